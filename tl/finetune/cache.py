"""What the frozen part of a run computes, computed once: codes and stage 2's inputs.

Before training, one pass over the training and validation images (each decoded once)
runs the frozen backbone and keeps:

- the pooled codes of its final layer, on which stage 1 fits the probe or trains the
  head (none from scratch: the codes of random weights mean nothing);
- what stage 2 trains from (`CachePlan`): without augmentation, the output of the cut
  layer below the first unfrozen one (`prefix`), so that every epoch runs only the
  layers above it; with augmentation, `--unfreeze all` or from scratch, the decoded
  and resized images (`images`), so that no epoch decodes a file again.

They stay in memory when they fit under a limit, else in a temporary HDF5 file in the
run folder (`cache/frozen.h5`, deleted after the run unless it is to be kept). The
cache changes no result: training reads exactly the values it would compute. A
resumed run computes it again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
from tqdm.auto import tqdm

from tl.engines.keras import compiled_extractor
from tl.errors import TLError
from tl.images import ImageIndex, decoded_batches
from tl.store import format_bytes

if TYPE_CHECKING:
    from tl.finetune.model import FineTuneModel

log = logging.getLogger("tl")

CACHE_FOLDER = "cache"
CACHE_FILE = "frozen.h5"
DEFAULT_MEMORY_GB = 2.0


@dataclasses.dataclass(frozen=True)
class CachePlan:
    """What stage 2 trains from: `prefix` (the output of layer `cut`), `images`
    (decoded, resized images) or None (images decoded every epoch)."""

    kind: str | None
    cut: str | None = None

    @classmethod
    def choose(cls, net: FineTuneModel, enabled: bool = True) -> CachePlan:
        """The cache `net`'s stage 2 needs: none without stage 2 or when not
        `enabled`; images with augmentation, from scratch or when nothing lies
        below the first unfrozen layer; else the frozen prefix."""
        settings = net.settings
        if not enabled or not settings.epochs:
            return cls(None)
        if settings.augment or settings.from_scratch:
            return cls("images")
        cut = net.cut()
        return cls("prefix", cut) if cut else cls("images")


class Rows:
    """Rows of one shape, in memory (numpy) or in an HDF5 dataset, read in any
    order."""

    def __init__(self, data: np.ndarray | h5py.Dataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one row."""
        return tuple(self.data.shape[1:])

    def take(self, positions: np.ndarray) -> np.ndarray:
        """The rows at `positions`, in that order."""
        if isinstance(self.data, np.ndarray):
            return self.data[positions]
        order = np.argsort(positions)
        rows = np.empty((len(positions), *self.shape), self.data.dtype)
        rows[order] = self.data[np.asarray(positions)[order]]  # HDF5: increasing
        return rows


@dataclasses.dataclass
class Frozen:
    """What the frozen pass computed for the images of one split, in index order:
    codes (None from scratch) and stage 2's cached inputs (None without a cache)."""

    codes: np.ndarray | None
    inputs: Rows | None


@dataclasses.dataclass
class FrozenPass:
    """The frozen pass's results per split (`train`, `val`), and where they lie."""

    plan: CachePlan
    splits: dict[str, Frozen]
    file: h5py.File | None  # when the cache did not fit in memory
    bytes: int

    def describe(self) -> dict:
        """For metadata.json: the kind of cache, its cut, where and how large."""
        return {
            "kind": self.plan.kind,
            "cut": self.plan.cut,
            "storage": self.plan.kind
            and (self.file.filename if self.file else "memory"),
            "bytes": self.bytes,
        }

    def close(self, keep: bool = False) -> None:
        """Release the HDF5 file; delete it unless `keep`."""
        if self.file is None or not self.file.id.valid:
            return
        path = Path(self.file.filename)
        self.file.close()
        if not keep:
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # not empty: someone else's files
                path.parent.rmdir()


def frozen_pass(
    net: FineTuneModel,
    plan: CachePlan,
    indexes: dict[str, ImageIndex],
    directory: Path,
    *,
    batch_size: int,
    memory_limit_gb: float = DEFAULT_MEMORY_GB,
    progress: bool = False,
) -> FrozenPass:
    """Decode each image of `indexes` once and compute what training needs of the
    frozen backbone (see the module docstring).

    Raises:
        TLError: for a file that no longer decodes (it did when the run started).
    """
    settings = net.settings
    codes = not settings.from_scratch
    if not codes and plan.kind is None:
        return FrozenPass(plan, {}, None, 0)
    extractor = compiled_extractor(net.extractor(plan.cut)) if codes else None
    if plan.kind == "prefix":
        shape = tuple(net.backbone.get_layer(plan.cut).output.shape[1:])
    else:
        shape = (*settings.image.size, 3)
    rows = sum(len(index) for index in indexes.values())
    size = rows * math.prod(shape) * 4 if plan.kind else 0
    path = None
    if size > memory_limit_gb * 1e9:
        path = directory / CACHE_FOLDER / CACHE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        log.info("caching %s in %s (over %g GB)", format_bytes(size), path,
                 memory_limit_gb)  # fmt: skip
    store = h5py.File(path, "w") if path else None
    results = {}
    frozen = FrozenPass(plan, results, store, size)
    try:
        with tqdm(
            total=rows, desc="frozen pass", unit="img", disable=not progress
        ) as bar:
            for role, index in indexes.items():
                results[role] = _one_split(
                    net, plan, index, extractor, shape, store, role, batch_size, bar
                )
    except BaseException:
        frozen.close()
        raise
    return frozen


def _one_split(net, plan, index, extractor, shape, store, role, batch_size, bar):
    """The codes and cached inputs of one split (see `frozen_pass`)."""
    count = len(index)
    codes = None
    if extractor is not None:
        codes = np.empty((count, net.backbone.output.shape[-1]), np.float32)
    inputs = None
    if plan.kind and store is not None:
        inputs = store.create_dataset(
            role, (count, *shape), np.float32, chunks=(1, *shape)
        )
    elif plan.kind:
        inputs = np.empty((count, *shape), np.float32)
    paths = index.absolute_paths()
    for batch in decoded_batches(paths, net.settings.image, batch_size):
        if batch.skipped:
            position, reason = batch.skipped[0]
            raise TLError(
                f"{paths[position]!r} no longer decodes ({reason}); it did when the "
                f"run started. Restore it and re-run (the run resumes)."
            )
        if batch.images is None:
            continue
        rows = slice(int(batch.positions[0]), int(batch.positions[-1]) + 1)
        outputs = extractor(batch.images) if extractor is not None else {}
        if codes is not None:
            codes[rows] = outputs[net.final_layer].numpy()
        if plan.kind == "prefix":
            inputs[rows] = outputs[plan.cut].numpy()
        elif plan.kind == "images":
            inputs[rows] = batch.images.numpy()
        bar.update(len(batch.positions))
    return Frozen(codes, None if inputs is None else Rows(inputs))
