"""Values people give: ranges (config.RANGES) on every entry, YAML that is not what it seems,
and what MLflow would refuse, each refused in one line before any run exists."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from pipeline import config
from pipeline.cli import cli
from pipeline.config import RANGES, SEED_MAX, PrepConfig, TrainConfig
from pipeline.errors import PipelineError, quote
from pipeline.experiments import load_experiment
from pipeline.retrain import load_config
from pipeline.steps import validate_prep, validate_train

from .conftest import ROOT, assert_one_line_error, run_cli

PREP_FIELDS = ("val_fraction", "test_fraction", "split_seed", "image_size")
# (field, value as YAML, value on the command line, what the message says); each bad value
# on every entry: CLI, experiment file (base, grid, runs), retrain.yaml, Python API.
BAD = [
    ("lr", ".nan", "nan", "lr must be a finite number > 0, got nan"),
    ("lr", ".inf", "inf", "lr must be a finite number > 0, got inf"),
    ("lr", "-.inf", "-inf", "lr must be a finite number > 0, got -inf"),
    ("lr", "0", "0", "lr must be > 0, got 0"),
    ("lr", "1e400", "1e400", "lr must be a finite number > 0, got inf"),
    ("momentum", ".nan", "nan", "momentum must be a finite number >= 0, got nan"),
    ("momentum", "-0.5", "-0.5", "momentum must be >= 0, got -0.5"),
    ("weight_decay", ".inf", "inf", "weight_decay must be a finite number >= 0, got inf"),
    ("weight_decay", "-1", "-1", "weight_decay must be >= 0, got -1"),
    ("label_smoothing", ".nan", "nan", "label_smoothing must be a finite number in [0, 1)"),
    ("label_smoothing", "5", "5", "label_smoothing must be in [0, 1), got 5"),
    ("label_smoothing", "1", "1", "label_smoothing must be in [0, 1), got 1"),
    ("warmup_steps", "-1", "-1", "warmup_steps must be >= 0, got -1"),
    ("step_size", "0", "0", "step_size must be >= 1, got 0"),
    ("gamma", "0", "0", "gamma must be in (0, 1], got 0"),
    ("gamma", "1.5", "1.5", "gamma must be in (0, 1], got 1.5"),
    ("gamma", ".nan", "nan", "gamma must be a finite number in (0, 1]"),
    ("eta_min_fraction", "2", "2", "eta_min_fraction must be between 0 and 1, got 2"),
    ("pct_start", "1", "1", "pct_start must be between 0 and 1 (exclusive), got 1"),
    ("epochs", "0", "0", "epochs must be >= 1, got 0"),
    ("batch_size", "-3", "-3", "batch_size must be >= 1, got -3"),
    ("log_every", "0", "0", "log_every must be >= 1, got 0"),
    ("print_every", "-1", "-1", "print_every must be >= 0, got -1"),
    ("seed", "9999999999999999999999999", "9999999999999999999999999",
     "seed must be between 0 and 18446744073709551615, got 9999999999999999999999999"),
    ("seed", "-1", "-1", "seed must be between 0 and 18446744073709551615, got -1"),
    ("seed", "18446744073709551616", "18446744073709551616", "seed must be between 0 and"),
    ("seed", "1" + "0" * 400, "1" + "0" * 400, "seed must be between 0 and 1844"),
    ("val_fraction", ".nan", "nan", "val_fraction must be a finite number between 0 and 1"),
    ("val_fraction", "0", "0", "val_fraction must be between 0 and 1 (exclusive), got 0"),
    ("test_fraction", "1", "1", "test_fraction must be between 0 and 1 (exclusive), got 1"),
    ("test_fraction", "-.inf", "-inf", "test_fraction must be a finite number between 0 and 1"),
    ("split_seed", "-1", "-1", "split_seed must be between 0 and 18446744073709551615"),
    ("split_seed", "1e30", None, "split_seed must be an integer, got '1e30'"),
    ("image_size", "11", "11", "image_size must be between 12 and 1024, got 11"),
    ("image_size", "1025", "1025", "image_size must be between 12 and 1024, got 1025"),
]  # fmt: skip
TRAIN_BAD = [b for b in BAD if b[0] not in PREP_FIELDS]
CLI_BAD = [b for b in BAD if b[2] is not None]  # click reads 1e30 as no integer: its message
PREP_BAD = [b for b in BAD if b[0] in PREP_FIELDS]


def _ids(cases: list[tuple]) -> list[str]:
    return [f"{c[0]}={(c[2] or c[1])[:24]}" for c in cases]


NEEDS = {
    "momentum": {"optimizer": "momentum"},
    "step_size": {"scheduler": "step"},
    "gamma": {"scheduler": "step"},
    "eta_min_fraction": {"scheduler": "cosine"},
    "pct_start": {"scheduler": "onecycle"},
}


def _needs(field: str) -> dict[str, str]:
    """What makes `field` apply at all: momentum needs an optimizer that takes one, a
    schedule's parameter its schedule."""
    return NEEDS.get(field, {})


def _write(tmp_path: Path, text: str | bytes, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def _error(load, path: Path) -> str:
    with pytest.raises(PipelineError) as info:
        load(path)
    message = str(info.value)
    assert message.startswith(f"{path}:"), message
    assert "\n" not in message, message
    return message


def assert_no_runs(uri: str) -> None:
    """Nothing was created in the store: no run in any experiment, no experiment but Default.
    No store file at all says the same, without the seconds MLflow takes to create one."""
    if not Path(uri.removeprefix("sqlite:///")).exists():
        return
    client = MlflowClient(uri)
    experiments = client.search_experiments()
    assert [e.name for e in experiments] == ["Default"]
    assert client.search_runs([e.experiment_id for e in experiments]) == []


# --- 1. ranges: the same on every entry -------------------------------------------------


@pytest.mark.parametrize("field, yaml_value, _cli, needle", TRAIN_BAD, ids=_ids(TRAIN_BAD))
def test_bad_train_value_is_refused_in_experiment_files(tmp_path, field, yaml_value, _cli, needle):
    extra = "".join(f", {k}: {v}" for k, v in _needs(field).items())
    for where, text in {
        "base": f"base: {{{field}: {yaml_value}{extra}}}\ngrid: {{loss: [cross_entropy]}}",
        "grid": f"base: {{epochs: 1{extra}}}\ngrid: {{{field}: [{yaml_value}]}}",
        "runs[1]": f"runs: [{{epochs: 1{extra}}}, {{{field}: {yaml_value}{extra}}}]",
    }.items():
        path = _write(tmp_path, f"experiment: x\n{text}\n")
        message = _error(load_experiment, path)
        assert f"{path}: {where}.{needle}" in message


@pytest.mark.parametrize("field, yaml_value, _cli, needle", PREP_BAD, ids=_ids(PREP_BAD))
def test_bad_prep_value_is_refused_in_experiment_files(tmp_path, field, yaml_value, _cli, needle):
    text = f"experiment: x\ndata: {{{field}: {yaml_value}}}\ngrid: {{epochs: [1]}}"
    path = _write(tmp_path, text)
    assert f"{path}: data.{needle}" in _error(load_experiment, path)


@pytest.mark.parametrize("field, yaml_value, _cli, needle", BAD, ids=_ids(BAD))
def test_bad_value_is_refused_in_retrain_yaml(tmp_path, field, yaml_value, _cli, needle):
    section = "prep" if field in PREP_FIELDS else "train"
    body = {field: yaml.safe_load(yaml_value)} | _needs(field)
    path = _write(tmp_path, yaml.safe_dump({section: body}), "retrain.yaml")
    if isinstance(body[field], str):  # YAML reads 1e30 as text; write it as the user would
        path.write_text(f"{section}:\n  {field}: {yaml_value}\n")
    assert f"{path}: {section}.{needle}" in _error(load_config, path)


@pytest.mark.parametrize("field, _yaml, cli_value, needle", CLI_BAD, ids=_ids(CLI_BAD))
def test_bad_value_is_refused_on_the_command_line(field, _yaml, cli_value, needle):
    """`prep`, `train` and `main` share the option types built from config.RANGES."""
    option = f"--{field.replace('_', '-')}"
    extra = [a for k, v in _needs(field).items() for a in (f"--{k}", v)]
    commands = ["prep", "main"] if field in PREP_FIELDS else ["train", "main"]
    for command in commands:
        data = ["--data", "x.pt"] if command == "train" else []
        result = CliRunner().invoke(cli, [command, *data, *extra, option, cli_value])
        assert result.exit_code == 2, result.output
        assert f"Invalid value for '{option}'" in result.output
        assert cli_value in result.output


@pytest.mark.parametrize("field, yaml_value, _cli, needle", BAD, ids=_ids(BAD))
def test_bad_value_is_refused_by_the_python_api(field, yaml_value, _cli, needle):
    value = yaml.safe_load(yaml_value)
    if isinstance(value, str):  # YAML's 1e30 is text; as a float it is no integer either
        value = float(value)
    if field in PREP_FIELDS:
        with pytest.raises(PipelineError, match=r"^" + field):
            validate_prep(replace(PrepConfig(), **{field: value}))
    else:
        cfg = replace(TrainConfig(data="x.pt"), **{field: value} | _needs(field))
        with pytest.raises(PipelineError) as info:
            validate_train(cfg)
        assert needle in str(info.value)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--lr", "nan"], "Invalid value for '--lr': 'nan' must be 'auto' or a finite number > 0"),
        (["--lr", "inf"], "Invalid value for '--lr': 'inf' must be 'auto' or a finite number > 0"),
        (["--optimizer", "momentum", "--momentum", "nan"],
         "Invalid value for '--momentum': 'nan' must be 'auto' or a finite number >= 0"),
        (["--label-smoothing", "nan"],
         "Invalid value for '--label-smoothing': 'nan' must be a finite number in [0, 1)"),
        (["--seed", "9999999999999999999999999"],
         "Invalid value for '--seed': 9999999999999999999999999 is not in the range "
         "0<=x<=18446744073709551615"),
        (["--optimizer", "nesterov", "--momentum", "0"],
         "optimizer 'nesterov' needs momentum > 0, got 0.0"),
    ],
)  # fmt: skip
def test_issue_examples_on_the_cli_fail_in_one_line_before_a_run(
    tracking, tmp_path, sample_file, args, needle
):
    proc = run_cli("train", "--data", str(sample_file), "--epochs", "1", *args, cwd=tmp_path)
    assert_one_line_error(proc, needle)
    assert_no_runs(tracking)


def test_issue_example_nan_grid_and_label_smoothing_in_a_sweep_file(tracking, tmp_path):
    nan_grid = _write(tmp_path, "experiment: x\ngrid: {lr: [.nan, .inf, 0.001]}\n", "nan.yaml")
    proc = run_cli("sweep", str(nan_grid), cwd=tmp_path)
    assert_one_line_error(proc, f"{nan_grid}: grid.lr must be a finite number > 0, got nan")
    smoothing = _write(
        tmp_path, "experiment: x\nbase: {label_smoothing: 5}\ngrid: {optimizer: [adam]}\n"
    )
    proc = run_cli("sweep", str(smoothing), "--dry-run", cwd=tmp_path)
    assert_one_line_error(proc, f"{smoothing}: base.label_smoothing must be in [0, 1), got 5")
    assert_no_runs(tracking)


def test_seeds_list_takes_the_seed_range(tmp_path):
    for seeds, needle in [
        ("[1, -1]", "seeds must be between 0 and 18446744073709551615, got -1"),
        ("[1, 18446744073709551616]", "seeds must be between 0 and 18446744073709551615"),
        ("[.nan]", "seeds must be integers, got nan"),
    ]:
        path = _write(tmp_path, f"experiment: x\ngrid: {{epochs: [1]}}\nseeds: {seeds}\n")
        assert needle in _error(load_experiment, path)
    path = _write(tmp_path, f"experiment: x\ngrid: {{epochs: [1]}}\nseeds: [0, {SEED_MAX}]\n")
    assert [t.config.seed for t in load_experiment(path).trials] == [0, SEED_MAX]


def test_seed_range_is_what_torch_takes_with_one_spelling_per_seed():
    """[0, 2**64 - 1]: torch takes [-2**63, 2**64 - 1], and a negative seed is another
    spelling of a large one, so negatives are refused."""
    for seed in (0, SEED_MAX):
        torch.manual_seed(seed)
        assert torch.Generator().manual_seed(seed).initial_seed() == seed
    for seed in (SEED_MAX + 1, -(2**63) - 1):
        with pytest.raises((RuntimeError, ValueError)):
            torch.Generator().manual_seed(seed)
    same = [torch.randperm(8, generator=torch.Generator().manual_seed(s)) for s in (-1, SEED_MAX)]
    assert torch.equal(*same)
    validate_train(TrainConfig(data="x.pt", seed=SEED_MAX))
    validate_prep(PrepConfig(split_seed=SEED_MAX))


def test_edges_of_each_range_are_accepted():
    cfg = TrainConfig(data="x.pt", lr=1e-300, weight_decay=0.0, label_smoothing=0.999999)
    validate_train(replace(cfg, optimizer="momentum", momentum=0.0))
    validate_train(replace(cfg, print_every=0, epochs=1, batch_size=1, log_every=1))
    validate_prep(PrepConfig(val_fraction=1e-9, test_fraction=1 - 1e-9, split_seed=0))
    assert 0.5 in RANGES["val_fraction"] and math.nan not in RANGES["val_fraction"]


def test_readme_parameters_table_states_each_range():
    readme = (ROOT / "README.md").read_text()
    rows = {
        line.split("|")[1].strip(" `"): line
        for line in readme.splitlines()
        if line.startswith("| `")
    }
    for field, rng in RANGES.items():
        assert str(rng) in rows[field], (field, str(rng), rows[field])


@pytest.mark.slow
def test_mlproject_passes_bad_values_to_the_same_check(tracking, tmp_path, sample_file):
    """MLproject types lr as a string and seed as an int: `mlflow run` passes nan and a
    25-digit seed through, and the CLI refuses them in one line before training."""
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    for param, needle in [
        ("lr=nan", "Invalid value for '--lr': 'nan' must be 'auto' or a finite number > 0"),
        ("seed=9999999999999999999999999", "Invalid value for '--seed'"),
    ]:
        proc = subprocess.run(
            ["mlflow", "run", str(ROOT), "--env-manager", "local", "-e", "train",
             f"-Pdata={sample_file}", "-Pepochs=1", f"-P{param}"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode != 0
        errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and needle in errors[0], proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        for run in MlflowClient(tracking).search_runs(["0"]):  # the one `mlflow run` made
            assert "train/loss" not in run.data.metrics


# --- 3. YAML files are input from people ------------------------------------------------


def _bomb(levels: int, top: str = "grid: {optimizer: *a%d}") -> str:
    """The "billion laughs": each level an alias list of nine of the level below."""
    lines = ["experiment: x", 'a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n" + top % levels + "\n"


def test_alias_bomb_is_one_short_line_on_a_dry_run(tracking, tmp_path):
    """The issue's example: a few hundred bytes printed 28 MB because the error repeated the
    value; now the file is refused by the loader before it is built."""
    path = _write(tmp_path, _bomb(8))
    assert path.stat().st_size < 500
    proc = run_cli("sweep", str(path), "--dry-run", cwd=tmp_path, timeout=60)
    assert_one_line_error(proc, f"{path}: not valid YAML at line")
    assert "aliases expand to over 100000 values" in proc.stderr
    assert len(proc.stderr) < 500 and len(proc.stdout) < 500
    assert_no_runs(tracking)


def test_alias_bomb_is_refused_in_retrain_yaml(tmp_path):
    path = _write(tmp_path, _bomb(8, "train: {optimizer: *a%d}").replace("experiment: x\n", ""))
    assert "aliases expand to over 100000 values" in _error(load_config, path)


def _nested(levels: int) -> str:
    """The same bomb as one flow value: each level's anchor defined in its first element."""
    value = '&a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]'
    for i in range(1, levels + 1):
        value = f"&a{i} [{value}, " + ", ".join([f"*a{i - 1}"] * 8) + "]"
    return value


@pytest.mark.parametrize(
    "top, needle",
    [
        ("grid: {optimizer: %s}", "grid.optimizer must be a string, got [["),
        ("metric: %s\ngrid: {epochs: [1]}", "metric [["),
        ("grid: %s", "key 'grid' must be a mapping of parameter: [values, ...], got [["),
        ("grid: {epochs: [1]}\nseeds: %s", "seeds must be integers, got [["),
    ],
)
def test_errors_quote_a_bounded_part_of_a_large_value(tmp_path, top, needle):
    """4 levels (6561 strings) load; the error shows a few of them, not all."""
    path = _write(tmp_path, "experiment: x\n" + top % _nested(4) + "\n")
    message = _error(load_experiment, path)
    assert needle in message
    assert len(message) < 400, len(message)


def test_quote_is_bounded_whatever_the_value():
    nested: list = ["lol"]
    for _ in range(30):
        nested = [nested] * 9  # 9**30 values, one list object per level
    for value in (nested, "x" * 10**6, 10**5000, {"k" * 1000: ["v"] * 1000}, b"\x00" * 10**5):
        assert len(quote(value)) <= 100
    assert quote("nan") == "'nan'" and quote(0.5) == "0.5"


@pytest.mark.parametrize("load", [load_experiment, load_config], ids=["experiment", "retrain"])
def test_a_key_given_twice_is_an_error_naming_key_and_line(tmp_path, load):
    top = "experiment: fz\n" if load is load_experiment else ""
    section = "grid" if load is load_experiment else "train"
    text = f"{top}{section}: {{optimizer: [adam]}}\nmetric: x\n{section}: {{optimizer: [sgd]}}\n"
    path = _write(tmp_path, text)
    line = text.count("\n", 0, text.rindex(section)) + 1
    first = 2 if top else 1
    message = _error(load, path)
    assert f"at line {line}: key '{section}' is given twice (first at line {first})" in message
    nested = _write(tmp_path, f"{top}{section}: {{epochs: 1, seed: 2, epochs: 3}}\n", "n.yaml")
    assert "key 'epochs' is given twice" in _error(load, nested)


def test_merge_keys_may_be_overridden_without_being_duplicates(tmp_path):
    path = _write(
        tmp_path,
        "experiment: x\nbase: &b {epochs: 1, lr: 0.1}\n"
        "runs:\n  - {<<: *b, optimizer: sgd, lr: 0.2}\n  - {<<: *b, optimizer: adam}\n",
    )
    trials = load_experiment(path).trials
    assert [(t.config.optimizer, t.config.lr) for t in trials] == [("sgd", 0.2), ("adam", 0.1)]


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"experiment: x\n\x00\x01\x02\x03", "not valid YAML text: character #x0000"),
        (bytes(range(256)) * 4, "not UTF-8 text (byte 0x80 at offset 128)"),
        ("experiment: café\ngrid: {epochs: [1]}\n".encode("latin-1"), "not UTF-8 text (byte 0xe9"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "not UTF-8 text"),
        ("a: &a [*a]\n", "an alias refers to a value that contains it"),
        ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
        ("a: " + "1" * 5000 + "\n", "Exceeds the limit (4300 digits) for integer string"),
        ("a: !!timestamp 2020-13-45\n", "not valid YAML: month must be in 1..12"),
        ("a: !!python/object/apply:os.system [ls]\n", "not valid YAML at line 1"),
        ("a: *nosuch\n", "not valid YAML at line 1: found undefined alias"),
        ("# " + "x" * (1 << 20) + "\n", "over 1024 KiB"),
    ],
    ids=["binary", "bytes", "latin-1", "png", "recursive", "deep", "long-int", "date", "python",
         "alias", "huge"],
)  # fmt: skip
@pytest.mark.parametrize("load", [load_experiment, load_config], ids=["experiment", "retrain"])
def test_what_is_not_yaml_text_is_one_line(tmp_path, load, content, needle):
    message = _error(load, _write(tmp_path, content))
    assert needle in message
    assert len(message) < 400


@pytest.mark.parametrize(
    "text, experiment_needle, retrain_needle",
    [
        ("42\n", "the file must be a mapping", "expected a mapping of keys, got int"),
        ("- a\n- b\n", "the file must be a mapping", "expected a mapping of keys, got list"),
        ("just text\n", "the file must be a mapping", "expected a mapping of keys, got str"),
        ("", "the file must be a mapping", None),  # an empty retrain.yaml: every default
    ],
)
def test_a_scalar_or_list_where_a_mapping_is_expected(tmp_path, text, experiment_needle,
                                                      retrain_needle):  # fmt: skip
    path = _write(tmp_path, text)
    assert experiment_needle in _error(load_experiment, path)
    if retrain_needle is None:
        assert load_config(path).model_name == "digits-classifier"
    else:
        assert retrain_needle in _error(load_config, path)


def test_a_folder_or_unreadable_file_is_one_line(tmp_path):
    with pytest.raises(PipelineError, match=r"^experiment file '.*' is not a file$"):
        load_experiment(tmp_path)
    path = _write(tmp_path, "experiment: x\n")
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):  # root reads anything
            pytest.skip("running as root: every file is readable")
        with pytest.raises(PipelineError, match="cannot be read: .*Permission denied"):
            load_experiment(path)
    finally:
        path.chmod(0o644)


def test_bad_yaml_on_the_cli_is_one_line_and_creates_nothing(tracking, tmp_path):
    dup = _write(tmp_path, "experiment: fz\ngrid: {optimizer: [adam]}\ngrid: {loss: [mse]}\n")
    proc = run_cli("sweep", str(dup), cwd=tmp_path)
    assert_one_line_error(proc, f"{dup}: not valid YAML at line 3: key 'grid' is given twice")
    utf16 = _write(tmp_path, "train: {epochs: 1}\n".encode("utf-16"), "retrain.yaml")
    proc = run_cli("retrain", "--config", str(utf16), cwd=tmp_path)
    assert_one_line_error(proc, f"{utf16}: not UTF-8 text (byte 0xff at offset 0)")
    assert_no_runs(tracking)


# --- 6. what MLflow would refuse, refused first -----------------------------------------


def test_limits_are_the_installed_mlflows():
    from mlflow.store.tracking.dbmodels.models import SqlExperiment, SqlRun
    from mlflow.utils import validation

    assert config.MAX_PARAM_VALUE == validation.MAX_PARAM_VAL_LENGTH
    assert config.MAX_TAG_VALUE == validation.MAX_TAG_VAL_LENGTH
    assert config.MAX_KEY == validation.MAX_ENTITY_KEY_LENGTH
    mlflow_limit = min(validation.MAX_EXPERIMENT_NAME_LENGTH, SqlExperiment.name.type.length)
    assert mlflow_limit == config.MAX_EXPERIMENT_NAME
    assert SqlRun.name.type.length == config.MAX_RUN_NAME
    for key in ("test/class_accuracy/T-shirt/top", "a b:c.d-e_f"):
        config.check_key("key", key)
        validation._validate_metric_name(key)
    for key in ("a//b", "../a", "/a", "a/", "a\nb", "a*b", "a\tb", "k" * 251):
        with pytest.raises(PipelineError):
            config.check_key("key", key)


def test_experiment_name_over_mlflows_limit_is_one_line(tracking, tmp_path):
    """The issue's example: 501 characters ended in a 43-line traceback."""
    path = _write(tmp_path, f"experiment: {'e' * 501}\ngrid: {{epochs: [1]}}\n")
    proc = run_cli("sweep", str(path), cwd=tmp_path)
    assert_one_line_error(proc, "is 501 characters; MLflow takes at most 256")
    assert len(proc.stderr) < 400
    assert_no_runs(tracking)


@pytest.mark.parametrize(
    "text, name, needle",
    [
        (f"experiment: {'e' * 257}\ngrid: {{epochs: [1]}}", "exp.yaml",
         "experiment 'eeee"),
        (f"experiment: x\ndescription: {'d' * 8001}\ngrid: {{epochs: [1]}}", "exp.yaml",
         "description 'dddd"),
        ("experiment: x\ngrid: {epochs: [1]}", "s" * 245 + ".yaml",
         "the parent run's name 'sweep-ssss"),
        (f"experiment: x\ngrid: {{epochs: [1, 1{'0' * 120}], batch_size: [1, 1{'0' * 120}]}}",
         "exp.yaml", "trial name 'adam-cross_entrop"),
        (f"experiment: x\ndata: {{data_dir: {'d' * 6001}}}\ngrid: {{epochs: [1]}}", "exp.yaml",
         "data.data_dir '"),
    ],
    ids=["experiment", "description", "parent-run-name", "trial-name", "data_dir"],
)  # fmt: skip
def test_values_mlflow_would_refuse_are_refused_in_experiment_files(tmp_path, text, name, needle):
    message = _error(load_experiment, _write(tmp_path, text, name))
    assert needle in message and "MLflow takes at most" in message
    assert len(message) < 400 + len(str(tmp_path)) + len(name)


def test_names_at_mlflows_limits_are_accepted(tmp_path):
    path = _write(tmp_path, f"experiment: {'e' * 256}\ndescription: {'d' * 8000}\n"
                            "grid: {epochs: [1]}\n", "s" * 244 + ".yaml")  # fmt: skip
    assert len(load_experiment(path).name) == 256


def test_data_reference_over_mlflows_param_limit_is_one_line(tracking, tmp_path):
    with pytest.raises(PipelineError, match="data 'xx.* is 6001 characters; MLflow takes"):
        validate_train(TrainConfig(data="x" * 6001))
    with pytest.raises(PipelineError, match="data_dir '.* MLflow takes at most 6000"):
        validate_prep(PrepConfig(data_dir="d" * 6000))
    proc = run_cli("train", "--data", "x" * 5000, cwd=tmp_path)
    assert_one_line_error(proc, "is not a usable path (")
    assert_no_runs(tracking)
