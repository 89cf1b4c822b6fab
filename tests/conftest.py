"""Shared fixtures: tiny image trees written into tmp folders, small random-weight nets.

TensorFlow is imported once per pytest process; every model is built with
`weights=none` at a small input size so the suite runs offline in minutes.
"""

from __future__ import annotations

import hashlib
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SMALL = 32  # input side for tests: every keras.applications net accepts 32 or more


def write_png_tree(root: Path, counts: dict[str, int], size=(SMALL, SMALL), seed=0):
    """Random RGB PNGs (lossless, so tests can recompute the exact pixels)."""
    rng = np.random.default_rng(seed)
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"img_{i:03d}.png")
    return root


@pytest.fixture
def png_tree(tmp_path):
    """Three classes of 32x32 PNGs: 5 + 4 + 6 images."""
    return write_png_tree(tmp_path / "images", {"ant": 5, "bee": 4, "cat": 6})


def load_pngs(root: Path, relative_paths: list[str]) -> np.ndarray:
    """The exact pixels of PNG files, float32, for independent computations."""
    return np.stack(
        [
            np.asarray(Image.open(root / p).convert("RGB"), np.float32)
            for p in relative_paths
        ]
    )


def settings(**overrides):
    """Extraction settings for a tiny random-weight VGG16 (fast to build and run)."""
    from tl.features import ExtractionSettings

    base = dict(
        backbone="vgg16",
        weights="none",
        image_size=SMALL,
        layers=("block2", "block3", "block5"),
        pooling="avg",
    )
    return ExtractionSettings.create(**{**base, **overrides})


def store_settings(**overrides) -> dict:
    """The settings a store of `settings(**overrides)` records."""
    return {**settings(**overrides).to_json(), "weights_sha256": None}


def write_store(path, layers, labels, class_names, settings=None, complete=True):
    """A feature store holding the given codes (a dict layer -> (N, D) array)."""
    from tl.store import StoreWriter

    labels = np.asarray(labels)
    n = len(labels)
    infos = [
        {
            "key": key,
            "requested": key,
            "layer": key,
            "raw_shape": [1, 1, x.shape[1]],
            "stride": 2 ** (i + 3),
            "depth": i,
            "pooling": "avg",
            "shape": list(x.shape[1:]),
            "dtype": "float32",
        }
        for i, (key, x) in enumerate(layers.items())
    ]
    writer = StoreWriter.create(
        path,
        settings=settings or store_settings(),
        provenance={},
        layers=infos,
        class_names=class_names,
        num_images=n,
        index_sha256="test",
    )
    with writer:
        writer.write_batch(
            {key: np.asarray(x, np.float32) for key, x in layers.items()},
            np.arange(n),
            labels,
            [f"img_{i:04d}.png" for i in range(n)],
            [],
            n,
        )
        if complete:
            writer.finish()
    return path


def assert_same_store(expected_path, got_path):
    """Two stores hold the same extraction: rows in the same order, the same skipped
    and ignored files, and the same codes (to float32 rounding)."""
    from tl.store import FeatureStore

    with FeatureStore(expected_path) as expected, FeatureStore(got_path) as got:
        assert got.paths == expected.paths
        assert got.labels.tolist() == expected.labels.tolist()
        assert got.positions.tolist() == expected.positions.tolist()
        assert got.skipped == expected.skipped
        assert got.ignored == expected.ignored
        assert got.class_names == expected.class_names
        assert got.num_images == expected.num_images
        assert got.layers == expected.layers
        for layer in expected.layers:
            np.testing.assert_allclose(
                got.read(layer), expected.read(layer), rtol=1e-5, atol=1e-6
            )


def blobs(n_per_class=60, classes=3, dim=12, separation=4.0, seed=0):
    """Gaussian blobs: separable codes and their labels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * separation
    labels = np.repeat(np.arange(classes), n_per_class)
    codes = centres[labels] + rng.normal(size=(len(labels), dim))
    return codes, labels


def assert_one_line_error(capsys, code: int, *fragments: str) -> str:
    """A user error from a script's `main([...])`: exit code 2 and exactly one line on
    stderr, `error: ...`, naming every fragment, with no traceback. Returns the line."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# Damaging model folders as a user, a disk or an attacker would


def edit_json(folder: Path, change, name: str = "metadata.json") -> None:
    """Apply `change(metadata)` to a model folder's metadata.json."""
    path = folder / name
    metadata = json.loads(path.read_text())
    change(metadata)
    path.write_text(json.dumps(metadata))


def record_sha256(folder: Path, name: str) -> None:
    """Record a replaced file's new SHA-256 in metadata.json, as someone replacing it
    on purpose would."""
    digest = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    edit_json(folder, lambda metadata: metadata["files"].update({name: digest}))


def truncate(path: Path) -> None:
    """Keep the first half of a file, as an interrupted copy would."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
