"""Classifier pipelines, the custom estimator, saving and loading models."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import STORE_SETTINGS, write_store
from sklearn.utils.estimator_checks import parametrize_with_checks

from tl.classifiers import (
    CLASSIFIERS,
    RelativeGammaSVC,
    load_classifier,
    make_pipeline,
    save_classifier,
)
from tl.errors import TLError
from tl.store import FeatureStore


@parametrize_with_checks([RelativeGammaSVC()])
def test_relative_gamma_svc_is_a_proper_estimator(estimator, check):
    check(estimator)


def test_relative_gamma_matches_svc_scale():
    from sklearn.svm import SVC

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(60, 5)) * 3, np.repeat([0, 1, 2], 20)
    ours = RelativeGammaSVC(C=2.0, gamma_factor=1.0).fit(X, y)
    theirs = SVC(C=2.0, gamma="scale").fit(X, y)
    np.testing.assert_allclose(ours.decision_function(X), theirs.decision_function(X))


def make_store(path, n=40, d=6, seed=0, settings=None):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    X = rng.normal(size=(n, d)) + y[:, None] * 2.0
    return write_store(path, {"block5_pool": X}, y, ["neg", "pos"], settings)


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_save_load_round_trip_predicts_the_same(tmp_path, name):
    store_path = make_store(tmp_path / "codes.h5")
    with FeatureStore(store_path) as store:
        X, y = store.read("block5_pool"), store.labels
        pipeline = make_pipeline(name, "standard").fit(X, y)
        save_classifier(
            tmp_path / "model",
            pipeline,
            store=store,
            layer="block5_pool",
            classifier=name,
            params={},
            normalization="standard",
            pca=None,
        )
        loaded = load_classifier(tmp_path / "model")
        loaded.check_codes(store)
    np.testing.assert_array_equal(loaded.predict(X), pipeline.predict(X))
    scores, kind = loaded.scores(X)
    assert scores.shape == (len(X), 2)
    assert kind in ("probability", "decision")
    assert loaded.class_names == ["neg", "pos"]


def test_mismatched_codes_and_versions_are_refused(tmp_path):
    store_path = make_store(tmp_path / "codes.h5")
    with FeatureStore(store_path) as store:
        pipeline = make_pipeline("logreg").fit(store.read("block5_pool"), store.labels)
        save_classifier(tmp_path / "model", pipeline, store=store, layer="block5_pool",
                        classifier="logreg", params={}, normalization="standard",
                        pca=None)  # fmt: skip
    other = make_store(
        tmp_path / "other.h5", settings={**STORE_SETTINGS, "image_size": [64, 64]}
    )
    model = load_classifier(tmp_path / "model")
    with (
        FeatureStore(other) as store,
        pytest.raises(
            TLError, match=r"image_size: model has \[32, 32\], store has \[64, 64\]"
        ),
    ):
        model.check_codes(store)
    meta = json.loads((tmp_path / "model" / "metadata.json").read_text())
    meta["versions"]["scikit-learn"] = "0.24.2"
    (tmp_path / "model" / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(TLError, match=r"saved with scikit-learn 0\.24\.2"):
        load_classifier(tmp_path / "model")
    with pytest.raises(TLError, match="not a saved tl model"):
        load_classifier(tmp_path)


def test_bad_pipeline_options_are_named():
    with pytest.raises(TLError, match="Unknown classifier 'svm'"):
        make_pipeline("svm")
    with pytest.raises(TLError, match="Unknown normalization 'zscore'"):
        make_pipeline("logreg", "zscore")
