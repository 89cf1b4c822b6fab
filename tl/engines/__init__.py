"""Inference engines: how a frozen extractor (pixels → pooled codes) is run.

`keras` runs the Keras extractor as a TensorFlow graph; it is the default and the
reference. `openvino` (the optional extra `tl[openvino]`) converts the same
multi-output model, preprocessing and in-graph pooling included, and runs it with
OpenVINO in float32, bfloat16 or int8 (post-training quantisation calibrated on the
user's own images, `tl.engines.calibration`). An engine module exposes
`compile_extractor(model, request) -> CompiledExtractor`; the registry below knows
which precisions each one has and which packages it needs, so that a missing
package or an unsupported precision fails at once, before any model is built.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from tl._checks import ParameterError, check_choice, check_interval
from tl._settings import FlatSettings
from tl.errors import TLError

if TYPE_CHECKING:
    from tl.engines.calibration import Calibration


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """What tl knows about an engine before importing it.

    Attributes:
        name: registry key (`--engine`).
        module: the module that implements `compile_extractor`.
        precisions: the compute precisions it offers, the first being the default.
        packages: importable packages it needs beyond tl's own requirements.
        extra: the `pip install 'tl[EXTRA]'` that provides them.
        keras_precision: the Keras model is built at the requested precision
            (Keras mixed precision); otherwise it is built in float32 and the
            engine applies the precision itself.
        description: one line for `--help` and errors.
    """

    name: str
    module: str
    precisions: tuple[str, ...]
    packages: tuple[str, ...] = ()
    extra: str | None = None
    keras_precision: bool = False
    description: str = ""

    def build_precision(self, precision: str) -> str:
        """The precision to build the Keras model at for `precision`."""
        return precision if self.keras_precision else "float32"


_REGISTRY = {
    spec.name: spec
    for spec in (
        EngineSpec(
            "keras",
            "tl.engines.keras",
            ("float32", "bfloat16", "float16"),
            keras_precision=True,
            description="TensorFlow graph of the Keras model (the reference)",
        ),
        EngineSpec(
            "openvino",
            "tl.engines.openvino",
            ("float32", "bfloat16", "int8"),
            packages=("openvino", "nncf"),
            extra="openvino",
            description="OpenVINO on the CPU, faster there; pip install 'tl[openvino]'",
        ),
    )
}
DEFAULT_ENGINE = "keras"
# Every precision some engine has, in the order --help lists them.
PRECISIONS = tuple(
    dict.fromkeys(p for spec in _REGISTRY.values() for p in spec.precisions)
)
# Images an int8 model is calibrated on, unless told otherwise.
DEFAULT_CALIBRATION_IMAGES = 300


def list_engines() -> list[str]:
    """Names accepted by `get_engine`, the default first."""
    return list(_REGISTRY)


def get_engine(name: str) -> EngineSpec:
    """The spec registered under `name`."""
    return _REGISTRY[check_choice("engine", name, _REGISTRY)]


def check_engine_precision(engine: str, precision: str) -> None:
    """Refuse an unknown precision, or one the engine lacks, naming the engine that
    has it."""
    check_choice("precision", precision, PRECISIONS)
    others = [s.name for s in _REGISTRY.values() if precision in s.precisions]
    check_choice(
        "precision",
        precision,
        get_engine(engine).precisions,
        advice=f"The {engine} engine has no {precision}: it runs with --engine "
        f"{' or '.join(others)}.",
    )


@dataclasses.dataclass(frozen=True)
class EngineSettings(FlatSettings):
    """What runs the extractor, and what an int8 model is calibrated on: part of
    every extraction, stored flat beside the other settings (`engine`,
    `calibration_images`, `calibration_source`).

    The compute precision is the backbone's (`BackboneSettings.precision`), shared
    with fine-tuning; `ExtractionSettings` checks that the engine has it
    (`for_precision`). A field added here is stored, read back, offered as an
    override and, but for the calibration source (named by the SHA-256 of its
    sample instead), part of the codes' identity (`tl.provenance`).

    Attributes:
        name: registry name (`list_engines()`): `keras` (the reference) or
            `openvino`.
        calibration_images: int8 only: the number of images to calibrate on
            (`DEFAULT_CALIBRATION_IMAGES` when None).
        calibration_source: int8 only: the folder or CSV of training images to draw
            them from, made absolute; `tl.extract` defaults it to its source.
    """

    name: str = DEFAULT_ENGINE
    calibration_images: int | None = None
    calibration_source: str | None = None

    JSON_NAMES: ClassVar[dict[str, str]] = {"name": "engine"}

    def __post_init__(self):
        get_engine(self.name)
        if self.calibration_images is not None:
            check_interval(
                "calibration_images",
                self.calibration_images,
                low=1,
                integer=True,
                advice=f"About {DEFAULT_CALIBRATION_IMAGES} is usual.",
            )
        if self.calibration_source is not None:
            source = Path(self.calibration_source).expanduser().resolve()
            object.__setattr__(self, "calibration_source", str(source))

    @property
    def spec(self) -> EngineSpec:
        return get_engine(self.name)

    def for_precision(self, precision: str) -> EngineSettings:
        """These settings checked against the compute `precision`: refused when the
        engine lacks it, or when calibration is given for another precision than
        int8; for int8 the number of calibration images filled in."""
        check_engine_precision(self.name, precision)
        if precision == "int8":
            if self.calibration_images is not None:
                return self
            return dataclasses.replace(
                self, calibration_images=DEFAULT_CALIBRATION_IMAGES
            )
        for name in ("calibration_images", "calibration_source"):
            if getattr(self, name) is not None:
                raise ParameterError(
                    name,
                    "given with the 'int8' precision only",
                    getattr(self, name),
                    f"The precision is {precision!r}, which is not calibrated.",
                )
        return self


def missing_packages(engine: str) -> list[str]:
    """The packages `engine` needs that are not installed."""
    return [
        package
        for package in get_engine(engine).packages
        if importlib.util.find_spec(package) is None
    ]


def load_engine(engine: str) -> ModuleType:
    """The module implementing `engine`, or one line saying what to install."""
    spec = get_engine(engine)
    missing = missing_packages(engine)
    if missing:
        raise TLError(
            f"The {engine} engine needs {', '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed: run "
            f"pip install 'tl[{spec.extra}]' (or use --engine {DEFAULT_ENGINE})."
        )
    return importlib.import_module(spec.module)


@dataclasses.dataclass(frozen=True)
class CompileRequest:
    """What an engine needs besides the Keras extractor.

    Attributes:
        precision: the compute precision (one of the engine's).
        identity: what determines the extractor's graph and weights (JSON values);
            engines that cache a converted model key the cache by it.
        calibration: images to calibrate int8 on and to check it with.
    """

    precision: str
    identity: dict[str, Any]
    calibration: Calibration | None = None


@dataclasses.dataclass
class CompiledExtractor:
    """An extractor ready to run: `codes_of(pixels)` maps a batch of RGB pixels in
    [0, 255], (N, H, W, 3) float32, to `{layer: codes}` numpy arrays; `provenance`
    says how (engine, versions, cache entry, int8 check), for the feature store."""

    codes_of: Callable[[Any], dict[str, np.ndarray]]
    provenance: dict[str, Any]


def compile_extractor(engine: str, model, request: CompileRequest) -> CompiledExtractor:
    """Compile the Keras extractor `model` with `engine`."""
    return load_engine(engine).compile_extractor(model, request)
