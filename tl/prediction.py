"""Classify new images end to end with a saved model.

A linear probe (train_classifier.py) records how its training codes were made
(backbone, weights and their hash, layer, pooling, image size, resize,
preprocessing); `predict_images` rebuilds exactly that extractor for the one layer,
computes the codes of the new images and applies the classifier. A fine-tuned model
(fine_tune.py) takes raw pixels, resized as in its training. Unreadable images are
listed with their reason.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from tl.classifiers import SavedClassifier, load_classifier
from tl.errors import TLError
from tl.features import ExtractionSettings, iter_codes, load_extractor
from tl.finetune.saved import MODEL_FORMAT as FINETUNED_FORMAT
from tl.finetune.saved import load_finetuned
from tl.images import UNLABELED, ImageIndex, index_folder, is_image_file
from tl.model_folder import model_format
from tl.provenance import INFERENCE_KEYS, identity_differences, layer_identity


def index_inputs(inputs: list[str], class_names: list[str]) -> ImageIndex:
    """Images to classify: one folder (class sub-folders named like the model's
    classes give true labels; paths relative to it), or any mix of image files and
    folders (unlabeled; absolute paths, those of files as given, made absolute)."""
    if not inputs:
        raise TLError("Give image files or folders to classify.")
    if len(inputs) == 1 and Path(inputs[0]).is_dir():
        index = index_folder(inputs[0])
        if index.class_names and set(index.class_names) <= set(class_names):
            number = {name: i for i, name in enumerate(class_names)}
            labels = np.array([number[index.class_names[y]] for y in index.labels])
            return dataclasses.replace(
                index, labels=labels.astype(np.int32), class_names=class_names
            )
        return index_folder(inputs[0], labels=None)
    paths: list[str] = []
    for item in inputs:
        path = Path(os.path.abspath(Path(item).expanduser()))
        if path.is_dir():
            found = index_folder(path, labels=None)
            paths += found.absolute_paths()
        elif is_image_file(path.name) or path.exists():
            paths.append(str(path))
        else:
            raise TLError(f"{item!r} is neither an image file nor a folder.")
    labels = np.full(len(paths), UNLABELED, np.int32)
    return ImageIndex(Path("/"), paths, labels, [])


def extraction_settings(
    model: SavedClassifier,
    engine: str | None = None,
    precision: str | None = None,
    allow_engine_mismatch: bool = False,
) -> ExtractionSettings:
    """The settings that made the model's training codes, for its one layer.

    `engine` and `precision` (None: those of the training codes) may differ from the
    training codes' only with `allow_engine_mismatch`: other codes may be classified
    worse. A switch to int8 calibrates on the training images.
    """
    trained = dataclasses.replace(
        ExtractionSettings.from_json(model.metadata["extraction"]),
        layers=(model.layer_info["layer"],),
        pooling=(model.layer_info["pooling"],),
    )
    made_by = (trained.engine.name, trained.backbone.precision)
    wanted = (engine or made_by[0], precision or made_by[1])
    if wanted == made_by:
        return trained
    if not allow_engine_mismatch:
        raise TLError(
            f"The model was trained on codes made by {made_by[0]} {made_by[1]}; "
            f"{wanted[0]} {wanted[1]} makes other codes, which it may classify worse. "
            f"Predict without --engine/--precision, or pass --allow-engine-mismatch "
            f"to accept that risk."
        )
    source = trained.engine.calibration_source or model.metadata.get(
        "provenance", {}
    ).get("source")
    return trained.updated(
        engine=wanted[0],
        precision=wanted[1],
        calibration_images=None,
        calibration_source=source if wanted[1] == "int8" else None,
    )


def predict_images(
    model_dir: str | Path,
    inputs: list[str],
    *,
    batch_size: int = 32,
    progress: bool = True,
    engine: str | None = None,
    precision: str | None = None,
    allow_engine_mismatch: bool = False,
) -> pd.DataFrame:
    """Classify images with a model saved by train_classifier.py or fine_tune.py.

    A linear probe's codes are computed by the engine and precision of its training
    codes unless `engine`/`precision` say otherwise, which needs
    `allow_engine_mismatch` (see `extraction_settings`).

    Returns:
        One row per image: `path`, `predicted` (class name), `score` (probability of
        the predicted class, or its decision value), `score_kind`, `true` (when the
        folder's sub-folders give labels), `error` (why an image was skipped).
    """
    if model_format(model_dir) == FINETUNED_FORMAT:
        if engine or precision:
            raise TLError(
                "--engine and --precision apply to linear probes; a fine-tuned model "
                "runs in Keras at the precision it was trained with."
            )
        model = load_finetuned(model_dir)
        index = index_inputs(inputs, model.class_names)
        records = _finetuned_records(model, index, batch_size)
    else:
        model = load_classifier(model_dir)
        index = index_inputs(inputs, model.class_names)
        settings = extraction_settings(model, engine, precision, allow_engine_mismatch)
        records = _probe_records(
            model, model_dir, settings, index, batch_size, progress
        )
    names = model.class_names
    table = pd.DataFrame(
        [{"path": index.paths[i], **records[i]} for i in range(len(index))]
    )
    if (index.labels >= 0).any():
        table.insert(2, "true", [names[y] if y >= 0 else "" for y in index.labels])
    return table


def _skipped_record(reason: str) -> dict:
    return {"predicted": "", "score": np.nan, "score_kind": "", "error": reason}


def _probe_records(
    model: SavedClassifier,
    model_dir: str | Path,
    settings: ExtractionSettings,
    index: ImageIndex,
    batch_size: int,
    progress: bool,
) -> dict[int, dict]:
    """Rebuild the training codes' extractor for the model's layer (with `settings`:
    the engine and precision may be others), then classify."""
    extractor = load_extractor(settings)
    differences = identity_differences(
        model.identity,
        layer_identity(extractor.codes_settings(), extractor.layer_info()[0]),
        # what `extraction_settings` let differ; a mismatch of the rest is refused
        ignore=INFERENCE_KEYS,
        names=("at training", "now"),
    )
    if differences:
        raise TLError(
            f"The codes of the extractor rebuilt for {str(model_dir)!r} would differ "
            f"from those it was trained on: {'; '.join(differences)}. Use the weights "
            f"file it was trained with ({model.metadata['extraction']['weights']!r})."
        )
    key = extractor.taps[0].layer
    classes = list(model.pipeline.classes_)
    records: dict[int, dict] = {}
    paths = index.absolute_paths()
    with tqdm(total=len(paths), unit="img", disable=not progress) as bar:
        for batch in iter_codes(extractor, paths, 0, batch_size):
            if len(batch.positions):
                codes = batch.codes[key]
                scores, kind = model.scores(codes)
                for position, label, row in zip(
                    batch.positions, model.predict(codes), scores, strict=True
                ):
                    records[int(position)] = {
                        "predicted": model.class_names[label],
                        "score": float(row[classes.index(label)]),
                        "score_kind": kind,
                        "error": "",
                    }
            for position, reason in batch.skipped:
                records[position] = _skipped_record(reason)
            bar.update(batch.end - bar.n)
    return records


def _finetuned_records(model, index: ImageIndex, batch_size: int) -> dict[int, dict]:
    """The fine-tuned Keras model on raw pixels, preprocessed as in training."""
    classes, probabilities, skipped = model.predict_images(
        index.absolute_paths(), batch_size
    )
    records = {position: _skipped_record(reason) for position, _, reason in skipped}
    kept = [p for p in range(len(index)) if p not in records]
    for position, label, row in zip(kept, classes, probabilities, strict=True):
        records[position] = {
            "predicted": model.class_names[label],
            "score": float(row[label]),
            "score_kind": "probability",
            "error": "",
        }
    return records
