"""The experiment file: what to compare, read from TOML and checked before any work.

    [experiment]  name, output_dir, cache_dir, seed, hash_content
    [data]        train, test, test_size
    [[backbone]]  label, layers, pooling (a list sweeps poolings), and the fields of
                  `BackboneSettings` (name, weights, precision, seed) and the keys of
                  `ImageSettings` (image_size, resize, interpolation, ...) and of
                  `EngineSettings` (engine)
    [probe]       classifiers, cv, shots and the other fields of `ComparisonSettings`
    [[finetune]]  backbone (a backbone's label), init_head, strategy and the keys of
                  `FineTuneSettings` (unfreeze, epochs, learning_rate, weights, ...)
    [run]         batch_size (extraction), lock_timeout (seconds), dask

The keys of the settings tables come from the settings dataclasses, so a field added
there (an engine, say) is accepted here without being listed. `load_spec` checks
everything before any image is read: unknown keys (with the closest valid one),
unknown backbones and layers (resolved on a random-weight model of each backbone at
its image size), a fine-tune naming a backbone not listed, bad values. Each is
refused in one line naming the file, the key path (`backbone[1].layers[2]`) and
what is valid. Paths are relative to the directory the experiment runs from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from tl._checks import ParameterError, check_choice, check_interval
from tl.backbones import (
    BackboneSettings,
    Tap,
    build_backbone,
    get_backbone,
    layer_taps,
    list_backbones,
    normalize_weights,
    resolve_layers,
)
from tl.classifiers import CLASSIFIERS, get_classifier
from tl.distributed import check_client
from tl.engines import EngineSettings
from tl.errors import TLError
from tl.evaluation import ComparisonSettings
from tl.features import ExtractionSettings, Pooling
from tl.finetune import GLOBAL_POOLINGS, FineTuneSettings
from tl.images import ImageSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

SECTIONS = ("experiment", "data", "backbone", "probe", "finetune", "run")
INIT_HEADS = ("best_probe", "probe", "random")
STRATEGIES = ("fine_tune", "scratch")
DEFAULT_CACHE_DIR = "features/cache"
DEFAULT_TEST_SIZE = 0.2

_EXPERIMENT_KEYS = ("name", "output_dir", "cache_dir", "seed", "hash_content")
_DATA_KEYS = ("train", "test", "test_size")
_RUN_KEYS = ("batch_size", "lock_timeout", "dask")
# Settings fields an experiment sets once for every step, and where.
_PROBE_ELSEWHERE = {
    "layers": "the backbones' layers",
    "protocol": "holdout on the test images",
    "test_size": "[data] test_size",
    "seed": "[experiment] seed",
    "folds": "[probe] cv",
}
# FineTuneSettings fields that the file spells otherwise (init_head, strategy) or
# that the experiment sets (the test images).
_FINETUNE_MAPPED = {"test_split", "init_head", "head_init", "from_scratch"}


def backbone_keys() -> frozenset[str]:
    """The keys of a `[[backbone]]` table: its label, layers and pooling, every field
    of `BackboneSettings` (the network is `name`) and the keys of `ImageSettings`
    and `EngineSettings` (`engine`)."""
    fields = {field.name for field in dataclasses.fields(BackboneSettings)}
    return frozenset(
        fields
        | ImageSettings.json_keys()
        | EngineSettings.json_keys()
        | {"label", "layers", "pooling"}
    )


def probe_keys() -> frozenset[str]:
    """The keys of `[probe]`: `cv` and the fields of `ComparisonSettings` that the
    experiment does not set for every step."""
    return frozenset(ComparisonSettings.json_keys() - set(_PROBE_ELSEWHERE) | {"cv"})


def finetune_keys() -> frozenset[str]:
    """The keys of a `[[finetune]]` table: the backbone's label, `init_head`,
    `strategy`, and the keys of `FineTuneSettings` (backbone and image keys
    override the backbone's)."""
    return frozenset(
        FineTuneSettings.json_keys() - _FINETUNE_MAPPED
        | {"backbone", "init_head", "strategy"}
    )


@dataclasses.dataclass(frozen=True)
class BackboneEntry:
    """One `[[backbone]]`: a network whose codes of `layers` are compared.

    Attributes:
        label: how the report and `[[finetune]] backbone` name it (default: `name`).
        where: its key path in the file, `backbone[0]`.
        backbone: network, weights, precision, seed.
        image: how files become inputs (the size resolved).
        engine: what runs the extractor (Keras by default).
        layers: as written (aliases or Keras layer names).
        poolings: one store per pooling: each pooling applies to every layer.
        taps: the layers resolved, in the order of `layers`.
        final_layer: the backbone's last layer (what `last` names).
        final_depth: its depth: layer depths divided by it run from 0 to 1.
    """

    label: str
    where: str
    backbone: BackboneSettings
    image: ImageSettings
    engine: EngineSettings
    layers: tuple[str, ...]
    poolings: tuple[str, ...]
    taps: tuple[Tap, ...] = ()
    final_layer: str = ""
    final_depth: int = 1

    def extraction(self, pooling: str) -> ExtractionSettings:
        """The extraction settings of this backbone's store for `pooling`."""
        return ExtractionSettings(
            self.backbone,
            self.image,
            layers=self.layers,
            pooling=(pooling,),
            engine=self.engine,
        )


@dataclasses.dataclass(frozen=True)
class FineTuneEntry:
    """One `[[finetune]]` of a listed backbone.

    Attributes:
        where: its key path, `finetune[0]`.
        backbone: the label of the backbone it fine-tunes.
        settings: the fine-tuning settings, without the head's initialisation.
        init_head: `best_probe`, `probe`, `random` or None (fine-tuning's default).
        strategy: `fine_tune` (from the backbone's weights) or `scratch`.
    """

    where: str
    backbone: str
    settings: FineTuneSettings
    init_head: str | None
    strategy: str


@dataclasses.dataclass(frozen=True)
class ExperimentSpec:
    """An experiment file, checked, with paths made absolute."""

    source: str
    name: str
    output_dir: Path
    cache_dir: Path
    seed: int
    hash_content: bool
    train: Path
    test: Path | None
    test_size: float
    backbones: tuple[BackboneEntry, ...]
    probe: ComparisonSettings
    finetunes: tuple[FineTuneEntry, ...]
    batch_size: int = 32
    lock_timeout: float = 3600.0
    dask: str | None = None

    def backbone(self, label: str) -> BackboneEntry:
        return next(entry for entry in self.backbones if entry.label == label)


def head_options(init_head: str | None, probe_folder: str | Path | None = None) -> dict:
    """The `fine_tune` keywords for a file's `init_head`.

    `best_probe` is `init_head=<the saved probe>` (LP-FT); `probe` and `random` are
    fine-tuning's `head_init` (stage 1 folds a probe fitted on the frozen codes into
    the head, or trains a random head); None leaves fine-tuning's default.
    """
    if init_head is None:
        return {}
    if init_head == "best_probe":
        return {"init_head": str(probe_folder)}
    return {"head_init": init_head}


def strategy_options(strategy: str) -> dict:
    """The `fine_tune` keywords of a strategy. `scratch` trains every layer from
    random weights (BatchNorm in training mode); `fine_tune` starts from the
    backbone's weights, random ones included: a random-weight backbone is then
    fine-tuned like a pretrained one, not trained from scratch."""
    if strategy == "scratch":
        return {"weights": "none", "from_scratch": True}
    return {"from_scratch": False}


# ---------------------------------------------------------------------------------
# Reading and checking


def read_experiment(source: str | Path | Mapping) -> tuple[str, dict]:
    """(name of the source for messages, its tables) from a TOML file or a dict."""
    if isinstance(source, Mapping):
        return "<experiment>", dict(source)
    path = Path(source).expanduser()
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise TLError(f"Experiment file {str(source)!r} does not exist.") from None
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or error
        raise TLError(
            f"Cannot read experiment file {str(source)!r}: {reason}."
        ) from None
    try:
        return str(source), tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise TLError(f"{source}: not valid TOML: {error}.") from None


def load_spec(source: str | Path | Mapping, *, hash_content: bool | None = None):
    """Read and check an experiment file (or the dict of its tables).

    Args:
        source: a TOML file, or a dict of the same tables.
        hash_content: overrides `[experiment] hash_content` when given.

    Returns:
        An `ExperimentSpec`, its layers resolved.

    Raises:
        TLError: in one line naming the file, the key path and what is valid.
    """
    name, tables = read_experiment(source)
    reader = _Reader(name)
    spec = reader.spec(tables, Path(name).stem if name != "<experiment>" else None)
    if hash_content is not None:
        spec = dataclasses.replace(spec, hash_content=hash_content)
    return reader.resolve(spec)


class _Reader:
    """Checks the tables of one file; every refusal names the file and key path."""

    def __init__(self, file: str):
        self.file = file

    def error(self, where: str, message: str) -> TLError:
        return TLError(f"{self.file}: {where}: {message}")

    @contextlib.contextmanager
    def checking(self, where: str, spelling: dict[str, str] | None = None) -> Iterator:
        """Errors of the block, reworded for `where`. A `ParameterError` names its
        key: `where` itself, or with `spelling` the key of its parameter in the
        table `where` (`{"folds": "cv"}`)."""
        try:
            yield
        except ParameterError as error:
            subject = where
            if spelling is not None:
                subject = _join(where, spelling.get(error.parameter, error.parameter))
            raise TLError(f"{self.file}: {error.message(subject)}") from None
        except TLError as error:
            raise self.error(where, str(error)) from None

    def table(self, value: Any, where: str, keys, hints=None) -> dict:
        """`value` as a table whose keys are all among `keys`."""
        if not isinstance(value, dict):
            raise self.error(where, f"must be a table, got {value!r}.")
        keys = sorted(keys)
        for key in value:
            if key in keys:
                continue
            hint = (hints or {}).get(key)
            if hint:
                raise self.error(_join(where, key), f"is set by {hint}, not here.")
            close = difflib.get_close_matches(key, keys, n=1)
            did_you_mean = f" Did you mean {close[0]!r}?" if close else ""
            raise self.error(
                _join(where, key) if where else key,
                f"unknown key.{did_you_mean} Valid keys here: {', '.join(keys)}.",
            )
        return value

    def array(self, tables: dict, section: str) -> list[dict]:
        value = tables.get(section, [])
        if isinstance(value, dict):
            raise self.error(
                section,
                f"write each {section} as [[{section}]] (an array of tables), not "
                f"[{section}].",
            )
        if not isinstance(value, list):
            raise self.error(section, f"must be [[{section}]] tables, got {value!r}.")
        return value

    def typed(self, value: Any, where: str, kind: type | tuple, what: str) -> Any:
        if isinstance(value, bool) and kind is not bool:
            raise self.error(where, f"must be {what}, got {value!r}.")
        if not isinstance(value, kind):
            raise self.error(where, f"must be {what}, got {value!r}.")
        return value

    def names(self, value: Any, where: str) -> tuple[str, ...]:
        """One name or a non-empty list of names."""
        if isinstance(value, str):
            return (value,)
        if not isinstance(value, list) or not value:
            raise self.error(
                where, f"must be a name or a list of names, got {value!r}."
            )
        for number, item in enumerate(value):
            self.typed(item, f"{where}[{number}]", str, "a name")
        return tuple(value)

    def path(self, value: Any, where: str, *, exists: bool) -> Path:
        self.typed(value, where, str, "a path")
        path = Path(value).expanduser().resolve()
        if exists and not path.exists():
            raise self.error(where, f"{value!r} does not exist.")
        return path

    # Sections ----------------------------------------------------------------------

    def spec(self, tables: dict, default_name: str | None) -> ExperimentSpec:
        self.table(tables, "", SECTIONS)
        experiment = self.table(
            tables.get("experiment", {}), "experiment", _EXPERIMENT_KEYS
        )
        data = (
            self.table(tables.get("data"), "data", _DATA_KEYS)
            if "data" in tables
            else None
        )
        if data is None or "train" not in data:
            raise self.error(
                "data.train",
                "missing: name the training images (class folders or a path,label "
                "CSV).",
            )
        name = experiment.get("name", default_name)
        if name is None:
            raise self.error("experiment.name", "missing: name the experiment.")
        self.typed(name, "experiment.name", str, "a name")
        if not name.strip() or "/" in name or name in (".", ".."):
            raise self.error("experiment.name", f"must be a plain name, got {name!r}.")
        seed = self.typed(
            experiment.get("seed", 0), "experiment.seed", int, "an integer"
        )
        with self.checking("experiment.seed"):
            check_interval("seed", seed, low=0, integer=True)
        test_size = data.get("test_size", DEFAULT_TEST_SIZE)
        with self.checking("data.test_size"):
            check_interval("test_size", test_size, low=0, high=1, closed="neither")
        backbones = self.backbones(tables, seed)
        probe = self.probe(tables.get("probe", {}), seed)
        finetunes = self.finetunes(tables, backbones, seed)
        run = self.table(tables.get("run", {}), "run", _RUN_KEYS)
        batch_size = self.typed(
            run.get("batch_size", 32), "run.batch_size", int, "an integer"
        )
        with self.checking("run.batch_size"):
            check_interval("batch_size", batch_size, low=1, integer=True)
        lock_timeout = run.get("lock_timeout", 3600.0)
        with self.checking("run.lock_timeout"):
            check_interval("lock_timeout", lock_timeout, low=0)
        dask = run.get("dask")
        if dask is not None:
            self.typed(dask, "run.dask", str, "local:N or a scheduler address")
            with self.checking("run.dask"):
                check_client(dask)
        return ExperimentSpec(
            source=self.file,
            name=name,
            output_dir=self.path(
                experiment.get("output_dir", f"experiments/{name}"),
                "experiment.output_dir",
                exists=False,
            ),
            cache_dir=self.path(
                experiment.get("cache_dir", DEFAULT_CACHE_DIR),
                "experiment.cache_dir",
                exists=False,
            ),
            seed=seed,
            hash_content=self.typed(
                experiment.get("hash_content", False),
                "experiment.hash_content",
                bool,
                "true or false",
            ),
            train=self.path(data["train"], "data.train", exists=True),
            test=(
                self.path(data["test"], "data.test", exists=True)
                if "test" in data
                else None
            ),
            test_size=test_size,
            backbones=backbones,
            probe=probe,
            finetunes=finetunes,
            batch_size=batch_size,
            lock_timeout=float(lock_timeout),
            dask=dask,
        )

    def backbones(self, tables: dict, seed: int) -> tuple[BackboneEntry, ...]:
        entries = self.array(tables, "backbone")
        if not entries:
            raise self.error(
                "backbone",
                "missing: list at least one [[backbone]] with its name and layers.",
            )
        result: list[BackboneEntry] = []
        for number, table in enumerate(entries):
            where = f"backbone[{number}]"
            entry = self.backbone(table, where, seed)
            taken = next((e for e in result if e.label == entry.label), None)
            if taken is not None:
                raise self.error(
                    where,
                    f"a second backbone labelled {entry.label!r} (as {taken.where}); "
                    f'give each a distinct label = "...".',
                )
            result.append(entry)
        return tuple(result)

    def backbone(self, table: Any, where: str, seed: int) -> BackboneEntry:
        table = self.table(table, where, backbone_keys())
        if "name" not in table:
            raise self.error(
                f"{where}.name", f"missing: one of {', '.join(list_backbones())}."
            )
        with self.checking(f"{where}.name"):
            self.typed(table["name"], f"{where}.name", str, "a backbone name")
            name = get_backbone(table["name"]).name
        if "weights" in table:
            with self.checking(f"{where}.weights"):
                self.typed(
                    table["weights"],
                    f"{where}.weights",
                    str,
                    "a weights file, 'imagenet' or 'none'",
                )
                normalize_weights(table["weights"])
        if "layers" not in table:
            raise self.error(
                f"{where}.layers",
                f'missing: the layers to compare, e.g. ["last"] (see '
                f"extract_features.py --list-layers {name}).",
            )
        layers = self.names(table["layers"], f"{where}.layers")
        poolings = self.names(table.get("pooling", "avg"), f"{where}.pooling")
        for number, pooling in enumerate(poolings):
            with self.checking(
                f"{where}.pooling" + (f"[{number}]" if len(poolings) > 1 else "")
            ):
                Pooling.parse(pooling)
        poolings = tuple(dict.fromkeys(str(Pooling.parse(p)) for p in poolings))
        label = table.get("label", name)
        self.typed(label, f"{where}.label", str, "a name")
        flat = {
            BackboneSettings.JSON_NAMES.get(key, key): value
            for key, value in table.items()
            if key not in ("label", "layers", "pooling")
        }
        flat.setdefault("seed", seed)
        with self.checking(where, spelling={"backbone": "name"}):
            settings = ExtractionSettings.create(
                **flat, layers=layers, pooling=poolings[0]
            ).resolved()
        if settings.backbone.precision == "int8":
            raise self.error(
                f"{where}.precision",
                "int8 codes depend on a calibration sample drawn while extracting, "
                "which an experiment's cache key cannot know beforehand; use "
                "float32 or bfloat16 (or extract_features.py --precision int8).",
            )
        return BackboneEntry(
            label,
            where,
            settings.backbone,
            settings.image,
            settings.engine,
            layers,
            poolings,
        )

    def probe(self, table: Any, seed: int) -> ComparisonSettings:
        table = self.table(table, "probe", probe_keys(), _PROBE_ELSEWHERE)
        values = {key: value for key, value in table.items() if key != "cv"}
        if "cv" in table:
            values["folds"] = table["cv"]
        for key in ("classifiers", "shots"):
            if isinstance(values.get(key), str | int) and not isinstance(
                values.get(key), bool
            ):
                values[key] = [values[key]]
        for number, name in enumerate(values.get("classifiers", ())):
            with self.checking(f"probe.classifiers[{number}]"):
                get_classifier(name, "classifiers")
        with self.checking("probe", spelling={"folds": "cv"}):
            return ComparisonSettings.create(**values, seed=seed, protocol="holdout")

    def finetunes(
        self, tables: dict, backbones: tuple[BackboneEntry, ...], seed: int
    ) -> tuple[FineTuneEntry, ...]:
        labels = [entry.label for entry in backbones]
        result = []
        for number, table in enumerate(self.array(tables, "finetune")):
            where = f"finetune[{number}]"
            table = self.table(
                table,
                where,
                finetune_keys(),
                {"test_split": "[data] test and test_size"},
            )
            label = table.get("backbone")
            if label is None and len(labels) == 1:
                label = labels[0]
            if label not in labels:
                close = difflib.get_close_matches(str(label), labels, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise self.error(
                    f"{where}.backbone",
                    f"{label!r} is not a backbone of this file.{hint} Backbones: "
                    f"{', '.join(labels)}.",
                )
            entry = next(e for e in backbones if e.label == label)
            init_head = table.get("init_head")
            if init_head is not None:
                with self.checking(f"{where}.init_head"):
                    check_choice("init_head", init_head, INIT_HEADS)
            # random weights where the backbone has others: trained from scratch
            reinitialised = (
                "weights" in table
                and str(table["weights"]).lower() == "none"
                and entry.backbone.weights != "none"
            )
            strategy = table.get(
                "strategy", "scratch" if reinitialised else "fine_tune"
            )
            with self.checking(f"{where}.strategy"):
                check_choice("strategy", strategy, STRATEGIES)
            if strategy == "scratch" and init_head not in (None, "random"):
                raise self.error(
                    f"{where}.init_head",
                    f"{init_head!r} starts from a probe on the backbone's weights, "
                    f"which a network trained from scratch does not have; use "
                    f"'random' or leave init_head out.",
                )
            overrides = {
                key: value
                for key, value in table.items()
                if key not in ("backbone", "init_head", "strategy")
            }
            flat = {
                **entry.backbone.to_json(),
                **entry.image.to_json(),
                **overrides,
                **strategy_options(strategy),
                # best_probe's folder is known once the probes have run
                **(head_options(init_head) if init_head != "best_probe" else {}),
            }
            with self.checking(where, spelling={}):
                settings = FineTuneSettings.create(**flat)
            result.append(FineTuneEntry(where, label, settings, init_head, strategy))
        return tuple(result)

    # Layers -------------------------------------------------------------------------

    def resolve(self, spec: ExperimentSpec) -> ExperimentSpec:
        """Resolve every backbone's layers on a random-weight model at its image size
        (nothing is downloaded), then check what needs them."""
        backbones = []
        for entry in spec.backbones:
            spec_ = entry.backbone.spec
            with self.checking(f"{entry.where}.image_size"):
                taps = backbone_taps(spec_.name, entry.image.size)
            for number, layer in enumerate(entry.layers):
                with self.checking(f"{entry.where}.layers[{number}]"):
                    resolve_layers(list(taps), [layer], spec_.name)
            with self.checking(f"{entry.where}.layers"):
                resolved = resolve_layers(list(taps), list(entry.layers), spec_.name)
            backbones.append(
                dataclasses.replace(
                    entry,
                    taps=tuple(resolved),
                    final_layer=taps[-1].layer,
                    final_depth=max(taps[-1].depth, 1),
                )
            )
        spec = dataclasses.replace(spec, backbones=tuple(backbones))
        for entry in spec.finetunes:
            if entry.init_head == "best_probe":
                self.check_best_probe(spec, entry)
        return spec

    def check_best_probe(self, spec: ExperimentSpec, entry: FineTuneEntry) -> None:
        """`best_probe` needs linear probes of the backbone's last layer, pooled as
        the fine-tuned model pools, on the codes the model computes."""
        backbone = spec.backbone(entry.backbone)
        where = f"{entry.where}.init_head"
        settings = entry.settings
        if (
            settings.backbone.updated(precision=backbone.backbone.precision)
            != (backbone.backbone)
            or settings.image.resolved(settings.backbone.spec) != backbone.image
        ):
            raise self.error(
                where,
                f"'best_probe' needs the weights and image settings of "
                f"{backbone.where} ({backbone.label}); this fine-tune changes them.",
            )
        if backbone.final_layer not in [tap.layer for tap in backbone.taps]:
            raise self.error(
                where,
                f"'best_probe' starts from a probe of the last layer: add \"last\" to "
                f"{backbone.where}.layers.",
            )
        if settings.pooling not in backbone.poolings:
            raise self.error(
                where,
                f"'best_probe' needs probes on {settings.pooling!r}-pooled codes "
                f"(the fine-tuned model's pooling, one of {', '.join(GLOBAL_POOLINGS)}"
                f"): add it to {backbone.where}.pooling.",
            )
        linear = [c for c in spec.probe.classifiers if CLASSIFIERS[c].linear]
        if not linear:
            names = ", ".join(n for n, c in CLASSIFIERS.items() if c.linear)
            raise self.error(
                where,
                f"'best_probe' needs a linear classifier among [probe] classifiers "
                f"({names}).",
            )


@functools.lru_cache(maxsize=32)
def backbone_taps(backbone: str, image_size: tuple[int, int]) -> tuple[Tap, ...]:
    """Every layer of `backbone` at `image_size`, from a random-weight model (the
    layers do not depend on the weights); built once per process."""
    spec = get_backbone(backbone)
    model, _ = build_backbone(spec, image_size, "none")
    return tuple(layer_taps(model, spec))


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where and key else where or key
