"""The content-addressed feature cache that experiments share.

    <cache_dir>/<key>.h5           a complete feature store
    <cache_dir>/<key>.json         what it holds: backbone, settings, layers, images
    <cache_dir>/<key>.partial.h5   its extraction while under way (or interrupted)
    <cache_dir>/<key>.h5.lock      held by the experiment extracting it
    <cache_dir>/refs/<id>.json     the keys one experiment (output folder) uses
    <cache_dir>/weights.json       SHA-256 of weights files, by path, size and mtime

A store's key is `tl.provenance.codes_identity(settings, index).sha256`, the hash
of everything that determines its codes: every image's path, label, size and
modification time (or the SHA-256 of its bytes, `hash_content`), the backbone, the
weights by SHA-256, the resolved layers and pooling, the image settings,
preprocessing, precision, the store schema and the code version. It is the identity
the store records itself, which `add` checks. A store whose identity differs only by
holding more layers is reused: each entry records its `base`, the identity without
its layers.

An extraction writes `<key>.partial.h5` (which resumes after an interruption, as
any store does) and renames it to `<key>.h5` once complete, holding the lock of
`<key>.h5` throughout; a second experiment asking for the same codes waits for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path

from tl import locking
from tl.backbones import BackboneSettings, sha256_of_file
from tl.errors import TLError
from tl.features import ExtractionSettings
from tl.provenance import Identity, identity_differences
from tl.store import FeatureStore, format_bytes

log = logging.getLogger("tl")

_POLL_S = 1.0
_PARTIAL = ".partial.h5"


class WeightsUnresolved(Exception):
    """The SHA-256 of ImageNet weights that were never loaded here (for a plan)."""


def base_identity(identity: Identity) -> str:
    """The SHA-256 of an identity without its layers: stores that match it hold the
    same images' codes, made the same way, of other layers."""
    values = identity.values
    del values["layers"]
    return Identity.of(values).sha256


@dataclasses.dataclass(frozen=True)
class CacheEntry:
    """A complete store in the cache and its record (the `<key>.json`)."""

    key: str
    path: Path
    record: dict

    @property
    def layers(self) -> list[list[str]]:
        """(layer, pooling) of every dataset of the store."""
        return self.record["layers"]


class FeatureCache:
    """The cache in `folder` (see the module docstring)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def store_path(self, key: str) -> Path:
        return self.folder / f"{key}.h5"

    def partial_path(self, key: str) -> Path:
        return self.folder / f"{key}{_PARTIAL}"

    def _record_path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    # Lookup ------------------------------------------------------------------------

    def entries(self) -> list[CacheEntry]:
        """Every complete entry, oldest first."""
        found = []
        for record_path in sorted(self.folder.glob("*.json")):
            key = record_path.stem
            path = self.store_path(key)
            record = _read_json(record_path)
            if record is not None and record.get("key") == key and path.is_file():
                found.append(CacheEntry(key, path, record))
        return sorted(found, key=lambda entry: entry.record.get("created", ""))

    def find(self, identity: Identity) -> CacheEntry | None:
        """The entry of `identity`, or else the smallest one holding its codes among
        more layers; None if there is none."""
        key = identity.sha256
        record = _read_json(self._record_path(key))
        if record is not None and self.store_path(key).is_file():
            return CacheEntry(key, self.store_path(key), record)
        base = base_identity(identity)
        wanted = {tuple(pair) for pair in identity.values["layers"]}
        holding = [
            entry
            for entry in self.entries()
            if entry.record.get("base") == base
            and wanted <= {tuple(pair) for pair in entry.layers}
        ]
        return min(holding, key=lambda entry: len(entry.layers), default=None)

    # Writing -----------------------------------------------------------------------

    @contextlib.contextmanager
    def writing(self, key: str, timeout: float) -> Iterator[None]:
        """Hold the lock of entry `key`, waiting (up to `timeout` seconds) for an
        experiment that holds it now."""
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.store_path(key)
        began, told, unowned = time.monotonic(), False, 0
        while True:
            try:
                lock = locking.acquire(target, "experiment extraction")
                break
            except TLError:
                owner = locking.current_owner(target)
                unowned = unowned + 1 if owner is None else 0
                if unowned > 1:  # no one holds it: the refusal was something else
                    raise
                waited = time.monotonic() - began
                if owner is not None and waited >= timeout:
                    raise TLError(
                        f"Gave up after {waited:.0f} s waiting for {owner.purpose} "
                        f"({owner}) of the same codes into {str(target)!r}; raise "
                        f"[run] lock_timeout, or run the experiment when it is done."
                    ) from None
                if owner is not None and not told:
                    log.info(
                        "waiting for %s (%s), which extracts the same codes into %s",
                        owner.purpose,
                        owner,
                        target,
                    )
                    told = True
                time.sleep(_POLL_S if owner is not None else 0)
        with lock:
            yield

    def resumable(
        self, partial: Path, settings: ExtractionSettings, weights_sha256: str | None
    ) -> bool:
        """Whether `tl.extract` resumes `partial` with `settings`: a store made with
        other settings for the same codes (the weights under another path, say), or
        one that cannot be read, is started over instead."""
        try:
            with FeatureStore(partial, require_complete=False) as store:
                stored = ExtractionSettings.with_defaults(store.settings)
        except (TLError, OSError):
            return False
        wanted = {**settings.resolved().to_json(), "weights_sha256": weights_sha256}
        return not identity_differences(stored, wanted)

    def add(
        self, identity: Identity, *, hash_content: bool, seconds: float, label: str
    ) -> CacheEntry:
        """Enter the finished `<key>.partial.h5` under its key: its record, then the
        store renamed into place.

        Raises:
            TLError: when the store records another identity than `identity` (its
                images changed while it was extracted); it is removed.
        """
        key = identity.sha256
        partial = self.partial_path(key)
        with FeatureStore(partial) as store:
            recorded = store.provenance.get("codes_identity")
            record = {
                "key": key,
                "base": base_identity(identity),
                "layers": identity.values["layers"],
                "label": label,
                "backbone": store.settings["backbone"],
                "settings": store.settings,
                "images": store.num_images,
                "rows": len(store),
                "skipped": len(store.skipped),
                "source": store.provenance.get("source"),
                "hash_content": hash_content,
                "seconds": seconds,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
        if not hash_content and recorded != key:
            partial.unlink()
            raise TLError(
                f"The images changed while their codes were extracted (the store "
                f"records identity {recorded}, the experiment expected {key}); run "
                f"the experiment again once they stay put."
            )
        _write_json(self._record_path(key), record)
        os.replace(partial, self.store_path(key))
        return CacheEntry(key, self.store_path(key), record)

    # Weights -----------------------------------------------------------------------

    def weights_sha256(
        self, backbone: BackboneSettings, image_size: tuple[int, int], *, resolve: bool
    ) -> str | None:
        """The SHA-256 of `backbone`'s weights (None: random weights).

        A file is hashed once per size and modification time. The file behind
        `imagenet` is known once it has been loaded: with `resolve` the backbone is
        built now (Keras downloads it if needed), else `WeightsUnresolved` is raised.
        """
        if backbone.weights == "none":
            return None
        memo_path = self.folder / "weights.json"
        memo = _read_json(memo_path) or {}
        name = (
            f"imagenet:{backbone.name}"
            if backbone.weights == "imagenet"
            else backbone.weights
        )
        known = memo.get(name)
        if known and _file_facts(known["path"]) == [known["size"], known["mtime_ns"]]:
            return known["sha256"]
        if backbone.weights == "imagenet":
            if not resolve:
                raise WeightsUnresolved(name)
            _, info = backbone.build(image_size)
            path, sha256 = info.path, info.sha256
        else:
            path, sha256 = backbone.weights, sha256_of_file(backbone.weights)
        facts = _file_facts(path) if path else None
        if facts is not None:
            memo[name] = {
                "path": path,
                "size": facts[0],
                "mtime_ns": facts[1],
                "sha256": sha256,
            }
            _write_json(memo_path, memo)
        return sha256

    # Experiments' references, ls and gc --------------------------------------------

    def register(self, output_dir: Path, name: str, keys: Iterable[str]) -> None:
        """Record that the experiment writing to `output_dir` uses `keys` (replacing
        what it recorded before)."""
        folder = str(Path(output_dir).resolve())
        _write_json(
            self.folder
            / "refs"
            / f"{hashlib.sha256(folder.encode()).hexdigest()}.json",
            {
                "experiment": name,
                "output_dir": folder,
                "keys": sorted(set(keys)),
                "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            },
        )

    def references(self) -> tuple[dict[str, list[str]], list[Path]]:
        """(key → the experiments that use it, reference files of experiments whose
        output folder is gone)."""
        users: dict[str, list[str]] = {}
        stale = []
        for path in sorted((self.folder / "refs").glob("*.json")):
            ref = _read_json(path)
            if ref is None or not Path(ref.get("output_dir", "")).is_dir():
                stale.append(path)
                continue
            for key in ref.get("keys", []):
                users.setdefault(key, []).append(ref.get("experiment", "?"))
        return users, stale

    def listing(self) -> str:
        """The entries as a table: key, backbone, weights, size, layers, images,
        bytes, creation time and the experiments that use it."""
        users, _ = self.references()
        lines = [
            f"{'key':<12}  {'backbone':<14} {'weights':<16} {'size':>9}  "
            f"{'images':>6} {'bytes':>9}  {'created':<25} {'experiments':<20} layers"
        ]
        for entry in self.entries():
            settings = entry.record["settings"]
            weights = settings.get("weights", "")
            if settings.get("weights_sha256"):
                kind = "imagenet" if weights == "imagenet" else "file"
                weights = f"{kind} {settings['weights_sha256'][:8]}"
            size = "x".join(map(str, settings.get("image_size") or ["?"]))
            layers = ", ".join(f"{layer}/{pool}" for layer, pool in entry.layers)
            lines.append(
                f"{entry.key[:12]:<12}  {entry.record['backbone']:<14} "
                f"{weights:<16} {size:>9}  {entry.record['images']:>6} "
                f"{format_bytes(entry.path.stat().st_size):>9}  "
                f"{entry.record['created']:<25} "
                f"{', '.join(users.get(entry.key, [])) or '-':<20} {layers}"
            )
        partials = sorted(self.folder.glob(f"*{_PARTIAL}"))
        for path in partials:
            key = path.name.removesuffix(_PARTIAL)
            owner = locking.current_owner(self.store_path(key))
            state = f"being extracted ({owner})" if owner else "interrupted"
            lines.append(f"{key[:12]:<12}  (partial: {state})")
        if len(lines) == 1:
            return f"{self.folder}: the cache is empty."
        return "\n".join(lines)

    def collect_garbage(self) -> list[str]:
        """Remove the entries (and interrupted extractions) that no experiment uses,
        and the references of experiments whose output folder is gone; entries being
        written are left alone. Returns one line per removal."""
        users, stale = self.references()
        removed = []
        for path in stale:
            path.unlink(missing_ok=True)
            removed.append(f"reference {path.name} (its output folder is gone)")
        for path in sorted(self.folder.glob("*.h5*")):
            key = path.name.split(".", 1)[0]
            if path.name.endswith(".lock") or key in users:
                continue
            if locking.current_owner(self.store_path(key)) or locking.current_owner(
                path
            ):
                continue
            size = path.stat().st_size
            path.unlink()
            self._record_path(key).unlink(missing_ok=True)
            removed.append(f"{path.name} ({format_bytes(size)})")
        for path in sorted(self.folder.glob("*.json")):
            orphan = not (
                self.store_path(path.stem).exists()
                or self.partial_path(path.stem).exists()
            )
            if path.name != "weights.json" and orphan:
                path.unlink()
        return removed


def _file_facts(path: str) -> list[int] | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return [status.st_size, status.st_mtime_ns]


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, value: dict) -> None:
    """Write atomically: readers see the old or the new file, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(value, indent=1, default=str))
    os.replace(temporary, path)
