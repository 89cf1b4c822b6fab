"""What determines a set of codes: its identity and hash, differences, versions.

Every "were these codes made the same way?" question in tl is answered here:

- `codes_identity` is the canonical JSON of everything that determines the codes of
  an extraction (backbone, weights by SHA-256, precision, engine and int8
  calibration sample by SHA-256, image settings, preprocessing, resolved layers and
  pooling, dtype, the store's schema, this module's `CODE_VERSION` and, given an
  index, every image's path, label, size and modification time), with its SHA-256:
  a key under which codes can be cached.
- `layer_identity` is what a saved probe must match in a store: the codes of one
  layer, read from the flat settings that stores and model folders keep.
- `identity_differences` names, key by key, how two identities (or two stored
  settings) differ; store resume, shard merges, saved probes against stores, test
  stores against training stores, LP-FT heads against their model, prediction and
  fine-tuning resume all use it.

Both identities are generic over the fields of `BackboneSettings`,
`EngineSettings` and `ImageSettings`: a field added there is part of them without
being listed here. Weights are named by their SHA-256 when it is known, so one
weights file under two paths is the same weights; the seed counts only for random
weights. An int8 calibration sample is named by its SHA-256, never by its folder.
Stores written before engines existed read as Keras codes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tl.engines import EngineSettings

if TYPE_CHECKING:
    from tl.features import ExtractionSettings, Extractor
    from tl.images import ImageIndex

# Bump when extraction computes codes differently for the same settings and images
# (preprocessing, pooling, resizing code), so that cached codes are not reused.
CODE_VERSION = 1
# Reprs longer than this are cut in difference messages (image lists, long paths).
_SHOWN_CHARS = 120


@dataclasses.dataclass(frozen=True)
class Identity:
    """An identity as canonical JSON (sorted keys, no spaces) and its SHA-256."""

    canonical: str
    sha256: str

    @classmethod
    def of(cls, values: dict[str, Any]) -> Identity:
        canonical = json.dumps(values, sort_keys=True, separators=(",", ":"))
        return cls(canonical, hashlib.sha256(canonical.encode()).hexdigest())

    @property
    def values(self) -> dict[str, Any]:
        return json.loads(self.canonical)


def _engine_identity(settings: dict, calibration_sha256: str | None) -> dict:
    """The engine's part of an identity, from flat settings: every `EngineSettings`
    key (its default where an older tl wrote none: Keras) but the calibration
    source, which is named by the SHA-256 of its int8 sample instead."""
    filled = EngineSettings.with_defaults(settings)
    values = {key: filled.get(key) for key in _ENGINE_KEYS}
    values["calibration_sha256"] = calibration_sha256
    return values


_ENGINE_KEYS = EngineSettings.json_keys() - {"calibration_source"}
# The identity keys that say how the extractor ran rather than what it computes:
# codes that differ in these differ by rounding (int8 the most), so a fine-tuned
# model's --init-head and predict.py --allow-engine-mismatch may let them differ.
INFERENCE_KEYS = ("precision", *sorted(_ENGINE_KEYS), "calibration_sha256")


def _backbone_identity(settings: dict, weights_sha256: str | None) -> dict:
    """The backbone's part of an identity, from flat settings: every
    `BackboneSettings` key (its default where an older tl wrote none), the weights
    by source and SHA-256 (their path only when there is no hash), the seed only for
    random weights."""
    from tl.backbones import BackboneSettings

    filled = BackboneSettings.with_defaults(settings)
    values = {key: filled.get(key) for key in BackboneSettings.json_keys()}
    weights = values["weights"]
    if weights == "none":
        return values
    del values["seed"]
    if weights_sha256:
        values["weights"] = "imagenet" if weights == "imagenet" else "file"
        values["weights_sha256"] = weights_sha256
    return values


def layer_identity(settings: dict, layer_info: dict) -> dict:
    """What determines the codes of one layer of a store: what a saved probe must
    match.

    Args:
        settings: the flat settings a store (or a model's `extraction`) records,
            with `weights_sha256` and `calibration_sha256`.
        layer_info: the layer's entry of the store's `layer_info`.
    """
    from tl.images import ImageSettings

    image = ImageSettings.with_defaults(settings)
    return {
        **_backbone_identity(settings, settings.get("weights_sha256")),
        **_engine_identity(settings, settings.get("calibration_sha256")),
        # max_pixels decides which images are refused, never the codes of one
        **{key: image[key] for key in ImageSettings.json_keys() - {"max_pixels"}},
        "layer": layer_info["layer"],
        "pooling": layer_info["pooling"],
    }


def codes_identity(
    settings: ExtractionSettings,
    index: ImageIndex | None = None,
    *,
    weights_sha256: str | None,
    layers: Sequence[str],
    calibration_sha256: str | None = None,
    hash_content: bool = False,
) -> Identity:
    """Everything that determines the codes of an extraction, and its SHA-256.

    `Extractor.identity` fills in what is known once the backbone is built.

    Args:
        settings: the extraction's settings (the image size is resolved here).
        index: the images; None leaves them out (the identity of the extractor).
        weights_sha256: the SHA-256 of the weights file (`WeightsInfo.sha256`).
        layers: the Keras layer names the requested layers resolved to, in order.
        calibration_sha256: the SHA-256 of the int8 calibration sample
            (`tl.engines.calibration.Calibration.sha256`), None for other precisions.
        hash_content: name each image by the SHA-256 of its bytes instead of its
            size and modification time (slower; survives copying the folder).
    """
    from tl.backbones import BackboneSettings
    from tl.store import SCHEMA_VERSION

    settings = settings.resolved()
    flat = settings.to_json()
    parts = BackboneSettings.json_keys() | EngineSettings.json_keys()
    values = {
        **{k: v for k, v in flat.items() if k not in parts},
        **_backbone_identity(flat, weights_sha256),
        **_engine_identity(flat, calibration_sha256),
        "preprocessing": settings.backbone.spec.preprocessing,
        "layers": [list(pair) for pair in zip(layers, flat["pooling"], strict=True)],
        "schema_version": SCHEMA_VERSION,
        "code_version": CODE_VERSION,
    }
    del values["pooling"]  # one pooling per layer, in `layers`
    if index is not None:
        values["class_names"] = list(index.class_names)
        values["images"] = _images_identity(index, hash_content)
    return Identity.of(values)


def _images_identity(index: ImageIndex, hash_content: bool) -> list[list]:
    """Per image: relative path, label, then size and mtime (ns) or the SHA-256 of
    its bytes; None for a file that cannot be read (it will be skipped)."""
    from tl.backbones import sha256_of_file

    rows = []
    for path, label, absolute in zip(
        index.paths, index.labels.tolist(), index.absolute_paths(), strict=True
    ):
        try:
            if hash_content:
                facts = [sha256_of_file(absolute)]
            else:
                status = os.stat(absolute)
                facts = [status.st_size, status.st_mtime_ns]
        except OSError:
            facts = [None]
        rows.append([path, label, *facts])
    return rows


def identity_differences(
    ours: dict,
    theirs: dict,
    ignore: Iterable[str] = (),
    *,
    names: tuple[str, str] | None = None,
) -> list[str]:
    """How two identities or stored settings differ, one `key: A vs B` per key.

    Args:
        ignore: keys that may differ.
        names: how to call the two sides, e.g. `("file has", "this run asks")`,
            which gives `key: file has A, this run asks B`.
    """
    skipped = set(ignore)
    lines = []
    for key in sorted((set(ours) | set(theirs)) - skipped):
        if ours.get(key) == theirs.get(key):
            continue
        a, b = _shown(ours.get(key)), _shown(theirs.get(key))
        if names:
            lines.append(f"{key}: {names[0]} {a}, {names[1]} {b}")
        else:
            lines.append(f"{key}: {a} vs {b}")
    return lines


def _shown(value: Any) -> str:
    text = repr(value)
    if len(text) <= _SHOWN_CHARS:
        return text
    return text[: _SHOWN_CHARS - 4] + " ..."


# ---------------------------------------------------------------------------------
# Versions and provenance


def library_versions() -> dict[str, str]:
    """The versions of tl and of the libraries whose behaviour its outputs depend on."""
    import h5py
    import keras
    import numpy as np
    import sklearn
    import skops
    import tensorflow as tf

    import tl

    return {
        "tl": tl.__version__,
        "scikit-learn": sklearn.__version__,
        "numpy": np.__version__,
        "skops": skops.__version__,
        "keras": keras.__version__,
        "tensorflow": tf.__version__,
        "h5py": h5py.__version__,
    }


def provenance_record(extractor: Extractor, source: Path, index: ImageIndex) -> dict:
    """How a store's codes were made, as stored in its `provenance` attribute: the
    versions, time, host, source, constructor, preprocessing, where the weights came
    from, how the engine ran them (versions, precision hint, int8 check) and the
    SHA-256 of the codes' identity (`codes_identity`)."""
    from tl.backbones import PREPROCESSING_MODES

    spec = extractor.spec
    return {
        "versions": library_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "source": str(source),
        "backbone_constructor": f"keras.applications.{spec.constructor}",
        "preprocessing": spec.preprocessing,
        "preprocessing_description": PREPROCESSING_MODES[spec.preprocessing],
        "weights": dataclasses.asdict(extractor.weights),
        "image_size": list(extractor.settings.image.size),
        "inference": extractor.compiled.provenance,
        "codes_identity": extractor.identity(index).sha256,
    }
