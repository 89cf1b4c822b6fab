"""`fine_tune`: a head on a registry backbone, trained in two stages, exported whole.

`fine_tune` indexes an image folder, holds out stratified validation and test splits,
builds `pixels → backbone preprocessing → backbone → global pooling → dropout → head`
and trains it in two stages: the head alone on the frozen backbone, then the top of the
backbone too (`unfreeze`: a block alias, a layer, `all` or a fraction) with a lower
learning rate under a linear warmup and a cosine decay. The head can start from a
linear probe saved by `train_classifier.py` (LP-FT): its scaler and PCA are folded into
the Dense layer, so the untrained model predicts exactly what the probe predicts.

A run writes into its output folder (see `tl.finetune.checkpoint` for what a resumed
run needs) and at the end:

    model.keras            the trained model: raw RGB pixels in [0, 255] → probabilities
                           (its last layer, `ClassNames`, holds the class names)
    metadata.json          format `tl-finetuned`, class names, image settings, settings,
                           data, best epoch, test metrics, versions, files (the
                           SHA-256 of model.keras)
    results.csv/.json      test metrics in the classifier leaderboard's schema
    confusion_matrix.csv/.png, history.csv/.png, splits.csv (path, label, split)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from sklearn.metrics import confusion_matrix

from tl._checks import check_interval
from tl.classifiers import SavedClassifier, load_classifier
from tl.finetune.cache import DEFAULT_MEMORY_GB, CachePlan, FrozenPass, frozen_pass
from tl.finetune.checkpoint import _BEST, _CHECKPOINTS, _STATE, _open_run, _State
from tl.finetune.data import Splits, labelled_index, prepare_splits
from tl.finetune.head_init import (
    LinearProbe,
    check_init_head,
    fit_probe,
    initialise_head,
    linear_probe,
    saved_probe,
)
from tl.finetune.model import FineTuneModel, HeadInput, build_model
from tl.finetune.outputs import _write_confusion, _write_history, _write_splits
from tl.finetune.saved import (
    MODEL_FILE,
    MODEL_FORMAT,
    MODEL_SCHEMA_VERSION,
    _inference_model,
)
from tl.finetune.settings import FineTuneSettings
from tl.finetune.training import KEPT_MODEL_RULE, _train, _TrainingJob
from tl.model_folder import METADATA, file_hashes
from tl.provenance import library_versions
from tl.reports import classification_metrics, metric_rows, write_results

log = logging.getLogger("tl")


@dataclasses.dataclass
class FineTuneResult:
    """What a call of `fine_tune` produced (also for a run that was already done)."""

    directory: Path
    metrics: dict[str, float]
    confusion_matrix: np.ndarray
    history: pd.DataFrame
    best_epoch: int | None  # the model's epoch: -1 before training, None without val
    epochs_run: int
    fit_seconds: float


def _result(directory: Path) -> FineTuneResult:
    metadata = json.loads((directory / "metadata.json").read_text())
    matrix = pd.read_csv(directory / "confusion_matrix.csv", index_col=0).to_numpy()
    return FineTuneResult(
        directory,
        metadata["test_metrics"],
        matrix,
        pd.read_csv(directory / "history.csv"),
        metadata["best_epoch"],
        metadata["epochs_run"],
        metadata["fit_seconds"],
    )


def _strategy() -> tf.distribute.Strategy:
    """MirroredStrategy over all visible GPUs; the default strategy without any."""
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        log.info("training on %d GPU(s) with MirroredStrategy", len(gpus))
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def fine_tune(
    source: str | Path,
    output_dir: str | Path,
    settings: FineTuneSettings | None = None,
    *,
    val_source: str | Path | None = None,
    test_source: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    strategy: tf.distribute.Strategy | None = None,
    cache: bool = True,
    cache_memory_gb: float = DEFAULT_MEMORY_GB,
    keep_cache: bool = False,
    **setting_overrides,
) -> FineTuneResult:
    """Fine-tune a registry backbone on an image folder and evaluate it.

    Args:
        source: a folder with one sub-folder per class, or a path,label CSV.
        output_dir: where the run writes (see the module docstring). If it holds an
            interrupted run with the same settings and data, that run resumes after
            its last finished epoch; a finished one is returned as it is; one with
            other settings is refused unless `overwrite`.
        settings: a `FineTuneSettings`; keyword arguments override it by its flat
            keys (`FineTuneSettings.updated`), e.g. `backbone="efficientnetb3"`.
        val_source, test_source: separate folders for validation and test instead
            of splitting them off `source`.
        overwrite: delete a previous run's files in `output_dir` first.
        progress: show progress bars.
        callbacks: extra Keras callbacks, passed to each epoch's `fit` call.
        strategy: a `tf.distribute` strategy; default: `MirroredStrategy` over all
            visible GPUs, or none on a machine without.
        cache: cache what stage 2 trains from (`tl.finetune.cache`); False decodes
            the images and runs the whole backbone every epoch (same results,
            slower: for comparisons).
        cache_memory_gb: the cache stays in memory up to this size, else it is
            written to `<output_dir>/cache/`.
        keep_cache: keep that file after the run.

    Returns:
        A `FineTuneResult`: test metrics, confusion matrix, history, timings.
    """
    settings = (settings or FineTuneSettings()).updated(**setting_overrides)
    settings = settings.resolved()
    check_interval("cache_memory_gb", cache_memory_gb, low=0)
    directory = Path(output_dir)
    source = Path(source).expanduser().resolve()
    images = {"train": labelled_index(source)}
    for role, other in (("val", val_source), ("test", test_source)):
        if other is not None:
            images[role] = labelled_index(other, role)
    state = _open_run(directory, settings, images, overwrite)
    if state.complete:
        log.info("%s is already complete; nothing to do.", directory)
        return _result(directory)

    class_names = images["train"].class_names
    saved = load_classifier(settings.init_head) if settings.init_head else None
    strategy = strategy or _strategy()
    net = build_model(settings, len(class_names), strategy=strategy)
    probe = None
    if saved is not None:
        check_init_head(saved, net, settings)
        probe = saved_probe(saved, class_names)
    splits = prepare_splits(
        images["train"],
        settings,
        val=images.get("val"),
        test=images.get("test"),
        progress=progress,
    )
    directory.mkdir(parents=True, exist_ok=True)
    if settings.from_scratch:
        what = f"trains all layers of {net.spec.name} from scratch"
    else:
        head = {
            "probe": "fits a probe on the frozen codes",
            "random": f"trains a new head on the frozen codes for "
            f"{settings.head_epochs} epochs",
        }[settings.head_init]
        if saved is not None:
            head = "starts the head as the --init-head probe"
        what = (
            f"stage 1 {head}; stage 2 trains {len(net.unfrozen)} layers of "
            f"{net.spec.name} (--unfreeze {settings.unfreeze})"
        )
    log.info(
        "%s: %d classes; %s; %s",
        source,
        len(class_names),
        ", ".join(f"{len(index)} {name}" for name, index in splits.items()),
        what,
    )
    _write_splits(splits, directory)
    validation = _validation_note(splits)
    frozen = frozen_pass(
        net,
        CachePlan.choose(net, cache),
        {name: index for name, index in splits.items() if name != "test"},
        directory,
        batch_size=settings.batch_size,
        memory_limit_gb=cache_memory_gb,
        progress=progress,
    )
    try:
        _start_head(net, state, frozen, splits, probe)
        job = _TrainingJob(net, settings, splits, state, directory, frozen)
        with strategy.scope():
            _train(job, progress, callbacks)
        _export(job, source, saved, validation)
    finally:
        frozen.close(keep=keep_cache)
    return _result(directory)


def _start_head(
    net: FineTuneModel,
    state: _State,
    frozen: FrozenPass,
    splits: Splits,
    probe: LinearProbe | None,
) -> None:
    """Stage 1's start: a head reading the codes standardised (as the probe's
    scaler or the training codes say) and, in a new run, the probe folded into it
    (the saved one, or one fitted now). A resumed run reads its weights back from
    its checkpoints instead."""
    settings = net.settings
    if settings.from_scratch:
        return
    codes = frozen.splits["train"].codes
    new = state.epoch == 0 and state.checkpoint is None
    if new and probe is None and settings.head_init == "probe":
        began = time.perf_counter()
        pipeline, state.probe = fit_probe(codes, splits.train.labels, settings)
        probe = linear_probe(pipeline, len(splits.train.class_names))
        log.info(
            "stage 1: logistic regression on the codes, %s (CV accuracy %s) in %.1f s",
            state.probe["params"] or "default C",
            "n/a"
            if state.probe["cv_accuracy"] is None
            else f"{state.probe['cv_accuracy']:.3f}",
            time.perf_counter() - began,
        )
    if new and probe is not None:
        initialise_head(net, probe, codes)
    else:
        net.replace_head(
            probe.head_input(codes) if probe else HeadInput.of_codes(codes)
        )


# Fewer validation images of a class than this make early stopping a coin toss.
MIN_VALIDATION_PER_CLASS = 10


def _validation_note(splits: Splits) -> dict:
    """How far the validation images can be trusted to choose the kept model;
    logged when not far."""
    if splits.val is None:
        return {"images": 0, "note": "no validation: the last epoch's model is kept"}
    counts = np.bincount(splits.val.labels, minlength=len(splits.val.class_names))
    smallest = int(counts.min())
    note = {"images": len(splits.val), "smallest_class": smallest, "noisy": False}
    if smallest < MIN_VALIDATION_PER_CLASS:
        name = splits.val.class_names[int(counts.argmin())]
        note["noisy"] = True
        note["note"] = (
            f"only {smallest} validation images of class {name!r} (fewer than "
            f"{MIN_VALIDATION_PER_CLASS}): early stopping and the choice of the kept "
            f"model on them are noise"
        )
        log.warning(
            "%s; give more with --val-dir or --val-split, or trust the probe "
            "(--epochs 0).",
            note["note"],
        )
    return note


def _export(
    job: _TrainingJob,
    source: Path,
    saved: SavedClassifier | None,
    validation: dict,
) -> None:
    """Evaluate on the test split, write the results and the model, mark complete."""
    settings, state, directory = job.settings, job.state, job.directory
    class_names = job.splits.train.class_names
    truth, probabilities = job.predict(job.splits.test)
    predicted = probabilities.argmax(axis=1)
    metrics = classification_metrics(truth, predicted)
    matrix = confusion_matrix(truth, predicted, labels=range(len(class_names)))
    rows = metric_rows(
        {**metrics, "fit_seconds": state.fit_seconds},
        method="fine_tune",
        layer=settings.unfreeze,
        classifier=_head_name(settings, saved),
        protocol="holdout",
        split="test",
        seed=settings.seed,
    )
    write_results(rows, directory)
    _write_confusion(matrix, class_names, directory)
    _write_history(state.history, directory)
    _inference_model(job.net.model, class_names).save(directory / MODEL_FILE)
    metadata = _metadata(job, source, metrics, saved, validation)
    metadata["files"] = file_hashes(directory, [MODEL_FILE])
    (directory / METADATA).write_text(json.dumps(metadata, indent=2, default=str))
    state.complete = True
    state.commit(directory / _STATE)
    shutil.rmtree(directory / _CHECKPOINTS, ignore_errors=True)
    (directory / _BEST).unlink(missing_ok=True)  # model.keras holds these weights


def _head_name(settings: FineTuneSettings, saved: SavedClassifier | None) -> str:
    """The head as the results' classifier column names it: `linear`, `mlp`,
    `linear+probe` (a fitted probe) or `linear+lpft` (a saved one)."""
    if saved is not None:
        return f"{settings.head}+lpft"
    if settings.head_init == "probe":
        return f"{settings.head}+probe"
    return settings.head


def _metadata(
    job: _TrainingJob,
    source: Path,
    metrics: dict,
    saved: SavedClassifier | None,
    validation: dict,
) -> dict:
    settings, net, splits, state = job.settings, job.net, job.splits, job.state
    return {
        "format": MODEL_FORMAT,
        "schema_version": MODEL_SCHEMA_VERSION,
        "class_names": splits.train.class_names,
        **settings.backbone.to_json(),
        "weights_sha256": net.weights.sha256,
        **settings.image.to_json(),
        "pooling": settings.pooling,
        "head": settings.head,
        "unfreeze": settings.unfreeze,
        "unfrozen_layers": net.unfrozen,
        "from_scratch": settings.from_scratch,
        "head_init": settings.head_init,
        "probe": state.probe,
        "init_head": {
            "path": settings.init_head,
            "classifier": saved.metadata["classifier"],
            "normalization": saved.metadata["normalization"],
            "pca": saved.metadata["pca"],
            "identity": saved.identity,
        }
        if saved
        else None,
        "settings": settings.to_json(),
        "data": {
            "source": str(source),
            **{f"{name}_images": len(index) for name, index in splits.items()},
            "fingerprints": splits.fingerprints(),
            "skipped": splits.skipped,
        },
        "validation": validation,
        "kept_model_rule": KEPT_MODEL_RULE,
        "cache": job.frozen.describe(),
        "epochs_run": state.epoch,
        "best_epoch": state.best_epoch,
        "fit_seconds": state.fit_seconds,
        "test_metrics": metrics,
        "versions": library_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
