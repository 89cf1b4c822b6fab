"""Inference engines: OpenVINO codes against the Keras reference, int8 calibration,
the converted-model cache, and the refusals that keep codes of different engines
apart. Tests marked `needs_openvino` run only with the extra (pip install
'tl[openvino]'); the others also run without it."""

from __future__ import annotations

import importlib.util
import logging
import sys

import numpy as np
import pytest
from conftest import assert_one_line_error, load_pngs, settings, write_png_tree
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import extract_features
import predict
from tl.classifiers import save_classifier
from tl.engines.calibration import sample_calibration
from tl.errors import TLError
from tl.features import extract, load_extractor
from tl.images import ImageSettings
from tl.provenance import layer_identity
from tl.store import FeatureStore

needs_openvino = pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("openvino", "nncf")),
    reason="needs the openvino extra: pip install 'tl[openvino]'",
)
COMMON = ["--backbone", "vgg16", "--weights", "none", "--image-size", "32", "-q"]


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tl_cache")


@pytest.fixture(autouse=True)
def _cache_in_tmp(shared_cache, monkeypatch):
    """Converted models go to a cache shared by this module's tests, never ~/.cache."""
    monkeypatch.setenv("TL_CACHE_DIR", str(shared_cache))


def _store_codes(path) -> dict[str, np.ndarray]:
    with FeatureStore(path) as store:
        return {layer: store.read(layer) for layer in store.layers}


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _fail_if_built(*args, **kwargs):
    raise AssertionError("a model was built before the engine was checked")


# ---------------------------------------------------------------------------------
# Without the extra


def test_missing_openvino_fails_at_once_with_the_install_command(
    png_tree, tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed
    monkeypatch.setattr("tl.backbones.build_backbone", _fail_if_built)
    output = tmp_path / "codes.h5"
    code = extract_features.main(
        [str(png_tree), *COMMON, "--engine", "openvino", "-o", str(output)]
    )
    assert_one_line_error(
        capsys, code, "openvino", "not installed", "pip install 'tl[openvino]'"
    )
    with pytest.raises(TLError, match=r"pip install 'tl\[openvino\]'"):
        extract(png_tree, output, settings(), engine="openvino", progress=False)
    assert not output.exists()


def test_each_precision_is_refused_by_the_engine_without_it(png_tree, capsys):
    with pytest.raises(TLError, match=r"keras engine has no int8.*--engine openvino"):
        settings(precision="int8")
    with pytest.raises(TLError, match=r"openvino engine has no float16.*engine keras"):
        settings(engine="openvino", precision="float16")
    with pytest.raises(
        TLError,
        match=r"'engine' parameter must be one of 'keras', 'openvino'. Got 'onnx'",
    ):
        settings(engine="onnx")
    code = extract_features.main([str(png_tree), *COMMON, "--precision", "int8"])
    assert_one_line_error(capsys, code, "keras engine has no int8", "--engine openvino")


def test_calibration_settings_belong_to_int8_only(png_tree, tmp_path, capsys):
    with pytest.raises(TLError, match=r"with the 'int8' precision only\. Got 10"):
        settings(engine="openvino", calibration_images=10)
    int8 = settings(engine="openvino", precision="int8", calibration_source=png_tree)
    assert int8.engine.calibration_images == 300
    assert int8.engine.calibration_source == str(png_tree.resolve())
    with pytest.raises(TLError, match=r"integer >= 1\. Got 0"):
        settings(engine="openvino", precision="int8", calibration_images=0)
    with pytest.raises(TLError, match="Calibration source '/no/such' does not exist"):
        sample_calibration("/no/such", 10, ImageSettings())
    code = extract_features.main([str(png_tree), *COMMON, "--calibration-images", "50"])
    assert_one_line_error(capsys, code, "--calibration-images", "'int8' precision only")


def test_layer_identity_tells_engines_apart_and_reads_old_stores_as_keras():
    old = {"backbone": "vgg16", "weights": "none", "precision": "float32"}
    layer = {"layer": "block5_pool", "pooling": "avg"}
    keras_codes = {**old, "engine": "keras", "calibration_sha256": None}
    assert layer_identity(old, layer) == layer_identity(keras_codes, layer)
    openvino = {**keras_codes, "engine": "openvino"}
    assert layer_identity(openvino, layer) != layer_identity(keras_codes, layer)
    int8 = {**openvino, "precision": "int8", "calibration_sha256": "ab"}
    other = {**int8, "calibration_sha256": "cd"}
    assert layer_identity(int8, layer) != layer_identity(other, layer)


def _saved_probe(store, directory, layer: str = "block3_pool"):
    """A logistic-regression probe fitted on a store's codes and saved with them."""
    with FeatureStore(store) as opened:
        pipeline = make_pipeline(StandardScaler(), LogisticRegression())
        pipeline.fit(opened.read(layer), opened.labels)
        return save_classifier(
            directory,
            pipeline,
            store=opened,
            layer=layer,
            classifier="logreg",
            params={},
            normalization="standard",
            pca=None,
        )


@pytest.fixture
def keras_probe(png_tree, tmp_path):
    """A linear probe saved from Keras float32 codes of `png_tree`."""
    store = tmp_path / "codes.h5"
    extract(png_tree, store, settings(layers=["block3"]), progress=False)
    return _saved_probe(store, tmp_path / "probe")


def test_predict_refuses_another_engine_than_the_training_codes(
    keras_probe, png_tree, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr("tl.backbones.build_backbone", _fail_if_built)
    output = str(tmp_path / "p.csv")
    for option in (["--engine", "openvino"], ["--precision", "bfloat16"]):
        code = predict.main([str(keras_probe), str(png_tree), "-o", output, *option])
        assert_one_line_error(
            capsys, code, "trained on codes made by keras float32",
            "--allow-engine-mismatch",
        )  # fmt: skip


# ---------------------------------------------------------------------------------
# With the extra


@needs_openvino
@pytest.mark.parametrize(
    "backbone, layers, poolings",
    [
        ("vgg16", ["block1_conv2", "block3", "block5"], ["avg", "grid:2x2", "none"]),
        ("mobilenetv2", ["stage2", "stage4", "last"], ["avgmax", "flatten", "max"]),
    ],
)
def test_openvino_float32_codes_equal_keras_codes(png_tree, backbone, layers, poolings):
    from tl.engines import CompileRequest, keras

    extractor = load_extractor(
        settings(backbone=backbone, layers=layers, pooling=poolings, engine="openvino")
    )
    pixels = load_pngs(
        png_tree, sorted(str(p.relative_to(png_tree)) for p in png_tree.rglob("*.png"))
    )
    reference = keras.compile_extractor(extractor.model, CompileRequest("float32", {}))
    expected, got = reference.codes_of(pixels), extractor.compiled.codes_of(pixels)
    assert sorted(got) == sorted(expected) == sorted(t.layer for t in extractor.taps)
    for layer, codes in expected.items():
        assert got[layer].shape == codes.shape
        np.testing.assert_allclose(
            got[layer], codes, rtol=1e-4, atol=1e-4 * np.abs(codes).max()
        )
    assert extractor.compiled.provenance["inference_precision_hint"] == "f32"


@needs_openvino
def test_int8_codes_stay_close_to_float32_and_the_check_is_stored(
    png_tree, tmp_path, monkeypatch, caplog
):
    import tl.engines.openvino

    reference, quantised = tmp_path / "keras.h5", tmp_path / "int8.h5"
    extract(png_tree, reference, settings(), progress=False)
    monkeypatch.setattr(tl.engines.openvino, "COSINE_WARNING", 1.01)  # always warn
    with caplog.at_level(logging.INFO, logger="tl"):
        extract(
            png_tree,
            quantised,
            settings(engine="openvino", precision="int8"),
            progress=False,
        )
    expected, got = _store_codes(reference), _store_codes(quantised)
    for layer, codes in expected.items():
        assert _cosines(codes, got[layer]).min() > 0.98, layer
        assert not np.allclose(codes, got[layer], rtol=1e-5)  # really quantised
    with FeatureStore(quantised) as store:
        assert store.settings["calibration_source"] == str(png_tree.resolve())
        assert len(store.settings["calibration_sha256"]) == 64
        inference = store.provenance["inference"]
        assert inference["calibration_images"] == 12  # 15 images, 3 held back
        check = inference["int8_check"]
        assert check["held_back_images"] == 3
        assert set(check["cosine"]) == set(expected)
        for cosine in check["cosine"].values():
            assert 0.98 < cosine["min"] <= cosine["median"] <= 1.0 + 1e-9
    assert "int8 vs float32 codes of 3 held-back images" in caplog.text
    assert "int8 changes these codes noticeably" in caplog.text


def _count_calls(monkeypatch, module, name: str) -> list:
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


@needs_openvino
def test_test_images_reuse_the_cached_training_calibration(tmp_path, monkeypatch):
    import tl.engines.openvino

    cache = tmp_path / "cache"
    monkeypatch.setenv("TL_CACHE_DIR", str(cache))
    train = write_png_tree(tmp_path / "train", {"a": 6, "b": 6}, seed=1)
    test = write_png_tree(tmp_path / "test", {"a": 3, "b": 3}, seed=2)
    conversions = _count_calls(monkeypatch, tl.engines.openvino, "_convert")
    quantisations = _count_calls(monkeypatch, tl.engines.openvino, "_quantize")
    int8 = settings(layers=["block3"], engine="openvino", precision="int8")
    extract(train, tmp_path / "train.h5", int8, progress=False)
    extract(  # unlabeled: the sample depends on the calibration source alone
        test, tmp_path / "test.h5", int8, calibration_source=train, labels=None
    )
    assert (len(conversions), len(quantisations)) == (1, 1)  # the second: cached
    extract(test, tmp_path / "self.h5", int8, progress=False)
    assert (len(conversions), len(quantisations)) == (1, 2)
    entries = [path.name for path in (cache / "openvino").iterdir()]
    assert len(entries) == 3 and not any(name.startswith(".") for name in entries)
    layer = {"layer": "block3_pool", "pooling": "avg"}
    with (
        FeatureStore(tmp_path / "train.h5") as train_store,
        FeatureStore(tmp_path / "test.h5") as test_store,
        FeatureStore(tmp_path / "self.h5") as self_store,
    ):
        ours = layer_identity(train_store.settings, layer)
        assert layer_identity(test_store.settings, layer) == ours
        assert layer_identity(self_store.settings, layer) != ours


@needs_openvino
def test_resuming_with_another_engine_is_refused(png_tree, tmp_path):
    output = tmp_path / "codes.h5"
    extract(png_tree, output, settings(layers=["block2"]), progress=False)
    with pytest.raises(
        TLError, match=r"engine: file has 'keras', this run asks 'openvino'"
    ):
        extract(
            png_tree,
            output,
            settings(layers=["block2"], engine="openvino"),
            progress=False,
        )


@needs_openvino
def test_predict_uses_the_engine_of_the_training_codes(png_tree, tmp_path):
    from tl.classifiers import load_classifier
    from tl.prediction import predict_images

    store = tmp_path / "codes.h5"
    extract(png_tree, store, settings(layers=["block3"], engine="openvino"))
    probe = _saved_probe(store, tmp_path / "probe")
    with FeatureStore(store) as opened:
        codes, paths = opened.read("block3_pool"), opened.paths
    model = load_classifier(probe)
    expected = [model.class_names[i] for i in model.predict(codes)]
    table = predict_images(probe, [str(png_tree)], progress=False)
    assert dict(zip(table.path, table.predicted, strict=True)) == dict(
        zip(paths, expected, strict=True)
    )
    with pytest.raises(TLError, match="made by openvino float32; keras float32"):
        predict_images(probe, [str(png_tree)], engine="keras", progress=False)
    allowed = predict_images(
        probe, [str(png_tree)], engine="keras", allow_engine_mismatch=True
    )
    assert list(allowed.predicted) == list(table.predicted)
