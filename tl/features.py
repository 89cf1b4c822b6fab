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
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import keras
import numpy as np
from keras import ops
from tqdm.auto import tqdm

from tl._checks import ParameterError, check_choice, check_interval
from tl._settings import FlatSettings
from tl.backbones import (
    BackboneSettings,
    BackboneSpec,
    Tap,
    WeightsInfo,
    layer_taps,
    resolve_layers,
)
from tl.engines import (
    CompiledExtractor,
    CompileRequest,
    EngineSettings,
    compile_extractor,
    load_engine,
)
from tl.engines.calibration import Calibration, sample_calibration
from tl.engines.hint import measured_speed_hint
from tl.errors import TLError
from tl.images import (
    ImageIndex,
    ImageSettings,
    decoded_batches,
    index_images,
)
from tl.locking import acquire
from tl.provenance import (
    INFERENCE_KEYS,
    Identity,
    codes_identity,
    identity_differences,
    provenance_record,
)
from tl.store import (
    FeatureStore,
    StoreWriter,
    estimated_bytes,
    format_bytes,
    refuse_foreign_file,
    repair_cut_short,
    replacement_path,
)

if TYPE_CHECKING:  # only with the dask extra
    from distributed import Client

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
        raise ParameterError(
            "pooling",
            "one of 'avg', 'max', 'avgmax', 'flatten', 'none' or 'grid:GHxGW' (e.g. "
            "'grid:2x2')",
            text,
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


DEFAULT_BACKBONE = "vgg16"  # the classic CNN codes: five pooled blocks, one per alias


@dataclasses.dataclass(frozen=True)
class ExtractionSettings(FlatSettings):
    """Everything that determines the codes; stored flat in the feature store and
    compared when a run resumes.

    Build it with parts (`ExtractionSettings(BackboneSettings("resnet50"),
    ImageSettings(64), layers=("conv4",))`) or with flat keywords
    (`ExtractionSettings.create(backbone="resnet50", image_size=64,
    layers=["conv4"])`).

    Attributes:
        backbone: the network, its weights, precision and seed (`BackboneSettings`).
        image: how files become inputs (`ImageSettings`; size None: the backbone's).
        layers: aliases or Keras layer names (`--list-layers BACKBONE`).
        pooling: one pooling for all layers or one per layer (see `Pooling`).
        dtype: stored dtype (`float32` or `float16`).
        labels: `inferred` (class sub-folders) or None (unlabeled).
        engine: what runs the extractor at the backbone's precision, and the int8
            calibration sample (`tl.engines.EngineSettings`; Keras by default).
    """

    backbone: BackboneSettings = dataclasses.field(
        default_factory=lambda: BackboneSettings(DEFAULT_BACKBONE)
    )
    image: ImageSettings = dataclasses.field(default_factory=ImageSettings)
    layers: tuple[str, ...] = ("last",)
    pooling: tuple[str, ...] = ("avg",)
    dtype: str = "float32"
    labels: str | None = "inferred"
    engine: EngineSettings = dataclasses.field(default_factory=EngineSettings)

    def __post_init__(self):
        def set_(name, value):
            object.__setattr__(self, name, value)

        self.check_parts()
        set_(
            "layers",
            (self.layers,) if isinstance(self.layers, str) else tuple(self.layers),
        )
        set_(
            "pooling",
            tuple(str(p) for p in parse_poolings(self.pooling, len(self.layers))),
        )
        check_choice("dtype", self.dtype, OUTPUT_DTYPES)
        check_choice("labels", self.labels, ("inferred", None))
        set_("engine", self.engine.for_precision(self.backbone.precision))

    def resolved(self) -> ExtractionSettings:
        """These settings with the image size filled in from the backbone."""
        return dataclasses.replace(self, image=self.image.resolved(self.backbone.spec))


@dataclasses.dataclass
class Extractor:
    """A built backbone with its taps: what `extract` runs and `predict` reuses."""

    spec: BackboneSpec
    settings: ExtractionSettings  # resolved: the image size is set
    taps: list[Tap]
    poolings: list[Pooling]
    model: keras.Model
    weights: WeightsInfo
    calibration: Calibration | None = None  # int8: the images it is calibrated on

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
        """Settings plus the resolved weights hash and that of the int8 calibration
        sample, as the store records them: what a resumed run must match."""
        return {
            **self.settings.to_json(),
            "weights_sha256": self.weights.sha256,
            "calibration_sha256": self.calibration.sha256 if self.calibration else None,
        }

    def identity(
        self, index: ImageIndex | None = None, *, hash_content: bool = False
    ) -> Identity:
        """The identity of the codes this extractor computes, for the images of
        `index` when given (see `tl.provenance.codes_identity`)."""
        return codes_identity(
            self.settings,
            index,
            weights_sha256=self.weights.sha256,
            layers=[tap.layer for tap in self.taps],
            calibration_sha256=self.calibration.sha256 if self.calibration else None,
            hash_content=hash_content,
        )

    def model_identity(self) -> dict:
        """What determines the Keras model an engine converts: the codes' identity
        without how they are run, plus the precision the model was built at and the
        Keras version (the key of an engine's converted-model cache). Which images
        are read (labels, size limit) changes the codes kept, not the model."""
        values = self.identity().values
        for key in (*INFERENCE_KEYS, "labels", "max_pixels"):
            values.pop(key, None)
        spec = self.settings.engine.spec
        return {
            **values,
            "build_precision": spec.build_precision(self.settings.backbone.precision),
            "keras_version": keras.__version__,
        }

    @functools.cached_property
    def compiled(self) -> CompiledExtractor:
        """The extractor compiled by the settings' engine on first use, once for all
        the runs of this extractor (a Dask worker runs one per shard): the Keras
        graph function, or an OpenVINO model converted (and calibrated) or read
        from its cache."""
        request = CompileRequest(
            self.settings.backbone.precision, self.model_identity(), self.calibration
        )
        return compile_extractor(self.settings.engine.name, self.model, request)


def load_extractor(settings: ExtractionSettings) -> Extractor:
    """Build the backbone, resolve and check its layers, and wrap the extractor.

    Everything that can be wrong with the settings fails here, before any image is
    read: a missing engine, unknown backbone or layer, missing weights, bad sizes,
    int8 without calibration images.
    """
    settings = settings.resolved()
    engine = settings.engine
    load_engine(engine.name)
    if engine.calibration_images and engine.calibration_source is None:
        raise TLError(
            "int8 needs calibration images: set calibration_source to the training "
            "images (--calibration-source)."
        )
    spec = settings.backbone.spec
    # An engine other than Keras applies the precision to a float32 model itself.
    build_precision = engine.spec.build_precision(settings.backbone.precision)
    backbone, weights = dataclasses.replace(
        settings.backbone, precision=build_precision
    ).build(settings.image.size)
    taps = resolve_layers(layer_taps(backbone, spec), list(settings.layers), spec.name)
    poolings = parse_poolings(settings.pooling, len(taps))
    model = build_extractor(backbone, spec, taps, poolings, settings.dtype)
    calibration = None
    if engine.calibration_images:
        calibration = sample_calibration(
            engine.calibration_source, engine.calibration_images, settings.image
        )
    return Extractor(spec, settings, taps, poolings, model, weights, calibration)


# ---------------------------------------------------------------------------------
# Extraction


@dataclasses.dataclass
class ExtractionResult:
    """What a call of `extract` did, and with which (resolved) settings."""

    path: Path
    settings: ExtractionSettings
    rows: int
    skipped: list[tuple[int, str, str]]
    images_processed: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images_processed / self.seconds if self.seconds else float("nan")


def storage_plan(layer_info: list[dict], images: int) -> list[str]:
    """Lines describing the bytes per image and in total of each layer's codes."""
    lines = []
    for info in layer_info:
        per_image = math.prod(info["shape"]) * np.dtype(info["dtype"]).itemsize
        raw = "x".join(map(str, info["raw_shape"]))
        lines.append(
            f"  {info['requested']:>14} = {info['layer']:<24} {raw:>14} "
            f"-> {info['pooling']:<9} {math.prod(info['shape']):>9} values "
            f"{format_bytes(per_image):>9}/image "
            f"{format_bytes(per_image * images):>9}"
        )
    return lines


def check_disk(path: Path, needed: int) -> None:
    """Refuse, in one line, to write `needed` bytes beside `path` if they do not fit."""
    folder = path.absolute().parent
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise TLError(
            f"The codes need about {format_bytes(needed)} but only "
            f"{format_bytes(free)} are free on {folder}. Pool more (avg, grid:2x2), "
            f"store --dtype float16, use --compression lzf, or write elsewhere."
        )


def _open_store(
    target: Path,
    source: Path,
    extractor: Extractor,
    index: ImageIndex,
    num_images: int,
    shard: dict | None,
    compression: str | None,
    start_over: bool,
) -> StoreWriter | None:
    """A writer of `target` positioned after its last complete batch; None if it is
    already complete. A store there with other settings or input is refused, or
    with `start_over` (the `<output>.new` of an overwrite) replaced, as is one that
    cannot be resumed."""
    if target.exists():
        try:
            return _resume_store(target, extractor, index, num_images, shard)
        except TLError:
            if not start_over:
                raise
    return StoreWriter.create(
        target,
        settings=extractor.codes_settings(),
        provenance=provenance_record(extractor, source, index),
        layers=extractor.layer_info(),
        class_names=index.class_names,
        num_images=num_images,
        index_sha256=index.fingerprint(),
        compression=compression,
        shard=shard,
        ignored=index.ignored,
    )


def _resume_store(
    target: Path,
    extractor: Extractor,
    index: ImageIndex,
    num_images: int,
    shard: dict | None,
) -> StoreWriter | None:
    repair_cut_short(target)
    with FeatureStore(target, require_complete=False) as existing:
        check_same_extraction(existing, extractor, index, num_images, shard)
        complete = existing.complete
    return None if complete else StoreWriter.resume(target)


def check_same_extraction(
    existing: FeatureStore,
    extractor: Extractor,
    index: ImageIndex,
    num_images: int,
    shard: dict | None,
) -> None:
    """Refuse, in one line, a store that holds another extraction than this one
    (settings, shard or input): it may be neither resumed nor counted as done."""
    differences = identity_differences(
        ExtractionSettings.with_defaults(existing.settings),
        extractor.codes_settings(),
        names=("file has", "this run asks"),
    )
    if existing.shard != shard:
        differences.append(f"shard: file has {existing.shard}, this run {shard}")
    if existing.index_sha256 != index.fingerprint():
        differences.append(
            f"input: the file indexed {existing.num_images} images, "
            f"{str(index.root)!r} now gives {num_images} (or other paths or "
            f"labels)"
        )
    if differences:
        raise TLError(
            f"{str(existing.path)!r} holds an extraction with other settings: "
            f"{'; '.join(differences)}. Pass --overwrite (overwrite=True) to "
            f"replace it, or choose another --output."
        )


def shard_range(total: int, shard: tuple[int, int] | None) -> tuple[int, int]:
    """[start, stop) of shard `(index, count)` of `total` images: contiguous slices."""
    if shard is None:
        return 0, total
    index, count = shard
    if not 0 <= index < count:
        raise ParameterError("shard", "I/N with 0 <= I < N", f"{index}/{count}")
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
    client: Client | str | None = None,
    keep_shards: bool = False,
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
            The run holds `<output>.lock` throughout: a second writer is refused.
        settings: an `ExtractionSettings`; keyword arguments override it by its flat
            keys (`ExtractionSettings.updated`), so `extract(src, out,
            backbone="resnet50", layers=["conv4", "conv5"], image_size=64)` works.
        batch_size: images per forward pass (memory only; codes do not depend on it).
        compression: None, `lzf` or `gzip` for the code datasets.
        shard: `(index, count)` to process only a contiguous slice of the input, for
            parallel workers; join the shard files with `tl.store.merge_stores`.
        overwrite: replace an existing store instead of resuming it. The new store
            is written to `<output>.new` and renamed over `output` once complete, so
            the old one survives an interruption; the same call resumes `.new`.
        progress: show a progress bar (images/s, ETA).
        on_batch: called as `on_batch(images_done, images_total)` after each batch
            is safely written.
        client: run on a Dask cluster (`pip install 'tl[dask]'`): a
            `distributed.Client`, `"local:N"` (N worker processes here) or a
            scheduler address. The index is split into shards that the workers
            extract under `<output>.shards/`, then merged into `output`; see
            `tl.distributed.extract`.
        keep_shards: with `client`, keep the shard folder after the merge.
        speed_hint: on a CPU with OpenVINO installed, a long float32 run first
            measures how much faster OpenVINO bfloat16 and int8 would be, on a few
            of its images, and logs it (`tl.engines.hint`; not with `client`).

    Returns:
        An `ExtractionResult` (path, rows written, skipped files, timing).
    """
    settings = (settings or ExtractionSettings()).updated(**setting_overrides)
    if settings.engine.calibration_images and not settings.engine.calibration_source:
        settings = settings.updated(calibration_source=str(source))
    check_interval("batch_size", batch_size, low=1, integer=True)
    if client is not None:
        if shard is not None:
            raise TLError(
                "A run on Dask splits the input into shards itself; drop the shard "
                "(--shard) or the client (--dask)."
            )
        from tl import distributed

        return distributed.extract(
            source,
            output,
            settings,
            client=client,
            batch_size=batch_size,
            compression=compression,
            overwrite=overwrite,
            progress=progress,
            on_batch=on_batch,
            keep_shards=keep_shards,
        )
    output = Path(output)
    extractor = load_extractor(settings)
    index = index_images(source, extractor.settings.labels)

    output.parent.mkdir(parents=True, exist_ok=True)
    with acquire(output, "extraction"):
        refuse_foreign_file(output)
        target = replacement_path(output) if overwrite else output
        if overwrite:
            log.info("writing %s; it replaces %s once complete", target, output)
        processed, seconds = write_codes(
            target,
            source,
            extractor,
            index,
            shard=shard,
            compression=compression,
            start_over=overwrite,
            batch_size=batch_size,
            progress=progress,
            on_batch=on_batch,
            speed_hint=speed_hint,
        )
        if overwrite:
            target.replace(output)
        return finished_result(output, settings, processed, seconds)


def finished_result(
    output: Path, settings: ExtractionSettings, processed: int, seconds: float
) -> ExtractionResult:
    """The result of an extraction into the complete store `output`; its skipped
    files are logged."""
    with FeatureStore(output) as store:
        result = ExtractionResult(
            output, settings, len(store), store.skipped, processed, seconds
        )
    for _, path, reason in result.skipped:
        log.warning("skipped %s: %s", path, reason)
    return result


def write_codes(
    target: Path,
    source: str | Path,
    extractor: Extractor,
    index: ImageIndex,
    *,
    shard: tuple[int, int] | None,
    compression: str | None,
    start_over: bool,
    batch_size: int,
    progress: bool,
    on_batch: Callable[[int, int], None] | None,
    announce: bool = True,
    speed_hint: bool = False,
) -> tuple[int, float]:
    """Fill the store `target` with the codes of `index` (or of its `shard`),
    resuming what it holds, and mark it complete. The caller holds its lock.

    A store there with other settings or input is refused, or with `start_over`
    replaced, as is one that cannot be resumed. `announce` logs the plan first;
    `speed_hint` then measures and logs a faster engine (`tl.engines.hint`).

    Returns:
        (images processed, seconds) by this call.
    """
    start, stop = shard_range(len(index), shard)
    writer = _open_store(
        target,
        Path(source).expanduser().resolve(),
        extractor,
        index,
        stop - start,
        {"index": shard[0], "count": shard[1]} if shard else None,
        compression,
        start_over,
    )
    if writer is None:
        log.info("%s is already complete; nothing to do.", target)
        return 0, 0.0
    with writer:
        done = writer.images_done
        needed = codes_bytes(
            extractor.layer_info(),
            stop - start,
            writer.rows,
            index.paths[start + done : stop],
        )
        if announce:
            describe_plan(extractor, index, stop - start, done, needed)
        check_disk(writer.path, needed)
        if speed_hint:
            paths = index.absolute_paths()[start + done : stop]
            if line := measured_speed_hint(extractor, paths):
                log.info("hint: %s", line)
        began = time.perf_counter()
        _append_batches(
            extractor, index, writer, start, stop, batch_size, progress, on_batch
        )
        seconds = time.perf_counter() - began
        writer.finish()
    return stop - start - done, seconds


def codes_bytes(
    layers: list[dict], num_images: int, rows: int, paths: Sequence[str]
) -> int:
    """Bytes that the rows of `paths` add to a store of `num_images` images that holds
    `rows` rows (`tl.store.estimated_bytes`)."""
    path_bytes = sum(len(path.encode()) for path in paths)
    return estimated_bytes(
        layers, num_images, rows + len(paths), path_bytes
    ) - estimated_bytes(layers, num_images, rows, 0)


def describe_plan(
    extractor: Extractor, index: ImageIndex, images: int, done: int, needed: int
) -> None:
    """Log what an extraction of `images` images, `done` of them already, will do:
    the input, its ignored files, the codes per layer and the bytes to write."""
    remaining = images - done
    log.info(
        "%s: %d images (%s), %s%s",
        index.root,
        images,
        f"{len(index.class_names)} classes" if index.class_names else "unlabeled",
        f"resuming after {done}, " if done else "",
        f"{remaining} to go",
    )
    for path, reason in index.ignored:
        log.warning("ignored %s: %s", path, reason)
    log.info(
        "codes per layer (%s), about %s to write:\n%s",
        extractor.settings.dtype,
        format_bytes(needed),
        "\n".join(storage_plan(extractor.layer_info(), remaining)),
    )
    if extractor.weights.source == "none":
        log.warning(
            "--weights none: random weights. These codes, and any accuracy measured "
            "on them, say nothing about the pretrained %s.",
            extractor.spec.name,
        )


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
    codes_of = extractor.compiled.codes_of
    for batch in decoded_batches(paths, extractor.settings.image, batch_size, first):
        codes = codes_of(batch.images) if batch.images is not None else {}
        yield CodeBatch(batch.positions, codes, batch.skipped, batch.end)


def _append_batches(
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
