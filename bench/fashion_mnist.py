"""Benchmark data: Fashion-MNIST (Debian package dataset-fashion-mnist) as PNG folders.

    apt-get install dataset-fashion-mnist
    python bench/fashion_mnist.py data/fashion_mnist --train-per-class 200

writes <out>/train/<class>/*.png (the first images of each class in the official
training file, after --skip), <out>/val/ (the next ones, --val-per-class; none with
0) and <out>/test/ (the first of the official test file, after --skip), so the
real-data examples in the README run on a small, real dataset unlike ImageNet (28x28
grayscale clothing). --classes keeps some classes, e.g. the four tops that are hard
to tell apart: --classes tshirt_top pullover coat shirt.
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


def write_split(images, labels, folder: Path, first: int, count: int, classes) -> None:
    """Images `first` to `first + count` of each of `classes`, as PNGs."""
    for number, name in enumerate(CLASSES):
        if name not in classes or not count:
            continue
        target = folder / name
        target.mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(labels == number)[first : first + count]:
            Image.fromarray(images[i]).save(target / f"{i:05d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output", nargs="?", default="data/fashion_mnist")
    parser.add_argument("--train-per-class", type=int, default=200)
    parser.add_argument("--val-per-class", type=int, default=50)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument(
        "--skip",
        type=int,
        default=0,
        help="images of each class to leave out first (another draw of the same size)",
    )
    parser.add_argument("--classes", nargs="+", default=CLASSES, choices=CLASSES)
    args = parser.parse_args()
    if not SOURCE.is_dir():
        raise SystemExit("apt-get install dataset-fashion-mnist first")
    output = Path(args.output)
    skip = args.skip
    splits = [
        ("train", "train", skip, args.train_per_class),
        ("val", "train", skip + args.train_per_class, args.val_per_class),
        ("test", "t10k", skip, args.test_per_class),
    ]
    for split, prefix, first, count in splits:
        images = read_idx(SOURCE / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(SOURCE / f"{prefix}-labels-idx1-ubyte.gz")
        write_split(images, labels, output / split, first, count, args.classes)
    print(f"wrote {output}/train, val and test")


if __name__ == "__main__":
    main()
