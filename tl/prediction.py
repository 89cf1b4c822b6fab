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
import json
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from tl.classifiers import SavedClassifier, load_classifier
from tl.errors import TLError
from tl.features import ExtractionSettings, iter_codes, load_extractor
from tl.finetune import MODEL_FORMAT as FINETUNED_FORMAT
from tl.finetune import load_finetuned
from tl.images import UNLABELED, ImageIndex, index_folder, is_image_file


def index_inputs(inputs: list[str], class_names: list[str]) -> ImageIndex:
    """Images to classify: one folder (class sub-folders named like the model's
    classes give true labels), or any mix of image files and folders (unlabeled)."""
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
        path = Path(item).expanduser().resolve()
        if path.is_dir():
            found = index_folder(path, labels=None)
            paths += found.absolute_paths()
        elif is_image_file(path.name) or path.exists():
            paths.append(str(path))
        else:
            raise TLError(f"{item!r} is neither an image file nor a folder.")
    labels = np.full(len(paths), UNLABELED, np.int32)
    return ImageIndex(Path("/"), [p.lstrip("/") for p in paths], labels, [])


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
    stored = model.metadata["extraction"]
    trained = dataclasses.replace(
        ExtractionSettings.from_json(stored),
        layers=(model.layer_info["layer"],),
        pooling=(model.layer_info["pooling"],),
    )
    wanted = (engine or trained.engine, precision or trained.precision)
    if wanted == (trained.engine, trained.precision):
        return trained
    if not allow_engine_mismatch:
        raise TLError(
            f"The model was trained on codes made by {trained.engine} "
            f"{trained.precision}; {wanted[0]} {wanted[1]} makes other codes, which "
            f"it may classify worse. Predict without --engine/--precision, or pass "
            f"--allow-engine-mismatch to accept that risk."
        )
    calibration_source = trained.calibration_source or model.metadata.get(
        "provenance", {}
    ).get("source")
    return dataclasses.replace(
        trained,
        engine=wanted[0],
        precision=wanted[1],
        calibration_images=None,
        calibration_source=calibration_source if wanted[1] == "int8" else None,
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
    meta_path = Path(model_dir) / "metadata.json"
    if meta_path.is_file() and json.loads(meta_path.read_text()).get("format") == (
        FINETUNED_FORMAT
    ):
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
        records = _probe_records(model, settings, index, batch_size, progress)
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
    settings: ExtractionSettings,
    index: ImageIndex,
    batch_size: int,
    progress: bool,
) -> dict[int, dict]:
    """Rebuild the training codes' extractor for the model's layer, then classify."""
    extractor = load_extractor(settings)
    trained_with = model.metadata["extraction"].get("weights_sha256")
    if extractor.weights.sha256 != trained_with:
        raise TLError(
            f"The weights differ from those the model's codes were made with: "
            f"SHA-256 {extractor.weights.sha256} now, {trained_with} at training "
            f"({model.metadata['extraction']['weights']}). Use the same weights file."
        )
    calibrated_on = model.metadata["extraction"].get("calibration_sha256")
    if calibrated_on and extractor.calibration.sha256 != calibrated_on:
        raise TLError(
            f"The int8 calibration images in {settings.calibration_source!r} differ "
            f"from those the model's codes were calibrated on (SHA-256 "
            f"{extractor.calibration.sha256} now, {calibrated_on} at training). "
            f"Restore them, or predict with --precision float32 "
            f"--allow-engine-mismatch."
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
