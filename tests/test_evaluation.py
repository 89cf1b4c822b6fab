"""The layer x classifier comparison: honest protocols, numbers, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import blobs, write_store
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression, RidgeClassifier
from sklearn.model_selection import (
    GridSearchCV,
    StratifiedKFold,
    cross_val_score,
    train_test_split,
)
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler

from tl.classifiers import CLASSIFIERS
from tl.errors import TLError
from tl.evaluation import _batches_of_at_least, compare
from tl.reports import protocol_summary

FAST = {"classifiers": ("logreg", "linear_svm"), "jobs": 1, "progress": False}
NAMES = ["a", "b", "c"]


@pytest.fixture
def separable(tmp_path):
    X, y = blobs(n_per_class=60)
    noise = np.random.default_rng(1).normal(size=X.shape)
    return write_store(tmp_path / "sep.h5", {"noise": noise, "good": X}, y, NAMES)


def test_beats_chance_on_separable_codes_and_is_at_chance_on_shuffled_labels(tmp_path):
    X, y = blobs(n_per_class=100)
    good = write_store(tmp_path / "good.h5", {"codes": X}, y, NAMES)
    result = compare(good, **FAST)
    assert result.winner.test["accuracy"] > 0.95
    shuffled = np.random.default_rng(0).permutation(y)
    bad = write_store(tmp_path / "bad.h5", {"codes": X}, shuffled, NAMES)
    result = compare(bad, **FAST)
    assert result.winner.test["accuracy"] < 1 / 3 + 0.17
    assert all(c.cv_mean < 1 / 3 + 0.12 for c in result.candidates)


def test_reported_cv_and_test_scores_equal_an_independent_computation(separable):
    result = compare(separable, classifiers=("logreg",), jobs=1, progress=False, seed=7)
    candidate = next(c for c in result.candidates if c.layer == "noise")
    from tl.store import FeatureStore

    with FeatureStore(separable) as store:
        X, y = store.read("noise"), store.labels
    train, test = train_test_split(
        np.arange(len(y)), test_size=0.2, stratify=y, random_state=7
    )
    independent = Pipeline(
        [
            ("scale", StandardScaler()),
            ("logreg", LogisticRegression(C=candidate.params["C"], max_iter=2000)),
        ]
    )
    folds = StratifiedKFold(5, shuffle=True, random_state=7)
    expected = cross_val_score(
        independent, X[np.sort(train)], y[np.sort(train)], cv=folds
    )
    np.testing.assert_allclose(candidate.cv_scores, expected)
    independent.fit(X[np.sort(train)], y[np.sort(train)])
    test_accuracy = (independent.predict(X[np.sort(test)]) == y[np.sort(test)]).mean()
    assert candidate.test["accuracy"] == pytest.approx(test_accuracy)
    assert sorted(result.split["test_rows"]) == sorted(test.tolist())
    rows = [
        r
        for r in result.rows
        if r["layer"] == "noise" and r["split"] == "test" and r["metric"] == "accuracy"
    ]
    assert rows[0]["value"] == pytest.approx(test_accuracy)


def _selection(result):
    return [(c.layer, c.classifier, c.params, c.cv_scores) for c in result.candidates]


def test_held_out_rows_play_no_part_in_selection(tmp_path, separable):
    first = compare(separable, **FAST)
    from tl.store import FeatureStore

    with FeatureStore(separable) as store:
        layers = {key: store.read(key) for key in store.layers}
        labels = store.labels
    test_rows = first.split["test_rows"]
    rng = np.random.default_rng(5)
    for key in layers:  # the test rows' codes become noise
        layers[key][test_rows] = rng.normal(size=(len(test_rows), layers[key].shape[1]))
    altered = write_store(tmp_path / "altered.h5", layers, labels, NAMES)
    second = compare(altered, **FAST)
    assert _selection(second) == _selection(first)
    assert (second.winner.layer, second.winner.classifier) == (
        first.winner.layer,
        first.winner.classifier,
    )
    assert second.winner.test["accuracy"] < first.winner.test["accuracy"]


def test_separate_test_store_labels_play_no_part_in_selection(tmp_path, separable):
    X, y = blobs(n_per_class=20, seed=3)
    honest = write_store(tmp_path / "t1.h5", {"noise": X, "good": X}, y, NAMES)
    lying = write_store(
        tmp_path / "t2.h5", {"noise": X, "good": X}, np.roll(y, 20), NAMES
    )
    a = compare(separable, test_store=honest, **FAST)
    b = compare(separable, test_store=lying, **FAST)
    assert _selection(a) == _selection(b)
    assert a.winner.test != b.winner.test
    assert a.split["train"] == 180 and a.split["test"] == 60


def test_winner_is_chosen_by_cv_and_good_layer_wins(separable):
    result = compare(separable, **FAST)
    assert result.winner.layer == "good"
    assert result.winner.cv_mean == max(c.cv_mean for c in result.candidates)
    assert result.winner_estimate["protocol"] == "holdout"
    assert result.confusion.sum() == result.split["test"]


def test_nested_cv_reports_the_selection_procedure(tmp_path):
    X, y = blobs(n_per_class=30, separation=3.0)
    noise = np.random.default_rng(2).normal(size=X.shape)
    store = write_store(tmp_path / "s.h5", {"noise": noise, "good": X}, y, NAMES)
    result = compare(store, protocol="cv", folds=3, **FAST)
    assert len(result.selections) == 3
    assert all(s["layer"] == "good" for s in result.selections)
    accuracy = [s["accuracy"] for s in result.selections]
    assert result.winner_estimate["accuracy"] == pytest.approx(np.mean(accuracy))
    assert result.winner.pipeline is not None and result.winner.layer == "good"
    assert result.confusion.sum() == len(y)  # every row scored once, out of fold
    selected = [r for r in result.rows if r["protocol"] == "nested_cv"]
    assert len(selected) == 3 * 3  # three metrics per outer fold


def test_nested_cv_final_model_is_chosen_by_the_inner_rule_on_all_rows(tmp_path):
    # three similar layers: the candidate with the best mean outer-fold accuracy
    # (the old rule) is not the one the inner CV on all rows picks
    layers = {
        f"l{i}": blobs(n_per_class=16, dim=6, separation=1.0, seed=120 + i)[0]
        for i in range(3)
    }
    y = blobs(n_per_class=16)[1]
    store = write_store(tmp_path / "s.h5", layers, y, NAMES)
    names = ("ridge", "knn")
    result = compare(
        store, protocol="cv", folds=3, classifiers=names, seed=12, jobs=1,
        progress=False,
    )  # fmt: skip
    estimators = {
        "ridge": RidgeClassifier(),
        "knn": KNeighborsClassifier(metric="cosine"),
    }
    folds = StratifiedKFold(3, shuffle=True, random_state=12)
    independent = {}
    for layer, X in layers.items():
        for name in names:
            pipeline = Pipeline(
                [("scale", StandardScaler()), ("model", estimators[name])]
            )
            grid = {f"model__{k}": v for k, v in CLASSIFIERS[name].grid.items()}
            search = GridSearchCV(pipeline, grid, cv=folds).fit(X, y)
            best = search.best_index_
            mean = search.cv_results_["mean_test_score"][best]
            std = search.cv_results_["std_test_score"][best]
            independent[(layer, name)] = ((mean, -std), search)
    expected = max(independent, key=lambda key: independent[key][0])
    by_outer_mean = max(result.candidates, key=lambda c: c.test["accuracy"])
    assert (by_outer_mean.layer, by_outer_mean.classifier) != expected  # the old rule
    winner = result.winner
    assert (winner.layer, winner.classifier) == expected
    search = independent[expected][1]
    assert winner.params == {
        k.removeprefix("model__"): v for k, v in search.best_params_.items()
    }
    assert result.final_selection["inner_cv"] == pytest.approx(search.best_score_)
    refit = search.best_estimator_  # refit on all rows
    X = layers[winner.layer]
    np.testing.assert_array_equal(winner.pipeline.predict(X), refit.predict(X))
    assert "chosen by the same rule on all rows (3-fold CV" in protocol_summary(result)


def test_low_shot_curves_have_rows_per_shots_and_seed(separable):
    result = compare(
        separable,
        classifiers=("logreg",),
        shots=(1, 5, 1000, 60),
        shot_seeds=3,
        jobs=1,
        progress=False,
    )
    rows = [
        r
        for r in result.rows
        if r["protocol"] == "low_shot" and r["metric"] == "accuracy"
    ]
    # 60 per class, 48 of them training rows: 1000 and 60 become 48, once
    assert sorted({(r["layer"], r["shots"]) for r in rows}) == [
        ("good", 1),
        ("good", 5),
        ("good", 48),
        ("noise", 1),
        ("noise", 5),
        ("noise", 48),
    ]
    assert len(rows) == 2 * 3 * 3
    assert any(
        "shots 1000, 60" in note and "only 48 training rows" in note
        for note in result.adjustments
    )
    good_5 = [r["value"] for r in rows if r["layer"] == "good" and r["shots"] == 5]
    assert np.mean(good_5) > 0.9
    # all training rows of every class: each seed fits the same rows
    good_all = [r["value"] for r in rows if r["layer"] == "good" and r["shots"] == 48]
    assert max(good_all) == min(good_all) > 0.9


def test_out_of_core_sgd_reads_chunks_and_matches_in_memory_scaling(tmp_path):
    X, y = blobs(n_per_class=100, dim=8)
    store = write_store(tmp_path / "s.h5", {"codes": X}, y, NAMES)
    result = compare(
        store,
        classifiers=("sgd", "logreg"),
        out_of_core="always",
        jobs=1,
        progress=False,
    )
    assert [c.classifier for c in result.candidates] == ["sgd"]
    assert any(
        "only sgd supports that; logreg skipped" in a for a in result.adjustments
    )
    winner = result.winner
    assert winner.test["accuracy"] > 0.95
    train = np.setdiff1d(np.arange(len(y)), result.split["test_rows"])
    scaler = winner.pipeline.named_steps["normalize"]
    np.testing.assert_allclose(scaler.mean_, X[train].mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(scaler.scale_, X[train].std(axis=0), rtol=1e-4)


@pytest.mark.parametrize(("normalization", "pca"), [("l2", None), ("standard", 6)])
def test_out_of_core_pipeline_has_the_normalization_and_pca_it_claims(
    tmp_path, normalization, pca
):
    X, y = blobs(n_per_class=1400, dim=8)
    X, y = X[:4099], y[:4099]  # the store's second 4,096-row chunk holds 3 rows
    store = write_store(tmp_path / "s.h5", {"codes": X}, y, NAMES)
    result = compare(
        store, classifiers=("sgd",), normalization=normalization, pca=pca,
        out_of_core="always", jobs=1, progress=False,
    )  # fmt: skip
    winner = result.winner
    assert winner.test["accuracy"] > 0.95
    train = np.setdiff1d(np.arange(len(y)), result.split["test_rows"])
    steps = winner.pipeline.named_steps
    if normalization == "l2":
        assert isinstance(steps["normalize"], Normalizer)
        expected = steps["classifier"].predict(X / np.linalg.norm(X, axis=1)[:, None])
        np.testing.assert_array_equal(winner.pipeline.predict(X), expected)
    else:
        assert isinstance(steps["normalize"], StandardScaler)
    if pca is None:
        assert steps["pca"] == "passthrough"
    else:
        assert steps["pca"].n_components_ == pca
        assert 0 < np.sum(train >= 4096) < pca  # a chunk too small for PCA alone
        scaled = StandardScaler().fit_transform(X[train])
        reference = PCA(pca).fit(scaled).components_
        # the same subspace as an in-memory PCA: all principal angles near zero
        cosines = np.linalg.svd(steps["pca"].components_ @ reference.T)[1]
        np.testing.assert_allclose(cosines, 1, atol=1e-3)
        assert steps["classifier"].coef_.shape == (3, pca)


def test_chunks_are_regrouped_for_incremental_pca():
    # IncrementalPCA.partial_fit needs (in some scikit-learn versions, in every
    # batch) as many rows as components; a chunk of selected rows may be smaller
    sizes = [2, 7, 1, 1, 6, 3]
    chunks = [np.full((n, 2), i) for i, n in enumerate(sizes)]
    batches = list(_batches_of_at_least(iter(chunks), 5))
    assert len(batches) > 1 and all(len(b) >= 5 for b in batches)
    np.testing.assert_array_equal(np.concatenate(batches), np.concatenate(chunks))
    assert [len(b) for b in _batches_of_at_least(iter(chunks[:1]), 5)] == [2]


def test_bad_stores_give_clear_errors(tmp_path):
    X, y = blobs(n_per_class=10)
    incomplete = write_store(tmp_path / "i.h5", {"c": X}, y, NAMES, complete=False)
    with pytest.raises(TLError, match=r"incomplete.*Re-run the same"):
        compare(incomplete, **FAST)
    empty = write_store(tmp_path / "e.h5", {"c": X[:0]}, y[:0], NAMES)
    with pytest.raises(TLError, match="has no rows"):
        compare(empty, **FAST)
    one = write_store(tmp_path / "o.h5", {"c": X}, np.zeros_like(y), NAMES)
    with pytest.raises(TLError, match=r"at least two classes; .* only 'a' \(30"):
        compare(one, **FAST)
    unlabeled = write_store(tmp_path / "u.h5", {"c": X}, -np.ones_like(y), [])
    with pytest.raises(TLError, match="unlabeled rows"):
        compare(unlabeled, **FAST)
    single = write_store(tmp_path / "s.h5", {"c": X[:21]}, y[:21], NAMES)
    with pytest.raises(TLError, match="Classes 'c' have a single image"):
        compare(single, **FAST)
    with pytest.raises(TLError, match="Unknown layer 'd'"):
        compare(incomplete.with_name("e.h5"), layers=("d",), **FAST)


def test_small_classes_reduce_the_folds_with_a_note(tmp_path):
    X, y = blobs(n_per_class=10)
    keep = np.r_[0:10, 10:20, 20:24]  # class 'c' has 4 images, 3 after the test split
    store = write_store(tmp_path / "s.h5", {"c": X[keep]}, y[keep], NAMES)
    result = compare(store, **FAST)
    assert any("3 folds instead of 5" in note for note in result.adjustments)
    assert all(len(c.cv_scores) == 3 for c in result.candidates)


def test_nonfinite_codes_are_refused_or_dropped_with_a_note(tmp_path):
    X, y = blobs(n_per_class=20)
    X[[3, 30]] = np.nan
    X[45, 2] = np.inf
    store = write_store(tmp_path / "s.h5", {"c": X}, y, NAMES)
    with pytest.raises(TLError, match=r"3 rows .* have NaN or infinite codes"):
        compare(store, **FAST)
    result = compare(store, drop_nonfinite=True, **FAST)
    assert any(
        "dropped 3 rows" in note and "img_0003.png" in note
        for note in result.adjustments
    )
    assert result.split["train"] + result.split["test"] == 57


def test_nonfinite_codes_that_leave_nothing_to_compare_are_one_clear_error(tmp_path):
    X, y = blobs(n_per_class=20)
    dead = np.full_like(X, np.nan)
    store = write_store(tmp_path / "d.h5", {"good": X, "dead": dead}, y, NAMES)
    for drop in (False, True):
        with pytest.raises(
            TLError, match=r"in layer\(s\) dead; leave them out with --layers good,"
        ):
            compare(store, drop_nonfinite=drop, **FAST)
    result = compare(store, layers=("good",), **FAST)
    assert result.winner.layer == "good"
    first, second = X.copy(), X.copy()
    first[:30], second[30:] = np.nan, np.inf  # together: every row
    store = write_store(tmp_path / "h.h5", {"a": first, "b": second}, y, NAMES)
    with pytest.raises(TLError, match=r"Every row .* one of the layers a, b"):
        compare(store, drop_nonfinite=True, **FAST)
    X[20:] = np.nan  # classes b and c
    store = write_store(tmp_path / "c.h5", {"c": X}, y, NAMES)
    with pytest.raises(
        TLError, match=r"only 'a' \(20 images\) after dropping 40 rows with NaN"
    ):
        compare(store, drop_nonfinite=True, **FAST)
