"""A measured hint: how much faster OpenVINO bfloat16 and int8 would extract a run.

Shown in the extraction log when OpenVINO is installed, the run is on a CPU in
float32 and is long enough (`MIN_IMAGES`) for the few seconds of measuring, on a
few of the run's own images, to matter little.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from tl.engines import load_engine, missing_packages
from tl.images import image_batches

# Runs shorter than this get no measured hint: measuring costs a few seconds.
MIN_IMAGES = 2000
_IMAGES = 2
# Below this speed-up, the hint says nothing.
_WORTH_IT = 1.3


def seconds_per_image(
    codes_of: Callable[[Any], dict], images: np.ndarray, repeats: int = 1
) -> float:
    """The best of `repeats` timed runs on `images`, after one warm-up run."""
    codes_of(images)
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        codes_of(images)
        best = min(best, time.perf_counter() - began)
    return best / len(images)


def measured_speed_hint(extractor, paths: Sequence[str]) -> str | None:
    """One line saying how much faster OpenVINO bfloat16 and int8 ran than this
    run's engine on a few of `paths`, or None when it does not apply or pay.

    Args:
        extractor: the run's `tl.features.Extractor`.
        paths: the images still to extract (absolute paths).
    """
    settings = extractor.settings
    if (
        len(paths) < MIN_IMAGES
        or settings.precision != "float32"
        or missing_packages("openvino")
        or tf.config.list_physical_devices("GPU")
    ):
        return None
    batches = image_batches(
        list(paths[: 4 * _IMAGES]),
        np.arange(min(len(paths), 4 * _IMAGES)),
        extractor.image_settings,
        _IMAGES,
    )
    images = next((batch.numpy() for _, batch in batches), None)
    if images is None:
        return None
    runners = load_engine("openvino").trial_runners(
        extractor.model, extractor.model_identity(), images
    )
    now = seconds_per_image(extractor.compiled.codes_of, images)
    speedups = {
        precision: now / seconds_per_image(codes_of, images)
        for precision, codes_of in runners.items()
    }
    if max(speedups.values()) < _WORTH_IT:
        return None
    best = max(speedups, key=speedups.get)
    return (
        f"on {len(images)} of these images, OpenVINO "
        + " and ".join(f"{p} ran {s:.1f}x" for p, s in speedups.items())
        + f" as fast as {settings.engine} float32 here: try --engine openvino "
        f"--precision {best}"
        + (" (calibrated on your images; see the README)" if best == "int8" else "")
        + "."
    )
