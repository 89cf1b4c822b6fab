"""The training loop: two stages, epoch by epoch, checkpointed and resumable.

Stage 1 trains the head alone, on the frozen codes of the training images (a head
that starts as a probe needs no stage-1 epochs). Stage 2 trains the head and the
unfrozen top of the backbone: on the cached output of the frozen part (the model
`top`), on cached images, or, without a cache, on images decoded every epoch.

Validation decides which model is kept (`better`): the model before training is the
first candidate; an epoch replaces the kept model when its validation loss is lower
and, in stage 2, its validation accuracy is at least that of the model stage 2
started from (the probe, by default). So the final model is never worse on
validation accuracy than that model, and among those no worse on validation loss.
Without validation images the last epoch's model is kept.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from tl.engines.keras import compiled_extractor
from tl.errors import TLError
from tl.finetune.cache import FrozenPass, Rows
from tl.finetune.checkpoint import (
    _BEST,
    _CHECKPOINTS,
    _STATE,
    _checkpointed,
    _load_variables,
    _save_variables,
    _State,
)
from tl.finetune.data import (
    Splits,
    _over_images,
    _training_batches,
    cached_batches,
    class_weights,
)
from tl.finetune.model import FineTuneModel
from tl.finetune.outputs import _ProgressBar, _write_history
from tl.finetune.settings import FineTuneSettings
from tl.images import ImageIndex, decoded_batches

log = logging.getLogger("tl")

# PreciseBN's recommendation: about 10^4 images estimate the statistics well.
BATCHNORM_IMAGES = 10_000
KEPT_MODEL_RULE = (
    "the model before training, replaced by each epoch with a lower val_loss and, "
    "in stage 2, a val_accuracy at least that of the model stage 2 started from"
)


@dataclasses.dataclass
class _Trainer:
    """What one stage trains, and on what: `rows` holds cached inputs per split
    (None: the images are decoded), `augment` says whether batches are augmented."""

    model: keras.Model
    rows: dict[str, Rows] | None
    augment: bool

    @functools.cached_property
    def predictor(self) -> Callable:
        return compiled_extractor(self.model)


@dataclasses.dataclass
class _TrainingJob:
    """One fine-tuning run being trained: the model, its images and what the frozen
    pass computed of them, its progress and its folder."""

    net: FineTuneModel
    settings: FineTuneSettings
    splits: Splits
    state: _State
    directory: Path
    frozen: FrozenPass
    _trainers: dict[int, _Trainer] = dataclasses.field(default_factory=dict)

    @functools.cached_property
    def _predictor(self) -> Callable:
        return compiled_extractor(self.net.model)

    def predict(self, index: ImageIndex) -> tuple[np.ndarray, np.ndarray]:
        """Labels and predicted probabilities of the decodable images of `index`."""
        settings = self.settings
        kept, outputs, _ = _over_images(
            index.absolute_paths(),
            settings.image,
            settings.batch_size,
            self._predictor,
        )
        return index.labels[kept], np.concatenate(outputs)

    def trainer(self, stage: int) -> _Trainer:
        """What `stage` trains: the head on the codes (stage 1); the top on the
        cached prefix, or the whole model on cached or decoded images (stage 2)."""
        if stage not in self._trainers:
            self._trainers[stage] = self._new_trainer(stage)
        return self._trainers[stage]

    def _new_trainer(self, stage: int) -> _Trainer:
        splits, plan = self.frozen.splits, self.frozen.plan
        if stage == 1:
            codes = {role: Rows(frozen.codes) for role, frozen in splits.items()}
            return _Trainer(self.net.head, codes, augment=False)
        inputs = {role: frozen.inputs for role, frozen in splits.items()}
        augment = bool(self.settings.augment)
        if plan.kind == "prefix":
            return _Trainer(self.net.top(plan.cut), inputs, augment=False)
        return _Trainer(self.net.model, inputs if plan.kind else None, augment)

    def probabilities(self, trainer: _Trainer, role: str):
        """Labels and the probabilities `trainer`'s model gives the images of the
        split `role`, from its cached inputs or the decoded images."""
        index = dict(self.splits.items())[role]
        if trainer.rows is None:
            return self.predict(index)
        rows, size = trainer.rows[role], self.settings.batch_size
        outputs = [
            np.asarray(
                trainer.predictor(rows.take(np.arange(i, min(i + size, len(rows)))))
            )
            for i in range(0, len(rows), size)
        ]
        return index.labels, np.concatenate(outputs)

    def estimate_batchnorm(self, trainer: _Trainer) -> None:
        """The BatchNorm statistics of a model trained from scratch, estimated on
        up to `BATCHNORM_IMAGES` training images, unaugmented, in shuffled
        batches (batches of one class would hide the variance between classes)."""
        train, size = self.splits.train, self.settings.batch_size
        order = np.random.default_rng(self.settings.seed).permutation(len(train))
        groups = [
            order[i : i + size]
            for i in range(0, min(len(train), BATCHNORM_IMAGES), size)
        ]
        if trainer.rows is not None:
            batches = (trainer.rows["train"].take(group) for group in groups)
        else:
            paths = train.absolute_paths()
            batches = (
                batch.images
                for batch in decoded_batches(
                    [paths[p] for p in np.concatenate(groups)],
                    self.settings.image,
                    size,
                )
                if batch.images is not None
            )
        self.net.estimate_batchnorm(batches)

    def batches(self, trainer: _Trainer, weights, full_batches: bool):
        """The current epoch's training batches for `trainer`."""
        settings, train, epoch = self.settings, self.splits.train, self.state.epoch
        if trainer.rows is None:
            return _training_batches(train, settings, epoch, weights, full_batches)
        return cached_batches(
            trainer.rows["train"],
            train.labels,
            len(train.class_names),
            settings,
            epoch,
            weights,
            full_batches,
            trainer.augment,
        )


# ---------------------------------------------------------------------------------
# Training


def _compile(
    net: FineTuneModel,
    model: keras.Model,
    settings: FineTuneSettings,
    stage: int,
    steps: int,
):
    """Set the stage's trainable layers and compile `model` (what the stage trains)
    with a fresh optimizer.

    Stage 1: constant `head_learning_rate`. Stage 2: linear warmup from 0 to
    `learning_rate` over `warmup_epochs`, then cosine decay to 0 at the last step.
    """
    net.set_stage(stage)
    if stage == 1:
        learning_rate = settings.head_learning_rate
    else:
        total = max(1, settings.epochs * steps)
        warmup = min(total - 1, round(settings.warmup_epochs * steps))
        learning_rate = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0 if warmup else settings.learning_rate,
            decay_steps=total - warmup,
            warmup_target=settings.learning_rate if warmup else None,
            warmup_steps=warmup,
        )
    optimizer = keras.optimizers.AdamW(
        learning_rate=learning_rate, weight_decay=settings.weight_decay
    )
    optimizer.exclude_from_weight_decay(
        var_list=net.backbone.weights if settings.l2_sp else None,
        var_names=["bias", "gamma", "beta"],
    )
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(
            label_smoothing=settings.label_smoothing
        ),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
    )


def better(state: _State, logs: dict) -> bool:
    """Whether an epoch's model replaces the kept one (see the module docstring):
    a lower validation loss than the kept model's and, in stage 2, a validation
    accuracy at least that of the model stage 2 started from."""
    if state.best is not None and logs["val_loss"] >= state.best:
        return False
    return (
        state.stage == 1
        or state.start_accuracy is None
        or logs["val_accuracy"] >= state.start_accuracy
    )


def _keep(job: _TrainingJob, logs: dict, epoch: int) -> None:
    """Make the current model, of `epoch` (-1: before training), the kept one."""
    state = job.state
    state.best, state.best_accuracy = logs["val_loss"], logs["val_accuracy"]
    state.best_epoch = epoch
    _save_variables(job.directory / _BEST, job.net.model.variables)


def _end_epoch(job: _TrainingJob, model: keras.Model, logs: dict, seconds: float):
    """Record an epoch of `model` (what the stage trains), keep the best weights,
    decide early stopping, checkpoint."""
    state, directory = job.state, job.directory
    patience = job.settings.patience
    row = {
        "epoch": state.epoch,
        "stage": state.stage,
        **{key: float(value) for key, value in logs.items()},
        "learning_rate": float(ops.convert_to_numpy(model.optimizer.learning_rate)),
        "seconds": seconds,
    }
    state.history.append(row)
    state.fit_seconds += seconds
    state.epoch += 1
    state.stage_epochs += 1
    if "val_loss" in logs:
        if better(state, row):
            _keep(job, row, row["epoch"])
            state.wait = 0
        else:
            state.wait += 1
            state.stopped = bool(patience) and state.wait >= patience
    name = f"epoch_{state.epoch:04d}.npz"
    (directory / _CHECKPOINTS).mkdir(exist_ok=True)
    _save_variables(directory / _CHECKPOINTS / name, _checkpointed(model))
    previous, state.checkpoint = state.checkpoint, name
    state.commit(directory / _STATE)
    if previous and previous != name:
        (directory / _CHECKPOINTS / previous).unlink(missing_ok=True)
    _write_history(state.history, directory)
    log.info(
        "epoch %d (stage %d): %s%s",
        row["epoch"] + 1,
        row["stage"],
        ", ".join(
            f"{key} {row[key]:.4g}"
            for key in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate")
            if key in row
        ),
        " (kept)" if state.best_epoch == row["epoch"] else "",
    )


def _validation_logs(job: _TrainingJob, trainer: _Trainer) -> dict[str, float]:
    """`val_loss` (cross-entropy, without label smoothing or penalties) and
    `val_accuracy` of `trainer`'s model, computed on one device (Keras' distributed
    validation fails on a last batch that does not split evenly over the
    replicas)."""
    labels, probabilities = job.probabilities(trainer, "val")
    true_class = probabilities[np.arange(len(labels)), labels]
    return {
        "val_loss": float(-np.mean(np.log(np.clip(true_class, 1e-7, 1.0)))),
        "val_accuracy": float(np.mean(probabilities.argmax(axis=1) == labels)),
    }


def _steps(job: _TrainingJob, full_batches: bool) -> int:
    train, size = job.splits.train, job.settings.batch_size
    steps = (math.floor if full_batches else math.ceil)(len(train) / size)
    if not steps:
        raise TLError(
            f"{len(train)} training images make no full batch of --batch-size "
            f"{size}; lower it."
        )
    return steps


def _train(
    job: _TrainingJob, progress: bool, callbacks: Sequence[keras.callbacks.Callback]
) -> None:
    """Both stages, epoch by epoch, from wherever the run's state says it is."""
    net, settings, state, directory = job.net, job.settings, job.state, job.directory
    train = job.splits.train
    weights = None
    if settings.class_weight == "balanced":
        weights = class_weights(train.labels, len(train.class_names))
    # Several replicas get full batches only: a replica's share of a last, small
    # batch may be empty, which some CPU kernels refuse.
    full_batches = tf.distribute.get_strategy().num_replicas_in_sync > 1
    steps = _steps(job, full_batches)
    validation = job.splits.val is not None
    if validation and state.best is None:
        # The model before training is the first candidate: a fine-tuning that
        # never does better on validation returns it (the probe, by default).
        first = job.trainer(2 if settings.from_scratch else 1)
        if settings.from_scratch:
            job.estimate_batchnorm(first)
        logs = _validation_logs(job, first)
        _keep(job, logs, -1)
        log.info(
            "before training: val_loss %.4g, val_accuracy %.4g",
            logs["val_loss"],
            logs["val_accuracy"],
        )
    total = settings.head_epochs + settings.epochs
    for stage, epochs in ((1, settings.head_epochs), (2, settings.epochs)):
        if stage < state.stage or not epochs:
            continue
        trainer = job.trainer(stage)
        _compile(net, trainer.model, settings, stage, steps)
        if state.stage == stage and state.checkpoint:
            checkpoint = directory / _CHECKPOINTS / state.checkpoint
            _load_variables(checkpoint, _checkpointed(trainer.model))
            log.info("resuming stage %d after epoch %d", stage, state.epoch)
        else:
            state.stage, state.stage_epochs, state.wait = stage, 0, 0
            state.stopped, state.checkpoint = False, None
            state.start_accuracy = state.best_accuracy if stage == 2 else None
        what = "head" if stage == 1 else f"head and {len(net.unfrozen)} layers"
        while state.stage_epochs < epochs and not state.stopped:
            bar = _ProgressBar(
                steps, f"stage {stage} ({what}), epoch {state.epoch + 1}/{total}"
            )
            began = time.perf_counter()
            history = trainer.model.fit(
                job.batches(trainer, weights, full_batches),
                initial_epoch=state.epoch,
                epochs=state.epoch + 1,
                shuffle=False,
                verbose=0,
                callbacks=[*([bar] if progress else []), *callbacks],
            )
            logs = {key: values[-1] for key, values in history.history.items()}
            if settings.from_scratch:
                job.estimate_batchnorm(trainer)
            if validation:
                logs.update(_validation_logs(job, trainer))
            _end_epoch(job, trainer.model, logs, time.perf_counter() - began)
        if state.stopped:
            log.info("stage %d stopped early: no better model on validation", stage)
        if state.best_epoch is not None:
            _load_variables(directory / _BEST, net.model.variables)
