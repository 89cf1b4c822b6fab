"""Classifier pipelines, the custom estimator, saving and loading models."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import skops.io
from conftest import store_settings, write_store
from sklearn.decomposition import IncrementalPCA
from sklearn.preprocessing import MinMaxScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from tl.classifiers import (
    CLASSIFIERS,
    NORMALIZATIONS,
    TRUSTED_TYPES,
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


# What each classifier's scores are: probabilities where it has predict_proba.
SCORE_KINDS = {
    "logreg": "probability",
    "knn": "probability",
    "sgd": "probability",  # log loss
    "linear_svm": "decision",
    "rbf_svm": "decision",
    "ridge": "decision",
}


def make_store(path, n=40, d=6, seed=0, settings=None):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    X = rng.normal(size=(n, d)) + y[:, None] * 2.0
    return write_store(path, {"block5_pool": X}, y, ["neg", "pos"], settings)


def save(directory, pipeline, store, classifier="logreg", normalization="standard",
         pca=None):  # fmt: skip
    return save_classifier(directory, pipeline, store=store, layer="block5_pool",
                           classifier=classifier, params={},
                           normalization=normalization, pca=pca)  # fmt: skip


@pytest.mark.parametrize("pca", [None, 3])
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_save_load_round_trip_predicts_the_same(tmp_path, name, normalization, pca):
    """Every pipeline train_classifier.py can save loads back from trusted types."""
    store_path = make_store(tmp_path / "codes.h5")
    with FeatureStore(store_path) as store:
        X, y = store.read("block5_pool"), store.labels
        pipeline = make_pipeline(name, normalization, pca).fit(X, y)
        save(tmp_path / "model", pipeline, store, name, normalization, pca)
        loaded = load_classifier(tmp_path / "model")
        loaded.check_codes(store)
    np.testing.assert_array_equal(loaded.predict(X), pipeline.predict(X))
    scores, kind = loaded.scores(X)
    assert kind == SCORE_KINDS[name]
    wide = X.astype(np.float64)  # as the saved model reads codes
    if kind == "probability":
        np.testing.assert_allclose(scores, pipeline.predict_proba(wide))
    else:  # binary: one decision value z, shown as the scores (-z, z)
        z = pipeline.decision_function(wide)
        np.testing.assert_allclose(scores, np.stack([-z, z], axis=1))
    assert loaded.class_names == ["neg", "pos"]
    model_file = tmp_path / "model" / "model.skops"
    assert set(skops.io.get_untrusted_types(file=model_file)) <= set(TRUSTED_TYPES)
    metadata = json.loads((tmp_path / "model" / "metadata.json").read_text())
    assert metadata["files"] == {
        "model.skops": hashlib.sha256(model_file.read_bytes()).hexdigest()
    }
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [
        "metadata.json",
        "model.skops",
    ]


def test_out_of_core_pipelines_load_too(tmp_path):
    """IncrementalPCA, and class weights given as a dict of numpy floats (what
    out-of-core training sets for class_weight="balanced")."""
    store_path = make_store(tmp_path / "codes.h5")
    with FeatureStore(store_path) as store:
        X, y = store.read("block5_pool"), store.labels
        pipeline = make_pipeline("sgd").set_params(
            pca=IncrementalPCA(3),
            classifier__class_weight={0: np.float64(0.5), 1: np.float64(2.0)},
        )
        pipeline.fit(X, y)
        save(tmp_path / "model", pipeline, store, "sgd", pca=3)
    loaded = load_classifier(tmp_path / "model")
    np.testing.assert_array_equal(loaded.predict(X), pipeline.predict(X))


def test_a_pipeline_step_outside_the_allowlist_is_refused(tmp_path):
    """skops itself trusts every scikit-learn estimator; tl only its own steps."""
    store_path = make_store(tmp_path / "codes.h5")
    with FeatureStore(store_path) as store:
        X, y = store.read("block5_pool"), store.labels
        pipeline = make_pipeline("logreg").set_params(normalize=MinMaxScaler())
        save(tmp_path / "model", pipeline.fit(X, y), store)
    with pytest.raises(
        TLError, match=r"steps tl does not trust: sklearn\..*MinMaxScaler"
    ):
        load_classifier(tmp_path / "model")


def test_mismatched_codes_and_versions_are_refused(tmp_path):
    store_path = make_store(tmp_path / "codes.h5")
    with FeatureStore(store_path) as store:
        pipeline = make_pipeline("logreg").fit(store.read("block5_pool"), store.labels)
        save(tmp_path / "model", pipeline, store)
    other = make_store(tmp_path / "other.h5", settings=store_settings(image_size=64))
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
    with pytest.raises(
        TLError,
        match=r"^The 'classifier' parameter must be one of 'logreg', 'linear_svm', .*"
        r"'sgd'\. Got 'svm' instead\.$",
    ):
        make_pipeline("svm")
    with pytest.raises(TLError, match=r"'normalization' .* Got 'zscore' instead"):
        make_pipeline("logreg", "zscore")
