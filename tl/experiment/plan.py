"""The steps of an experiment, their keys, and which of them are done.

    extract(backbone, pooling, split)             a feature store, in the cache
    probe(backbone, pooling, layer, classifier)   `tl.evaluation.compare` on it
    finetune(entry)                               `tl.finetune.fine_tune`

A store's key is its codes' identity (`tl.experiment.cache`). A probe's key is the
SHA-256 of its classifier and comparison settings and of the identities of the codes
it reads (one layer of the training and of the test store, whichever store holds
them); a fine-tune's, of its settings, the weights' and images' identities and, for
`init_head = "best_probe"`, the key of that probe. So an edited image invalidates
the stores holding it and what was computed from them; another classifier only its
own probes (and a fine-tune whose best probe it becomes).

Every probe and fine-tune writes its record, `steps/<key>.json` in the output
folder, once it has finished; a rerun skips each step whose record exists.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

from tl.backbones import Tap
from tl.classifiers import CLASSIFIERS
from tl.evaluation import ComparisonSettings
from tl.experiment.cache import (
    CacheEntry,
    FeatureCache,
    WeightsUnresolved,
    base_identity,
)
from tl.experiment.spec import BackboneEntry, ExperimentSpec, FineTuneEntry
from tl.experiment.splits import ExperimentData
from tl.features import ExtractionSettings
from tl.provenance import Identity, codes_identity, images_identity

# Settings that change how a probe runs, not what it finds.
_NOT_IN_PROBE_KEY = ("jobs",)


def key_of(values: dict) -> str:
    """The SHA-256 of canonical JSON: a step's key."""
    return Identity.of(values).sha256


def probe_selection_key(record: dict) -> tuple[float, float]:
    """How probes are chosen without the test images: the best CV accuracy, ties
    broken by the lower spread (as `tl.evaluation` chooses); `max` keeps the first
    of equals, in the plan's order."""
    return record["cv_accuracy"], -record["cv_std"]


class StepRecords:
    """The records of finished steps: `<folder>/<key>.json`."""

    def __init__(self, folder: Path):
        self.folder = folder

    def load(self, key: str | None) -> dict | None:
        if key is None:
            return None
        try:
            return json.loads((self.folder / f"{key}.json").read_text())
        except (OSError, ValueError):
            return None

    def save(self, record: dict) -> None:
        """Write atomically, so a killed run leaves a record whole or not at all."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{record['key']}.json"
        temporary = path.with_name(f"{path.name}.tmp")
        temporary.write_text(json.dumps(record, default=str))
        os.replace(temporary, path)


@dataclasses.dataclass
class ExtractStep:
    """The codes of one backbone, one pooling, one split.

    `identity` is None in a plan when the weights' SHA-256 is not known yet (ImageNet
    weights never loaded here); `entry` is the cache entry once found or made.
    """

    backbone: BackboneEntry
    pooling: str
    split: str
    images: int
    settings: ExtractionSettings
    weights_sha256: str | None
    identity: Identity | None
    entry: CacheEntry | None = None
    kind: ClassVar[str] = "extract"

    @property
    def key(self) -> str | None:
        return self.identity.sha256 if self.identity else None

    @property
    def done(self) -> bool:
        return self.entry is not None

    @property
    def title(self) -> str:
        return (
            f"extract  {self.backbone.label} {self.pooling} {self.split} "
            f"({self.images} images)"
        )

    def codes_key(self, tap: Tap) -> str | None:
        """The identity of one layer's codes in this step's store."""
        if self.identity is None:
            return None
        return key_of(
            {
                "base": base_identity(self.identity),
                "layer": tap.layer,
                "pooling": self.pooling,
            }
        )


@dataclasses.dataclass
class ProbeStep:
    """One classifier on the codes of one layer (train store → test store)."""

    backbone: BackboneEntry
    pooling: str
    tap: Tap
    classifier: str
    train: ExtractStep
    test: ExtractStep
    settings: ComparisonSettings
    key: str | None = None
    record: dict | None = None
    kind: ClassVar[str] = "probe"

    @property
    def done(self) -> bool:
        return self.record is not None

    @property
    def title(self) -> str:
        return (
            f"probe    {self.backbone.label} {self.tap.layer} {self.pooling} "
            f"{self.classifier}"
        )

    def compute_key(self) -> str | None:
        train, test = self.train.codes_key(self.tap), self.test.codes_key(self.tap)
        if train is None or test is None:
            return None
        settings = self.settings.to_json()
        for name in _NOT_IN_PROBE_KEY:
            del settings[name]
        return key_of(
            {"kind": self.kind, "settings": settings, "train": train, "test": test}
        )


@dataclasses.dataclass
class FineTuneStep:
    """One `[[finetune]]`; `probes` are the candidates of `best_probe`."""

    entry: FineTuneEntry
    backbone: BackboneEntry
    probes: list[ProbeStep]
    data: dict | None  # images' identities, the weights' SHA-256 (None: unknown)
    key: str | None = None
    record: dict | None = None
    kind: ClassVar[str] = "finetune"

    @property
    def done(self) -> bool:
        return self.record is not None

    @property
    def title(self) -> str:
        init = self.entry.init_head or "default"
        return (
            f"finetune {self.backbone.label} unfreeze {self.entry.settings.unfreeze} "
            f"({self.entry.strategy}, head {init})"
        )

    def best_probe(self) -> ProbeStep | None:
        """The `best_probe` head: the probe of the final layer with the best CV
        accuracy (ties: the lower spread); None while one has not run."""
        if not self.probes or any(not probe.done for probe in self.probes):
            return None
        return max(self.probes, key=lambda probe: probe_selection_key(probe.record))

    def compute_key(self) -> str | None:
        if self.data is None:
            return None
        probe = None
        if self.entry.init_head == "best_probe":
            best = self.best_probe()
            if best is None:
                return None
            probe = best.key
        return key_of(
            {
                "kind": self.kind,
                "settings": self.entry.settings.to_json(),
                "init_head": self.entry.init_head,
                "strategy": self.entry.strategy,
                "probe": probe,
                **self.data,
            }
        )


Step = ExtractStep | ProbeStep | FineTuneStep


@dataclasses.dataclass
class Plan:
    """The steps of an experiment, in the order they run."""

    spec: ExperimentSpec
    data: ExperimentData
    steps: list[Step]
    records: StepRecords

    def refresh(self, step: ProbeStep | FineTuneStep) -> None:
        """(Re)compute a step's key from its inputs' and load its record."""
        step.key = step.compute_key()
        step.record = self.records.load(step.key)

    def finished_records(self) -> list[dict]:
        """The records of the probes and fine-tunes that have finished, in the
        plan's order."""
        return [
            step.record
            for step in self.steps
            if not isinstance(step, ExtractStep) and step.record is not None
        ]

    def store_keys(self) -> list[str]:
        """The keys of the stores this experiment uses (found, made or to make)."""
        keys = []
        for step in self.steps:
            if isinstance(step, ExtractStep):
                key = step.entry.key if step.entry else step.key
                if key:
                    keys.append(key)
        return keys

    def describe(self) -> str:
        """One line per step, `cached` or `to run`, then the counts."""
        lines = []
        for number, step in enumerate(self.steps, start=1):
            lines.append(f"{self.counter(number)} {step.title:<62} {status(step)}")
        done = sum(step.done for step in self.steps)
        lines.append(
            f"{len(self.steps)} steps: {done} cached, {len(self.steps) - done} to run."
        )
        return "\n".join(lines)

    def counter(self, number: int) -> str:
        width = len(str(len(self.steps)))
        return f"[{number:>{width}}/{len(self.steps)}]"


def status(step: Step) -> str:
    """What a plan says about a step."""
    if isinstance(step, ExtractStep):
        if step.entry is not None:
            return f"cached {step.entry.key[:12]}"
        if step.identity is None:
            return "to run (weights' SHA-256 known once loaded)"
        return "to run"
    if step.done:
        return "cached"
    if step.key is None:
        return "to run (after the steps it needs)"
    return "to run"


def make_plan(
    spec: ExperimentSpec,
    data: ExperimentData,
    cache: FeatureCache,
    *,
    resolve_weights: bool,
    announce: Callable[[str], None] = lambda text: None,
) -> Plan:
    """Every step of `spec` with its key, and what the cache and the step records
    already hold.

    Args:
        resolve_weights: build a backbone whose ImageNet weights' SHA-256 is not known
            yet (False, for a plan: its steps are shown as to run).
        announce: told about slow preparations (hashing images, loading weights).
    """
    records = StepRecords(spec.output_dir / "steps")
    indexes = {"train": data.train, "test": data.test}
    if spec.hash_content:
        announce("hashing the images' contents (hash_content)")
    images = {
        split: images_identity(index, spec.hash_content)
        for split, index in indexes.items()
    }
    steps: list[Step] = []
    probes: dict[str, list[ProbeStep]] = {}
    for backbone in spec.backbones:
        sha256 = _weights(
            cache, backbone.backbone, backbone.image.size, resolve_weights
        )
        layers = [tap.layer for tap in backbone.taps]
        for pooling in backbone.poolings:
            settings = backbone.extraction(pooling)
            stores = {}
            for split, index in indexes.items():
                identity = None
                if sha256 is not WeightsUnresolved:
                    identity = codes_identity(
                        settings,
                        index,
                        weights_sha256=sha256,
                        layers=layers,
                        hash_content=spec.hash_content,
                    )
                step = ExtractStep(
                    backbone, pooling, split, len(index), settings, sha256, identity
                )
                step.entry = cache.find(identity) if identity else None
                stores[split] = step
                steps.append(step)
            for tap in backbone.taps:
                for classifier in spec.probe.classifiers:
                    step = ProbeStep(
                        backbone,
                        pooling,
                        tap,
                        classifier,
                        stores["train"],
                        stores["test"],
                        spec.probe.updated(
                            classifiers=(classifier,), layers=(tap.layer,)
                        ),
                    )
                    steps.append(step)
                    probes.setdefault(backbone.label, []).append(step)
    for entry in spec.finetunes:
        backbone = spec.backbone(entry.backbone)
        settings = entry.settings
        sha256 = _weights(
            cache, settings.backbone, backbone.image.size, resolve_weights
        )
        candidates = [
            probe
            for probe in probes.get(backbone.label, [])
            if probe.tap.layer == backbone.final_layer
            and probe.pooling == settings.pooling
            and CLASSIFIERS[probe.classifier].linear
        ]
        data_identity = None
        if sha256 is not WeightsUnresolved:
            data_identity = {"weights_sha256": sha256, "images": images}
        steps.append(
            FineTuneStep(
                entry,
                backbone,
                candidates if entry.init_head == "best_probe" else [],
                data_identity,
            )
        )
    plan = Plan(spec, data, steps, records)
    for step in steps:
        if not isinstance(step, ExtractStep):
            plan.refresh(step)
    return plan


def _weights(cache: FeatureCache, backbone, image_size, resolve: bool):
    """The weights' SHA-256, or `WeightsUnresolved` itself when not known yet."""
    try:
        return cache.weights_sha256(backbone, image_size, resolve=resolve)
    except WeightsUnresolved:
        return WeightsUnresolved
