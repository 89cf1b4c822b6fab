"""The advisor: its rules on measured numbers (table-driven, no model), its
measurements against independent computations, one run end to end on generated
images with a random-weight VGG16 at 32x32, and its refusals of bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL, assert_one_line_error, blobs, load_pngs, write_png_tree

import advise as advise_script
import tl.features
from tl.advisor import advise, rules
from tl.advisor.advice import (
    _comparison,
    _experiment_tables,
    _head,
    _stages,
    toml_text,
)
from tl.advisor.measure import (
    HeadConfidence,
    LearningCurve,
    ProbeScore,
    StageScore,
    learning_curve,
    measure_counts,
    probe,
)
from tl.backbones import BackboneSettings
from tl.errors import TLError
from tl.experiment import load_spec
from tl.experiment.spec import backbone_taps
from tl.images import ImageSettings, index_images
from tl.store import FeatureStore

# ---------------------------------------------------------------------------------
# Rules: measured numbers in, decisions out


def score(mean: float, std: float = 0.0, rows: int = 100) -> ProbeScore:
    """A probe whose 4 fold scores have exactly this mean and (population) std."""
    return ProbeScore(rows, rows // 4, 4, [mean - std, mean + std] * 2, 1.0)


def profile(*accuracies: tuple[float, float]) -> list[StageScore]:
    """Stages stage1..N-1 and last with these (mean, std)."""
    count = len(accuracies)
    return [
        StageScore(
            "last" if i == count - 1 else f"stage{i + 1}",
            f"layer{i + 1}",
            (i + 1) / count,
            64,
            score(*pair),
        )
        for i, pair in enumerate(accuracies)
    ]


def curve(half: tuple[float, float], full: tuple[float, float]) -> LearningCurve:
    return LearningCurve(
        "last", "layer3", [(0.5, score(*half, 50)), (1.0, score(*full))], []
    )


FLAT = curve((0.80, 0.01), (0.81, 0.01))  # +1 point a doubling
STEEP = curve((0.70, 0.01), (0.80, 0.01))  # +10 points, far beyond the spread
NO_HEAD = HeadConfidence(False, "no weights")

SIZE_CASES = [
    # (median per class, curve, value, close)
    (25, STEEP, "small", False),  # few images: small whatever the slope
    (5000, FLAT, "large", False),  # many: large whatever the slope
    (400, STEEP, "large", False),  # in between, still rising: lean to fine-tuning
    (400, FLAT, "small", False),  # in between, flat: the probe has it
    (400, curve((0.78, 0.02), (0.805, 0.02)), "small", True),  # 2.5 vs 3 ± 2.8
    (300, None, "small", True),  # no curve: the nearer count (middle 387), close
    (800, None, "large", True),
]


@pytest.mark.parametrize(("per_class", "measured", "value", "close"), SIZE_CASES)
def test_size_verdict(per_class, measured, value, close):
    verdict = rules.size_verdict(per_class, measured)
    assert (verdict.value, verdict.close) == (value, close)
    assert verdict.reasons and f"{per_class:g} images per class" in verdict.reasons[0]


def test_a_small_dataset_still_rising_is_told_more_images_would_pay():
    assert "more images would pay" in rules.size_verdict(25, STEEP).reasons[-1]
    assert len(rules.size_verdict(25, FLAT).reasons) == 1


SIMILARITY_CASES = [
    # (profile, head, value, close, best)
    ([(0.6, 0.02), (0.7, 0.02), (0.9, 0.02)], NO_HEAD, "similar", False, "last"),
    ([(0.6, 0.02), (0.9, 0.02), (0.7, 0.02)], NO_HEAD, "different", False, "stage2"),
    # ahead by 2 points, spread 5.7: a close call, leaning similar
    ([(0.6, 0.02), (0.82, 0.04), (0.80, 0.04)], NO_HEAD, "similar", True, "stage2"),
    # the head decides a close call
    (
        [(0.6, 0.02), (0.82, 0.04), (0.80, 0.04)],
        HeadConfidence(True, "loaded", 10, 0.2, 5.0),
        "different",
        False,
        "stage2",
    ),
    # the head disagrees with a clear profile: close
    (
        [(0.6, 0.02), (0.7, 0.02), (0.9, 0.02)],
        HeadConfidence(True, "loaded", 10, 0.1, 6.0),
        "similar",
        True,
        "last",
    ),
    (
        [(0.6, 0.02), (0.7, 0.02), (0.9, 0.02)],
        HeadConfidence(True, "loaded", 10, 0.8, 1.0),
        "similar",
        False,
        "last",
    ),
]


@pytest.mark.parametrize(
    ("accuracies", "head", "value", "close", "best"), SIMILARITY_CASES
)
def test_similarity_verdict(accuracies, head, value, close, best):
    stages = profile(*accuracies)
    verdict = rules.similarity_verdict(stages, head)
    assert (verdict.value, verdict.close, verdict.best) == (value, close, best)
    chosen = next(s for s in stages if s.alias == best)
    assert verdict.gap == pytest.approx(chosen.mean - stages[-1].mean)
    assert verdict.spread == pytest.approx(math.hypot(chosen.std, stages[-1].std))
    assert verdict.head == (
        "missing"
        if not head.available
        else "confident"
        if head.mean_top1 >= 0.5
        else "unsure"
    )
    if not head.available:
        assert "missing (no weights)" in verdict.reasons[-1]


SIMILAR = [(0.6, 0.02), (0.7, 0.02), (0.9, 0.02)]
DIFFERENT = [(0.6, 0.02), (0.9, 0.02), (0.7, 0.02)]
SCENARIO_CASES = [
    # (size, profile, recommended, contrasts): (strategy, stage, classifiers)
    (
        STEEP,
        25,
        SIMILAR,
        [("probe", "last", ("logreg",))],
        [("probe", "stage2", ("logreg",))],
    ),
    (
        FLAT,
        25,
        DIFFERENT,
        [("probe", "stage2", ("logreg", "linear_svm"))],
        [("probe", "last", ("logreg", "linear_svm"))],
    ),
    (
        FLAT,
        5000,
        SIMILAR,
        [("fine_tune", "last", ())],
        [("probe", "last", ("logreg",))],
    ),
    (
        FLAT,
        5000,
        DIFFERENT,
        [("fine_tune", "all", ())],
        [("scratch", "all", ()), ("probe", "stage2", ("logreg",)),
         ("probe", "last", ("logreg",))],
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    ("measured", "per_class", "accuracies", "recommended", "contrasts"),
    SCENARIO_CASES,
)
def test_each_scenario_recommends_its_strategy_and_contrast(
    measured, per_class, accuracies, recommended, contrasts
):
    stages = profile(*accuracies)
    size = rules.size_verdict(per_class, measured)
    similarity = rules.similarity_verdict(stages, NO_HEAD)
    advice = rules.recommend(size, similarity, stages)
    assert advice.scenario == f"{size.value}, {similarity.value}"
    assert advice.rule == rules.SCENARIOS[(size.value, similarity.value)]
    got = {
        role: [(c.strategy, c.stage, c.classifiers) for c in advice.role(role)]
        for role in ("recommended", "contrast")
    }
    assert got == {"recommended": recommended, "contrast": contrasts}


@pytest.mark.parametrize(
    ("measured", "per_class", "accuracies", "recommended", "contrasts"),
    SCENARIO_CASES,
)
def test_each_scenario_writes_a_valid_experiment_that_runs_its_comparison(
    tmp_path, measured, per_class, accuracies, recommended, contrasts
):
    """The experiment file of each scenario passes tl.experiment's own loader and
    holds exactly the candidates' layers, classifiers and fine-tunes."""
    write_png_tree(tmp_path / "images", {"a": 2, "b": 2})
    backbone = BackboneSettings("vgg16", weights="none")
    image = ImageSettings(size=SMALL)
    # stage2 and last of VGG16 at 32x32 as the profile's layers
    stages = [("stage2", None), ("last", None)]
    scores = profile(*accuracies)
    scores = [
        StageScore(s.alias, layer, s.depth, s.dims, s.score)
        for s, layer in zip(
            scores, ["block1_conv2", "block2_conv2", "block5_pool"], strict=True
        )
    ]
    advice = rules.recommend(
        rules.size_verdict(per_class, measured),
        rules.similarity_verdict(scores, NO_HEAD),
        scores,
    )
    tables = _experiment_tables(
        tmp_path / "advice",
        tmp_path / "cache",
        str(tmp_path / "images"),
        None,
        backbone,
        image,
        0,
    )
    path = tmp_path / "experiment.toml"
    path.write_text(toml_text(_comparison(tables, advice, stages, 3, 2)))
    spec = load_spec(path)
    (entry,) = spec.backbones
    probes = {c.layer for c in advice.candidates if c.strategy == "probe"}
    assert {tap.layer for tap in entry.taps} == probes
    assert set(spec.probe.classifiers) == {
        name for c in advice.candidates for name in c.classifiers
    }
    assert [(f.strategy, f.settings.unfreeze, f.init_head) for f in spec.finetunes] == [
        (c.strategy, c.stage, c.init_head)
        for c in advice.candidates
        if c.strategy != "probe"
    ]
    assert all(f.settings.epochs == 2 for f in spec.finetunes)
    assert (entry.backbone, entry.image) == (backbone, image)


def leaderboard(*rows) -> list[dict]:
    return [
        {
            "strategy": strategy,
            "layer": layer,
            "classifier": classifier,
            "test_accuracy": accuracy,
            "test_ci_low": accuracy - 0.1,
            "test_ci_high": accuracy + 0.1,
        }
        for strategy, layer, classifier, accuracy in rows
    ]


def test_judge_says_plainly_when_the_measurement_contradicts_the_advice():
    stages = profile(*DIFFERENT)
    advice = rules.recommend(
        rules.size_verdict(25, FLAT), rules.similarity_verdict(stages, NO_HEAD), stages
    )  # recommends a probe of stage2 (layer2)
    agree = rules.judge(
        advice,
        leaderboard(
            ("probe", "layer2", "logreg", 0.9), ("probe", "layer3", "logreg", 0.8)
        ),
    )
    assert agree.consistent and agree.text.startswith("consistent with the advice")
    assert agree.text.endswith("lies within its 95% interval")  # 0.8 >= 0.9 - 0.1
    clear = rules.judge(
        advice,
        leaderboard(
            ("probe", "layer2", "logreg", 0.9), ("probe", "layer3", "logreg", 0.7)
        ),
    )
    assert clear.consistent and "close call" not in clear.text
    tie = rules.judge(
        advice,
        leaderboard(
            ("probe", "layer3", "logreg", 0.9), ("probe", "layer2", "logreg", 0.9)
        ),
    )
    assert tie.consistent
    disagree = rules.judge(
        advice,
        leaderboard(
            ("probe", "layer3", "logreg", 0.9), ("probe", "layer2", "logreg", 0.7)
        ),
    )
    assert disagree.consistent is False
    assert disagree.text.startswith("the measurement wins: logreg probe on layer3")
    assert "0.700" in disagree.text and "0.900" in disagree.text


def test_the_budget_scales_images_stages_and_folds():
    assert rules.plan_budget(1, 5) == rules.Budget(1, 400, 3, 3)
    assert rules.plan_budget(0.1, 5).images == rules.MIN_IMAGES
    assert rules.plan_budget(10, 5) == rules.Budget(10, 4000, 5, 5)
    assert rules.plan_budget(1000, 2).images == rules.MAX_IMAGES


# ---------------------------------------------------------------------------------
# Measurements


def test_probe_scores_are_scikit_learns_cv_at_the_chosen_c():
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = blobs(n_per_class=12, classes=3, separation=1.0, seed=2)
    found = probe(X, y, folds=4, seed=0)
    reference = cross_val_score(
        make_pipeline(
            StandardScaler(),
            LogisticRegression(C=found.C, max_iter=2000, random_state=0),
        ),
        X,
        y,
        cv=StratifiedKFold(4, shuffle=True, random_state=0),
    )
    assert found.fold_scores == pytest.approx(reference.tolist())
    assert (found.rows, found.per_class_min, found.folds) == (36, 12, 4)


def test_too_few_images_per_class_reduce_the_curve_with_the_reason():
    X, y = blobs(n_per_class=4, classes=3, seed=1)
    full = StageScore("last", "layer", 1.0, X.shape[1], probe(X, y, 5, 0))
    assert full.score.folds == 4  # reduced to the smallest class
    reduced = learning_curve(X, y, full, folds=5, seed=0)
    assert [fraction for fraction, _ in reduced.points] == [0.5, 1.0]
    ((fraction, reason),) = reduced.skipped
    assert fraction == 0.25 and "CV needs 2 of each" in reason
    assert reduced.slope == pytest.approx(
        reduced.points[1][1].mean - reduced.points[0][1].mean
    )
    X, y = blobs(n_per_class=3, classes=2, seed=1)
    stage = StageScore("last", "layer", 1.0, X.shape[1], probe(X, y, 5, 0))
    only = learning_curve(X, y, stage, folds=5, seed=0)
    assert len(only.points) == 1 and only.slope is None and len(only.skipped) == 2
    assert rules.size_verdict(300, only).close  # no slope in between: a close call
    with pytest.raises(TLError, match="has 1 training image"):
        probe(X[:3], np.array([0, 0, 1]), 5, 0)


def test_counts_and_header_sizes(tmp_path):
    write_png_tree(tmp_path / "d", {"a": 3, "b": 5}, size=(20, 30))
    (tmp_path / "d" / "a" / "broken.png").write_bytes(b"not a png")
    counts = measure_counts(index_images(tmp_path / "d"))
    assert counts.per_class == {"a": 4, "b": 5}
    assert (counts.min_per_class, counts.median_per_class, counts.max_per_class) == (
        4,
        4.5,
        5,
    )
    assert counts.balance == pytest.approx(0.8)
    assert counts.image_sizes == [(30, 20)] * 8  # Pillow: (width, height)
    assert [path for path, _ in counts.unreadable] == ["a/broken.png"]
    assert counts.to_json()["image_width"] == {"min": 30, "median": 30.0, "max": 30}


def test_head_confidence_of_an_injected_1000_way_head(tmp_path):
    """A random-weight MobileNetV2 with its 1000-way top stands in for the ImageNet
    head: the measured top-1 and entropy match its softmax outputs on the same
    images, computed independently."""
    import keras

    root = write_png_tree(tmp_path / "d", {"a": 3, "b": 2})
    index = index_images(root)
    model = keras.applications.MobileNetV2(
        include_top=True, weights=None, input_shape=(SMALL, SMALL, 3), classes=1000
    )
    backbone = BackboneSettings("mobilenetv2", weights="none")
    head = _head(backbone, ImageSettings(size=SMALL), None, index, model)
    pixels = load_pngs(root, index.paths)
    probabilities = np.asarray(model(backbone.spec.preprocess(pixels)), np.float64)
    assert head.available and head.images == 5
    assert head.mean_top1 == pytest.approx(probabilities.max(axis=1).mean(), rel=1e-5)
    entropy = -(probabilities * np.log(np.clip(probabilities, 1e-12, 1))).sum(axis=1)
    assert head.mean_entropy == pytest.approx(entropy.mean(), rel=1e-5)
    assert head.normalized_entropy == pytest.approx(entropy.mean() / math.log(1000))
    # a random head is near uniform over its classes: unsure, "different"
    assert rules.similarity_verdict(profile(*SIMILAR), head).head == "unsure"


def test_without_the_heads_weights_the_signal_is_missing_never_guessed(tmp_path):
    index = index_images(write_png_tree(tmp_path / "d", {"a": 1, "b": 1}))
    head = _head(
        BackboneSettings("vgg16", weights="none"), ImageSettings(), None, index, None
    )
    assert not head.available and head.mean_top1 is None
    assert "--head-weights" in head.reason


@pytest.mark.parametrize(
    ("name", "constructor", "profiled", "left_to_last"),
    [
        (
            "vgg16",
            "VGG16",
            ["block1_conv2", "block2_conv2", "block3_conv3", "block4_conv3"],
            ["block5_conv3"],  # only block5_pool, a max-pool, follows it
        ),
        (
            "mobilenetv2",
            "MobileNetV2",
            [
                "block_1_expand_relu",
                "block_3_expand_relu",
                "block_6_expand_relu",
                "block_13_expand_relu",
            ],
            [],  # stage5 is out_relu, last itself
        ),
    ],
)
def test_a_stage_without_weights_up_to_last_is_left_to_last(
    name, constructor, profiled, left_to_last
):
    """The profile's stages are distinct: each has a layer with weights after it
    up to `last`, checked on the Keras model itself; a stage with none (VGG16's
    block5_conv3, then block5_pool) codes nearly what `last` codes and is left to
    it, with a note."""
    import keras

    taps = backbone_taps(name, (SMALL, SMALL))
    stages, notes = _stages(taps)
    model = getattr(keras.applications, constructor)(
        include_top=False, weights=None, input_shape=(SMALL, SMALL, 3)
    )
    names = [layer.name for layer in model.layers]

    def weighted_after(layer: str) -> bool:
        after = model.layers[names.index(layer) + 1 :]
        return any(layer.weights for layer in after)

    assert stages[-1] == ("last", next(t for t in taps if "last" in t.aliases))
    assert stages[-1][1].layer == names[-1]
    assert [tap.layer for _, tap in stages[:-1]] == profiled
    assert all(weighted_after(tap.layer) for _, tap in stages[:-1])
    numbered = [t.layer for t in taps if any(a[:5] == "stage" for a in t.aliases)]
    dropped = [layer for layer in numbered if layer not in profiled]
    assert not any(weighted_after(layer) for layer in dropped)
    assert [note.split(" ")[1] for note in notes] == [f"({x})" for x in left_to_last]


# ---------------------------------------------------------------------------------
# End to end


@pytest.fixture(scope="module")
def advised(tmp_path_factory):
    """tl.advise on 2 x 10 generated images (random-weight VGG16 at 32x32, a
    one-minute budget), then its comparison run; extractions counted."""
    root = tmp_path_factory.mktemp("advise")
    write_png_tree(root / "images", {"ant": 10, "bee": 10}, seed=3)
    sources = []
    original = tl.features.extract

    def counting(source, *args, **kwargs):
        sources.append(Path(source).name)
        return original(source, *args, **kwargs)

    patch = pytest.MonkeyPatch()
    patch.setattr(tl.features, "extract", counting)
    try:
        advice = advise(
            root / "images",
            BackboneSettings("vgg16", weights="none"),
            ImageSettings(size=SMALL),
            budget_minutes=1,
            output_dir=root / "advice",
            cache_dir=root / "cache",
            epochs=1,
            progress=False,
        )
        measured = list(sources)
        from tl.advisor.advice import run_comparison

        run_comparison(advice, progress=False)
    finally:
        patch.undo()
    return root, advice, measured, sources


def test_advice_json_traces_every_number_to_its_measurement(advised):
    _, advice, _, _ = advised
    values = json.loads(advice.advice_json.read_text())
    assert values["counts"]["per_class"] == {"ant": 10, "bee": 10}
    assert values["budget"]["stages"] == 3 and values["budget"]["folds"] == 3
    assert [s["alias"] for s in values["stages"]] == [
        "stage2",
        "stage3",
        "stage4",
        "last",
    ]  # stage5 (block5_conv3) is left to last (block5_pool)
    # the profile, recomputed from the fold scores of the store's codes
    with FeatureStore(values["measured_on"]["store"]) as store:
        assert len(store) == values["measured_on"]["rows"] == 16  # 20% held out
        layers = set(store.layers)
    for stage in values["stages"]:
        assert stage["layer"] in layers
        assert stage["mean"] == pytest.approx(np.mean(stage["fold_scores"]))
        assert stage["std"] == pytest.approx(np.std(stage["fold_scores"]))
    best = max(values["stages"], key=lambda s: (s["mean"], -s["std"], s["depth"]))
    points = values["learning_curve"]["points"]
    assert values["learning_curve"]["layer"] == best["layer"]
    assert points[-1]["fold_scores"] == best["fold_scores"]
    assert values["learning_curve"]["slope_per_doubling"] == pytest.approx(
        points[-1]["mean"] - points[-2]["mean"]
    )
    assert values["thresholds"] == rules.thresholds()
    assert values["head_confidence"]["available"] is False
    recommendation = values["recommendation"]
    assert (
        recommendation["scenario"] == "small, " + recommendation["similarity"]["value"]
    )
    assert recommendation["size"]["reasons"][0].startswith("8 images per class")


def test_the_experiment_file_is_valid_and_run_finds_the_advisors_codes(advised):
    root, advice, measured, sources = advised
    spec = load_spec(advice.experiment_toml)
    assert spec.cache_dir == (root / "cache").resolve()
    assert measured == ["train.csv"]  # the advisor: the training split, once
    assert sources == ["train.csv", "test.csv"]  # the run: only the test images
    assert advice.report.is_file() and "winner" in advice.report.read_text().lower()
    values = json.loads(advice.advice_json.read_text())
    assert values["report"] == str(advice.report)
    outcome = values["outcome"]
    assert outcome["consistent"] in (True, False)
    assert outcome["text"].startswith(
        "consistent with the advice"
        if outcome["consistent"]
        else "the measurement wins"
    )


def test_the_command_line_writes_the_advice_runs_it_and_prints_the_outcome(
    tmp_path, capsys
):
    """advise.py DATA --test TEST --run: the script's whole path, on 2 x 4 training
    and 2 x 2 test images with a random-weight VGG16 at 32x32."""
    write_png_tree(tmp_path / "train", {"ant": 4, "bee": 4}, seed=5)
    write_png_tree(tmp_path / "test", {"ant": 2, "bee": 2}, seed=6)
    output = tmp_path / "advice"
    code = advise_script.main([
        str(tmp_path / "train"), "--test", str(tmp_path / "test"),
        "--weights", "none", "-s", "32", "--budget", "1", "-o", str(output),
        "--cache-dir", str(tmp_path / "cache"), "-q", "--run",
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    values = json.loads((output / "advice.json").read_text())
    report = Path(values["report"])
    assert report.is_file() and report.parent == output / "experiment"
    assert f"report: {report}" in out.splitlines()
    outcome = values["outcome"]
    assert out.splitlines()[-1] == f"outcome: {outcome['text']}"
    assert outcome["text"].startswith(
        "consistent with the advice"
        if outcome["consistent"]
        else "the measurement wins"
    )
    assert outcome["winner"]["test_images"] == 4


# ---------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("tree", "fragments"),
    [
        ({"only": 6}, ("has one class", "'only'")),
        (None, ("unlabeled",)),
        ({"a": 6, "b": 3}, ("Class 'b'", "has 3 image(s)", "at least 5")),
        ("missing", ("does not exist",)),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, tree, fragments):
    data = tmp_path / "d"
    if tree is None:
        write_png_tree(tmp_path, {"d": 3})  # images, no class folders
    elif tree != "missing":
        write_png_tree(data, tree)
    code = advise_script.main([str(data), "--weights", "none", "-s", "32"])
    assert_one_line_error(capsys, code, *fragments)
