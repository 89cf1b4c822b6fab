"""The private Keras API tl relies on (tl/_keras_compat.py), against the installed
Keras: if a release moves any of it, these tests fail first."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import SMALL

from tl import _keras_compat
from tl.backbones import build_backbone, get_backbone, sha256_of_file
from tl.errors import TLError

VGG16_NOTOP = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"


def test_imagenet_weights_are_recorded_and_hashed_where_keras_cached_them(
    monkeypatch, tmp_path
):
    """keras.applications ask for their file through the patched `get_file`: tl
    learns its name, its origin and the cached path, and hashes that file."""
    cached = tmp_path / "vgg16.weights.h5"
    keras.utils.set_random_seed(3)
    reference = keras.applications.VGG16(
        include_top=False, weights=None, input_shape=(SMALL, SMALL, 3)
    )
    reference.save_weights(cached)
    asked = []

    def cache_hit(fname=None, origin=None, *args, **kwargs):
        asked.append((fname, origin))
        return str(cached)

    monkeypatch.setattr(_keras_compat.keras_file_utils, "get_file", cache_hit)
    with _keras_compat.recorded_downloads() as calls:
        model, info = build_backbone(get_backbone("vgg16"), (SMALL, SMALL), "imagenet")
    assert [call["fname"] for call in calls] == [VGG16_NOTOP] == [a[0] for a in asked]
    assert calls[0]["origin"].startswith("https://")
    assert (info.source, info.path) == ("imagenet", str(cached))
    assert info.sha256 == sha256_of_file(cached)
    for a, b in zip(model.weights, reference.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert _keras_compat.keras_file_utils.get_file is cache_hit  # restored


def test_a_failed_download_names_the_file_and_keras_cache(monkeypatch):
    def offline(fname=None, origin=None, *args, **kwargs):
        raise Exception(f"URL fetch failure on {origin}: None -- name resolution")

    monkeypatch.setattr(_keras_compat.keras_file_utils, "get_file", offline)
    with pytest.raises(TLError) as error:
        build_backbone(get_backbone("vgg16"), (SMALL, SMALL), "imagenet")
    message = str(error.value)
    assert f"{_keras_compat.weights_cache()}/{VGG16_NOTOP}" in message
    assert f"--weights /path/to/{VGG16_NOTOP}" in message
    assert "https://" in message


def test_the_weights_cache_is_where_keras_puts_downloaded_weights(tmp_path):
    source = tmp_path / "probe.bin"
    source.write_bytes(b"tl")
    path = keras.utils.get_file(
        "tl_compat_probe.bin", origin=source.as_uri(), cache_subdir="models"
    )
    try:
        assert keras.utils.get_file is _keras_compat.keras_file_utils.get_file
        assert str(_keras_compat.weights_cache() / "tl_compat_probe.bin") == path
    finally:
        (_keras_compat.weights_cache() / "tl_compat_probe.bin").unlink()


def test_inbound_layer_names_follow_the_graph():
    pixels = keras.Input((4,), name="pixels")
    left = keras.layers.Dense(3, name="left")(pixels)
    right = keras.layers.Dense(3, name="right")(pixels)
    joined = keras.layers.Add(name="joined")([left, right])
    model = keras.Model(pixels, keras.layers.Dense(2, name="out")(joined))
    names = _keras_compat.inbound_layer_names
    assert names(model.get_layer("joined")) == ["left", "right"]
    assert names(model.get_layer("left")) == ["pixels"]
    assert names(model.get_layer("out")) == ["joined"]
