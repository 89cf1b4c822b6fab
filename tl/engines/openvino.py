"""The OpenVINO engine (optional extra `tl[openvino]`): the Keras extractor converted
as it is (preprocessing, taps and in-graph pooling included), run on the CPU in
float32, bfloat16 or int8.

- The compute precision is always set (`INFERENCE_PRECISION_HINT`): on a CPU with
  native bfloat16, OpenVINO would otherwise compute in bfloat16 unasked.
- int8 is NNCF post-training quantisation calibrated on the user's own images
  (`tl.engines.calibration`); the codes of held-back images are then compared with
  float32 codes, and a warning says when int8 changes them noticeably.
- Converted and quantised models are cached under `$TL_CACHE_DIR/openvino` (default
  `~/.cache/tl/openvino`), one folder per model named by the SHA-256 of everything
  that determines it, written under a temporary name and then renamed; a second run
  loads it instead of converting (and calibrating) again.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import keras
import nncf
import numpy as np
import openvino as ov
from nncf.quantization.range_estimator import RangeEstimatorParametersSet

import tl
from tl.engines import CompiledExtractor, CompileRequest
from tl.engines.calibration import Calibration
from tl.errors import TLError

log = logging.getLogger("tl")

CACHE_ENV = "TL_CACHE_DIR"
# Below this median cosine between int8 and float32 codes of a layer, warn.
COSINE_WARNING = 0.999
_INFERENCE_PRECISION = {"float32": "f32", "bfloat16": "bf16", "int8": "f32"}
# Threads pinned to cores lost to unpinned ones when other processes (tf.data's
# decoders, other jobs) share the cores: 2.6x vs 1.8x for bfloat16 VGG16 measured on
# a busy 2-core machine.
_CPU_CONFIG = {"ENABLE_CPU_PINNING": False}
# Activation ranges from the smallest and largest values over the whole calibration
# sample, not NNCF's default mean of each image's extremes, which clips the images
# with larger activations: on Fashion-MNIST (VGG16 block5_pool, bench/
# engines_accuracy.py) the worst test image's cosine to float32 rose from 0.947 to
# 0.997 (median 0.9998 -> 0.9994), and probe accuracy moved from -1.4 to -1.0
# points of float32. Part of the cache key.
ACTIVATION_RANGES = "MINMAX"
_core = ov.Core()


def cache_root() -> Path:
    """Where converted models are kept: `$TL_CACHE_DIR/openvino` or
    `~/.cache/tl/openvino`."""
    base = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "tl"
    return Path(base).expanduser() / "openvino"


def _cache_key(fields: dict[str, Any]) -> str:
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _versions() -> dict[str, str]:
    return {"tl": tl.__version__, "openvino": ov.get_version()}


def _cached(
    fields: dict[str, Any], make: Callable[[], tuple[ov.Model, dict]]
) -> tuple[ov.Model, dict]:
    """The model cached under `fields` and its notes, or `make()`'s, cached now.

    The entry is written into a temporary folder beside its final place and renamed
    there, so a reader never sees half an entry; when two processes race, the first
    rename wins and the other's copy is dropped. An unreadable entry is made again.
    """
    key = _cache_key(fields)
    folder = cache_root() / key
    if (folder / "entry.json").is_file():
        try:
            notes = json.loads((folder / "entry.json").read_text())["notes"]
            return _core.read_model(folder / "model.xml"), notes
        except (OSError, RuntimeError, ValueError, KeyError) as error:
            log.warning(
                "cache entry %s is unreadable (%s); making it again", folder, error
            )
            shutil.rmtree(folder, ignore_errors=True)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        temporary = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=folder.parent))
    except OSError as error:
        raise TLError(
            f"Cannot write the OpenVINO model cache in {str(folder.parent)!r} "
            f"({error.strerror}); set {CACHE_ENV} to a writable folder."
        ) from None
    try:
        model, notes = make()
        ov.save_model(model, temporary / "model.xml", compress_to_fp16=False)
        entry = {"key": key, "fields": fields, "notes": notes}
        (temporary / "entry.json").write_text(json.dumps(entry, indent=2))
        try:
            temporary.rename(folder)
        except OSError:  # fine when another process cached the same model first
            if not (folder / "entry.json").is_file():
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return model, notes


def _convert(model: keras.Model) -> ov.Model:
    """The Keras extractor as an OpenVINO model, with a dynamic batch dimension."""
    with warnings.catch_warnings():
        # convert_model calls the model with a tuple where it expects one tensor.
        warnings.filterwarnings("ignore", "The structure of `inputs`", UserWarning)
        return ov.convert_model(model)


def converted(model: keras.Model, identity: dict[str, Any]) -> ov.Model:
    """The float32 OpenVINO model of the extractor `model`, from the cache or
    converted now; `identity` is what determines the Keras model."""

    def convert() -> tuple[ov.Model, dict]:
        log.info("converting the extractor to OpenVINO (cached in %s)", cache_root())
        return _convert(model), {}

    return _cached({"kind": "float32", "model": identity, **_versions()}, convert)[0]


def compiled(model: ov.Model, precision: str) -> ov.CompiledModel:
    """`model` compiled for the CPU at `precision`, set explicitly."""
    config = {"INFERENCE_PRECISION_HINT": _INFERENCE_PRECISION[precision]}
    return _core.compile_model(model, "CPU", {**config, **_CPU_CONFIG})


def _runner(model: ov.CompiledModel) -> Callable[[Any], dict[str, np.ndarray]]:
    names = [output.get_any_name() for output in model.outputs]

    def codes_of(images) -> dict[str, np.ndarray]:
        results = model(np.asarray(images, np.float32))
        return {name: results[i] for i, name in enumerate(names)}

    return codes_of


class _Reiterable:
    """An iterable that starts over each time NNCF iterates it."""

    def __init__(self, start: Callable[[], Iterator], length: int):
        self._start, self._length = start, length

    def __iter__(self) -> Iterator:
        return self._start()

    def __len__(self) -> int:
        return self._length


def _quantize(float_model: ov.Model, calibration: Calibration) -> ov.Model:
    count = len(calibration.calibration_paths)
    log.info("calibrating int8 on %d images of %s", count, calibration.root)
    images = _Reiterable(calibration.calibration_images, count)
    with _quiet_nncf():
        return nncf.quantize(
            float_model,
            nncf.Dataset(images),
            subset_size=count,
            advanced_parameters=_advanced_parameters(),
        )


def _advanced_parameters(**options) -> nncf.AdvancedQuantizationParameters:
    ranges = getattr(RangeEstimatorParametersSet, ACTIVATION_RANGES)
    return nncf.AdvancedQuantizationParameters(
        activations_range_estimator_params=ranges, **options
    )


@contextlib.contextmanager
def _quiet_nncf() -> Iterator[None]:
    """NNCF's INFO lines off; its progress bars stay (calibration takes a while)."""
    logger = logging.getLogger("nncf")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine between matching rows of `a` and `b` (flattened per row); 1 where both
    rows are zero, 0 where only one is."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    both_zero = (np.abs(a).sum(1) == 0) & (np.abs(b).sum(1) == 0)
    safe = np.where(norms > 0, norms, 1.0)
    return np.where(norms > 0, (a * b).sum(1) / safe, both_zero.astype(float))


def _int8_check(
    float_model: ov.Model, int8_model: ov.Model, calibration: Calibration
) -> dict:
    """Cosine (min, median) per layer between int8 and float32 codes of the
    held-back images."""
    reference, quantised = (
        _runner(compiled(float_model, "float32")),
        _runner(compiled(int8_model, "int8")),
    )
    values: dict[str, list[np.ndarray]] = {}
    count = 0
    for images in calibration.held_back_images():
        expected, got = reference(images), quantised(images)
        count += len(images)
        for layer, codes in expected.items():
            values.setdefault(layer, []).append(cosines(codes, got[layer]))
    joined = {layer: np.concatenate(parts) for layer, parts in values.items()}
    return {
        "held_back_images": count,
        "cosine": {
            layer: {"min": float(v.min()), "median": float(np.median(v))}
            for layer, v in joined.items()
        },
    }


def _report(check: dict) -> None:
    """Log the int8 check, and warn where int8 changes the codes noticeably."""
    if not check["held_back_images"]:
        log.warning("int8: no images held back (too few images) to check the codes.")
        return
    log.info(
        "int8 vs float32 codes of %d held-back images, cosine per layer:\n%s",
        check["held_back_images"],
        "\n".join(
            f"  {layer:<24} min {c['min']:.5f}  median {c['median']:.5f}"
            for layer, c in check["cosine"].items()
        ),
    )
    changed = {
        layer: c["median"]
        for layer, c in check["cosine"].items()
        if c["median"] < COSINE_WARNING
    }
    if changed:
        log.warning(
            "int8 changes these codes noticeably (median cosine to float32 below "
            "%s): %s. Compare probe accuracy with float32 codes before relying on "
            "them.",
            COSINE_WARNING,
            ", ".join(f"{layer} {median:.4f}" for layer, median in changed.items()),
        )


def quantized(
    float_model: ov.Model, identity: dict[str, Any], calibration: Calibration
) -> tuple[ov.Model, dict]:
    """The int8 model calibrated on `calibration`, from the cache or quantised and
    checked now, and its check (cosines of held-back codes to float32)."""

    def quantize() -> tuple[ov.Model, dict]:
        int8_model = _quantize(float_model, calibration)
        check = _int8_check(float_model, int8_model, calibration)
        return int8_model, {"int8_check": check}

    fields = {
        "kind": "int8",
        "model": identity,
        "calibration": calibration.identity(),
        "nncf": nncf.__version__,
        "activation_ranges": ACTIVATION_RANGES,
        **_versions(),
    }
    model, notes = _cached(fields, quantize)
    return model, notes["int8_check"]


def compile_extractor(model: keras.Model, request: CompileRequest) -> CompiledExtractor:
    """Convert (or load from the cache), quantise for int8, and compile `model`."""
    float_model = converted(model, request.identity)
    provenance: dict[str, Any] = {
        "engine": "openvino",
        "precision": request.precision,
        "inference_precision_hint": _INFERENCE_PRECISION[request.precision],
        "openvino_version": ov.get_version(),
    }
    runnable = float_model
    if request.precision == "int8":
        runnable, check = quantized(float_model, request.identity, request.calibration)
        _report(check)
        provenance.update(
            nncf_version=nncf.__version__,
            calibration_images=len(request.calibration.calibration_paths),
            calibration_root=str(request.calibration.root),
            int8_check=check,
        )
    return CompiledExtractor(_runner(compiled(runnable, request.precision)), provenance)


def trial_runners(
    model: keras.Model, identity: dict[str, Any], images: np.ndarray
) -> dict[str, Callable[[Any], dict[str, np.ndarray]]]:
    """`model` compiled in bfloat16 and in int8, for timing only: the int8 model is
    calibrated on `images` alone, without bias correction, and is not cached."""
    float_model = converted(model, identity)
    with _quiet_nncf(), contextlib.redirect_stdout(io.StringIO()):
        int8_model = nncf.quantize(
            float_model,
            nncf.Dataset([image[None] for image in images]),
            subset_size=len(images),
            advanced_parameters=_advanced_parameters(disable_bias_correction=True),
        )
    return {
        "bfloat16": _runner(compiled(float_model, "bfloat16")),
        "int8": _runner(compiled(int8_model, "int8")),
    }
