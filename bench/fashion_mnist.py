"""Benchmark data: Fashion-MNIST (Debian package dataset-fashion-mnist) as PNG folders.

    apt-get install dataset-fashion-mnist
    python bench/fashion_mnist.py data/fashion_mnist --train-per-class 200

writes <out>/train/<class>/*.png and <out>/test/<class>/*.png (the first images of
each class in the official train and test files), so the real-data examples in the
README run on a small, real dataset unlike ImageNet (28x28 grayscale clothing).
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np
from PIL import Image

SOURCE = Path("/usr/share/datasets/fashion-mnist")
CLASSES = [
    "tshirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
]


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format): big-endian header, then uint8 data."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def write_split(images, labels, folder: Path, per_class: int) -> None:
    for number, name in enumerate(CLASSES):
        target = folder / name
        target.mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(labels == number)[:per_class]:
            Image.fromarray(images[i]).save(target / f"{i:05d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output", nargs="?", default="data/fashion_mnist")
    parser.add_argument("--train-per-class", type=int, default=200)
    parser.add_argument("--test-per-class", type=int, default=100)
    args = parser.parse_args()
    if not SOURCE.is_dir():
        raise SystemExit("apt-get install dataset-fashion-mnist first")
    output = Path(args.output)
    for split, prefix, count in (
        ("train", "train", args.train_per_class),
        ("test", "t10k", args.test_per_class),
    ):
        images = read_idx(SOURCE / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(SOURCE / f"{prefix}-labels-idx1-ubyte.gz")
        write_split(images, labels, output / split, count)
    print(f"wrote {output}/train and {output}/test")


if __name__ == "__main__":
    main()
