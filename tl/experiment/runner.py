"""Run an experiment: its steps in order, each skipped when done, then the report.

Per backbone and pooling, one extraction computes the codes of every requested layer
for the training images and one for the test images (or finds them in the cache);
then the probes run per layer × classifier; the fine-tunes come last. Each step
prints one line; extractions and fine-tunes show their progress bars. A step's
record is written as soon as it finishes, so an interrupted run continues where it
stopped: inside an extraction (the store resumes), inside a fine-tune (the run
resumes) or at the next step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from tl import evaluation, features, finetune
from tl.classifiers import as_features, save_classifier
from tl.cli import check_output
from tl.errors import TLError
from tl.experiment.cache import FeatureCache
from tl.experiment.plan import (
    ExtractStep,
    FineTuneStep,
    Plan,
    ProbeStep,
    make_plan,
)
from tl.experiment.report import format_top, selection_line, write_report
from tl.experiment.spec import ExperimentSpec, head_options, load_spec
from tl.experiment.splits import fine_tune_lists, prepare_data
from tl.images import ImageIndex, index_images
from tl.provenance import library_versions
from tl.reports import METRICS
from tl.store import FeatureStore


@dataclasses.dataclass
class ExperimentResult:
    """What `run` did.

    Attributes:
        spec: the experiment, checked.
        plan: its steps (each with its key, cache entry or record).
        ran: the titles of the steps that did work in this call.
        leaderboard: one row per probe and fine-tune, best first (None: a plan).
        report: the path of report.html (None: a plan).
    """

    spec: ExperimentSpec
    plan: Plan
    ran: list[str]
    leaderboard: pd.DataFrame | None = None
    report: Path | None = None


def run(
    source: str | Path | Mapping,
    *,
    plan_only: bool = False,
    progress: bool = True,
    hash_content: bool | None = None,
) -> ExperimentResult:
    """Run the experiment of a TOML file (or a dict of its tables).

    Args:
        source: the experiment file, or the dict `tomllib` would read from it.
        plan_only: print the steps and which are cached, and stop: nothing is
            extracted, trained or written.
        progress: show the progress bars of extractions, probes and fine-tunes.
        hash_content: name images by the SHA-256 of their bytes rather than their
            size and modification time (overrides `[experiment] hash_content`).

    Returns:
        An `ExperimentResult`; the report is in `spec.output_dir`.
    """
    spec = load_spec(source, hash_content=hash_content)
    if not plan_only:
        for option, folder in (
            ("experiment.output_dir", spec.output_dir),
            ("experiment.cache_dir", spec.cache_dir),
        ):
            check_output(folder, f"{spec.source}: {option}", folder=True)
    cache = FeatureCache(spec.cache_dir)
    data = prepare_data(spec, write=not plan_only)
    plan = make_plan(spec, data, cache, resolve_weights=not plan_only, announce=_say)
    _say(
        f"experiment {spec.name!r} ({spec.source}): {len(data.train)} training and "
        f"{len(data.test)} test images, {len(data.class_names)} classes; output "
        f"{spec.output_dir}, cache {spec.cache_dir}"
    )
    if plan_only:
        _say(plan.describe())
        return ExperimentResult(spec, plan, [])
    cache.register(spec.output_dir, spec.name, plan.store_keys())
    ran = []
    began = time.perf_counter()
    with _cluster(spec) as client:
        for number, step in enumerate(plan.steps, start=1):
            counter = plan.counter(number)
            if isinstance(step, ExtractStep):
                work = extract_step(step, spec, cache, counter, progress, client)
            elif isinstance(step, ProbeStep):
                work = _probe(step, plan, counter, progress)
            else:
                work = _fine_tune(step, plan, counter, progress)
            if work:
                ran.append(step.title)
    cache.register(spec.output_dir, spec.name, plan.store_keys())
    _write_run(plan, ran, time.perf_counter() - began)
    table, report = write_report(plan, ran)
    _say(format_top(table))
    if selection := selection_line(table, plan.finished_records()):
        _say(selection)
    _say(f"report: {report}")
    return ExperimentResult(spec, plan, ran, table, report)


def _say(text: str) -> None:
    print(text, flush=True)


@contextlib.contextmanager
def _cluster(spec: ExperimentSpec) -> Iterator[dict]:
    """The keywords that put extraction on a Dask cluster (`[run] dask`): the hook
    for `tl.distributed`, whose `connected` makes the client; none without it."""
    if spec.dask is None:
        yield {}
        return
    from tl.distributed import connected

    with connected(spec.dask) as client:
        yield {"client": client}


# ---------------------------------------------------------------------------------
# Steps


def extract_step(
    step: ExtractStep,
    spec: ExperimentSpec,
    cache: FeatureCache,
    counter: str,
    progress: bool,
    client: dict,
) -> bool:
    """Find or make the step's store in the cache; whether it extracted (the
    runner's step, and the advisor's measurements)."""
    if step.entry is not None:
        _say(f"{counter} {step.title}: cached {step.entry.key[:12]}")
        return False
    key = step.key
    with cache.writing(key, spec.lock_timeout):
        step.entry = cache.find(step.identity)  # another experiment may have made it
        if step.entry is not None:
            _say(f"{counter} {step.title}: made meanwhile, {step.entry.key[:12]}")
            return False
        partial = cache.partial_path(key)
        resumed = partial.exists() and cache.resumable(
            partial, step.settings, step.weights_sha256
        )
        _say(
            f"{counter} {step.title}: extracting {len(step.backbone.taps)} layers "
            f"into {cache.store_path(key)}" + (" (resuming)" if resumed else "")
        )
        source = spec.output_dir / "splits" / f"{step.split}.csv"
        began = time.perf_counter()
        features.extract(
            source,
            partial,
            step.settings,
            batch_size=spec.batch_size,
            overwrite=partial.exists() and not resumed,
            progress=progress,
            **client,
        )
        step.entry = cache.add(
            step.identity,
            hash_content=spec.hash_content,
            seconds=time.perf_counter() - began,
            label=step.backbone.label,
        )
    return True


def _probe(step: ProbeStep, plan: Plan, counter: str, progress: bool) -> bool:
    """Run a probe unless its record exists; whether it ran."""
    plan.refresh(step)
    if step.record is None:
        began = time.perf_counter()
        result = evaluation.compare(
            step.train.entry.path,
            step.settings,
            test_store=step.test.entry.path,
            progress=progress,
        )
        plan.records.save(
            _probe_record(step, plan, result, time.perf_counter() - began)
        )
        plan.refresh(step)
        ran = True
    else:
        ran = False
    record = step.record
    outcome = f"CV {record['cv_accuracy']:.3f}, test {record['test']['accuracy']:.3f}"
    timing = f" ({record['seconds']:.1f} s)" if ran else ", cached"
    _say(f"{counter} {step.title}: {outcome}{timing}")
    return ran


def _probe_record(step: ProbeStep, plan: Plan, result, seconds: float) -> dict:
    """The record of a finished probe: scores, predictions on the test images, the
    saved model and the stores it came from."""
    candidate = result.candidates[0]
    folder = Path("probes") / step.key
    settings = step.settings
    with FeatureStore(step.train.entry.path) as store:
        save_classifier(
            plan.spec.output_dir / folder,
            candidate.pipeline,
            store=store,
            layer=step.tap.layer,
            classifier=step.classifier,
            params=candidate.params,
            normalization=settings.normalization,
            pca=settings.pca,
            scores={"cv_accuracy": candidate.cv_scores, "test": candidate.test},
        )
    with FeatureStore(step.test.entry.path) as test_store:
        names = test_store.class_names
        predictions = {
            "paths": test_store.paths,
            "truth": [names[label] for label in test_store.labels],
            "predicted": [names[label] for label in candidate.predicted],
        }
    common = _common(
        step,
        kind="probe",
        strategy="probe",
        layer=step.tap.layer,
        classifier=step.classifier,
        model=folder,
        seconds=seconds,
        store=step.train.entry.key,
        test_store=step.test.entry.key,
    )
    return {
        **common,
        "settings": settings.to_json(),
        "depth": step.tap.depth / step.backbone.final_depth,
        "cv_scores": candidate.cv_scores,
        "cv_accuracy": candidate.cv_mean,
        "cv_std": candidate.cv_std,
        "val_accuracy": None,
        "params": candidate.params,
        "test": candidate.test,
        "fit_seconds": candidate.fit_seconds,
        "adjustments": result.adjustments,
        "predictions": predictions,
        "rows": [_row(row, common) for row in result.rows],
    }


def _fine_tune(step: FineTuneStep, plan: Plan, counter: str, progress: bool) -> bool:
    """Run (or resume) a fine-tune unless its record exists; whether it ran."""
    plan.refresh(step)
    if step.record is not None:
        accuracy = step.record["test"]["accuracy"]
        _say(f"{counter} {step.title}: test {accuracy:.3f}, cached")
        return False
    if step.key is None:  # only with weights unresolved, which a run resolves
        raise TLError(f"{step.entry.where}: its inputs are not ready.")
    spec, data = plan.spec, plan.data
    folder = Path("finetune") / step.key
    _say(f"{counter} {step.title}: training in {spec.output_dir / folder}")
    began = time.perf_counter()
    train, val = fine_tune_lists(spec, data, step.entry)
    best = step.best_probe()
    head = None
    if best is not None:
        head = spec.output_dir / "finetune" / f"{step.key}-head"
        _refit_probe(best, index_images(train), head)
    settings = step.entry.settings.updated(**head_options(step.entry.init_head, head))
    result = finetune.fine_tune(
        train,
        spec.output_dir / folder,
        settings,
        val_source=val,
        test_source=data.test_csv,
        progress=progress,
    )
    record = _fine_tune_record(step, plan, result, folder, time.perf_counter() - began)
    plan.records.save({**record, "settings": settings.to_json()})
    plan.refresh(step)
    return True


def _refit_probe(best: ProbeStep, train: ImageIndex, folder: Path) -> None:
    """Save the best probe (classifier and hyper-parameters) refit on the codes of
    a fine-tune's training images only: the head an LP-FT starts from."""
    settings, params = best.settings, best.record["params"]
    with FeatureStore(best.train.entry.path) as store:
        rows = np.isin(store.paths, train.absolute_paths())
        X = as_features(store.read(best.tap.layer, rows))
        pipeline, _ = evaluation.fit_pipeline(
            best.classifier, params, X, store.labels[rows], settings
        )
        save_classifier(
            folder,
            pipeline,
            store=store,
            layer=best.tap.layer,
            classifier=best.classifier,
            params=params,
            normalization=settings.normalization,
            pca=settings.pca,
            scores={"refit_of": best.record["model"], "rows": int(rows.sum())},
        )


def _fine_tune_record(
    step: FineTuneStep, plan: Plan, result, folder: Path, seconds: float
) -> dict:
    """The record of a finished fine-tune: its test scores, its accuracy on its
    validation images, its predictions on the test images, and its folder."""
    directory = plan.spec.output_dir / folder
    model = finetune.load_finetuned(directory)
    splits = pd.read_csv(directory / "splits.csv", dtype=str, keep_default_na=False)
    splits = splits[splits["split"].isin(["val", "test"])].reset_index(drop=True)
    classes, _, _ = model.predict_images(list(splits["path"]))  # all decode: checked
    splits["predicted"] = [model.class_names[c] for c in classes]
    val = splits[splits["split"] == "val"]
    test = splits[splits["split"] == "test"]
    val_accuracy = float((val.label == val.predicted).mean()) if len(val) else None
    predictions = {
        "paths": list(test.path),
        "truth": list(test.label),
        "predicted": list(test.predicted),
    }
    settings = step.entry.settings
    rows = pd.read_csv(directory / "results.csv").to_dict(orient="records")
    common = _common(
        step,
        kind="finetune",
        strategy=step.entry.strategy,
        layer=settings.unfreeze,
        classifier=rows[0]["classifier"],
        model=folder,
        seconds=seconds,
        store=None,
        test_store=None,
        pooling=settings.pooling,
    )
    return {
        **common,
        "depth": None,
        "cv_scores": [],
        "cv_accuracy": None,
        "cv_std": None,
        "val_accuracy": val_accuracy,
        "params": {
            "init_head": step.entry.init_head,
            "epochs_run": result.epochs_run,
            "best_epoch": result.best_epoch,
        },
        "test": {metric: result.metrics[metric] for metric in METRICS},
        "fit_seconds": result.fit_seconds,
        "adjustments": [],
        "predictions": predictions,
        "rows": [_row(row, common) for row in rows],
    }


def _common(step, *, kind, model: Path, pooling=None, **values) -> dict:
    """What every record holds: its step, backbone, strategy, layer, classifier,
    model folder and stores."""
    return {
        "key": step.key,
        "kind": kind,
        "title": step.title.split(maxsplit=1)[1],
        "backbone": step.backbone.label,
        "pooling": pooling or step.pooling,
        "model": str(model),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **values,
    }


def _row(row: dict, common: dict) -> dict:
    """A tidy result row with the columns that trace it to its step."""
    return {
        **{k: (None if pd.isna(v) else v) for k, v in row.items()},
        "backbone": common["backbone"],
        "strategy": common["strategy"],
        "pooling": common["pooling"],
        "step": common["key"],
        "store": common["store"],
        "model": common["model"],
    }


def _write_run(plan: Plan, ran: list[str], seconds: float) -> None:
    """`run.json`: the experiment as checked, what this run did, the versions."""
    spec = plan.spec
    steps = [
        {
            "title": step.title,
            "kind": step.kind,
            "key": step.entry.key if isinstance(step, ExtractStep) else step.key,
            "ran": step.title in ran,
        }
        for step in plan.steps
    ]
    summary = {
        "source": spec.source,
        "name": spec.name,
        "seconds": seconds,
        "splits": {
            "train": str(plan.data.train_csv),
            "test": str(plan.data.test_csv),
        },
        "cache_dir": str(spec.cache_dir),
        "steps": steps,
        "versions": library_versions(),
        "spec": dataclasses.asdict(spec),
    }
    path = spec.output_dir / "run.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1, default=str))
