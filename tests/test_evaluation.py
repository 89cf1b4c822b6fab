"""The layer x classifier comparison: honest protocols, numbers, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import blobs, write_store
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score, train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from tl.errors import TLError
from tl.evaluation import compare

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


def test_low_shot_curves_have_rows_per_shots_and_seed(separable):
    result = compare(
        separable,
        classifiers=("logreg",),
        shots=(1, 5, 1000),
        shot_seeds=3,
        jobs=1,
        progress=False,
    )
    rows = [
        r
        for r in result.rows
        if r["protocol"] == "low_shot" and r["metric"] == "accuracy"
    ]
    assert {(r["layer"], r["shots"]) for r in rows} == {
        ("noise", 1),
        ("noise", 5),
        ("good", 1),
        ("good", 5),
    }  # 1000 > class size
    assert len(rows) == 2 * 2 * 3
    good_5 = [r["value"] for r in rows if r["layer"] == "good" and r["shots"] == 5]
    assert np.mean(good_5) > 0.9


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
