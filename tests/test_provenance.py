"""The identity of a set of codes: what changes its hash, what does not, and how two
identities are compared."""

from __future__ import annotations

import os
import shutil

import keras
import pytest
from conftest import SMALL, settings, write_png_tree

from tl.features import extract, load_extractor
from tl.images import index_images
from tl.provenance import identity_differences, layer_identity
from tl.store import FeatureStore


def random_vgg16_weights(path, seed: int):
    keras.utils.set_random_seed(seed)
    keras.applications.VGG16(
        include_top=False, weights=None, input_shape=(SMALL, SMALL, 3)
    ).save_weights(path)
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Four images, and two VGG16 weights files."""
    root = tmp_path_factory.mktemp("identity")
    images = write_png_tree(root / "images", {"ant": 2, "bee": 2})
    weights = random_vgg16_weights(root / "a.weights.h5", seed=1)
    other = random_vgg16_weights(root / "b.weights.h5", seed=2)
    return images, weights, other


def identity(images, **overrides) -> str:
    extractor = load_extractor(settings(**{"layers": ["block2"], **overrides}))
    return extractor.identity(index_images(images)).sha256


def test_each_input_that_determines_the_codes_changes_the_hash(inputs):
    images, weights, other = inputs
    reference = identity(images, weights=str(weights))
    changed = {
        "weights file": identity(images, weights=str(other)),
        "image size": identity(images, weights=str(weights), image_size=48),
        "layer": identity(images, weights=str(weights), layers=["block3"]),
        "pooling": identity(images, weights=str(weights), pooling="max"),
        "precision": identity(images, weights=str(weights), precision="bfloat16"),
        "resize": identity(images, weights=str(weights), resize="pad"),
        "dtype": identity(images, weights=str(weights), dtype="float16"),
    }
    assert reference not in changed.values()
    assert len(set(changed.values())) == len(changed)


def test_an_edited_image_changes_the_hash_by_its_size_or_its_mtime(inputs, tmp_path):
    images, weights, _ = inputs
    copy = shutil.copytree(images, tmp_path / "images")
    reference = identity(copy, weights=str(weights))
    path = copy / "bee" / "img_001.png"
    before = path.stat()
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    touched = identity(copy, weights=str(weights))
    with open(path, "ab") as handle:  # one more byte, the old modification time
        handle.write(b"\0")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    grown = identity(copy, weights=str(weights))
    assert len({reference, touched, grown}) == 3


def test_content_hashing_ignores_modification_times(inputs, tmp_path):
    images, weights, _ = inputs
    copy = shutil.copytree(images, tmp_path / "images")
    extractor = load_extractor(settings(layers=["block2"], weights=str(weights)))
    before = extractor.identity(index_images(copy), hash_content=True)
    path = copy / "ant" / "img_000.png"
    os.utime(path, ns=(0, path.stat().st_mtime_ns + 10**9))
    assert extractor.identity(index_images(copy), hash_content=True) == before
    path.write_bytes(path.read_bytes() + b"\0")
    assert extractor.identity(index_images(copy), hash_content=True) != before


def test_the_seed_counts_for_random_weights_only(inputs):
    images, weights, _ = inputs
    assert identity(images, weights="none", seed=0) != identity(
        images, weights="none", seed=1
    )
    assert identity(images, weights=str(weights), seed=0) == identity(
        images, weights=str(weights), seed=1
    )


def test_what_does_not_determine_the_codes_leaves_the_hash_alone(inputs, tmp_path):
    """Batch size, the progress bar, the output path, and where the weights file
    lies (same SHA-256) change nothing; the store records the same hash."""
    images, weights, _ = inputs
    moved = shutil.copy(weights, tmp_path / "elsewhere.weights.h5")
    reference = identity(images, weights=str(weights))
    assert identity(images, weights=str(moved)) == reference
    runs = [
        (tmp_path / "one.h5", weights, 2, False),
        (tmp_path / "deeper" / "two.h5", moved, 3, True),
    ]
    for output, weights_file, batch_size, progress in runs:
        extract(
            images,
            output,
            settings(layers=["block2"], weights=str(weights_file)),
            batch_size=batch_size,
            progress=progress,
        )
        with FeatureStore(output) as store:
            assert store.provenance["codes_identity"] == reference


def test_identity_differences_name_each_key_that_differs():
    ours = {"a": 1, "b": [1, 2], "precision": "float32"}
    theirs = {"a": 1, "b": [1, 3], "c": None, "precision": "bfloat16"}
    assert identity_differences(ours, theirs) == [
        "b: [1, 2] vs [1, 3]",
        "precision: 'float32' vs 'bfloat16'",
    ]
    assert identity_differences(
        ours, theirs, ignore=("precision",), names=("file has", "this run asks")
    ) == ["b: file has [1, 2], this run asks [1, 3]"]


def test_a_layer_is_the_same_whatever_path_its_weights_file_had():
    stored = settings(layers=["block5"]).to_json()
    info = {"layer": "block5_pool", "pooling": "avg"}
    a = {**stored, "weights": "/old/w.h5", "weights_sha256": "1" * 64}
    b = {**stored, "weights": "/new/w.h5", "weights_sha256": "1" * 64}
    assert identity_differences(layer_identity(a, info), layer_identity(b, info)) == []
    c = {**b, "weights_sha256": "2" * 64}
    assert identity_differences(layer_identity(a, info), layer_identity(c, info)) == [
        f"weights_sha256: {'1' * 64!r} vs {'2' * 64!r}"
    ]
    # a store written before a setting existed reads as that setting's default
    older = {key: value for key, value in a.items() if key != "antialias"}
    assert layer_identity(older, info) == layer_identity(a, info)
