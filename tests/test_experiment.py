"""Experiments: one file, every backbone x layer x classifier x fine-tune, cached.

One two-backbone experiment (random-weight VGG16 and MobileNet at 32x32, 16
generated images) runs once for the module; the tests that run more work on copies
of its folders or on experiments of their own.
"""

from __future__ import annotations

import copy
import html
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from conftest import SMALL, assert_one_line_error, blobs, write_png_tree, write_store

import run_experiment
import tl.evaluation
import tl.features
from tl import locking
from tl.backbones import build_backbone, get_backbone
from tl.classifiers import as_features, load_classifier
from tl.errors import TLError
from tl.evaluation import compare
from tl.experiment import FeatureCache, run
from tl.experiment.cache import base_identity
from tl.experiment.plan import ExtractStep, FineTuneStep, ProbeStep
from tl.experiment.report import (
    chosen_without_test,
    leaderboard,
    mcnemar_p_value,
    paired_comparison,
    selection_line,
    selection_paragraph,
    wilson_interval,
)
from tl.experiment.spec import head_options, load_spec
from tl.store import FeatureStore

CLASSES = {"ant": 8, "bee": 8}


def experiment(root: Path, name: str = "two", **tables) -> dict:
    """The module's two-backbone experiment over `root/images`, writing under
    `root`; `tables` replace whole tables."""
    spec = {
        "experiment": {
            "name": name,
            "output_dir": str(root / name),
            "cache_dir": str(root / "cache"),
        },
        "data": {"train": str(root / "images"), "test_size": 0.25},
        "backbone": [
            {
                "name": "vgg16",
                "weights": "none",
                "image_size": SMALL,
                "layers": ["block4", "last"],
            },
            {
                "name": "mobilenet",
                "weights": "none",
                "image_size": SMALL,
                "layers": ["stage3", "last"],
            },
        ],
        "probe": {
            "classifiers": ["logreg", "ridge"],
            "cv": 3,
            "shots": [1, 2],
            "shot_seeds": 2,
            "jobs": 1,
        },
        "finetune": [
            {
                "backbone": "vgg16",
                "unfreeze": "block5",
                "epochs": 1,
                "batch_size": 4,
                "init_head": "best_probe",
            }
        ],
    }
    spec.update(tables)
    return spec


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The module's experiment, run once: (its spec, its result). Read only."""
    root = tmp_path_factory.mktemp("experiment")
    write_png_tree(root / "images", CLASSES, seed=5)
    spec = experiment(root)
    return spec, run(spec, progress=False)


def copied(spec: dict, destination: Path) -> dict:
    """`spec` with its output and cache folders copied to `destination`, as if it
    had run there (the images stay where they are, so every key stays the same)."""
    spec = copy.deepcopy(spec)
    moved = {}
    for key in ("output_dir", "cache_dir"):
        source = Path(spec["experiment"][key])
        shutil.copytree(source, destination / source.name)
        spec["experiment"][key] = moved[str(source)] = str(destination / source.name)
    for ref in Path(spec["experiment"]["cache_dir"], "refs").glob("*.json"):
        values = json.loads(ref.read_text())
        values["output_dir"] = moved.get(values["output_dir"], values["output_dir"])
        ref.write_text(json.dumps(values))
    return spec


class Counted:
    """Counts the calls of functions replaced by `watch`."""

    def __init__(self, monkeypatch):
        self.calls: dict[str, int] = {}
        self.monkeypatch = monkeypatch

    def watch(self, owner, name: str) -> None:
        original = getattr(owner, name)
        label = f"{getattr(owner, '__name__', owner)}.{name}"
        self.calls[label] = 0

        def counting(*args, **kwargs):
            self.calls[label] += 1
            return original(*args, **kwargs)

        self.monkeypatch.setattr(owner, name, counting)


def work_counter(monkeypatch) -> Counted:
    """Counts extractor builds, classifier searches and fits, and training epochs."""
    counted = Counted(monkeypatch)
    counted.watch(tl.features, "load_extractor")
    counted.watch(tl.evaluation, "_search")
    counted.watch(tl.evaluation, "fit_pipeline")
    counted.watch(keras.Model, "fit")
    return counted


def to_toml(spec: dict) -> str:
    """The TOML of an experiment dict (strings, numbers, booleans, lists of them,
    tables and arrays of tables: what experiment files hold)."""

    def value(item) -> str:
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, list):
            return "[" + ", ".join(value(v) for v in item) + "]"
        if isinstance(item, str):
            return json.dumps(item)
        return repr(item)

    lines = []
    for section, content in spec.items():
        tables = content if isinstance(content, list) else [content]
        for table in tables:
            header = f"[[{section}]]" if isinstance(content, list) else f"[{section}]"
            lines.append(header)
            lines += [f"{key} = {value(item)}" for key, item in table.items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------
# Rows, report, resume


def test_two_backbones_give_every_expected_row(finished):
    spec, result = finished
    table = result.leaderboard
    got = {
        (r.backbone, r.strategy, r.layer, r.pooling, r.classifier)
        for r in table.itertuples()
    }
    probes = {
        (backbone, "probe", layer, "avg", classifier)
        for backbone, layers in (
            ("vgg16", ("block4_pool", "block5_pool")),
            ("mobilenet", ("conv_pw_5_relu", "conv_pw_13_relu")),
        )
        for layer in layers
        for classifier in ("logreg", "ridge")
    }
    assert got == probes | {("vgg16", "fine_tune", "block5", "avg", "linear+lpft")}
    assert table["rank"].tolist() == list(range(1, 10))
    output = Path(spec["experiment"]["output_dir"])
    assert pd.read_csv(output / "leaderboard.csv").shape[0] == 9
    results = pd.read_csv(output / "results.csv")
    assert {"backbone", "strategy", "step", "store", "model"} <= set(results.columns)
    for row in table.itertuples():
        rows = results[results.step == row.step]
        test = rows[rows.protocol == "holdout"]
        test = test[test.split == "test"].set_index("metric").value
        assert test["accuracy"] == pytest.approx(row.test_accuracy)
        # probes: 3 CV folds, 4 test metrics, 3 metrics x 2 shots x 2 seeds;
        # the fine-tune: 4 test metrics
        assert len(rows) == (3 + 4 + 12 if row.strategy == "probe" else 4)
    assert len(json.loads((output / "results.json").read_text())) == len(results)


def test_each_row_traces_to_its_store_and_model(finished):
    """A probe's saved model, applied to its test store's codes, gives exactly the
    recorded predictions and test accuracy; its store holds its layer."""
    spec, result = finished
    output = Path(spec["experiment"]["output_dir"])
    cache = FeatureCache(spec["experiment"]["cache_dir"])
    probes = result.leaderboard[result.leaderboard.strategy == "probe"]
    for row in probes.itertuples():
        record = json.loads((output / "steps" / f"{row.step}.json").read_text())
        assert record["settings"]["classifiers"] == [row.classifier]
        assert record["settings"]["layers"] == [row.layer]
        saved = load_classifier(output / row.model)
        with FeatureStore(cache.store_path(row.test_store)) as test_store:
            predicted = saved.pipeline.predict(as_features(test_store.read(row.layer)))
            truth = test_store.labels
        assert np.mean(predicted == truth) == pytest.approx(row.test_accuracy)
        with FeatureStore(cache.store_path(row.store)) as store:
            assert row.layer in store.layers
            # the cache key is the identity the store records itself
            assert store.provenance["codes_identity"] == row.store
    finetuned = result.leaderboard[result.leaderboard.strategy != "probe"].iloc[0]
    assert (output / finetuned.model / "model.keras").is_file()


def test_report_is_one_file_with_the_winner(finished):
    spec, result = finished
    page = result.report.read_text()
    winner = result.leaderboard.iloc[0]
    assert result.report == Path(spec["experiment"]["output_dir"]) / "report.html"
    assert f"Winner: {winner.backbone}" in page
    assert f"Test accuracy {winner.test_accuracy:.3f}" in page
    assert f"95% interval {winner.test_ci_low:.3f}–{winner.test_ci_high:.3f}" in page
    assert "McNemar" in page
    # the winner is called optimistic; the training-side picks are shown
    records = result.plan.finished_records()
    assert html.escape(selection_paragraph(result.leaderboard, records)) in page
    probes = [r for r in records if r["strategy"] == "probe"]
    best_cv = max(r["cv_accuracy"] for r in probes)
    honest = min(
        (r for r in probes if r["cv_accuracy"] == best_cv), key=lambda r: r["cv_std"]
    )
    assert chosen_without_test(records)[0] is honest
    assert f"{honest['backbone']} {honest['layer']}" in page.split("honest estimate")[1]
    for title in ("Accuracy against layer depth", "Probes against fine-tuning",
                  "Low-shot curves", "Time per step", "Stores"):  # fmt: skip
        assert f"<h2>{title}</h2>" in page
    # self-contained: every image embedded, nothing fetched
    assert page.count('src="data:image/png;base64,') == 4
    assert "http://" not in page and "https://" not in page
    for key in result.plan.store_keys():
        assert key in page  # the provenance of every store


def test_rerun_does_no_work_and_gives_the_same_results(
    finished, tmp_path, monkeypatch, capsys
):
    spec, first = finished
    spec = copied(spec, tmp_path)
    counted = work_counter(monkeypatch)
    capsys.readouterr()
    again = run(spec, progress=False)
    assert again.ran == []
    assert set(counted.calls.values()) == {0}, counted.calls
    pd.testing.assert_frame_equal(again.leaderboard, first.leaderboard)
    line = selection_line(again.leaderboard, again.plan.finished_records())
    assert line.startswith("Optimistic: #1 is the best of 9 on the same 4 test")
    assert f"\n{line}\nreport: {again.report}\n" in capsys.readouterr().out


def test_plan_shows_every_step_cached_and_runs_nothing(
    finished, tmp_path, monkeypatch, capsys
):
    spec, _ = finished
    path = tmp_path / "two.toml"
    path.write_text(to_toml(spec))
    counted = work_counter(monkeypatch)
    report = Path(spec["experiment"]["output_dir"]) / "report.html"
    written = report.stat().st_mtime_ns
    assert run_experiment.main([str(path), "--plan"]) == 0
    out = capsys.readouterr().out
    assert "13 steps: 13 cached, 0 to run." in out
    assert out.count("cached") == 14
    assert set(counted.calls.values()) == {0}
    assert report.stat().st_mtime_ns == written


def test_changed_settings_invalidate_exactly_what_depends_on_them(finished):
    """Planned, not run: another image size re-extracts that backbone only;
    another classifier adds its probes and nothing else."""
    spec, _ = finished

    def to_run(changed) -> set[str]:
        plan = run(changed, plan_only=True).plan
        return {step.title for step in plan.steps if not step.done}

    bigger = copy.deepcopy(spec)
    bigger["backbone"][1]["image_size"] = 48
    changed = to_run(bigger)
    assert len(changed) == 6
    assert all(" mobilenet " in title for title in changed)

    more = copy.deepcopy(spec)
    more["probe"]["classifiers"] = ["logreg", "ridge", "knn"]
    changed = to_run(more)
    assert len(changed) == 4
    assert all(title.startswith("probe") and title.endswith("knn") for title in changed)


def test_experiments_over_the_same_images_share_one_store(
    finished, tmp_path, monkeypatch, capsys
):
    spec, first = finished
    spec = copied(spec, tmp_path)
    other = experiment(tmp_path, name="other")
    other["data"] = spec["data"]
    other["experiment"]["cache_dir"] = spec["experiment"]["cache_dir"]
    other["backbone"] = spec["backbone"][:1]
    other["probe"] = {"classifiers": ["linear_svm"], "cv": 3, "jobs": 1}
    other["finetune"] = []
    counted = work_counter(monkeypatch)
    result = run(other, progress=False)
    assert counted.calls["tl.features.load_extractor"] == 0
    assert set(result.plan.store_keys()) < set(first.plan.store_keys())
    assert set(result.leaderboard.store) <= set(first.leaderboard.store)

    cache_dir = spec["experiment"]["cache_dir"]
    capsys.readouterr()
    assert run_experiment.main(["--cache", "ls", "--cache-dir", cache_dir]) == 0
    listing = capsys.readouterr().out
    for key in result.plan.store_keys():
        line = next(line for line in listing.splitlines() if line.startswith(key[:12]))
        assert {"two", "other"} <= set(line.replace(",", " ").split())
    assert run_experiment.main(["--cache", "gc", "--cache-dir", cache_dir]) == 0
    assert capsys.readouterr().out.strip() == "nothing to do"
    shutil.rmtree(spec["experiment"]["output_dir"])  # the first experiment is gone
    assert run_experiment.main(["--cache", "gc", "--cache-dir", cache_dir]) == 0
    removed = capsys.readouterr().out
    kept = set(result.plan.store_keys())
    assert {e.key for e in FeatureCache(cache_dir).entries()} == kept
    assert removed.count(".h5 (") == len(set(first.plan.store_keys()) - kept)


def test_run_killed_mid_extraction_resumes_to_the_same_results(finished, tmp_path):
    """SIGKILL inside the first extraction, then the same call: the store and the
    results equal those of the module's uninterrupted run."""
    spec, reference = finished
    killed = copy.deepcopy(spec)
    killed["experiment"].update(
        output_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache")
    )
    killed["backbone"] = spec["backbone"][:1]
    killed["finetune"] = []
    killed["run"] = {"batch_size": 2}
    (tmp_path / "spec.json").write_text(json.dumps(killed))
    script = textwrap.dedent(
        f"""
        import json, os, signal
        from tl.store import StoreWriter
        from tl.experiment import run

        write_batch = StoreWriter.write_batch
        def dying(self, *args, **kwargs):
            write_batch(self, *args, **kwargs)
            if self.images_done >= 6:
                os.kill(os.getpid(), signal.SIGKILL)
        StoreWriter.write_batch = dying
        run(json.loads(open({str(tmp_path / "spec.json")!r}).read()), progress=False)
        """
    )
    process = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).parents[1],
        capture_output=True,
        text=True,
    )
    assert process.returncode == -signal.SIGKILL, process.stderr[-2000:]
    partials = list((tmp_path / "cache").glob("*.partial.h5"))
    assert len(partials) == 1
    with FeatureStore(partials[0], require_complete=False) as partial:
        assert 0 < len(partial) < 12

    resumed = run(killed, progress=False)
    assert not list((tmp_path / "cache").glob("*.partial.h5"))
    for step in resumed.plan.steps:
        if isinstance(step, ExtractStep):
            with (
                FeatureStore(step.entry.path) as got,
                FeatureStore(
                    Path(spec["experiment"]["cache_dir"]) / step.entry.path.name
                ) as expected,
            ):
                assert got.paths == expected.paths
                for layer in expected.layers:
                    np.testing.assert_array_equal(got.read(layer), expected.read(layer))
    columns = ["backbone", "layer", "classifier", "cv_accuracy", "test_accuracy"]
    got = resumed.leaderboard[columns].sort_values(columns[:3]).reset_index(drop=True)
    expected = reference.leaderboard
    expected = expected[(expected.backbone == "vgg16") & (expected.strategy == "probe")]
    expected = expected[columns].sort_values(columns[:3]).reset_index(drop=True)
    pd.testing.assert_frame_equal(got, expected)


# ---------------------------------------------------------------------------------
# The cache's keys


@pytest.fixture
def small(tmp_path):
    """A one-backbone experiment with separate test images and a weights file."""
    write_png_tree(tmp_path / "train", {"ant": 6, "bee": 6}, seed=1)
    write_png_tree(tmp_path / "test", {"ant": 3, "bee": 3}, seed=2)
    weights = tmp_path / "a.weights.h5"
    keras.utils.set_random_seed(7)
    keras.applications.MobileNet(
        include_top=False, weights=None, input_shape=(SMALL, SMALL, 3)
    ).save_weights(weights)
    spec = {
        "experiment": {
            "name": "small",
            "output_dir": str(tmp_path / "out"),
            "cache_dir": str(tmp_path / "cache"),
        },
        "data": {"train": str(tmp_path / "train"), "test": str(tmp_path / "test")},
        "backbone": [
            {
                "name": "mobilenet",
                "weights": str(weights),
                "image_size": SMALL,
                "layers": ["last"],
            }
        ],
        "probe": {"classifiers": ["logreg"], "cv": 2, "jobs": 1},
    }
    run(spec, progress=False)
    return spec


def planned(spec: dict) -> dict[str, bool]:
    """Step title → cached, without running."""
    return {step.title: step.done for step in run(spec, plan_only=True).plan.steps}


def test_edited_image_other_weights_or_size_never_hit_an_old_entry(small, tmp_path):
    train, test, probe = planned(small)
    assert planned(small) == {train: True, test: True, probe: True}

    copy_of_weights = tmp_path / "elsewhere" / "same.weights.h5"
    copy_of_weights.parent.mkdir()
    shutil.copy(small["backbone"][0]["weights"], copy_of_weights)
    moved = copy.deepcopy(small)
    moved["backbone"][0]["weights"] = str(copy_of_weights)
    assert all(planned(moved).values())  # the same weights, by SHA-256

    other_weights = tmp_path / "b.weights.h5"
    keras.utils.set_random_seed(8)
    keras.applications.MobileNet(
        include_top=False, weights=None, input_shape=(SMALL, SMALL, 3)
    ).save_weights(other_weights)
    other = copy.deepcopy(small)
    other["backbone"][0]["weights"] = str(other_weights)
    assert not any(planned(other).values())

    bigger = copy.deepcopy(small)
    bigger["backbone"][0]["image_size"] = 40
    assert not any(planned(bigger).values())

    image = tmp_path / "train" / "bee" / "img_002.png"
    write_png_tree(tmp_path / "edit", {"bee": 3}, seed=9)
    shutil.copy(tmp_path / "edit" / "bee" / "img_002.png", image)
    assert planned(small) == {train: False, test: True, probe: False}

    # hash_content: images named by their bytes, so a touched file keeps its key
    hashed = copy.deepcopy(small)
    hashed["experiment"]["hash_content"] = True
    before = keys(hashed), keys(small)
    os.utime(image, ns=(0, 10**18))
    after = keys(hashed), keys(small)
    assert after[0] == before[0]
    assert after[1][train] != before[1][train]
    assert after[1][test] == before[1][test]


def keys(spec: dict) -> dict[str, str]:
    """Extraction step title → its cache key, planned."""
    plan = run(spec, plan_only=True).plan
    return {s.title: s.key for s in plan.steps if isinstance(s, ExtractStep)}


def test_a_store_holding_more_layers_is_reused(finished):
    spec, _ = finished
    fewer = copy.deepcopy(spec)
    fewer["backbone"][0]["layers"] = ["block5"]
    plan = run(fewer, plan_only=True).plan
    extracts = [s for s in plan.steps if isinstance(s, ExtractStep)][:2]
    for step in extracts:  # vgg16's: block5_pool from its block4 + block5 stores
        assert step.entry.key != step.key
        assert step.entry.record["base"] == base_identity(step.identity)
        assert ["block5_pool", "avg"] in step.entry.layers
    assert all(step.done for step in plan.steps)


def test_a_second_experiment_waits_for_the_lock_of_the_same_codes(tmp_path):
    cache = FeatureCache(tmp_path)
    held = locking.acquire(cache.store_path("k"), "experiment extraction")
    with (
        pytest.raises(TLError, match=r"Gave up after \d+ s waiting for experiment"),
        cache.writing("k", timeout=0.2),
    ):
        pass
    threading.Timer(1.0, held.release).start()
    began = time.monotonic()
    with cache.writing("k", timeout=30):
        assert time.monotonic() - began >= 0.9


# ---------------------------------------------------------------------------------
# Statistics and probes


def test_wilson_interval_and_mcnemar_against_hand_computed_values():
    z = 1.959963984540054
    for correct, total in ((8, 10), (36, 40), (0, 5), (5, 5)):
        p = correct / total
        centre = (p + z**2 / (2 * total)) / (1 + z**2 / total)
        half = (
            z
            / (1 + z**2 / total)
            * math.sqrt(p * (1 - p) / total + z**2 / (4 * total**2))
        )
        assert wilson_interval(correct, total) == pytest.approx(
            (centre - half, centre + half), abs=1e-12
        )
    # exact two-sided binomial test on the discordant pairs
    assert mcnemar_p_value(8, 2) == pytest.approx(2 * (1 + 10 + 45) / 2**10)
    assert mcnemar_p_value(2, 8) == pytest.approx(2 * (1 + 10 + 45) / 2**10)
    assert mcnemar_p_value(10, 0) == pytest.approx(2 / 2**10)
    assert mcnemar_p_value(3, 3) == 1.0
    assert mcnemar_p_value(0, 0) == 1.0


def test_paired_comparison_matches_images_by_path():
    paths = [f"/i/{n}.png" for n in range(12)]
    truth = ["a"] * 6 + ["b"] * 6
    first = ["a"] * 6 + ["b"] * 6  # all right
    second = ["b"] * 3 + ["a"] * 3 + ["b"] * 6  # wrong on 0..2
    order = np.random.default_rng(0).permutation(12)
    paired = paired_comparison(
        {"predictions": {"paths": paths, "truth": truth, "predicted": first}},
        {
            "predictions": {
                "paths": [paths[i] for i in order] + ["/i/extra.png"],
                "truth": [truth[i] for i in order] + ["a"],
                "predicted": [second[i] for i in order] + ["a"],
            }
        },
    )
    assert (paired.images, paired.only_first, paired.only_second) == (12, 3, 0)
    assert paired.second_accuracy == pytest.approx(9 / 12)
    assert paired.p_value == pytest.approx(2 / 2**3)


def _candidate(key, strategy, *, right, cv=None, std=0.0, val=None) -> dict:
    """A finished step's record: right on the first `right` of 20 test images."""
    truth = ["a", "b"] * 10
    predicted = truth[:right] + [{"a": "b", "b": "a"}[t] for t in truth[right:]]
    return {
        "key": key, "backbone": "net", "strategy": strategy, "layer": key,
        "pooling": "avg", "classifier": "logreg", "cv_accuracy": cv, "cv_std": std,
        "val_accuracy": val, "params": {}, "fit_seconds": 0.0, "seconds": 0.0,
        "depth": None, "store": None, "test_store": None, "model": key,
        "test": {"accuracy": right / 20, "balanced_accuracy": right / 20,
                 "macro_f1": right / 20},
        "predictions": {"paths": [f"/t/{n}.png" for n in range(20)],
                        "truth": truth, "predicted": predicted},
    }  # fmt: skip


def test_the_candidates_chosen_without_the_test_images_are_shown_beside_the_winner():
    """The winner (best of 6 on the same test images) is called optimistic; the
    honest estimates are the probe with the best CV accuracy (ties: the lower
    spread, then the plan's order, never the test) and the fine-tune with the best
    validation accuracy, each with its own test accuracy and interval."""
    records = [
        _candidate("first", "probe", right=12, cv=0.8, std=0.1),
        _candidate("steady", "probe", right=14, cv=0.8, std=0.05),
        _candidate("tie", "probe", right=17, cv=0.8, std=0.05),  # later in the plan
        _candidate("lucky", "probe", right=19, cv=0.7),  # the winner on test
        _candidate("tuned", "fine_tune", right=15, val=0.9),
        _candidate("unvalidated", "fine_tune", right=18),  # no validation images
        _candidate("scratch", "scratch", right=10, val=0.5),
    ]
    assert [r["key"] for r in chosen_without_test(records)] == ["steady", "tuned"]
    table = leaderboard(records)
    assert table.step.iloc[0] == "lucky"
    line = selection_line(table, records)
    assert "Optimistic: #1 is the best of 7 on the same 20 test images." in line
    for name, right in (("steady", 14), ("tuned", 15)):
        low, high = wilson_interval(right, 20)
        assert f"test {right / 20:.3f}, 95% interval {low:.3f}–{high:.3f}" in line
        assert name in line
    assert "lucky" not in line.split("Chosen without them")[1]
    assert "optimistic by construction" in selection_paragraph(table, records)
    assert selection_line(table.head(1), records[:1]) == ""


def test_one_probe_per_step_equals_one_comparison_of_all(tmp_path):
    """Probes run one layer x classifier at a time: the same CV folds, search
    subsample, parameters and test scores as one comparison of all of them."""
    X, y = blobs(n_per_class=30, classes=3, dim=10, separation=1.5, seed=4)
    noisy = X + np.random.default_rng(1).normal(scale=2, size=X.shape)
    train = write_store(
        tmp_path / "train.h5", {"a": X[::2], "b": noisy[::2]}, y[::2], ["x", "y", "z"]
    )
    test = write_store(
        tmp_path / "test.h5", {"a": X[1::2], "b": noisy[1::2]}, y[1::2], ["x", "y", "z"]
    )
    options = {"folds": 3, "search_rows": 25, "shots": (2,), "shot_seeds": 2, "jobs": 1}
    everything = compare(
        train,
        test_store=test,
        progress=False,
        classifiers=("logreg", "ridge"),
        **options,
    )
    rows = pd.DataFrame(everything.rows)
    for c in everything.candidates:
        alone = compare(
            train,
            test_store=test,
            progress=False,
            classifiers=(c.classifier,),
            layers=(c.layer,),
            **options,
        )
        (one,) = alone.candidates
        assert (one.params, one.cv_scores, one.test) == (c.params, c.cv_scores, c.test)
        np.testing.assert_array_equal(one.predicted, c.predicted)
        mine = rows[(rows.layer == c.layer) & (rows.classifier == c.classifier)]
        got = pd.DataFrame(alone.rows)
        pd.testing.assert_series_equal(
            got[got.metric != "fit_seconds"].value.reset_index(drop=True),
            mine[mine.metric != "fit_seconds"].value.reset_index(drop=True),
        )


def test_init_head_and_strategy_become_fine_tunings_settings(tmp_path):
    """`init_head = "probe" | "random"` is fine-tuning's head_init; `strategy =
    "scratch"` (or `weights = "none"` over a pretrained backbone) trains from random
    weights with BatchNorm in training mode; a fine-tune of a random-weight backbone
    is fine-tuned like a pretrained one, never silently trained from scratch."""
    write_png_tree(tmp_path / "images", {"a": 2, "b": 2})
    weights = tmp_path / "vgg16.weights.h5"
    model, _ = build_backbone(get_backbone("vgg16"), (SMALL, SMALL), "none")
    model.save_weights(weights)

    def finetunes(backbone_weights: str, *entries: dict) -> list:
        spec = load_spec(
            {
                "experiment": {"name": "heads", "output_dir": str(tmp_path / "out")},
                "data": {"train": str(tmp_path / "images")},
                "backbone": [
                    {
                        "name": "vgg16",
                        "weights": backbone_weights,
                        "image_size": SMALL,
                        "layers": ["last"],
                    }
                ],
                "probe": {"classifiers": ["logreg"]},
                "finetune": list(entries),
            }
        )
        return [
            (
                entry.strategy,
                entry.settings.backbone.weights,
                entry.settings.resolved().head_init,
                entry.settings.resolved().from_scratch,
            )
            for entry in spec.finetunes
        ]

    pretrained = str(weights)
    assert finetunes(
        pretrained,
        {"init_head": "probe"},
        {"init_head": "random"},
        {"strategy": "scratch"},
        {"weights": "none"},
        {"strategy": "scratch", "init_head": "random"},
    ) == [
        ("fine_tune", pretrained, "probe", False),
        ("fine_tune", pretrained, "random", False),
        ("scratch", "none", "random", True),
        ("scratch", "none", "random", True),
        ("scratch", "none", "random", True),
    ]
    assert finetunes("none", {"unfreeze": "block5"}, {"init_head": "random"}) == [
        ("fine_tune", "none", "probe", False),
        ("fine_tune", "none", "random", False),
    ]
    with pytest.raises(TLError, match=r"finetune\[0\]\.init_head: 'probe' starts"):
        finetunes(pretrained, {"strategy": "scratch", "init_head": "probe"})
    assert head_options("best_probe", tmp_path) == {"init_head": str(tmp_path)}


# ---------------------------------------------------------------------------------
# Bad files


@pytest.fixture
def files(tmp_path):
    """Writes an experiment file from a spec, with a folder of images to name."""
    write_png_tree(tmp_path / "images", {"a": 3, "b": 3})

    def write(change) -> Path:
        spec = {
            "experiment": {"name": "bad", "output_dir": str(tmp_path / "out")},
            "data": {"train": str(tmp_path / "images")},
            "backbone": [
                {
                    "name": "vgg16",
                    "weights": "none",
                    "image_size": SMALL,
                    "layers": ["block4", "last"],
                },
            ],
            "probe": {"classifiers": ["logreg"], "cv": 2},
            "finetune": [{"backbone": "vgg16", "epochs": 1}],
        }
        change(spec)
        path = tmp_path / "bad.toml"
        path.write_text(to_toml(spec))
        return path

    return write


def _set(section, key, value, index=0):
    def change(spec):
        table = spec[section]
        (table[index] if isinstance(table, list) else table)[key] = value

    return change


@pytest.mark.parametrize(
    "change, fragments",
    [
        (
            _set("backbone", "layer", ["last"]),
            ["backbone[0].layer: unknown key. Did you mean 'layers'?", "image_size"],
        ),
        (
            _set("backbone", "name", "vgg17"),
            ["backbone[0].name: Unknown backbone 'vgg17'. Did you mean vgg19, vgg16?"],
        ),
        (
            _set("backbone", "layers", ["block4", "blok5"]),
            ["backbone[0].layers[1]: Unknown layer 'blok5' for vgg16.", "block5"],
        ),
        (
            _set("finetune", "backbone", "resnet50"),
            ["finetune[0].backbone: 'resnet50' is not a backbone", "Backbones: vgg16"],
        ),
        (_set("probe", "cv", 1), ["probe.cv must be an integer >= 2. Got 1 instead."]),
        (
            _set("probe", "classifiers", ["logreg", "svm"]),
            ["probe.classifiers[1] must be one of 'logreg'", "Got 'svm'"],
        ),
        (_set("probe", "seed", 3), ["probe.seed: is set by [experiment] seed"]),
        (
            _set("backbone", "pooling", "mean"),
            ["backbone[0].pooling must be one of 'avg'", "Got 'mean'"],
        ),
        (
            _set("finetune", "init_head", "best"),
            ["finetune[0].init_head must be one of 'best_probe', 'probe', 'random'"],
        ),
        (_set("data", "test_size", 1.5), ["data.test_size must be in (0, 1)"]),
        (
            _set("data", "train", "/no/such/folder"),
            ["data.train: '/no/such/folder' does not exist."],
        ),
        (
            lambda spec: spec.update(backbone=spec["backbone"][0]),
            ["backbone: write each backbone as [[backbone]]"],
        ),
        (lambda spec: spec.update(results={"a": 1}), ["results: unknown key."]),
        (lambda spec: spec.update(run={"dask": "local"}), ["run.dask: "]),
    ],
)
def test_bad_files_are_refused_in_one_line_before_any_work(
    files, change, fragments, capsys, tmp_path
):
    path = files(change)
    code = run_experiment.main([str(path)])
    assert_one_line_error(capsys, code, str(path), *fragments)
    assert not (tmp_path / "out").exists()


def test_unreadable_files_are_refused_in_one_line(tmp_path, capsys):
    broken = tmp_path / "broken.toml"
    broken.write_text("[experiment\nname = 1\n")
    assert_one_line_error(
        capsys, run_experiment.main([str(broken)]), "broken.toml: not valid TOML"
    )
    missing = tmp_path / "missing.toml"
    assert_one_line_error(
        capsys, run_experiment.main([str(missing)]), "missing.toml' does not exist"
    )


def test_the_backbone_table_takes_the_engine_settings(finished, capsys, tmp_path):
    """`engine` (a field of tl.engines.EngineSettings, not listed in spec.py) is
    read into the codes' identity: the default spelled out hits the cache, another
    engine makes new stores of that backbone only; an unknown engine and int8
    (whose calibration sample no key can know beforehand) are refused."""
    spec, _ = finished

    def to_run(engine: str) -> set[str]:
        changed = copy.deepcopy(spec)
        changed["backbone"][0]["engine"] = engine
        plan = run(changed, plan_only=True).plan
        return {step.title for step in plan.steps if not step.done}

    assert to_run("keras") == set()
    changed = to_run("openvino")
    assert {t for t in changed if t.startswith("extract")} == {
        "extract  vgg16 avg train (12 images)",
        "extract  vgg16 avg test (4 images)",
    }
    assert all(" mobilenet " not in title for title in changed)
    bad = copy.deepcopy(spec)
    bad["backbone"][0]["engine"] = "openvin"
    path = tmp_path / "bad.toml"
    path.write_text(to_toml(bad))
    capsys.readouterr()
    code = run_experiment.main([str(path), "--plan"])
    assert_one_line_error(capsys, code, "backbone[0].engine", "'openvin'")
    bad["backbone"][0].update(engine="openvino", precision="int8")
    path.write_text(to_toml(bad))
    code = run_experiment.main([str(path), "--plan"])
    assert_one_line_error(capsys, code, "backbone[0].precision: int8 codes")


def test_plan_without_weights_known_shows_them_to_run(finished, monkeypatch):
    """ImageNet weights never loaded here: a plan names the steps that need them
    without building anything (no download)."""
    spec, _ = finished
    imagenet = copy.deepcopy(spec)
    imagenet["backbone"][0]["weights"] = "imagenet"
    imagenet["finetune"] = []
    counted = Counted(monkeypatch)
    counted.watch(tl.backbones.BackboneSettings, "build")
    plan = run(imagenet, plan_only=True).plan
    assert counted.calls["BackboneSettings.build"] == 0
    vgg = [s for s in plan.steps if s.backbone.label == "vgg16"]
    assert vgg and not any(step.done for step in vgg)
    assert all(
        step.key is None for step in vgg if isinstance(step, ExtractStep | ProbeStep)
    )
    other = [s for s in plan.steps if s.backbone.label == "mobilenet"]
    assert all(step.done for step in other)
    assert not any(isinstance(step, FineTuneStep) for step in plan.steps)
