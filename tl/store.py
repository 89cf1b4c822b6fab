"""The HDF5 feature store: one self-describing, appendable file of CNN codes.

Layout (schema version 1):

    /features/<layer>   (N, ...) float32|float16, chunked, resizable: codes per row
    /labels             (N,) int32, -1 for unlabeled images
    /paths              (N,) str, image path relative to the source root
    /positions          (N,) int64, row's position in the input index
    /class_names        (K,) str
    /skipped/{positions,paths,reasons}   images that could not be used, and why
    attributes          format, schema_version, settings (JSON: everything that
                        determines the codes), provenance (JSON: versions, weights
                        hash, time), layers (JSON), num_images, index_sha256,
                        images_done, rows, complete, shard (JSON or null)

Rows are appended batch by batch and the file is flushed after each one; `rows` and
`images_done` only move after the batch's data is written, so a killed writer leaves
a file whose counters describe complete batches, and `StoreWriter.resume` truncates
anything past them. Shards (`shard = {index, count}`) hold a contiguous slice of the
input index each; `merge_stores` joins them into the file one process would write.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import h5py
import numpy as np

from tl.errors import TLError

FORMAT = "tl-features"
SCHEMA_VERSION = 1
COMPRESSIONS = (None, "lzf", "gzip")
_STRING = h5py.string_dtype()
_CHUNK_BYTES = 1 << 20


def _chunk_rows(row_shape: Sequence[int], dtype) -> int:
    row_bytes = int(np.prod(row_shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return int(max(1, min(4096, _CHUNK_BYTES // max(row_bytes, 1))))


def _appendable(group, name, row_shape, dtype, compression=None):
    options = {}
    if compression == "gzip":
        options = {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    elif compression == "lzf":
        options = {"compression": "lzf", "shuffle": True}
    return group.create_dataset(
        name,
        shape=(0, *row_shape),
        maxshape=(None, *row_shape),
        dtype=dtype,
        chunks=(
            _chunk_rows(row_shape, dtype if dtype != _STRING else "u8"),
            *row_shape,
        ),
        **options,
    )


def _append(dataset, values) -> None:
    if len(values) == 0:
        return
    start = dataset.shape[0]
    dataset.resize(start + len(values), axis=0)
    dataset[start:] = values


def settings_differences(stored: dict, requested: dict) -> list[str]:
    """Human-readable differences between two settings dicts."""
    keys = sorted(set(stored) | set(requested))
    return [
        f"{key}: file has {stored.get(key)!r}, this run asks {requested.get(key)!r}"
        for key in keys
        if stored.get(key) != requested.get(key)
    ]


class StoreWriter:
    """Appends batches of rows to a feature store; see the module docstring."""

    def __init__(self, handle: h5py.File):
        self._file = handle

    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        settings: dict,
        provenance: dict,
        layers: list[dict],
        class_names: list[str],
        num_images: int,
        index_sha256: str,
        compression: str | None = None,
        shard: dict | None = None,
    ) -> StoreWriter:
        """Create a new, empty store (replacing any file at `path`).

        Args:
            layers: one dict per layer with at least `key` (dataset name), `shape`
                (per-row shape) and `dtype`; all of it is stored as metadata.
        """
        if compression not in COMPRESSIONS:
            raise TLError(
                f"Unknown compression {compression!r}; choose one of "
                f"{', '.join(str(c).lower() for c in COMPRESSIONS)}."
            )
        handle = h5py.File(path, "w")
        attrs = handle.attrs
        attrs["format"] = FORMAT
        attrs["schema_version"] = SCHEMA_VERSION
        attrs["settings"] = json.dumps(settings, sort_keys=True)
        attrs["provenance"] = json.dumps(provenance, sort_keys=True)
        attrs["layers"] = json.dumps(layers)
        attrs["num_images"] = num_images
        attrs["index_sha256"] = index_sha256
        attrs["shard"] = json.dumps(shard)
        attrs["images_done"] = 0
        attrs["rows"] = 0
        attrs["complete"] = False
        features = handle.create_group("features")
        for layer in layers:
            _appendable(
                features,
                layer["key"],
                tuple(layer["shape"]),
                layer["dtype"],
                compression,
            )
        _appendable(handle, "labels", (), np.int32)
        _appendable(handle, "paths", (), _STRING)
        _appendable(handle, "positions", (), np.int64)
        handle.create_dataset(
            "class_names", data=np.array(class_names, dtype=object), dtype=_STRING
        )
        skipped = handle.create_group("skipped")
        for name, dtype in (
            ("positions", np.int64),
            ("paths", _STRING),
            ("reasons", _STRING),
        ):
            _appendable(skipped, name, (), dtype)
        handle.flush()
        return cls(handle)

    @classmethod
    def resume(cls, path: str | Path) -> StoreWriter:
        """Reopen an incomplete store and drop anything past its last complete batch."""
        handle = h5py.File(path, "r+")
        rows = int(handle.attrs["rows"])
        for name in _row_datasets(handle):
            handle[name].resize(rows, axis=0)
        done = int(handle.attrs["images_done"])
        skipped = handle["skipped/positions"][:]
        keep = int(np.sum(skipped < done))
        for name in ("positions", "paths", "reasons"):
            handle[f"skipped/{name}"].resize(keep, axis=0)
        return cls(handle)

    @property
    def images_done(self) -> int:
        """Input positions consumed so far (written or skipped), counted from the
        start of this store's slice of the index."""
        return int(self._file.attrs["images_done"])

    @property
    def rows(self) -> int:
        return int(self._file.attrs["rows"])

    def write_batch(
        self,
        features: dict[str, np.ndarray],
        positions: np.ndarray,
        labels: np.ndarray,
        paths: list[str],
        skipped: list[tuple[int, str, str]],
        images_done: int,
    ) -> None:
        """Append one batch of rows and skipped files, then commit and flush."""
        handle = self._file
        for key, values in features.items():
            _append(handle["features"][key], values)
        _append(handle["labels"], labels)
        _append(handle["paths"], np.array(paths, dtype=object))
        _append(handle["positions"], positions)
        if skipped:
            skipped_positions, skipped_paths, reasons = zip(*skipped, strict=True)
            _append(handle["skipped/positions"], np.asarray(skipped_positions))
            _append(handle["skipped/paths"], np.array(skipped_paths, dtype=object))
            _append(handle["skipped/reasons"], np.array(reasons, dtype=object))
        handle.attrs["rows"] = self.rows + len(positions)
        handle.attrs["images_done"] = images_done
        handle.flush()

    def finish(self) -> None:
        """Mark the store complete (every image written or skipped) and close it."""
        self._file.attrs["complete"] = True
        self.close()

    def close(self) -> None:
        if self._file.id.valid:
            self._file.flush()
            self._file.close()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _row_datasets(handle: h5py.File) -> list[str]:
    return [f"features/{key}" for key in handle["features"]] + [
        "labels",
        "paths",
        "positions",
    ]


def _strings(dataset) -> list[str]:
    return [
        value.decode() if isinstance(value, bytes) else value for value in dataset[:]
    ]


class FeatureStore:
    """Read access to a feature store.

    Example:
        with FeatureStore("features/flowers_vgg16.h5") as store:
            X, y = store.read("block5_pool"), store.labels

    Args:
        path: the `.h5` file.
        require_complete: refuse a store whose extraction has not finished.
    """

    def __init__(self, path: str | Path, *, require_complete: bool = True):
        self.path = Path(path)
        try:
            self._file = h5py.File(self.path, "r")
        except FileNotFoundError:
            raise TLError(f"Feature store {str(path)!r} does not exist.") from None
        except OSError as error:
            raise TLError(
                f"Cannot open {str(path)!r} as an HDF5 feature store: {error}. If an "
                f"extraction was killed while writing it, re-run it with --overwrite "
                f"to start over."
            ) from None
        attrs = self._file.attrs
        if attrs.get("format") != FORMAT:
            self.close()
            raise TLError(f"{str(path)!r} is not a tl feature store (no format tag).")
        version = int(attrs["schema_version"])
        if version > SCHEMA_VERSION:
            self.close()
            raise TLError(
                f"{str(path)!r} has schema version {version}, newer than this tl "
                f"reads ({SCHEMA_VERSION}); upgrade tl."
            )
        if require_complete and not self.complete:
            done, total = int(attrs["images_done"]), self.num_images
            self.close()
            raise TLError(
                f"Feature store {str(path)!r} is incomplete ({done} of {total} images "
                f"processed): its extraction was interrupted. Re-run the same "
                f"extract_features.py command (or --resume {path}) to finish it."
            )

    # Metadata --------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return bool(self._file.attrs["complete"])

    @property
    def settings(self) -> dict:
        """Everything that determines the codes (backbone, layers, weights, sizes)."""
        return json.loads(self._file.attrs["settings"])

    @property
    def provenance(self) -> dict:
        """Versions, weights hash, creation time: how the codes were made."""
        return json.loads(self._file.attrs["provenance"])

    @property
    def shard(self) -> dict | None:
        return json.loads(self._file.attrs["shard"])

    @property
    def num_images(self) -> int:
        """Images in the input index (or in this shard's slice of it)."""
        return int(self._file.attrs["num_images"])

    @property
    def index_sha256(self) -> str:
        return str(self._file.attrs["index_sha256"])

    @property
    def layer_info(self) -> list[dict]:
        """Per layer: key, layer, requested name, raw shape, pooling, shape, dtype."""
        return json.loads(self._file.attrs["layers"])

    @property
    def layers(self) -> list[str]:
        """Dataset keys, in the order they were requested."""
        return [info["key"] for info in self.layer_info]

    def __len__(self) -> int:
        return int(self._file.attrs["rows"])

    # Rows ------------------------------------------------------------------------
    def _dataset(self, layer: str):
        if layer not in self.layers:
            raise TLError(
                f"Unknown layer {layer!r} in {str(self.path)!r}. Layers: "
                f"{', '.join(self.layers)}."
            )
        return self._file["features"][layer]

    def read(self, layer: str, rows: slice | np.ndarray | None = None) -> np.ndarray:
        """The codes of one layer, all rows or a selection, as a numpy array."""
        dataset = self._dataset(layer)
        n = len(self)
        if rows is None:
            return dataset[:n]
        if isinstance(rows, slice):
            return dataset[rows]
        rows = np.asarray(rows)
        order = np.argsort(rows)  # h5py fancy indexing needs increasing indices
        out = np.empty((len(rows), *dataset.shape[1:]), dataset.dtype)
        out[order] = dataset[np.sort(rows)]
        return out

    def iter_chunks(self, layer: str, chunk_rows: int = 4096) -> Iterator[np.ndarray]:
        """The codes of one layer in blocks of `chunk_rows`, for data beyond memory."""
        dataset = self._dataset(layer)
        for start in range(0, len(self), chunk_rows):
            yield dataset[start : min(start + chunk_rows, len(self))]

    def iter_rows(
        self, layer: str, rows: np.ndarray | None = None, chunk_rows: int = 4096
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(row numbers, codes) of the selected `rows` (None: all), chunk by chunk in
        row order: a subset of a layer larger than memory, read sequentially."""
        selected = None if rows is None else np.zeros(len(self), bool)
        if selected is not None:
            selected[rows] = True
        for start, codes in zip(
            range(0, len(self), chunk_rows),
            self.iter_chunks(layer, chunk_rows),
            strict=True,
        ):
            numbers = np.arange(start, start + len(codes))
            if selected is None:
                yield numbers, codes
            elif (keep := selected[numbers]).any():
                yield numbers[keep], codes[keep]

    @property
    def labels(self) -> np.ndarray:
        return self._file["labels"][: len(self)]

    @property
    def paths(self) -> list[str]:
        return _strings(self._file["paths"])[: len(self)]

    @property
    def positions(self) -> np.ndarray:
        return self._file["positions"][: len(self)]

    @property
    def class_names(self) -> list[str]:
        return _strings(self._file["class_names"])

    @property
    def skipped(self) -> list[tuple[int, str, str]]:
        """(position, path, reason) of every image that could not be used."""
        group = self._file["skipped"]
        return list(
            zip(
                group["positions"][:].tolist(),
                _strings(group["paths"]),
                _strings(group["reasons"]),
                strict=True,
            )
        )

    def close(self) -> None:
        if self._file.id.valid:
            self._file.close()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def merge_stores(
    shard_paths: Sequence[str | Path], output: str | Path, *, overwrite: bool = False
) -> Path:
    """Join complete shards of one extraction into the store a single run would write.

    The shards must share settings and input index, be complete, and together be
    every shard `0..count-1` of the same split. Rows are copied in shard order, a
    block at a time so memory stays flat, into a temporary file renamed at the end:
    an interrupted merge never leaves a half-merged store behind.
    """
    output = Path(output)
    if output.exists() and not overwrite:
        raise TLError(f"{str(output)!r} exists; pass overwrite=True (--overwrite).")
    if not shard_paths:
        raise TLError("No shards to merge.")
    stores = [FeatureStore(path) for path in shard_paths]
    try:
        _check_shards(stores)
        stores.sort(key=lambda store: store.shard["index"])
        first = stores[0]
        temporary = output.with_name(output.name + ".merging")
        writer = StoreWriter.create(
            temporary,
            settings=first.settings,
            provenance={
                **first.provenance,
                "merged_from": [str(s.path) for s in stores],
            },
            layers=first.layer_info,
            class_names=first.class_names,
            num_images=sum(store.num_images for store in stores),
            index_sha256=first.index_sha256,
            compression=first._dataset(first.layers[0]).compression,
        )
        with writer:
            done = 0
            for store in stores:
                for start in range(0, len(store), 4096):
                    rows = slice(start, min(start + 4096, len(store)))
                    writer.write_batch(
                        {key: store.read(key, rows) for key in store.layers},
                        store.positions[rows],
                        store.labels[rows],
                        store.paths[rows],
                        skipped=[],
                        images_done=done,
                    )
                done += store.num_images
                writer.write_batch(
                    {},
                    np.empty(0, np.int64),
                    np.empty(0, np.int32),
                    [],
                    skipped=store.skipped,
                    images_done=done,
                )
            writer.finish()
        temporary.replace(output)
    finally:
        for store in stores:
            store.close()
    return output


def _check_shards(stores: list[FeatureStore]) -> None:
    first = stores[0]
    for store in stores:
        if store.shard is None:
            raise TLError(f"{str(store.path)!r} is not a shard (no shard index).")
        differences = settings_differences(first.settings, store.settings)
        if differences or store.index_sha256 != first.index_sha256:
            raise TLError(
                f"{str(store.path)!r} is not a shard of the same extraction as "
                f"{str(first.path)!r}: "
                f"{'; '.join(differences) or 'different input index'}."
            )
    count = first.shard["count"]
    found = sorted(store.shard["index"] for store in stores)
    if found != list(range(count)) or any(s.shard["count"] != count for s in stores):
        raise TLError(
            f"Shards found: {found} of {count}; a merge needs each of 0..{count - 1} "
            f"exactly once."
        )
