"""Feature extraction: CNN codes of several layers in one pass, streamed to a store.

`build_extractor` wraps a backbone into one multi-output Keras model that takes raw
pixels, preprocesses them the backbone's way, taps the requested layers and pools each
inside the graph. `extract` runs it over an image source batch by batch and appends
the codes to an HDF5 feature store (`tl.store`), resuming a store that an interrupted
run left behind.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import platform
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path

import h5py
import keras
import numpy as np
import tensorflow as tf
from keras import ops
from tqdm.auto import tqdm

import tl
from tl.backbones import (
    PREPROCESSING_MODES,
    BackboneSpec,
    Tap,
    WeightsInfo,
    build_backbone,
    get_backbone,
    layer_taps,
    normalize_weights,
    resolve_layers,
)
from tl.engines import (
    DEFAULT_ENGINE,
    LEGACY_SETTINGS,
    CompiledExtractor,
    CompileRequest,
    check_engine_precision,
    compile_extractor,
    get_engine,
    load_engine,
)
from tl.engines.calibration import (
    Calibration,
    check_calibration,
    sample_calibration,
)
from tl.engines.hint import measured_speed_hint
from tl.errors import TLError
from tl.images import (
    DEFAULT_MAX_PIXELS,
    ImageIndex,
    ImageSettings,
    decoded_batches,
    index_images,
)
from tl.store import FeatureStore, StoreWriter, settings_differences

log = logging.getLogger("tl")

OUTPUT_DTYPES = ("float32", "float16")


# ---------------------------------------------------------------------------------
# Pooling


@dataclasses.dataclass(frozen=True)
class Pooling:
    """How a layer's (H, W, C) map becomes a row of codes.

    `avg`/`max`: global average/max per channel (C values); `avgmax`: both,
    concatenated (2C); `grid:GHxGW`: average over a GH×GW grid of cells as
    PyTorch's adaptive average pooling, flattened in (row, column, channel) order;
    `flatten`: the whole map as one vector; `none`: the raw map. Non-spatial
    outputs pass through unchanged.
    """

    kind: str
    grid: tuple[int, int] | None = None

    KINDS = ("avg", "max", "avgmax", "flatten", "none", "grid:GHxGW")

    @classmethod
    def parse(cls, text: str) -> Pooling:
        text = str(text).strip().lower()
        if text in ("avg", "max", "avgmax", "flatten", "none"):
            return cls(text)
        match = re.fullmatch(r"grid:(\d+)(?:x(\d+))?", text)
        if match and int(match[1]) > 0 and int(match[2] or match[1]) > 0:
            return cls("grid", (int(match[1]), int(match[2] or match[1])))
        raise TLError(
            f"Unknown pooling {text!r}; choose one of avg, max, avgmax, flatten, none "
            f"or grid:GHxGW (e.g. grid:2x2)."
        )

    def __str__(self) -> str:
        return f"grid:{self.grid[0]}x{self.grid[1]}" if self.grid else self.kind

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Per-image shape of the pooled codes for a layer output of `shape`."""
        if len(shape) != 3 or self.kind == "none":
            return tuple(shape)
        height, width, channels = shape
        if self.kind == "grid":
            return (self.grid[0] * self.grid[1] * channels,)
        return {
            "avg": (channels,),
            "max": (channels,),
            "avgmax": (2 * channels,),
            "flatten": (height * width * channels,),
        }[self.kind]

    def apply(self, maps):
        """Pool a batch of maps (B, H, W, C) with Keras ops (works inside graphs)."""
        if len(maps.shape) != 4 or self.kind == "none":
            return maps
        if self.kind == "avg":
            return ops.mean(maps, axis=(1, 2))
        if self.kind == "max":
            return ops.max(maps, axis=(1, 2))
        if self.kind == "avgmax":
            return ops.concatenate(
                [ops.mean(maps, axis=(1, 2)), ops.max(maps, axis=(1, 2))], axis=-1
            )
        if self.kind == "flatten":
            return ops.reshape(maps, (-1, math.prod(maps.shape[1:])))
        height, width = maps.shape[1], maps.shape[2]
        cells = [
            ops.mean(maps[:, top:bottom, left:right, :], axis=(1, 2))
            for top, bottom in _bins(height, self.grid[0])
            for left, right in _bins(width, self.grid[1])
        ]
        return ops.concatenate(cells, axis=-1)


def _bins(length: int, count: int) -> list[tuple[int, int]]:
    """Adaptive pooling bins: [floor(i*L/n), ceil((i+1)*L/n)) for i < n."""
    return [
        (math.floor(i * length / count), math.ceil((i + 1) * length / count))
        for i in range(count)
    ]


def parse_poolings(poolings: str | Sequence[str], count: int) -> list[Pooling]:
    """One pooling for every layer, or one per layer."""
    if isinstance(poolings, str | Pooling):
        poolings = [poolings]
    parsed = [p if isinstance(p, Pooling) else Pooling.parse(p) for p in poolings]
    if len(parsed) == 1:
        return parsed * count
    if len(parsed) != count:
        raise TLError(
            f"Give one pooling for all layers or one per layer: {count} layers but "
            f"{len(parsed)} poolings ({', '.join(map(str, parsed))})."
        )
    return parsed


# ---------------------------------------------------------------------------------
# Extractor


def build_extractor(
    backbone: keras.Model,
    spec: BackboneSpec,
    taps: Sequence[Tap],
    poolings: Sequence[Pooling],
    dtype: str = "float32",
) -> keras.Model:
    """One Keras model: raw RGB pixels in [0, 255] → {layer: pooled codes}.

    Preprocessing is the backbone's own and runs inside the model; only the part of
    the backbone that the deepest requested layer needs is computed; pooling runs in
    float32 whatever the compute precision, and codes are cast to `dtype`.
    """
    height, width = backbone.input_shape[1:3]
    pixels = keras.Input((height, width, 3), name="pixels")
    trunk = keras.Model(
        backbone.inputs,
        [backbone.get_layer(tap.layer).output for tap in taps],
        name=f"{backbone.name}_taps",
    )
    maps = trunk(spec.preprocess(pixels))
    maps = maps if isinstance(maps, list | tuple) else [maps]
    outputs = {
        tap.layer: ops.cast(pooling.apply(ops.cast(raw, "float32")), dtype)
        for tap, pooling, raw in zip(taps, poolings, maps, strict=True)
    }
    return keras.Model(pixels, outputs, name=f"{spec.name}_extractor")


# ---------------------------------------------------------------------------------
# Settings


def _size_pair(image_size) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, int):
        return (image_size, image_size)
    if isinstance(image_size, str):
        match = re.fullmatch(r"\s*(\d+)\s*(?:[x,]\s*(\d+))?\s*", image_size)
        if not match:
            raise TLError(f"Image size must be N or HxW, got {image_size!r}.")
        return (int(match[1]), int(match[2] or match[1]))
    return tuple(int(side) for side in image_size)


@dataclasses.dataclass(frozen=True)
class ExtractionSettings:
    """Everything that determines the codes; stored in the feature store and compared
    when a run resumes.

    Attributes:
        backbone: registry name (`tl.list_backbones()`).
        layers: aliases or Keras layer names (`--list-layers BACKBONE`).
        pooling: one pooling for all layers or one per layer (see `Pooling`).
        image_size: (height, width); None takes the backbone's default.
        resize, interpolation, antialias, max_pixels: see `tl.images.ImageSettings`.
        weights: `imagenet`, `none` or a weights file path.
        precision: compute precision (`float32`, `bfloat16`, `float16`; `int8` with
            the openvino engine).
        dtype: stored dtype (`float32` or `float16`).
        labels: `inferred` (class sub-folders) or None (unlabeled).
        seed: random initialisation seed (`weights=none`).
        engine: what runs the extractor (`tl.engines`): `keras` (the reference) or
            `openvino`.
        calibration_images: int8 only: images to calibrate on (default 300).
        calibration_source: int8 only: the folder or CSV to draw them from, which
            should hold training images only; `extract` defaults it to its source.
    """

    backbone: str = "vgg16"
    layers: tuple[str, ...] = ("last",)
    pooling: tuple[str, ...] = ("avg",)
    image_size: tuple[int, int] | None = None
    resize: str = "squash"
    interpolation: str = "bilinear"
    antialias: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    weights: str = "imagenet"
    precision: str = "float32"
    dtype: str = "float32"
    labels: str | None = "inferred"
    seed: int = 0
    engine: str = DEFAULT_ENGINE
    calibration_images: int | None = None
    calibration_source: str | None = None

    def __post_init__(self):
        def set_(name, value):
            object.__setattr__(self, name, value)

        set_(
            "layers",
            (self.layers,) if isinstance(self.layers, str) else tuple(self.layers),
        )
        set_(
            "pooling",
            tuple(str(p) for p in parse_poolings(self.pooling, len(self.layers))),
        )
        set_("image_size", _size_pair(self.image_size))
        set_("weights", normalize_weights(self.weights))
        check_engine_precision(self.engine, self.precision)
        images, source = check_calibration(
            self.precision, self.calibration_images, self.calibration_source
        )
        set_("calibration_images", images)
        set_("calibration_source", source)
        if self.dtype not in OUTPUT_DTYPES:
            raise TLError(
                f"Unknown dtype {self.dtype!r}; choose one of "
                f"{', '.join(OUTPUT_DTYPES)}."
            )

    def to_json(self) -> dict:
        values = dataclasses.asdict(self)
        values["layers"] = list(self.layers)
        values["pooling"] = list(self.pooling)
        values["image_size"] = list(self.image_size) if self.image_size else None
        return values

    @classmethod
    def from_json(cls, values: dict) -> ExtractionSettings:
        fields = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in fields})


@dataclasses.dataclass
class Extractor:
    """A built backbone with its taps: what `extract` runs and `predict` reuses."""

    spec: BackboneSpec
    settings: ExtractionSettings
    image_settings: ImageSettings
    taps: list[Tap]
    poolings: list[Pooling]
    model: keras.Model
    weights: WeightsInfo
    calibration: Calibration | None = None

    def layer_info(self) -> list[dict]:
        """Per-layer metadata stored in the feature store."""
        return [
            {
                "key": tap.layer,
                "requested": requested,
                "layer": tap.layer,
                "raw_shape": list(tap.shape),
                "stride": tap.stride,
                "depth": tap.depth,
                "pooling": str(pooling),
                "shape": list(pooling.output_shape(tap.shape)),
                "dtype": self.settings.dtype,
            }
            for requested, tap, pooling in zip(
                self.settings.layers, self.taps, self.poolings, strict=True
            )
        ]

    def codes_settings(self) -> dict:
        """Settings plus the resolved weights hash and the int8 calibration sample's
        hash: what a resumed run must match."""
        return {
            **self.settings.to_json(),
            "weights_sha256": self.weights.sha256,
            "calibration_sha256": self.calibration.sha256 if self.calibration else None,
        }

    def model_identity(self) -> dict:
        """What determines the Keras extractor's graph and weights, whatever engine
        runs it: the key of an engine's converted model."""
        settings = self.settings
        return {
            "backbone": settings.backbone,
            "weights": self.weights.sha256 or dataclasses.asdict(self.weights),
            "layers": [tap.layer for tap in self.taps],
            "pooling": list(settings.pooling),
            "image_size": list(settings.image_size),
            "dtype": settings.dtype,
            "precision": get_engine(settings.engine).build_precision(
                settings.precision
            ),
            "keras_version": keras.__version__,
        }

    @functools.cached_property
    def compiled(self) -> CompiledExtractor:
        """The extractor compiled by the settings' engine, on first use (an engine
        may convert the model and calibrate it, which takes a while)."""
        request = CompileRequest(
            self.settings.precision, self.model_identity(), self.calibration
        )
        return compile_extractor(self.settings.engine, self.model, request)


def load_extractor(settings: ExtractionSettings) -> Extractor:
    """Build the backbone, resolve and check its layers, and wrap the extractor.

    Everything that can be wrong with the settings fails here, before any image is
    read: a missing engine, unknown backbone or layer, missing weights, bad sizes,
    int8 without calibration images.
    """
    load_engine(settings.engine)
    if settings.calibration_images and settings.calibration_source is None:
        raise TLError(
            "int8 needs calibration images: set calibration_source to the training "
            "images (--calibration-source)."
        )
    spec = get_backbone(settings.backbone)
    if settings.image_size is None:
        settings = dataclasses.replace(settings, image_size=(spec.default_size,) * 2)
    image_settings = ImageSettings(  # checks resize and interpolation up front
        settings.image_size,
        settings.resize,
        settings.interpolation,
        settings.antialias,
        settings.max_pixels,
    )
    backbone, weights = build_backbone(
        spec,
        settings.image_size,
        settings.weights,
        precision=get_engine(settings.engine).build_precision(settings.precision),
        seed=settings.seed,
    )
    taps = resolve_layers(layer_taps(backbone, spec), list(settings.layers), spec.name)
    poolings = parse_poolings(settings.pooling, len(taps))
    model = build_extractor(backbone, spec, taps, poolings, settings.dtype)
    calibration = None
    if settings.calibration_images:
        calibration = sample_calibration(
            settings.calibration_source, settings.calibration_images, image_settings
        )
    return Extractor(
        spec, settings, image_settings, taps, poolings, model, weights, calibration
    )


# ---------------------------------------------------------------------------------
# Extraction


@dataclasses.dataclass
class ExtractionResult:
    """What a call of `extract` did."""

    path: Path
    rows: int
    skipped: list[tuple[int, str, str]]
    images_processed: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images_processed / self.seconds if self.seconds else float("nan")


def _provenance(extractor: Extractor, source: Path) -> dict:
    return {
        "tl_version": tl.__version__,
        "keras_version": keras.__version__,
        "tensorflow_version": tf.__version__,
        "h5py_version": h5py.__version__,
        "numpy_version": np.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "source": str(source),
        "backbone_constructor": f"keras.applications.{extractor.spec.constructor}",
        "preprocessing": extractor.spec.preprocessing,
        "preprocessing_description": PREPROCESSING_MODES[extractor.spec.preprocessing],
        "weights": dataclasses.asdict(extractor.weights),
        "image_size": list(extractor.settings.image_size),
        "inference": extractor.compiled.provenance,
    }


def _format_bytes(count: float) -> str:
    power = min(int(math.log10(max(count, 1)) // 3), 4)
    if power == 0:
        return f"{count:.0f} B"
    return f"{count / 1000**power:.1f} {('KB', 'MB', 'GB', 'TB')[power - 1]}"


def storage_plan(layer_info: list[dict], images: int) -> tuple[list[str], int]:
    """Lines describing bytes per image and in total for each layer, and the total."""
    lines, total = [], 0
    for info in layer_info:
        per_image = math.prod(info["shape"]) * np.dtype(info["dtype"]).itemsize
        total += per_image * images
        raw = "x".join(map(str, info["raw_shape"]))
        lines.append(
            f"  {info['requested']:>14} = {info['layer']:<24} {raw:>14} "
            f"-> {info['pooling']:<9} {math.prod(info['shape']):>9} values "
            f"{_format_bytes(per_image):>9}/image "
            f"{_format_bytes(per_image * images):>9}"
        )
    return lines, total


def _check_disk(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise TLError(
            f"The codes need about {_format_bytes(needed)} but only "
            f"{_format_bytes(free)} are free on {folder}. Pool more (avg, grid:2x2), "
            f"store --dtype float16, use --compression lzf, or write elsewhere."
        )


def _open_store(
    output: Path,
    source: Path,
    extractor: Extractor,
    index: ImageIndex,
    num_images: int,
    shard: dict | None,
    compression: str | None,
    overwrite: bool,
) -> StoreWriter | None:
    """A writer positioned after the last complete batch; None if already complete."""
    codes_settings = extractor.codes_settings()
    if output.exists() and not overwrite:
        with FeatureStore(output, require_complete=False) as existing:
            differences = settings_differences(
                {**LEGACY_SETTINGS, **existing.settings}, codes_settings
            )
            if existing.shard != shard:
                differences.append(
                    f"shard: file has {existing.shard}, this run {shard}"
                )
            if existing.index_sha256 != index.fingerprint():
                differences.append(
                    f"input: the file indexed {existing.num_images} images, "
                    f"{str(index.root)!r} now gives {num_images} (or other paths or "
                    f"labels)"
                )
            complete = existing.complete
        if differences:
            raise TLError(
                f"{str(output)!r} holds an extraction with other settings: "
                f"{'; '.join(differences)}. Pass --overwrite (overwrite=True) to "
                f"replace it, or choose another --output."
            )
        if complete:
            return None
        return StoreWriter.resume(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    return StoreWriter.create(
        output,
        settings=codes_settings,
        provenance=_provenance(extractor, source),
        layers=extractor.layer_info(),
        class_names=index.class_names,
        num_images=num_images,
        index_sha256=index.fingerprint(),
        compression=compression,
        shard=shard,
    )


def shard_range(total: int, shard: tuple[int, int] | None) -> tuple[int, int]:
    """[start, stop) of shard `(index, count)` of `total` images: contiguous slices."""
    if shard is None:
        return 0, total
    index, count = shard
    if not 0 <= index < count:
        raise TLError(f"Shard must be I/N with 0 <= I < N, got {index}/{count}.")
    return index * total // count, (index + 1) * total // count


def extract(
    source: str | Path,
    output: str | Path,
    settings: ExtractionSettings | None = None,
    *,
    batch_size: int = 32,
    compression: str | None = None,
    shard: tuple[int, int] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    on_batch: Callable[[int, int], None] | None = None,
    speed_hint: bool = False,
    **setting_overrides,
) -> ExtractionResult:
    """Extract the CNN codes of several layers for every image of `source`.

    Args:
        source: an image folder (one sub-folder per class), an unlabeled folder, or a
            CSV of `path,label`.
        output: the HDF5 feature store to write. If it exists with the same settings
            and input, the run resumes after its last complete batch (or returns at
            once when it is complete); other settings are refused unless `overwrite`.
        settings: an `ExtractionSettings`; keyword arguments override its fields, so
            `extract(src, out, backbone="resnet50", layers=["conv4", "conv5"])` works.
        batch_size: images per forward pass (memory only; codes do not depend on it).
        compression: None, `lzf` or `gzip` for the code datasets.
        shard: `(index, count)` to process only a contiguous slice of the input, for
            parallel workers; join the shard files with `tl.store.merge_stores`.
        overwrite: replace an existing store instead of resuming it.
        progress: show a progress bar (images/s, ETA).
        on_batch: called as `on_batch(images_done, images_total)` after each batch
            is safely written.
        speed_hint: on a CPU with OpenVINO installed, a long float32 run first
            measures how much faster OpenVINO bfloat16 and int8 would be, on a few
            of its images, and logs it (`tl.engines.hint`).

    Returns:
        An `ExtractionResult` (path, rows written, skipped files, timing).
    """
    settings = dataclasses.replace(
        settings or ExtractionSettings(), **setting_overrides
    )
    if settings.calibration_images and settings.calibration_source is None:
        settings = dataclasses.replace(settings, calibration_source=str(source))
    if batch_size < 1:
        raise TLError(f"batch_size must be at least 1, got {batch_size}.")
    output = Path(output)
    extractor = load_extractor(settings)
    settings = extractor.settings
    index = index_images(source, settings.labels)
    start, stop = shard_range(len(index), shard)
    shard_info = {"index": shard[0], "count": shard[1]} if shard else None

    writer = _open_store(
        output,
        Path(source).expanduser().resolve(),
        extractor,
        index,
        stop - start,
        shard_info,
        compression,
        overwrite,
    )
    if writer is None:
        log.info("%s is already complete; nothing to do.", output)
        with FeatureStore(output) as store:
            return ExtractionResult(output, len(store), store.skipped, 0, 0.0)
    with writer:
        done = writer.images_done
        remaining = stop - start - done
        lines, needed = storage_plan(extractor.layer_info(), remaining)
        log.info(
            "%s: %d images (%s), %s%s",
            index.root,
            stop - start,
            f"{len(index.class_names)} classes" if index.class_names else "unlabeled",
            f"resuming after {done}, " if done else "",
            f"{remaining} to go",
        )
        for ignored in index.ignored:
            log.warning("ignored %s: not inside a class folder", ignored)
        log.info("codes per layer (%s):\n%s", settings.dtype, "\n".join(lines))
        if extractor.weights.source == "none":
            log.warning(
                "--weights none: random weights. These codes, and any accuracy "
                "measured on them, say nothing about the pretrained %s.",
                extractor.spec.name,
            )
        _check_disk(output.resolve().parent, needed)
        if speed_hint:
            paths = index.absolute_paths()[start + done : stop]
            if line := measured_speed_hint(extractor, paths):
                log.info("hint: %s", line)
        began = time.perf_counter()
        _run(extractor, index, writer, start, stop, batch_size, progress, on_batch)
        seconds = time.perf_counter() - began
        writer.finish()
    with FeatureStore(output) as store:
        result = ExtractionResult(output, len(store), store.skipped, remaining, seconds)
    for _, path, reason in result.skipped:
        log.warning("skipped %s: %s", path, reason)
    return result


@dataclasses.dataclass
class CodeBatch:
    """One forward pass: codes of the images at `positions`, and the positions
    before `end` that the input pipeline dropped, with the reason for each."""

    positions: np.ndarray
    codes: dict[str, np.ndarray]
    skipped: list[tuple[int, str]]
    end: int


def iter_codes(
    extractor: Extractor, paths: Sequence[str], first: int, batch_size: int
) -> Iterator[CodeBatch]:
    """Codes of `paths[first:]`, batch by batch, with every dropped file diagnosed
    (see `tl.images.decoded_batches`)."""
    run = extractor.compiled.run
    for batch in decoded_batches(paths, extractor.image_settings, batch_size, first):
        codes = run(batch.images) if batch.images is not None else {}
        yield CodeBatch(batch.positions, codes, batch.skipped, batch.end)


def _run(
    extractor: Extractor,
    index: ImageIndex,
    writer: StoreWriter,
    slice_start: int,
    stop: int,
    batch_size: int,
    progress: bool,
    on_batch: Callable[[int, int], None] | None,
) -> None:
    """The loop: codes batch by batch, appended and committed with skipped files."""
    paths = index.absolute_paths()[:stop]
    first = slice_start + writer.images_done
    total = stop - slice_start
    skipped_count = 0
    with tqdm(
        total=total,
        initial=writer.images_done,
        unit="img",
        disable=not progress,
        smoothing=0.1,
        dynamic_ncols=True,
    ) as bar:
        for batch in iter_codes(extractor, paths, first, batch_size):
            positions = batch.positions
            writer.write_batch(
                batch.codes,
                positions,
                index.labels[positions],
                [index.paths[p] for p in positions],
                [(p, index.paths[p], reason) for p, reason in batch.skipped],
                images_done=batch.end - slice_start,
            )
            bar.update(batch.end - slice_start - bar.n)
            skipped_count += len(batch.skipped)
            if batch.skipped:
                bar.set_postfix(skipped=skipped_count)
            if on_batch:
                on_batch(writer.images_done, total)


def resume(store: str | Path, **options) -> ExtractionResult:
    """Finish the interrupted extraction in `store` with the settings stored in it.

    Keyword options are those of `extract` that do not change the codes
    (`batch_size`, `progress`, `on_batch`).
    """
    with FeatureStore(store, require_complete=False) as existing:
        settings = ExtractionSettings.from_json(existing.settings)
        source = existing.provenance["source"]
        shard = existing.shard
    shard = (shard["index"], shard["count"]) if shard else None
    return extract(source, store, settings, shard=shard, **options)
