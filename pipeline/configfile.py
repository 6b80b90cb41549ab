"""YAML config files (experiment sweeps, retrain): read with a strict `yaml.SafeLoader`, and
their values typed into PrepConfig and TrainConfig fields, each problem a one-line error
naming file and key.
"""

from __future__ import annotations

import typing
from dataclasses import fields
from pathlib import Path

import yaml

from pipeline.config import CHOICES, RANGES, PrepConfig, TrainConfig, check_range
from pipeline.errors import PATH_MAX, PipelineError, first_line, quote
from pipeline.steps import validate_prep

TRAIN_KEYS = tuple(f.name for f in fields(TrainConfig) if f.name != "data")
PREP_KEYS = tuple(f.name for f in fields(PrepConfig))
MAX_FILE_BYTES = 1 << 20  # config files are a few KiB: a bigger one is the wrong file
# Values a document may hold once its aliases are expanded. A few hundred bytes of nested
# aliases ("billion laughs") stand for billions of values, and anything that walks them
# (printing one, say) takes as long as if they had been written out.
MAX_VALUES = 100_000
_MERGE = "tag:yaml.org,2002:merge"


class FileErrors:
    """Builds the one-line errors, each starting with the file name."""

    def __init__(self, path: Path | str) -> None:
        self.path = path

    def __call__(self, message: str) -> PipelineError:
        return PipelineError(f"{self.path}: {message}")

    def unknown_keys(self, mapping: dict, valid: tuple[str, ...], where: str) -> None:
        for key in mapping:
            if key not in valid:
                raise self(f"unknown key {quote(key)} in {where}; valid keys: {', '.join(valid)}")


class StrictLoader(yaml.SafeLoader):
    """`yaml.safe_load`'s loader, with its safe constructors only, stricter in two ways.

    A key given twice in one mapping is an error (the YAML spec requires unique keys;
    PyYAML keeps the last one silently), and a document whose aliases expand to more than
    MAX_VALUES values, or contain themselves, is refused before any of it is built.
    """

    def construct_document(self, node: yaml.Node) -> object:
        _count_values(node, {}, set())
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict[object, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE:  # `<<: *base` then `key: value` overrides, by design
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                seen = first.setdefault(key, key_node)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if seen is not key_node:
                raise yaml.constructor.ConstructorError(
                    problem=f"key {quote(key)} is given twice (first at line "
                    f"{seen.start_mark.line + 1})",
                    problem_mark=key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


def _count_values(node: yaml.Node, counted: dict[int, int], open_: set[int]) -> int:
    """How many values `node` stands for with its aliases expanded (each node once)."""
    if id(node) in counted:
        return counted[id(node)]
    if id(node) in open_:
        raise yaml.constructor.ConstructorError(
            problem="an alias refers to a value that contains it", problem_mark=node.start_mark
        )
    open_.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        n = 1 + sum(_count_values(child, counted, open_) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        n = 1 + sum(
            _count_values(k, counted, open_) + _count_values(v, counted, open_)
            for k, v in node.value
        )
    else:
        n = 1
    if n > MAX_VALUES:
        raise yaml.constructor.ConstructorError(
            problem=f"its aliases expand to over {MAX_VALUES} values; write the values out",
            problem_mark=node.start_mark,
        )
    open_.discard(id(node))
    counted[id(node)] = n
    return n


def read_yaml(path: Path, what: str) -> tuple[str, object]:
    """The text of `path` and what it parses to; `what` names the file in errors.

    Raises a one-line PipelineError for a missing or unreadable file, one over
    MAX_FILE_BYTES, text that is not UTF-8 or not valid YAML (a duplicate key and an alias
    bomb included, see StrictLoader).
    """
    shown = quote(str(path), PATH_MAX)
    try:
        if not path.exists():
            raise PipelineError(f"{what} {shown} does not exist")
        if not path.is_file():
            raise PipelineError(f"{what} {shown} is not a file")
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise PipelineError(f"{what} {shown} cannot be read: {first_line(exc)}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise PipelineError(
            f"{path}: over {MAX_FILE_BYTES // 1024} KiB; expected a few KiB of YAML text"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PipelineError(
            f"{path}: not UTF-8 text (byte {raw[exc.start]:#04x} at offset {exc.start}); "
            f"the {what} must be YAML text"
        ) from None
    try:
        return text, yaml.load(text, Loader=StrictLoader)  # a SafeLoader: no Python objects
    except yaml.reader.ReaderError as exc:  # a character YAML text may not hold
        raise PipelineError(
            f"{path}: not valid YAML text: character #x{exc.character:04x} at offset "
            f"{exc.position}: {exc.reason}"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise PipelineError(f"{path}: not valid YAML{where}: {problem[:200]}") from None
    except RecursionError:
        raise PipelineError(f"{path}: not valid YAML: nested too deeply") from None
    except ValueError as exc:  # a constructor's: an int over Python's digit limit, a bad date
        reason = first_line(exc).split(";")[0][:200]  # not Python's advice on sys settings
        raise PipelineError(f"{path}: not valid YAML: {reason}") from None


def mapping(err: FileErrors, value: object, where: str) -> dict:
    """A section that must be a mapping; absent or empty is `{}`."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise err(f"key {where!r} must be a mapping of parameter: value")
    return value


def prep_config(err: FileErrors, value: object, where: str) -> PrepConfig:
    """A PrepConfig from the section `where`, defaults for missing keys."""
    section = mapping(err, value, where)
    err.unknown_keys(section, PREP_KEYS, where)
    hints = typing.get_type_hints(PrepConfig)
    cfg = PrepConfig(
        **{k: field_value(err, f"{where}.{k}", k, v, hints[k]) for k, v in section.items()}
    )
    try:
        validate_prep(cfg)
    except PipelineError as exc:
        raise err(f"{where}.{exc}") from None
    return cfg


def train_values(err: FileErrors, section: dict, where: str) -> dict[str, object]:
    """TrainConfig values from one mapping, each checked for name, type, choice and range."""
    err.unknown_keys(section, TRAIN_KEYS, where)
    return {k: train_value(err, f"{where}.{k}", k, v) for k, v in section.items()}


def train_value(err: FileErrors, where: str, key: str, value: object) -> object:
    return field_value(err, where, key, value, typing.get_type_hints(TrainConfig)[key])


def field_value(err: FileErrors, where: str, key: str, value: object, kind: object) -> object:
    """`value` for the field `key` of type `kind`: converted, and in CHOICES or RANGES."""
    value = convert(err, where, value, kind)
    if key in CHOICES and value not in CHOICES[key]:
        choices = ", ".join(map(str, CHOICES[key]))
        raise err(f"{where} {quote(value)} is invalid; valid choices: {choices}")
    if key in RANGES:
        try:
            check_range(key, value, where)
        except PipelineError as exc:
            raise err(str(exc)) from None
    return value


def convert(err: FileErrors, where: str, value: object, kind: object) -> object:
    """`value` as the dataclass field type `kind`; YAML's text-looking numbers are accepted."""
    optional = kind == (float | None)
    if optional and (value is None or (isinstance(value, str) and value.lower() == "auto")):
        return None
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise err(f"{where} must be true or false, got {quote(value)}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise err(f"{where} must be an integer, got {quote(value)}")
    if kind is float or optional:
        # PyYAML reads `1e-3` (no dot) as text, so numeric text is taken as the number it is.
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                return float(value)
            except (ValueError, OverflowError):
                pass
        extra = " or 'auto'" if optional else ""
        raise err(f"{where} must be a number{extra}, got {quote(value)}")
    if isinstance(value, str):
        return value
    raise err(f"{where} must be a string, got {quote(value)}")


CHECKPOINT_KEYS = ("resume", "checkpoint_every")
RESUME_CHOICES = ("auto", "never")


def checkpoint_config(err: FileErrors, doc: dict):
    """The file's `resume` (auto: a train run with the same params, data and code that did
    not finish is resumed from its checkpoint; never: always a new run; default auto) and
    `checkpoint_every` (as `pipeline train --checkpoint-every`) as a CheckpointConfig."""
    from pipeline.checkpointing import DEFAULT_EVERY, CheckpointConfig, parse_every

    resume = doc.get("resume", "auto")
    if resume not in RESUME_CHOICES:
        raise err(f"resume {quote(resume)} is invalid; valid choices: {', '.join(RESUME_CHOICES)}")
    every = doc.get("checkpoint_every", DEFAULT_EVERY)
    if not isinstance(every, (str, int)) or isinstance(every, bool):
        raise err(f"checkpoint_every must be text such as 'epoch,60s', got {quote(every)}")
    try:
        parse_every(str(every))
    except PipelineError as exc:
        raise err(str(exc)) from None
    return CheckpointConfig(every=str(every), resume=None if resume == "never" else "auto")
