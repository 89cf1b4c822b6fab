"""`advise`: measure a dataset, name its scenario, write (and run) the comparison.

The measurements run on the training split of the experiment the advice writes:
its codes are extracted once, every stage in one pass, into the experiment cache
under the key the experiment's own extraction computes, so `--run` finds them there
(a store holding more layers is reused). Its test images stay untouched until the
experiment scores every strategy on them.

    <output>/advice.json       every measurement, threshold, verdict and the outcome
    <output>/experiment.toml   the comparison (tl.experiment's format)
    <output>/images.csv        the stratified subsample, when the budget needs one
    <output>/experiment/       the experiment's splits, steps and report (--run)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tl.advisor import rules
from tl.advisor.measure import (
    MIN_PER_CLASS,
    DatasetCounts,
    HeadConfidence,
    LearningCurve,
    StageScore,
    head_confidence,
    learning_curve,
    measure_counts,
    profile_stages,
)
from tl.backbones import BackboneSettings, Tap
from tl.classifiers import as_features
from tl.errors import TLError
from tl.images import ImageIndex, ImageSettings, index_images
from tl.provenance import library_versions

log = logging.getLogger("tl")

DEFAULT_EPOCHS = 10


@dataclasses.dataclass
class Advice:
    """What `advise` measured, decided and wrote (and measured with `run`)."""

    counts: DatasetCounts
    budget: rules.Budget
    stages: list[StageScore]
    curve: LearningCurve
    head: HeadConfidence
    recommendation: rules.Recommendation
    advice_json: Path
    experiment_toml: Path
    report: Path | None = None
    outcome: rules.Outcome | None = None


def advise(
    data: str | Path,
    backbone: BackboneSettings | str = "vgg16",
    image: ImageSettings | None = None,
    *,
    test: str | Path | None = None,
    budget_minutes: float = 10.0,
    output_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    head_weights: str | Path | None = None,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    run: bool = False,
    progress: bool = True,
    head_model=None,
) -> Advice:
    """Measure `data`'s size and similarity to the backbone's source, name its
    scenario, and write the experiment that checks the advice.

    Args:
        data: class folders or a path,label CSV.
        backbone: the network and its weights (a name: ImageNet weights).
        image: how files become inputs (default: the backbone's size).
        test: separate test images for the comparison (default: 20% held out).
        budget_minutes: caps the subsample, the stages and the CV folds.
        output_dir: where advice.json and experiment.toml go
            (default: advice/<data>_<backbone>).
        cache_dir: the experiment cache (default: features/cache).
        head_weights: the backbone's include-top weights file, for the ImageNet
            head's confidence offline (default: Keras' ImageNet weights when the
            backbone uses them; else the signal is missing).
        epochs: epochs of the fine-tunes the comparison runs.
        run: run the comparison now and judge its winner against the advice.
        head_model: a Keras classifier to use as the source head (tests).

    Returns:
        An `Advice`; `advice.json` holds every number.
    """
    from tl.cli import check_output, default_output
    from tl.experiment.spec import DEFAULT_CACHE_DIR, backbone_taps

    if isinstance(backbone, str):
        backbone = BackboneSettings(backbone)
    image = (image or ImageSettings()).resolved(backbone.spec)
    index = _labelled(data, test is None)
    for option, path in (("test", test), ("head_weights", head_weights)):
        if path is not None and not Path(path).expanduser().exists():
            raise TLError(f"{option} {str(path)!r} does not exist.")
    output = Path(
        output_dir or default_output("advice", str(data), backbone.name)
    ).resolve()
    check_output(output, "output_dir", folder=True)
    output.mkdir(parents=True, exist_ok=True)
    counts = measure_counts(index, seed)
    taps = backbone_taps(backbone.name, image.size)
    stages, merged = _stages(taps)
    budget = rules.plan_budget(budget_minutes, len(stages) - 1)
    stages = stages[-budget.stages - 1 :]
    train_source = _subsample(index, data, budget.images, seed, output / "images.csv")
    tables = _experiment_tables(
        output,
        Path(cache_dir or DEFAULT_CACHE_DIR).resolve(),
        train_source,
        test,
        backbone,
        image,
        seed,
    )
    measured = {
        **tables,
        "backbone": [{**tables["backbone"][0], "layers": [s[0] for s in stages]}],
        "probe": {"classifiers": ["logreg"], "cv": budget.folds},
    }
    _say(
        f"advise: {data}: {counts.images} images, {counts.classes} classes "
        f"({counts.min_per_class} to {counts.max_per_class} per class, median "
        f"{counts.median_per_class:g}, balance {counts.balance:.2f}); "
        f"{backbone.name} at {image.size[0]}x{image.size[1]}, weights "
        f"{backbone.weights}"
    )
    _say(
        f"budget {budget.minutes:g} min: up to {budget.images} images, the deepest "
        f"{budget.stages} stages, {budget.folds}-fold CV"
    )
    for note in merged:
        _say(note)
    store_path, train_index = _extract_stages(measured, progress)
    scores, curve, y = _probe_stages(store_path, stages, budget.folds, seed)
    head = _head(backbone, image, head_weights, train_index, head_model)
    size = rules.size_verdict(float(np.median(np.bincount(y))), curve)
    similarity = rules.similarity_verdict(scores, head)
    recommendation = rules.recommend(size, similarity, scores)
    experiment = _comparison(tables, recommendation, stages, budget.folds, epochs)
    toml_path = output / "experiment.toml"
    toml_path.write_text(toml_text(experiment))
    from tl.experiment import load_spec

    load_spec(toml_path)  # the file is valid, or this is a bug worth a traceback
    advice = Advice(
        counts,
        budget,
        scores,
        curve,
        head,
        recommendation,
        output / "advice.json",
        toml_path,
    )
    _write_advice(advice, data, backbone, image, store_path, len(y))
    _say(describe(advice))
    if run:
        run_comparison(advice, progress)
    return advice


def _say(text: str) -> None:
    print(text, flush=True)


# ---------------------------------------------------------------------------------
# Inputs


def _labelled(data: str | Path, held_out: bool) -> ImageIndex:
    """The labelled images of `data`: at least two classes, each with enough
    images for a CV'd probe (and, when the test images are `held_out` from them,
    one of every five to test)."""
    from tl.experiment.spec import DEFAULT_TEST_SIZE

    index = index_images(data)
    if not index.class_names:
        raise TLError(
            f"{str(data)!r} holds unlabeled images; the advisor measures how well "
            f"classes separate, so give one sub-folder (or CSV label) per class."
        )
    if len(index.class_names) < 2:
        raise TLError(
            f"{str(data)!r} has one class ({index.class_names[0]!r}); the advisor "
            f"needs at least two, one sub-folder (or CSV label) each."
        )
    needed = math.ceil(1 / DEFAULT_TEST_SIZE) if held_out else MIN_PER_CLASS
    counts = np.bincount(index.labels, minlength=len(index.class_names))
    if counts.min() < needed:
        name = index.class_names[int(counts.argmin())]
        why = f"{MIN_PER_CLASS} for a cross-validated probe" + (
            f", and {DEFAULT_TEST_SIZE:.0%} held out to test" if held_out else ""
        )
        raise TLError(
            f"Class {name!r} of {str(data)!r} has {counts.min()} image(s); the "
            f"advisor needs at least {needed} of each class ({why}). Add images"
            + (" or give --test images." if held_out else ".")
        )
    return index


def _stages(taps: Sequence[Tap]) -> tuple[list[tuple[str, Tap]], list[str]]:
    """(alias, tap) of `stage1..N` and `last`, each a distinct stage, and a note
    for each stage left to `last`.

    A stage with no weights between it and `last` (only pooling, activation or
    reshaping layers, e.g. VGG's block5_pool after block5_conv3; or `last` itself)
    pools to nearly the same codes as `last`: no contrast to it, so `last` stands
    for it.
    """
    by_alias = {alias: tap for tap in taps for alias in tap.aliases}
    last = by_alias["last"]
    stages, notes = [], []
    number = 1
    while (tap := by_alias.get(f"stage{number}")) is not None:
        between = [t for t in taps if tap.depth < t.depth <= last.depth]
        if any(t.params for t in between):
            stages.append((f"stage{number}", tap))
        elif between:
            notes.append(
                f"stage{number} ({tap.layer}) is not profiled apart from last "
                f"({last.layer}): no layer with weights lies between them"
            )
        number += 1
    return [*stages, ("last", last)], notes


def _subsample(
    index: ImageIndex, data: str | Path, size: int, seed: int, path: Path
) -> str:
    """The training source: `data` itself, or beyond the budget's `size` a
    stratified, seeded subsample written to `path` as a CSV."""
    if len(index) <= size:
        path.unlink(missing_ok=True)
        return str(Path(data).expanduser().resolve())
    from sklearn.model_selection import train_test_split

    from tl.experiment.splits import csv_text, write_if_changed

    rows, _ = train_test_split(
        np.arange(len(index)), train_size=size, stratify=index.labels, random_state=seed
    )
    paths = index.absolute_paths()
    names = [index.class_names[label] for label in index.labels]
    write_if_changed(path, csv_text([(paths[i], names[i]) for i in sorted(rows)]))
    return str(path)


def _experiment_tables(
    output: Path,
    cache_dir: Path,
    train: str,
    test: str | Path | None,
    backbone: BackboneSettings,
    image: ImageSettings,
    seed: int,
) -> dict:
    """The tables the measurements and the comparison share: the same images, split
    the same way, the same backbone and image settings, so the same codes."""
    data = {"train": train}
    if test is not None:
        data["test"] = str(Path(test).expanduser().resolve())
    else:
        from tl.experiment.spec import DEFAULT_TEST_SIZE

        data["test_size"] = DEFAULT_TEST_SIZE
    return {
        "experiment": {
            "name": f"advice-{output.name}",
            "output_dir": str(output / "experiment"),
            "cache_dir": str(cache_dir),
            "seed": seed,
        },
        "data": data,
        "backbone": [
            {
                **{
                    ("name" if key == "backbone" else key): value
                    for key, value in backbone.to_json().items()
                },
                **image.to_json(),
            }
        ],
    }


# ---------------------------------------------------------------------------------
# Measurements


def _extract_stages(tables: dict, progress: bool) -> tuple[Path, ImageIndex]:
    """Extract every stage of the experiment's training split into the cache (or
    find it there); (the store, the split's index)."""
    from tl.experiment import FeatureCache, load_spec
    from tl.experiment.plan import ExtractStep, make_plan
    from tl.experiment.runner import extract_step
    from tl.experiment.splits import prepare_data

    spec = load_spec(tables)
    cache = FeatureCache(spec.cache_dir)
    data = prepare_data(spec)
    plan = make_plan(spec, data, cache, resolve_weights=True)
    step = next(
        step
        for step in plan.steps
        if isinstance(step, ExtractStep) and step.split == "train"
    )
    extract_step(step, spec, cache, "[advise]", progress, {})
    cache.register(spec.output_dir, spec.name, [step.entry.key])
    return step.entry.path, data.train


def _probe_stages(
    store_path: Path, stages: list, folds: int, seed: int
) -> tuple[list[StageScore], LearningCurve, np.ndarray]:
    """The layer profile, then the learning curve of its best stage."""
    from tl.store import FeatureStore

    with FeatureStore(store_path) as store:
        y = np.asarray(store.labels)
        final = max(tap.depth for _, tap in stages) or 1
        _say(
            f"layer profile: logistic regression, C by {folds}-fold CV, on "
            f"{len(y)} training images"
        )
        scores = profile_stages(
            lambda layer: as_features(store.read(layer)),
            y,
            [(alias, tap.layer, tap.depth / final) for alias, tap in stages],
            folds,
            seed,
        )
        best = max(scores, key=lambda s: (s.mean, -s.std, s.depth))
        curve = learning_curve(
            as_features(store.read(best.layer)), y, best, folds, seed
        )
    for fraction, reason in curve.skipped:
        _say(f"learning curve: {fraction:.0%} point skipped: {reason}")
    return scores, curve, y


def _head(
    backbone: BackboneSettings,
    image: ImageSettings,
    head_weights: str | Path | None,
    index: ImageIndex,
    model,
) -> HeadConfidence:
    """The ImageNet head's confidence on the measured images, or why it is
    missing."""
    import keras

    from tl.images import decoded_batches

    spec = backbone.spec
    if model is None:
        if head_weights is None and backbone.weights != "imagenet":
            kind = "random" if backbone.weights == "none" else "a no-top file"
            return HeadConfidence(
                False,
                f"the backbone's weights are {kind}, without the ImageNet "
                f"classifier; give --head-weights FILE (the include-top weights of "
                f"{spec.name}) to measure it",
            )
        weights = str(head_weights) if head_weights else "imagenet"
        try:
            model = getattr(keras.applications, spec.constructor)(
                include_top=True, weights=weights
            )
        except Exception as error:  # Keras raises bare Exception offline
            reason = " ".join(str(error).split())[:160]
            return HeadConfidence(
                False, f"the include-top weights {weights!r} did not load: {reason}"
            )
    size = tuple(model.input_shape[1:3])
    settings = dataclasses.replace(image, size=size)
    batches = (
        spec.preprocess(batch.images)
        for batch in decoded_batches(index.absolute_paths(), settings, 32)
        if batch.images is not None
    )
    return head_confidence(model, batches, int(model.output_shape[-1]))


# ---------------------------------------------------------------------------------
# The comparison


def _comparison(
    tables: dict,
    recommendation: rules.Recommendation,
    stages: list,
    folds: int,
    epochs: int,
) -> dict:
    """The experiment that runs the recommended strategy against the contrasting
    ones: the probes' stages, their classifiers, the fine-tunes."""
    candidates = recommendation.candidates
    probed = {c.stage for c in candidates if c.strategy == "probe"}
    classifiers = dict.fromkeys(
        name for c in candidates if c.strategy == "probe" for name in c.classifiers
    )
    experiment = {
        **tables,
        "backbone": [
            {
                **tables["backbone"][0],
                "layers": [alias for alias, _ in stages if alias in probed],
            }
        ],
        "probe": {"classifiers": list(classifiers), "cv": folds},
    }
    finetunes = []
    for candidate in candidates:
        if candidate.strategy == "probe":
            continue
        entry = {
            "unfreeze": candidate.stage,
            "epochs": epochs,
            "init_head": candidate.init_head,
        }
        if candidate.strategy == "scratch":
            entry["strategy"] = "scratch"
        finetunes.append(entry)
    if finetunes:
        experiment["finetune"] = finetunes
    return experiment


def toml_text(tables: dict) -> str:
    """An experiment's tables as TOML: tables of strings, numbers, booleans and
    lists of them, and arrays of such tables."""

    def value(item) -> str:
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, list | tuple):
            return "[" + ", ".join(value(v) for v in item) + "]"
        if isinstance(item, str):
            return json.dumps(item)
        if isinstance(item, int | float):
            return repr(item)
        raise TypeError(f"no TOML for {item!r}")

    lines = []
    for section, content in tables.items():
        for table in content if isinstance(content, list) else [content]:
            header = f"[[{section}]]" if isinstance(content, list) else f"[{section}]"
            lines += ["", header] if lines else [header]
            lines += [
                f"{key} = {value(item)}"
                for key, item in table.items()
                if item is not None
            ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------
# Reporting


def _write_advice(
    advice: Advice,
    data,
    backbone: BackboneSettings,
    image: ImageSettings,
    store: Path,
    rows: int,
) -> None:
    """advice.json: the inputs, every measurement with how it was made, the
    thresholds, the verdicts and the comparison written."""
    values = {
        "data": str(data),
        "backbone": backbone.to_json(),
        "image": image.to_json(),
        "budget": advice.budget.to_json(),
        "counts": advice.counts.to_json(),
        "measured_on": {
            "store": str(store),
            "rows": rows,
            "what": "the comparison's training split (its test images untouched)",
        },
        "stages": [stage.to_json() for stage in advice.stages],
        "learning_curve": advice.curve.to_json(),
        "head_confidence": advice.head.to_json(),
        "thresholds": rules.thresholds(),
        "recommendation": advice.recommendation.to_json(),
        "experiment": str(advice.experiment_toml),
        "report": str(advice.report) if advice.report else None,
        "outcome": advice.outcome.to_json() if advice.outcome else None,
        "versions": library_versions(),
    }
    advice.advice_json.write_text(json.dumps(values, indent=1, default=str))


def describe(advice: Advice) -> str:
    """The advice as printed: the evidence table, the scenario with its reasons,
    the recommended and the contrasting strategies, the files."""
    rec = advice.recommendation
    lines = [f"{'stage':<8} {'layer':<24} {'dims':>6}  {'accuracy':<15} folds"]
    for stage in advice.stages:
        lines.append(
            f"{stage.alias:<8} {stage.layer:<24} {stage.dims:>6}  "
            f"{stage.mean:.3f} ± {stage.std:.3f}   {stage.score.folds}"
        )
    curve = advice.curve
    points = ", ".join(
        f"{fraction:.0%} ({score.rows} rows) {score.mean:.3f} ± {score.std:.3f}"
        for fraction, score in curve.points
    )
    slope = (
        f"{curve.slope * 100:+.1f} points per doubling (spread "
        f"{curve.slope_spread * 100:.1f})"
        if curve.slope is not None
        else "no slope (fewer than two points)"
    )
    lines.append(f"learning curve on {curve.alias}: {points}: {slope}")
    head = advice.head
    lines.append(
        f"ImageNet head: mean top-1 {head.mean_top1:.3f}, entropy "
        f"{head.mean_entropy:.2f} nats ({head.images} images)"
        if head.available
        else f"ImageNet head: missing ({head.reason})"
    )
    close = " (a close call)" if rec.close else ""
    lines.append(f"scenario: {rec.scenario}{close}: {rec.rule}")
    for verdict in (rec.size, rec.similarity):
        lines += [f"  - {reason}" for reason in verdict.reasons]
    for role in ("recommended", "contrast"):
        for candidate in rec.role(role):
            lines.append(f"{role + ':':<12} {candidate.title}")
    lines.append(f"advice: {advice.advice_json}")
    lines.append(
        f"comparison: {advice.experiment_toml} (run it: python run_experiment.py "
        f"{advice.experiment_toml}, or advise.py ... --run)"
    )
    return "\n".join(lines)


def run_comparison(advice: Advice, progress: bool = True) -> rules.Outcome:
    """Run the advice's experiment, judge its winner against the recommendation,
    and record both in advice.json."""
    from tl.experiment import run

    result = run(advice.experiment_toml, progress=progress)
    rows = result.leaderboard.to_dict(orient="records")
    advice.outcome = rules.judge(advice.recommendation, rows)
    advice.report = result.report
    values = json.loads(advice.advice_json.read_text())
    values.update(report=str(result.report), outcome=advice.outcome.to_json())
    advice.advice_json.write_text(json.dumps(values, indent=1, default=str))
    _say(f"outcome: {advice.outcome.text}")
    return advice.outcome
