"""A generated example dataset: coloured shapes on textured backgrounds.

Used by `make demo` (the machine may have no internet, so no dataset is downloaded),
by the tests and by the benchmarks (realistic JPEG sizes such as 500x375). Classes
differ in shape, not colour or size, so a classifier has to use spatial structure.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle", "star")


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list:
    if kind == "square":
        corners = 4
        radii = [r] * corners
    elif kind == "triangle":
        corners = 3
        radii = [r] * corners
    else:  # star
        corners = 10
        radii = [r if i % 2 == 0 else r * 0.45 for i in range(corners)]
    angles = angle + np.arange(corners) * 2 * np.pi / corners
    return [
        (cx + q * np.cos(a), cy + q * np.sin(a))
        for q, a in zip(radii, angles, strict=True)
    ]


def shape_image(
    kind: str, size: tuple[int, int], rng: np.random.Generator
) -> Image.Image:
    """One RGB image (height, width) = `size` showing a shape of `kind`."""
    height, width = size
    low = rng.integers(0, 160, 3)
    noise = rng.normal(0, 1, (height // 8 + 1, width // 8 + 1, 3))
    background = Image.fromarray(
        np.clip(low + 40 * noise, 0, 255).astype(np.uint8)
    ).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(background)
    side = min(height, width)
    r = side * rng.uniform(0.18, 0.35)
    cx = rng.uniform(r, width - r)
    cy = rng.uniform(r, height - r)
    colour = tuple(int(c) for c in rng.integers(90, 256, 3))
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        draw.polygon(_polygon(kind, cx, cy, r, rng.uniform(0, 2 * np.pi)), fill=colour)
    return background.filter(ImageFilter.GaussianBlur(side / 400))


def make_shapes_dataset(
    root: str | Path,
    per_class: int = 30,
    size: tuple[int, int] = (375, 500),
    classes: tuple[str, ...] = SHAPES,
    seed: int = 0,
    quality: int = 90,
) -> Path:
    """Write `per_class` JPEGs for each class into `root/<class>/`; returns `root`."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for kind in classes:
        folder = root / kind
        folder.mkdir(parents=True, exist_ok=True)
        for number in range(per_class):
            image = shape_image(kind, size, rng)
            image.save(folder / f"{kind}_{number:04d}.jpg", quality=quality)
    return root
