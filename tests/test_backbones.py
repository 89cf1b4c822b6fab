"""The backbone registry: families, preprocessing, taps, layer resolution, weights."""

from __future__ import annotations

import random
import threading
import time

import keras
import numpy as np
import pytest
from conftest import SMALL

from tl.backbones import (
    build_backbone,
    describe_layers,
    get_backbone,
    layer_taps,
    list_backbones,
    resolve_layers,
    sha256_of_file,
)
from tl.errors import TLError

ALL_FAMILIES = {
    "vgg16", "vgg19", "resnet50", "resnet101", "resnet152", "resnet50v2",
    "resnet101v2", "resnet152v2", "inceptionv3", "inceptionresnetv2", "xception",
    "mobilenet", "mobilenetv2", "mobilenetv3small", "mobilenetv3large", "densenet121",
    "densenet169", "densenet201", *(f"efficientnetb{i}" for i in range(8)),
    "efficientnetv2b0", "efficientnetv2b1", "efficientnetv2b2", "efficientnetv2b3",
    "efficientnetv2s", "efficientnetv2m", "efficientnetv2l", "convnexttiny",
    "convnextsmall", "convnextbase", "convnextlarge", "convnextxlarge", "nasnetmobile",
    "nasnetlarge",
}  # fmt: skip
MIN_SIDE = {"inception": 75, "inception_resnet": 75, "xception": 71}
# The smallest model of each family builds in every run; the others are slow
# (ConvNeXtXLarge, EfficientNetB7...) and run with `make test-all`.
SMALLEST = {
    "vgg16", "resnet50", "resnet50v2", "inceptionv3", "inceptionresnetv2",
    "xception", "mobilenet", "mobilenetv2", "mobilenetv3small", "densenet121",
    "efficientnetb0", "efficientnetv2b0", "convnexttiny", "nasnetmobile",
}  # fmt: skip


def reference_preprocess(pixels: np.ndarray, mode: str) -> np.ndarray:
    """The documented ImageNet preprocessing modes, written out in numpy."""
    if mode == "caffe":
        return pixels[..., ::-1] - np.array([103.939, 116.779, 123.68])
    if mode == "tf":
        return pixels / 127.5 - 1.0
    if mode == "torch":
        return (pixels / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    return pixels  # "none": the model rescales inside


def test_registry_covers_every_keras_applications_family():
    assert set(list_backbones()) == ALL_FAMILIES
    for name in list_backbones():
        spec = get_backbone(name)
        assert hasattr(keras.applications, spec.constructor)
    assert get_backbone("ResNet-50") is get_backbone("resnet50")
    assert get_backbone("efficientnetb7").default_size == 600
    assert get_backbone("inceptionv3").default_size == 299
    assert get_backbone("nasnetlarge").default_size == 331


@pytest.mark.parametrize(
    "name, mode",
    [("vgg16", "caffe"), ("resnet50", "caffe"), ("resnet50v2", "tf"),
     ("inceptionv3", "tf"), ("xception", "tf"), ("mobilenetv2", "tf"),
     ("densenet121", "torch"), ("efficientnetb0", "none"), ("efficientnetv2b0", "none"),
     ("convnexttiny", "none"), ("mobilenetv3small", "none"), ("nasnetmobile", "tf")],
)  # fmt: skip
def test_each_family_gets_its_own_preprocessing(name, mode):
    spec = get_backbone(name)
    assert spec.preprocessing == mode
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 4, 4, 3)).astype(np.float32)
    original = pixels.copy()
    got = np.asarray(spec.preprocess(pixels))
    np.testing.assert_allclose(
        got, reference_preprocess(original, mode), rtol=1e-5, atol=1e-4
    )
    np.testing.assert_array_equal(pixels, original)  # the input is not written over


def test_unknown_backbone_lists_known_names():
    with pytest.raises(TLError, match=r"Unknown backbone 'vgg61'.*vgg16.*resnet50"):
        get_backbone("vgg61")


def _build(name, size=None):
    spec = get_backbone(name)
    side = size or MIN_SIDE.get(spec.family, SMALL)
    model, _ = build_backbone(spec, (side, side), "none")
    return spec, model


def test_vgg_and_resnet_aliases_and_tap_metadata():
    spec, model = _build("vgg16", 64)
    taps = {tap.layer: tap for tap in layer_taps(model, spec)}
    assert "block3" in taps["block3_pool"].aliases
    assert taps["block3_pool"].shape == (8, 8, 256)
    assert taps["block3_pool"].stride == 8
    aliases = set(taps["block5_pool"].aliases)
    assert {"block5", "last"} <= aliases and "penultimate" not in aliases

    spec, model = _build("resnet50", 64)
    taps = layer_taps(model, spec)
    resolved = resolve_layers(
        taps, ["conv2", "conv3", "conv4", "conv5", "last"][:4], "resnet50"
    )
    assert [t.layer for t in resolved] == [
        "conv2_block3_out",
        "conv3_block4_out",
        "conv4_block6_out",
        "conv5_block3_out",
    ]
    assert [t.stride for t in resolved] == [4, 8, 16, 32]
    assert [t.shape[-1] for t in resolved] == [256, 512, 1024, 2048]


def test_stage_aliases_follow_stride_through_branches():
    spec, model = _build("inceptionv3", 299)
    stages = {a: t for t in layer_taps(model, spec) for a in t.aliases}
    # stages are the concatenations where every branch meets, not a branch layer
    assert stages["stage5"].layer == "mixed10"
    assert [stages[f"stage{i}"].stride for i in range(1, 6)] == [2, 4, 8, 16, 32]


def test_unknown_layer_lists_aliases_and_close_names():
    spec, model = _build("vgg16")
    taps = layer_taps(model, spec)
    with pytest.raises(TLError) as error:
        resolve_layers(taps, ["block3", "blok5_pool"], "vgg16")
    message = str(error.value)
    assert "Unknown layer 'blok5_pool' for vgg16" in message
    assert "block5_pool" in message and "block1" in message
    assert "--list-layers vgg16" in message
    with pytest.raises(TLError, match="already requested"):
        resolve_layers(taps, ["block3", "block3_pool"], "vgg16")


def test_describe_layers_lists_aliases_and_every_layer():
    text = describe_layers("resnet50", (64, 64))
    assert "conv4_block6_out" in text and "conv2_block1_1_conv" in text
    assert "conv5, stage5, last" in text
    assert "last            the final feature map, before global pooling" in text


def test_weights_file_is_loaded_and_hashed(tmp_path):
    spec, model = _build("mobilenetv2")
    path = tmp_path / "mine.weights.h5"
    model.save_weights(path)
    loaded, info = build_backbone(spec, (SMALL, SMALL), str(path), seed=99)
    assert info.source == "file" and info.sha256 == sha256_of_file(path)
    for a, b in zip(model.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_weights_file_of_another_architecture_is_refused(tmp_path):
    _, model = _build("vgg16")
    path = tmp_path / "vgg.weights.h5"
    model.save_weights(path)
    with pytest.raises(TLError, match=r"Could not load weights file .* into resnet50"):
        build_backbone(get_backbone("resnet50"), (SMALL, SMALL), str(path))
    with pytest.raises(TLError, match="does not exist"):
        build_backbone(get_backbone("vgg16"), (SMALL, SMALL), str(tmp_path / "no.h5"))


def test_random_weights_are_the_same_in_every_build():
    _spec, first = _build("efficientnetb0")
    _, second = _build("efficientnetb0")
    assert [w.name for w in first.weights] == [w.name for w in second.weights]
    for a, b in zip(first.weights, second.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_random_weights_do_not_depend_on_other_threads():
    """Keras seeds each initializer from Python's shared random generator: a thread
    drawing numbers meanwhile (a Dask worker's event loop) changed the weights."""
    _spec, quiet = _build("vgg16")
    stop = threading.Event()

    def draw():
        while not stop.is_set():
            random.random()
            time.sleep(0.0005)

    thread = threading.Thread(target=draw)
    thread.start()
    try:
        _spec, busy = _build("vgg16")
    finally:
        stop.set()
        thread.join()
    for a, b in zip(quiet.weights, busy.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_one_smallest_model_per_family_runs_by_default():
    families = [get_backbone(name).family for name in SMALLEST]
    assert len(families) == len(set(families))
    assert set(families) == {get_backbone(name).family for name in ALL_FAMILIES}


@pytest.mark.parametrize(
    "name",
    [
        name if name in SMALLEST else pytest.param(name, marks=pytest.mark.slow)
        for name in sorted(ALL_FAMILIES)
    ],
)
def test_every_backbone_builds_small_with_taps_and_finite_codes(name):
    spec, model = _build(name)
    taps = layer_taps(model, spec)
    stages = [t for t in taps if any(a.startswith("stage") for a in t.aliases)]
    assert len(stages) >= 2
    assert all(t.stride is not None for t in stages)
    assert [t.stride for t in stages] == sorted(t.stride for t in stages)
    side = model.input_shape[1]
    pixels = np.random.default_rng(0).uniform(0, 255, (2, side, side, 3))
    out = model(spec.preprocess(pixels.astype(np.float32)))
    assert out.shape[1:] == model.output_shape[1:]
    assert np.isfinite(np.asarray(out)).all()
