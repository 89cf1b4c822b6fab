"""The HDF5 feature store: one self-describing, appendable file of CNN codes.

Layout (schema version 2; version 1 had no `/ignored` group and no `skipped_rows`):

    /features/<layer>   (N, ...) float32|float16, chunked, resizable: codes per row
    /labels             (N,) int32, -1 for unlabeled images
    /paths              (N,) str, image path relative to the source root
    /positions          (N,) int64, row's position in the input index
    /class_names        (K,) str
    /skipped/{positions,paths,reasons}   images that could not be used, and why
    /ignored/{paths,reasons}             files the index left out, and why
    attributes          format, schema_version, settings (JSON: everything that
                        determines the codes), provenance (JSON: versions, weights
                        hash, time), layers (JSON), num_images, index_sha256,
                        images_done, rows, skipped_rows, complete, shard (JSON or null)

Rows are appended batch by batch. A batch's data is written and flushed before the
counters (`rows`, `images_done`, `skipped_rows`) move, and they are flushed in turn,
so a killed writer leaves a file whose counters describe complete batches;
`StoreWriter.resume` checks that part and truncates anything past it. Shards
(`shard = {index, count}`) hold a contiguous slice of the input index each;
`merge_stores` joins them into the file one process would write.

Nothing committed is ever put at risk:
- One writer at a time: extractions and merges hold `<output>.lock` (`tl.locking`).
- An extraction with `--overwrite` writes the new store to `<output>.new`
  (`replacement_path`) and renames it over `<output>` only once it is complete; a
  merge writes `<output>.merging` the same way.
- Before each batch the writer checks the free space against the batch's estimated
  bytes plus a margin (`estimated_bytes`) and reserves those bytes in the file
  (posix_fallocate), so a full disk or a file-size limit stops the run between
  batches with one message, the store resumable at its last committed batch. Any
  other failure to write is reported the same way.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import h5py
import numpy as np

try:
    import resource
except ImportError:  # not on Windows
    resource = None

from tl import locking
from tl._checks import check_choice
from tl.errors import TLError
from tl.provenance import identity_differences

FORMAT = "tl-features"
SCHEMA_VERSION = 2
COMPRESSIONS = (None, "lzf", "gzip")
_STRING = h5py.string_dtype()
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_CHUNK_BYTES = 1 << 20
_MAX_CHUNK_ROWS = 4096
_MERGE_BLOCK_ROWS = 4096  # rows a merge copies at a time: memory stays flat
# Measured (tests/test_store.py): a variable-length string costs a 16-byte reference
# in its dataset plus a 16-byte global-heap header and its UTF-8 text padded to 8
# bytes (4 on average); superblock, groups, object headers, attributes, chunk
# indexes and the first heap collection take about 24 KB.
_STRING_REFERENCE_BYTES = 16
_HEAP_BYTES_PER_STRING = 16 + 4
_METADATA_BYTES = 24 << 10
# posix_fallocate failures that mean "cannot reserve here", not "no space"
_NO_RESERVATION = {errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS}


def format_bytes(count: float) -> str:
    """`1.2 MB`: a byte count for messages (powers of 1000)."""
    power = min(int(math.log10(max(count, 1)) // 3), 4)
    if power == 0:
        return f"{count:.0f} B"
    return f"{count / 1000**power:.1f} {('KB', 'MB', 'GB', 'TB')[power - 1]}"


def _chunk_rows(row_bytes: int, num_images: int) -> int:
    """Rows per chunk: about 1 MB (at most 4096 rows), never more rows than the store
    will hold, spread evenly so that the last chunk is not mostly empty. HDF5
    allocates whole chunks, so a 1 MB chunk for 7 rows would waste nearly all of it."""
    most = max(1, min(_MAX_CHUNK_ROWS, _CHUNK_BYTES // max(row_bytes, 1)))
    images = max(num_images, 1)
    return math.ceil(images / math.ceil(images / most))


def _row_bytes(shape: Sequence[int], dtype) -> int:
    if dtype == _STRING:
        return _STRING_REFERENCE_BYTES
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def _row_datasets_of(layers: Sequence[dict]) -> list[tuple[str, tuple, object]]:
    """(name, per-row shape, dtype) of every dataset that grows by one row per image."""
    return [
        *(
            (f"features/{info['key']}", tuple(info["shape"]), info["dtype"])
            for info in layers
        ),
        ("labels", (), np.int32),
        ("paths", (), _STRING),
        ("positions", (), np.int64),
    ]


_SKIPPED_DATASETS = (
    ("skipped/positions", (), np.int64),
    ("skipped/paths", (), _STRING),
    ("skipped/reasons", (), _STRING),
)


def estimated_bytes(
    layers: Sequence[dict], num_images: int, rows: int, path_bytes: int
) -> int:
    """Bytes on disk of an uncompressed store once it holds `rows` rows.

    Counts what HDF5 really allocates: whole chunks of every row dataset (sized for
    `num_images` images, as `StoreWriter.create` sizes them), a reference and a heap
    object for each path (their UTF-8 text totals `path_bytes`), and the file's
    metadata. The up-front check of an extraction and the writer's check before
    each batch both use it; compressed stores take less.

    Args:
        layers: one dict per layer with `shape` (per row) and `dtype`.
    """
    total = _METADATA_BYTES + rows * _HEAP_BYTES_PER_STRING + path_bytes
    for _name, shape, dtype in _row_datasets_of(layers):
        row_bytes = _row_bytes(shape, dtype)
        chunk = _chunk_rows(row_bytes, num_images)
        total += math.ceil(rows / chunk) * chunk * row_bytes
    return total


def _appendable(handle, name, row_shape, dtype, num_images, compression=None):
    options = {}
    if compression == "gzip":
        options = {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    elif compression == "lzf":
        options = {"compression": "lzf", "shuffle": True}
    return handle.create_dataset(
        name,
        shape=(0, *row_shape),
        maxshape=(None, *row_shape),
        dtype=dtype,
        chunks=(_chunk_rows(_row_bytes(row_shape, dtype), num_images), *row_shape),
        **options,
    )


def _append(dataset, values) -> None:
    if len(values) == 0:
        return
    start = dataset.shape[0]
    dataset.resize(start + len(values), axis=0)
    dataset[start:] = values


def replacement_path(output: str | Path) -> Path:
    """Where an overwriting extraction writes until it is complete: `<output>.new`."""
    output = Path(output)
    return output.with_name(output.name + ".new")


def _has_hdf5_signature(path: Path) -> bool:
    try:
        with open(path, "rb") as file:
            return file.read(len(_HDF5_SIGNATURE)) == _HDF5_SIGNATURE
    except OSError:
        return False


def refuse_foreign_file(path: str | Path) -> None:
    """Refuse to replace an existing `path` that is not a tl feature store.

    A damaged store (an HDF5 file that cannot be opened) may be replaced; anything
    else (not a regular file, not HDF5, HDF5 without tl's format tag) is the user's
    and is never written over, `--overwrite` or not.
    """
    path = Path(path)
    if not path.exists():
        return
    reason = None
    if not path.is_file():
        reason = "not a regular file"
    elif not _has_hdf5_signature(path):
        reason = "not an HDF5 file"
    else:
        with (
            contextlib.suppress(OSError),
            h5py.File(path, "r", locking=False) as handle,
        ):
            if handle.attrs.get("format") != FORMAT:
                reason = "an HDF5 file without tl's format tag"
    if reason:
        raise TLError(
            f"{str(path)!r} is not a tl feature store ({reason}) and will not be "
            f"replaced; choose another --output or delete it yourself."
        )


def _cause(error: Exception) -> str:
    """The operating system's words for an h5py error, without HDF5's details."""
    match = re.search(r"error message = '([^']+)'", str(error))
    if match:
        return match[1]
    return getattr(error, "strerror", None) or str(error).split(" (")[0]


@contextlib.contextmanager
def _silent_unraisable():
    """h5py reports errors of objects closed by the garbage collector as 'Exception
    ignored' tracebacks; after a failed write they repeat what the error says."""
    hook = sys.unraisablehook
    sys.unraisablehook = lambda _unraisable: None
    try:
        yield
    finally:
        sys.unraisablehook = hook


class StoreWriter:
    """Appends batches of rows to a feature store; see the module docstring."""

    def __init__(self, path: str | Path, handle: h5py.File):
        self.path = Path(path)
        self._file = handle
        self._closed = False
        attrs = handle.attrs
        self._layers = json.loads(attrs["layers"])
        self._num_images = int(attrs["num_images"])
        self._rows = int(attrs["rows"])
        self._done = int(attrs["images_done"])
        self._skipped = _skipped_count(handle)
        # kept open, so that HDF5 writes a batch's chunks when the file is flushed
        # (where a failure raises) and never while h5py closes a dataset object
        self._datasets = {
            name: handle[name]
            for name, _shape, _dtype in (
                *_row_datasets_of(self._layers),
                *_SKIPPED_DATASETS,
            )
        }
        self._margin = (
            _METADATA_BYTES
            + sum(  # rewriting one chunk of each
                dataset.chunks[0] * _row_bytes(dataset.shape[1:], dataset.dtype)
                for dataset in self._datasets.values()
            )
        )

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
        ignored: Sequence[tuple[str, str]] = (),
    ) -> StoreWriter:
        """Create a new, empty store (replacing any file at `path`).

        Args:
            layers: one dict per layer with at least `key` (dataset name), `shape`
                (per-row shape) and `dtype`; all of it is stored as metadata.
            ignored: (path, reason) of the files the input index left out.
        """
        check_choice("compression", compression, COMPRESSIONS)
        try:
            handle = h5py.File(path, "w")
        except OSError as error:
            raise TLError(
                f"Cannot create the feature store {str(path)!r}: {_cause(error)}."
            ) from None
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
        attrs["skipped_rows"] = 0
        attrs["complete"] = False
        handle.create_group("features")
        for name, shape, dtype in (*_row_datasets_of(layers), *_SKIPPED_DATASETS):
            is_code = name.startswith("features/")
            _appendable(
                handle, name, shape, dtype, num_images, compression if is_code else None
            )
        _strings_dataset(handle, "class_names", class_names)
        ignored_paths, reasons = zip(*ignored, strict=True) if ignored else ((), ())
        _strings_dataset(handle, "ignored/paths", ignored_paths)
        _strings_dataset(handle, "ignored/reasons", reasons)
        handle.flush()
        return cls(path, handle)

    @classmethod
    def resume(cls, path: str | Path) -> StoreWriter:
        """Reopen an incomplete store, check its committed part and drop anything past
        its last committed batch."""
        handle = _open_for_appending(Path(path))
        try:
            writer = cls(path, handle)
            writer._check_committed()
        except TLError:
            _close_quietly(handle)
            raise
        except (OSError, RuntimeError, KeyError, ValueError) as error:
            _close_quietly(handle)
            raise _damaged(path, _cause(error)) from None
        for name, dataset in writer._datasets.items():
            committed = writer._skipped if name.startswith("skipped/") else writer._rows
            dataset.resize(committed, axis=0)
        return writer

    def _check_committed(self) -> None:
        """Every row dataset holds the committed rows, and the last of them reads."""
        for names, count in (
            ([name for name, *_ in _row_datasets_of(self._layers)], self._rows),
            ([name for name, *_ in _SKIPPED_DATASETS], self._skipped),
        ):
            for name in names:
                dataset = self._file[name]
                if dataset.shape[0] < count:
                    raise _damaged(
                        self.path,
                        f"{name} holds {dataset.shape[0]} rows of the {count} "
                        f"committed",
                    )
                if count:
                    dataset[count - 1]

    @property
    def images_done(self) -> int:
        """Input positions consumed so far (written or skipped), counted from the
        start of this store's slice of the index."""
        return self._done

    @property
    def rows(self) -> int:
        return self._rows

    def write_batch(
        self,
        features: dict[str, np.ndarray],
        positions: np.ndarray,
        labels: np.ndarray,
        paths: list[str],
        skipped: list[tuple[int, str, str]],
        images_done: int,
    ) -> None:
        """Append one batch of rows and skipped files, then commit it.

        Raises a one-line TLError, leaving the store at its last committed batch and
        this writer closed, when the batch does not fit on the disk or cannot be
        written.
        """
        path_bytes = sum(len(path.encode()) for path in paths)
        self._reserve(
            estimated_bytes(
                self._layers, self._num_images, self._rows + len(positions), path_bytes
            )
            - estimated_bytes(self._layers, self._num_images, self._rows, 0)
            + self._margin
        )
        handle, datasets = self._file, self._datasets
        try:
            for key, values in features.items():
                _append(datasets[f"features/{key}"], values)
            _append(datasets["labels"], labels)
            _append(datasets["paths"], np.array(paths, dtype=object))
            _append(datasets["positions"], positions)
            if skipped:
                skipped_positions, skipped_paths, reasons = zip(*skipped, strict=True)
                _append(datasets["skipped/positions"], np.asarray(skipped_positions))
                _append(
                    datasets["skipped/paths"], np.array(skipped_paths, dtype=object)
                )
                _append(datasets["skipped/reasons"], np.array(reasons, dtype=object))
            handle.flush()  # the data first: counters never describe unwritten rows
            handle.attrs["rows"] = self._rows + len(positions)
            handle.attrs["images_done"] = images_done
            handle.attrs["skipped_rows"] = self._skipped + len(skipped)
            handle.flush()
            self._release_reservation()
        except (OSError, RuntimeError) as error:
            raise self._failure(_cause(error), hdf5_failed=True) from None
        self._rows += len(positions)
        self._done = images_done
        self._skipped += len(skipped)

    def _reserve(self, nbytes: int) -> None:
        """Make room for the next batch before HDF5 writes any of it.

        The free space must exceed the batch's estimate plus a margin; then the bytes
        are reserved at the end of the file itself, so that a full disk, a quota or a
        file-size limit refuses the reservation, not HDF5's writes halfway through a
        batch (after which HDF5 may leave a file it cannot reopen).
        """
        free = shutil.disk_usage(self.path.absolute().parent).free
        if nbytes > free:
            raise self._failure(f"the next batch needs about {format_bytes(nbytes)}")
        if not hasattr(os, "posix_fallocate"):
            return
        try:
            descriptor = self._file.id.get_vfd_handle()
            os.posix_fallocate(descriptor, self._file.id.get_filesize(), nbytes)
        except OSError as error:
            if error.errno in _NO_RESERVATION:
                return
            raise self._failure(_cause(error)) from None

    def _release_reservation(self) -> None:
        """Cut the file back to the end of what HDF5 has allocated."""
        if not hasattr(os, "posix_fallocate"):
            return
        descriptor = self._file.id.get_vfd_handle()
        end = self._file.id.get_filesize()
        if os.fstat(descriptor).st_size > end:
            os.ftruncate(descriptor, end)

    def _failure(self, cause: str, hdf5_failed: bool = False) -> TLError:
        """Close the file quietly and describe a failed write in one line."""
        self._abandon(hdf5_failed)
        folder = self.path.absolute().parent
        try:
            free = f"{format_bytes(shutil.disk_usage(folder).free)} are free"
        except OSError:
            free = "the free space is unknown"
        return TLError(
            f"Could not write to {str(self.path)!r} ({cause}): {self._rows} images "
            f"are committed ({self._done} of {self._num_images} processed) and "
            f"{free} on {folder}. Free some space, then re-run the same command to "
            f"resume."
        )

    def _abandon(self, hdf5_failed: bool = False) -> None:
        """Close the file after a failure; if HDF5 itself failed, make what it wrote
        readable again where the file system allows."""
        if self._closed:
            return
        self._closed = True
        if not hdf5_failed:
            with contextlib.suppress(OSError, RuntimeError, ValueError):
                self._release_reservation()
        _close_quietly(self._file, hdf5_failed)
        if hdf5_failed:
            repair_cut_short(self.path)

    def finish(self) -> None:
        """Mark the store complete (every image written or skipped) and close it."""
        try:
            self._file.attrs["complete"] = True
        except (OSError, RuntimeError) as error:
            raise self._failure(_cause(error), hdf5_failed=True) from None
        self.close()

    def close(self) -> None:
        """Flush and close; a failure to write raises a one-line TLError."""
        if self._closed:
            return
        try:
            self._file.flush()
            self._release_reservation()
            self._file.close()
        except (OSError, RuntimeError) as error:
            raise self._failure(_cause(error), hdf5_failed=True) from None
        self._closed = True

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        if exc_type is None:
            self.close()
        else:  # keep the error on its way; the committed part is safe regardless
            with contextlib.suppress(TLError):
                self.close()


def _close_quietly(handle: h5py.File, hdf5_failed: bool = False) -> None:
    """Close a file after a failure; errors of closing say nothing more.

    After HDF5 itself failed to write, its caches hold data it can no longer place;
    closing would retry those writes, fail again and leave a handle that crashes the
    interpreter when touched. Its file descriptor is first pointed at an anonymous
    in-memory file (past any file-size limit, which applies there too), so that
    closing completes without touching the store again.
    """
    if not handle.id.valid:
        return
    with _silent_unraisable(), _without_file_size_limit(hdf5_failed):
        if hdf5_failed:
            with contextlib.suppress(OSError, RuntimeError, ValueError):
                sink = _scratch_file()
                os.dup2(sink, handle.id.get_vfd_handle())
                os.close(sink)
        with contextlib.suppress(OSError, RuntimeError):
            handle.close()
        gc.collect()


@contextlib.contextmanager
def _without_file_size_limit(lift: bool):
    """Raise the soft file-size limit to the hard one for a while, if `lift`."""
    if not lift or resource is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    try:
        yield
    finally:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def _scratch_file() -> int:
    if hasattr(os, "memfd_create"):
        return os.memfd_create("tl-abandoned-store")
    with tempfile.TemporaryFile() as file:
        return os.dup(file.fileno())


def _extend_cut_file(path: Path, error: OSError) -> bool:
    """Make a file that a failed write left shorter than HDF5's recorded end readable:
    the missing tail held only the failed batch, so zeros do in its place (the
    committed part is checked when the store is resumed)."""
    match = re.search(r"truncated file: eof = \d+.*stored_eof = (\d+)", str(error))
    if not match:
        return False
    try:
        os.truncate(path, int(match[1]))
    except OSError:
        return False
    return True


def repair_cut_short(path: str | Path) -> None:
    """Extend a store that a failed write left shorter than the end HDF5 recorded for
    it (see `_extend_cut_file`); any other file is left alone. For writers only."""
    try:
        h5py.File(path, "r", locking=False).close()
    except OSError as error:
        _extend_cut_file(Path(path), error)


def _open_for_appending(path: Path) -> h5py.File:
    repair_cut_short(path)
    try:
        return h5py.File(path, "r+")
    except OSError as error:
        if "unable to lock file" in str(error):
            raise TLError(
                f"{str(path)!r} is open in another process; close it there, then "
                f"re-run to resume."
            ) from None
        raise _damaged(path, _cause(error)) from None


def _damaged(path, detail: str) -> TLError:
    return TLError(
        f"{str(path)!r} is damaged ({detail}): its committed rows cannot be read "
        f"back. Start over with --overwrite."
    )


def _skipped_count(handle: h5py.File) -> int:
    """Committed entries of /skipped.

    Version 1 files have no counter for them: the committed ones are those before
    the first position not yet consumed. Positions count from the start of the
    whole index, `images_done` from the start of the store's slice (a shard's), so
    the slice's start is needed: the lowest position stored, since the first image
    consumed became either a row or a skipped entry.
    """
    attrs = handle.attrs
    if "skipped_rows" in attrs:
        return int(attrs["skipped_rows"])
    positions = handle["skipped/positions"][:]
    done = int(attrs["images_done"])
    if attrs["complete"]:
        return len(positions)
    if not done:
        return 0
    first_row = handle["positions"][:1] if int(attrs["rows"]) else []
    start = int(np.min(np.concatenate([first_row, positions[:1]])))
    return int(np.sum(positions < start + done))


def _strings_dataset(handle, name: str, values: Sequence[str]) -> None:
    handle.create_dataset(
        name, data=np.array(list(values), dtype=object), dtype=_STRING
    )


def _strings(dataset, rows: slice = slice(None)) -> list[str]:
    return [
        value.decode() if isinstance(value, bytes) else value for value in dataset[rows]
    ]


def _open_for_reading(path: Path, require_complete: bool) -> h5py.File:
    """Open a store read-only; one that is being written is read without HDF5's file
    locking, and only when incomplete stores are welcome."""
    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise TLError(f"Feature store {str(path)!r} does not exist.") from None
    except OSError as error:
        if "unable to lock file" not in str(error):
            raise _unreadable(path, error) from None
    owner = locking.current_owner(path)
    if owner is None:
        raise TLError(
            f"{str(path)!r} is open for writing by another process; wait for it to "
            f"finish and try again."
        )
    if require_complete:
        raise _in_progress(path, owner)
    try:
        return h5py.File(path, "r", locking=False)
    except OSError as error:
        raise TLError(
            f"{str(path)!r} could not be read while its {owner.purpose} runs "
            f"({owner}): {_cause(error)}; try again, or wait for it to finish."
        ) from None


def _in_progress(path: Path, owner: locking.LockOwner) -> TLError:
    return TLError(
        f"{str(path)!r}: {owner.purpose} in progress ({owner}); wait for it or read "
        f"with require_complete=False."
    )


def _unreadable(path: Path, error: OSError) -> TLError:
    if not _has_hdf5_signature(path):
        return TLError(f"{str(path)!r} is not a tl feature store (not an HDF5 file).")
    if "truncated file" in str(error):
        return TLError(
            f"{str(path)!r} ends before the end HDF5 recorded for it (a write failed, "
            f"or a copy was cut short); re-run the same extract_features.py command "
            f"to repair and finish it."
        )
    return TLError(
        f"Cannot open {str(path)!r} as an HDF5 feature store ({_cause(error)}): it is "
        f"damaged. If an extraction was killed while writing it, re-run it with "
        f"--overwrite to start over."
    )


class FeatureStore:
    """Read access to a feature store.

    Example:
        with FeatureStore("features/flowers_vgg16.h5") as store:
            X, y = store.read("block5_pool"), store.labels

    Args:
        path: the `.h5` file.
        require_complete: refuse a store whose extraction has not finished (or is
            running now). False opens it anyway, even while it is being written,
            and shows the rows committed so far.
    """

    def __init__(self, path: str | Path, *, require_complete: bool = True):
        self.path = Path(path)
        self._file = _open_for_reading(self.path, require_complete)
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
            owner = locking.current_owner(self.path)
            if owner is not None:
                raise _in_progress(self.path, owner)
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

    @property
    def images_done(self) -> int:
        """Input positions consumed so far (written or skipped), counted from the
        start of this store's slice of the index."""
        return int(self._file.attrs["images_done"])

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
        """The codes of one layer, all rows or a selection, as a numpy array.

        `rows` selects as numpy would among the committed rows: a slice, row numbers
        (any order, repeats and negative numbers allowed) or a boolean mask.
        """
        dataset = self._dataset(layer)
        n = len(self)
        if rows is None:
            return dataset[:n]
        if isinstance(rows, slice) and rows.step in (None, 1):
            start, stop, _ = rows.indices(n)
            return dataset[start : max(start, stop)]
        numbers = np.arange(n)[rows]
        if numbers.size == 0:
            return np.empty((0, *dataset.shape[1:]), dataset.dtype)
        # h5py reads increasing, distinct row numbers: read those, then spread them
        distinct, where = np.unique(numbers, return_inverse=True)
        return dataset[distinct][where]

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
        return _strings(self._file["paths"], slice(len(self)))

    @property
    def positions(self) -> np.ndarray:
        return self._file["positions"][: len(self)]

    @property
    def class_names(self) -> list[str]:
        return _strings(self._file["class_names"])

    @property
    def skipped(self) -> list[tuple[int, str, str]]:
        """(position, path, reason) of every image that could not be used."""
        group, count = self._file["skipped"], _skipped_count(self._file)
        return list(
            zip(
                group["positions"][:count].tolist(),
                _strings(group["paths"], slice(count)),
                _strings(group["reasons"], slice(count)),
                strict=True,
            )
        )

    @property
    def ignored(self) -> list[tuple[str, str]]:
        """(path, reason) of the files the input index left out (none recorded in
        schema version 1)."""
        if "ignored" not in self._file:
            return []
        group = self._file["ignored"]
        return list(
            zip(_strings(group["paths"]), _strings(group["reasons"]), strict=True)
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
    an interrupted merge never leaves a half-merged store behind. The merge holds
    the output's writer lock, as an extraction does.
    """
    output = Path(output)
    if not shard_paths:
        raise TLError("No shards to merge.")
    output.parent.mkdir(parents=True, exist_ok=True)
    with locking.acquire(output, "merge"):
        refuse_foreign_file(output)
        if output.exists() and not overwrite:
            raise TLError(
                f"{str(output)!r} exists; pass overwrite=True (--overwrite) to replace "
                f"it."
            )
        return merge_into(shard_paths, output)


def merge_into(shard_paths: Sequence[str | Path], output: Path) -> Path:
    """The merge itself (see `merge_stores`), for a caller that holds the output's
    writer lock and has decided that `output` may be replaced."""
    stores = [FeatureStore(path) for path in shard_paths]
    try:
        _check_shards(stores)
        stores.sort(key=lambda store: store.shard["index"])
        temporary = output.with_name(output.name + ".merging")
        _copy_shards(stores, temporary)
        temporary.replace(output)
    finally:
        for store in stores:
            store.close()
    return output


def _copy_shards(stores: list[FeatureStore], path: Path) -> None:
    first = stores[0]
    writer = StoreWriter.create(
        path,
        settings=first.settings,
        provenance={**first.provenance, "merged_from": [str(s.path) for s in stores]},
        layers=first.layer_info,
        class_names=first.class_names,
        num_images=sum(store.num_images for store in stores),
        index_sha256=first.index_sha256,
        compression=first._dataset(first.layers[0]).compression,
        ignored=first.ignored,
    )
    with writer:
        done = 0
        for store in stores:
            handle = store._file
            for start in range(0, len(store), _MERGE_BLOCK_ROWS):
                rows = slice(start, min(start + _MERGE_BLOCK_ROWS, len(store)))
                writer.write_batch(
                    {key: store.read(key, rows) for key in store.layers},
                    handle["positions"][rows],
                    handle["labels"][rows],
                    _strings(handle["paths"], rows),
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


def _check_shards(stores: list[FeatureStore]) -> None:
    first = stores[0]
    for store in stores:
        if store.shard is None:
            raise TLError(f"{str(store.path)!r} is not a shard (no shard index).")
        differences = identity_differences(first.settings, store.settings)
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
