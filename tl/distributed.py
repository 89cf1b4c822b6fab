"""Dask: extraction shards and classifier searches on a cluster (optional extra).

`pip install 'tl[dask]'`. A client is given as `local:N` (a `LocalCluster` of N
single-threaded worker processes on this machine), as a scheduler address
(`tcp://host:8786`), or as a `distributed.Client` made by the caller (dask-jobqueue,
Kubernetes, `dask_cuda.LocalCUDACluster`, ...). Workers must see the images and the
output folder at the same paths as the client (one machine, or a shared file system).

Extraction (`extract`): the client holds the output's writer lock for the whole run,
splits the index into about `SHARDS_PER_WORKER` shards per worker thread and submits
a task for each shard that is not complete. A task writes its shard store under
`<output>.shards/`, holding that store's lock, with an extractor built once per
worker process. A worker that dies takes its task with it and the scheduler runs the
task again elsewhere: it resumes the shard after its last committed batch. Workers
report each committed batch (Dask events), which the client shows as images per
second over all of them. Once every shard is complete, the client merges them into
`output`, the store a single process would have written, and removes the folder.

Classifier searches (`search_backend`, `StoreRows`): scikit-learn's CV fits run
through joblib's Dask backend, and each worker reads the rows it searches on from
the feature store itself, so the codes are never pickled into the tasks.

This module is the only one that imports Dask, and only when it is used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import numpy as np
from tqdm.auto import tqdm

from tl.errors import TLError
from tl.locking import acquire
from tl.store import FeatureStore, merge_into, refuse_foreign_file

if TYPE_CHECKING:  # Dask and TensorFlow are imported only when used
    from distributed import Client

    from tl.features import ExtractionResult, ExtractionSettings, Extractor
    from tl.images import ImageIndex

log = logging.getLogger("tl")

SHARDS_PER_WORKER = 4  # more shards than workers: a slow or lost worker delays less
INSTALL = "pip install 'tl[dask]'"
_CONNECT_SECONDS = 10
_WORKERS_SECONDS = 60  # how long a scheduler may have no worker before we give up
_POLL_SECONDS = 0.2
_SHARD_NAME = re.compile(r"shard-(\d+)-of-(\d+)\.h5")


def _distributed():
    """The `distributed` package, or a one-line TLError naming the extra."""
    try:
        import distributed
    except ImportError as error:
        raise TLError(
            f"Running on Dask needs the optional extra: {INSTALL} ({error})."
        ) from None
    return distributed


# ---------------------------------------------------------------------------------
# Clients


@contextlib.contextmanager
def connected(client: Client | str) -> Iterator[Client]:
    """A `distributed.Client` for `client`, closed afterwards if made here.

    Args:
        client: a `distributed.Client` (used as it is), `"local:N"` (a LocalCluster
            of N single-threaded worker processes, for the duration) or a
            scheduler address such as `"tcp://host:8786"`.
    """
    distributed = _distributed()
    if isinstance(client, distributed.Client):
        yield client
        return
    spec = check_client(client)
    if spec.startswith("local:"):
        with _local_cluster(distributed, int(spec.removeprefix("local:"))) as made:
            yield made
        return
    _check_reachable(spec)
    try:
        made = distributed.Client(spec, timeout=_CONNECT_SECONDS)
    except Exception as error:  # anything the connection raises is one line
        raise TLError(
            f"Cannot connect to the Dask scheduler at {spec!r} "
            f"({_first_line(error)}); check the address, or start one with `dask "
            f"scheduler` and its workers with `dask worker {spec}`."
        ) from None
    with made:
        yield made


def check_client(client: Client | str) -> str:
    """Refuse at once, in one line, a `client` that cannot work: Dask missing, or a
    cluster that is neither `local:N` nor an address. Returns the cluster as text."""
    distributed = _distributed()
    if isinstance(client, distributed.Client):
        return str(client.scheduler.address)
    spec = str(client).strip()
    local = re.fullmatch(r"local:(\d+)", spec)
    if local and int(local[1]) < 1:
        raise TLError(f"local:N needs at least one worker, got {spec!r}.")
    if not local and "://" not in spec:
        raise TLError(
            f"Unknown Dask cluster {spec!r}: give local:N (N worker processes on this "
            f"machine) or a scheduler address such as tcp://host:8786."
        )
    return spec


@contextlib.contextmanager
def _local_cluster(distributed, workers: int) -> Iterator:
    """N single-threaded worker processes here. Each one's TensorFlow keeps its
    thread per core: on 2 cores, 2 workers ran 1.06x one process that way, 0.72x
    to 0.88x with one TensorFlow thread each (bench/dask_extraction.py)."""
    cluster = distributed.LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,  # spawned processes: TensorFlow cannot be forked
        dashboard_address=None,
        # TensorFlow exits slowly; the nanny's complaints about it mean nothing
        silence_logs=logging.CRITICAL,
    )
    try:
        with distributed.Client(cluster) as client:
            yield client
    finally:
        cluster.close()


def _check_reachable(spec: str) -> None:
    """Refuse at once a TCP scheduler address that nothing answers (Dask itself
    would keep retrying until its timeout)."""
    parts = urlsplit(spec)
    if parts.scheme != "tcp" or not parts.hostname:
        return
    try:
        port = parts.port or 8786
        socket.create_connection((parts.hostname, port), _CONNECT_SECONDS).close()
    except (OSError, ValueError) as error:
        raise TLError(
            f"Cannot reach the Dask scheduler at {spec!r} ({_first_line(error)}); "
            f"check the address, or start one with `dask scheduler` and its workers "
            f"with `dask worker {spec}`."
        ) from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _worker_threads(client: Client) -> int:
    """Threads over all workers, waiting a while for a first worker to join."""
    if not client.nthreads():
        try:
            client.wait_for_workers(1, timeout=_WORKERS_SECONDS)
        except Exception:  # a timeout, whatever its class in this version
            raise TLError(
                f"No Dask worker joined the scheduler at {client.scheduler.address} "
                f"within {_WORKERS_SECONDS} s; start some with `dask worker "
                f"{client.scheduler.address}`."
            ) from None
    return sum(client.nthreads().values())


def _task_resources(client: Client) -> dict | None:
    """`{"GPU": 1}` when workers advertise GPUs (`dask worker --resources GPU=1`),
    so that each shard runs on a GPU of its own; None otherwise."""
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    if any("GPU" in (worker.get("resources") or {}) for worker in workers):
        return {"GPU": 1}
    return None


# ---------------------------------------------------------------------------------
# Extraction


def shard_folder(output: str | Path) -> Path:
    """Where a Dask extraction keeps the shard stores of `output`."""
    output = Path(output)
    return output.with_name(output.name + ".shards")


@dataclasses.dataclass(frozen=True)
class Shard:
    """One shard of a Dask extraction and what its store holds already."""

    index: int
    count: int
    path: Path
    start: int
    stop: int
    rows: int = 0
    done: int = 0
    complete: bool = False


def extract(
    source: str | Path,
    output: str | Path,
    settings: ExtractionSettings,
    *,
    client: Client | str,
    batch_size: int = 32,
    compression: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    on_batch: Callable[[int, int], None] | None = None,
    keep_shards: bool = False,
) -> ExtractionResult:
    """`tl.features.extract` on a Dask cluster; see the module docstring.

    Every shard that is complete is kept, one that is half done resumes, and an
    output that is complete already is left alone, so the same call finishes an
    interrupted run. Shards found in the folder keep their split whatever the
    number of workers now. `overwrite` starts over (the old output stays until the
    new one replaces it); `keep_shards` keeps the shard folder after the merge.

    Returns:
        An `ExtractionResult`; its seconds and images per second are those of the
        shards' extraction over all workers (the merge is logged apart).
    """
    from tl import features
    from tl.images import index_images

    check_client(client)
    output = Path(output)
    extractor = features.load_extractor(settings)  # bad settings fail here
    index = index_images(source, extractor.settings.labels)
    output.parent.mkdir(parents=True, exist_ok=True)
    with acquire(output, "extraction"):
        refuse_foreign_file(output)
        if not overwrite and _extracted_already(output, extractor, index):
            log.info("%s is already complete; nothing to do.", output)
            return features.finished_result(output, extractor.settings, 0, 0.0)
        folder = shard_folder(output)
        if overwrite:
            _remove_shards(folder)
        with connected(client) as client:
            threads = _worker_threads(client)
            shards = _plan(folder, extractor, index, SHARDS_PER_WORKER * threads)
            _announce(extractor, index, shards, threads, output)
            # An engine that converts or calibrates the model does it once, here, and
            # logs its int8 check; workers on this host then read it from its cache.
            extractor.compiled  # noqa: B018 (compiles it)
            job = _ShardJob(
                str(Path(source).expanduser().resolve()),
                extractor.settings,
                compression,
                batch_size,
                f"tl-extraction-{uuid.uuid4().hex}",
            )
            seconds = _run_shards(client, shards, job, index, progress, on_batch)
            _until_complete(client, folder, extractor, index, job)
        began = time.perf_counter()
        merge_into([shard.path for shard in shards], output)
        log.info(
            "merged %d shards into %s in %.1f s",
            len(shards),
            output,
            time.perf_counter() - began,
        )
        if not keep_shards:
            _remove_shards(folder)
        processed = len(index) - sum(shard.done for shard in shards)
        return features.finished_result(output, extractor.settings, processed, seconds)


def _extracted_already(output: Path, extractor: Extractor, index: ImageIndex) -> bool:
    """True when `output` holds this extraction, complete; refuses one with other
    settings, or a single-process run that was interrupted."""
    from tl import features

    if not output.exists():
        return False
    with FeatureStore(output, require_complete=False) as existing:
        features.check_same_extraction(existing, extractor, index, len(index), None)
        if existing.complete:
            return True
    raise TLError(
        f"{str(output)!r} holds an interrupted single-process extraction: finish it "
        f"with the same command without --dask, or pass --overwrite to extract it "
        f"again on Dask."
    )


def _plan(
    folder: Path, extractor: Extractor, index: ImageIndex, wanted: int
) -> list[Shard]:
    """The shards of this run: the split found in `folder` if any (its stores are
    checked against this extraction), else `wanted` shards (at most one per image)."""
    from tl import features

    if folder.exists() and not folder.is_dir():
        raise TLError(
            f"{str(folder)!r} is not a folder; a Dask extraction keeps its shards "
            f"there. Move it away, or choose another --output."
        )
    folder.mkdir(exist_ok=True)
    counts = sorted(
        {int(m[2]) for p in folder.iterdir() if (m := _SHARD_NAME.fullmatch(p.name))}
    )
    if len(counts) > 1:
        raise TLError(
            f"{str(folder)!r} holds shards of several splits ({counts} shards); pass "
            f"--overwrite to start over."
        )
    count = counts[0] if counts else max(1, min(wanted, len(index)))
    shards = []
    for number in range(count):
        path = folder / f"shard-{number:05d}-of-{count:05d}.h5"
        start, stop = features.shard_range(len(index), (number, count))
        shard = Shard(number, count, path, start, stop)
        if path.exists():
            refuse_foreign_file(path)
            shard = _stored_progress(shard, extractor, index)
        shards.append(shard)
    return shards


def _stored_progress(shard: Shard, extractor: Extractor, index: ImageIndex) -> Shard:
    """`shard` with what its store holds; a store that cannot be read is extracted
    again (a shard is tl's own intermediate file), one of another extraction is
    refused."""
    from tl import features

    try:
        existing = FeatureStore(shard.path, require_complete=False)
    except TLError:
        log.warning("%s cannot be read; it is extracted again", shard.path)
        return shard
    with existing:
        features.check_same_extraction(
            existing,
            extractor,
            index,
            shard.stop - shard.start,
            {"index": shard.index, "count": shard.count},
        )
        return dataclasses.replace(
            shard,
            rows=len(existing),
            done=existing.images_done,
            complete=existing.complete,
        )


def _announce(
    extractor: Extractor,
    index: ImageIndex,
    shards: list[Shard],
    threads: int,
    output: Path,
) -> None:
    """Log the plan and refuse a run whose shards and merged store do not fit."""
    from tl import features

    layers = extractor.layer_info()
    needed = features.codes_bytes(layers, len(index), 0, index.paths)  # merged
    for shard in shards:
        needed += features.codes_bytes(
            layers,
            shard.stop - shard.start,
            shard.rows,
            index.paths[shard.start + shard.done : shard.stop],
        )
    done = sum(shard.done for shard in shards)
    features.describe_plan(extractor, index, len(index), done, needed)
    log.info(
        "on Dask: %d shards over %d worker threads (%d complete), in %s",
        len(shards),
        threads,
        sum(shard.complete for shard in shards),
        shard_folder(output),
    )
    features.check_disk(Path(output), needed)


@dataclasses.dataclass(frozen=True)
class _ShardJob:
    """What every shard task of one run shares."""

    source: str
    settings: ExtractionSettings  # resolved (image size filled in)
    compression: str | None
    batch_size: int
    topic: str  # of the progress events


def _until_complete(
    client: Client,
    folder: Path,
    extractor: Extractor,
    index: ImageIndex,
    job: _ShardJob,
    rounds: int = 3,
) -> None:
    """Return once every shard store of `folder` is complete.

    A task can end without its shard being complete (a task lost with its worker
    and reported done, say): the stores, not the futures, say what is finished, and
    such shards are extracted again (they resume), up to `rounds` times.
    """
    for _ in range(rounds):
        shards = _plan(folder, extractor, index, len(index))
        unfinished = [shard for shard in shards if not shard.complete]
        if not unfinished:
            return
        log.warning(
            "%d shard(s) came back incomplete (%s); extracting them again",
            len(unfinished),
            ", ".join(str(shard.index) for shard in unfinished),
        )
        _run_shards(client, shards, job, index, progress=False, on_batch=None)
    raise TLError(
        f"Shards of {str(folder)!r} stayed incomplete after {rounds} more attempts; "
        f"the shards done so far are kept: re-run the same command to resume."
    )


def _run_shards(
    client: Client,
    shards: list[Shard],
    job: _ShardJob,
    index: ImageIndex,
    progress: bool,
    on_batch: Callable[[int, int], None] | None,
) -> float:
    """Extract the shards that are not complete on the cluster, showing progress
    over all of them; returns the seconds taken."""
    todo = [shard for shard in shards if not shard.complete]
    if not todo:
        return 0.0
    done = {shard.index: shard.done for shard in shards}
    total = sum(shard.stop - shard.start for shard in shards)
    lock = threading.Lock()

    def on_event(event) -> None:
        _, (number, images_done) = event
        with lock:
            done[number] = max(done[number], images_done)

    client.subscribe_topic(job.topic, on_event)
    began = time.perf_counter()
    index_data = client.scatter(index, broadcast=True, hash=False)
    resources = _task_resources(client)
    pending = {
        client.submit(
            _extract_shard,
            job,
            shard,
            index_data,
            key=f"tl-shard-{shard.index}-of-{shard.count}-{job.topic[-12:]}",
            pure=False,
            resources=resources,
        ): shard
        for shard in todo
    }
    try:
        with tqdm(
            total=total,
            initial=sum(done.values()),
            unit="img",
            disable=not progress,
            smoothing=0.1,
            dynamic_ncols=True,
        ) as bar:
            while pending:
                time.sleep(_POLL_SECONDS)
                for future in [future for future in pending if future.done()]:
                    shard = pending.pop(future)
                    _raise_failure(future, shard)
                    with lock:
                        done[shard.index] = shard.stop - shard.start
                now = sum(done.values())
                if now != bar.n:
                    bar.update(now - bar.n)
                    if on_batch:
                        on_batch(now, total)
    finally:
        client.cancel(list(pending))
        client.unsubscribe_topic(job.topic)
    return time.perf_counter() - began


def _raise_failure(future, shard: Shard) -> None:
    """Re-raise what stopped a shard task; a task that killed its workers over and
    over becomes one line."""
    if future.status != "error":
        return
    error = future.exception()
    if isinstance(error, _distributed().KilledWorker):
        raise TLError(
            f"Shard {shard.index} of {shard.count} lost its worker every time it ran "
            f"(out of memory? see the workers' logs); the shards done so far are kept "
            f"in {str(shard.path.parent)!r}: re-run the same command to resume."
        )
    raise error


def _remove_shards(folder: Path) -> None:
    """Delete the shard stores (and locks) of `folder`, then the folder if nothing
    else is in it."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        name = path.name.removesuffix(".lock")
        if _SHARD_NAME.fullmatch(name):
            path.unlink()
    with contextlib.suppress(OSError):
        folder.rmdir()


# Worker side ---------------------------------------------------------------------

_extractors: dict[str, Extractor] = {}  # per worker process: settings JSON -> Extractor
_extractors_lock = threading.Lock()


def _worker_extractor(settings: ExtractionSettings) -> Extractor:
    """The extractor of `settings`, built once per worker process (GPU memory
    growth on); only the latest one is kept."""
    from tl import features
    from tl._tensorflow import start_tensorflow

    key = json.dumps(settings.to_json(), sort_keys=True)
    with _extractors_lock:
        if key not in _extractors:
            start_tensorflow()
            _extractors.clear()
            _extractors[key] = features.load_extractor(settings)
        return _extractors[key]


def _extract_shard(job: _ShardJob, shard: Shard, index: ImageIndex) -> None:
    """A task: write (or resume) one shard store, reporting each committed batch."""
    from distributed import get_worker

    from tl import features

    worker = get_worker()
    extractor = _worker_extractor(job.settings)

    def report(images_done: int, _total: int) -> None:
        worker.log_event(job.topic, [shard.index, images_done])

    with acquire(shard.path, "extraction shard"):
        features.write_codes(
            shard.path,
            job.source,
            extractor,
            index,
            shard=(shard.index, shard.count),
            compression=job.compression,
            start_over=True,  # a shard that cannot be resumed is extracted again
            batch_size=job.batch_size,
            progress=False,
            on_batch=report,
            announce=False,
        )


# ---------------------------------------------------------------------------------
# Classifier searches


@contextlib.contextmanager
def search_backend(client: Client) -> Iterator[None]:
    """Run joblib's parallel work (scikit-learn's CV fits) on `client`'s workers."""
    _distributed()
    import joblib

    with joblib.parallel_config(backend="dask", client=client):
        yield


class StoreRows:
    """Rows of one layer of a feature store, read where they are indexed.

    What a CV search on Dask gets in place of its codes: it pickles as a path, a
    layer and row numbers, and a worker that indexes it reads those rows from the
    store once (then from memory, for every fit of the search). It looks to
    scikit-learn's searches like the float64 matrix `tl.classifiers.as_features`
    makes of the rows.
    """

    def __init__(self, store: FeatureStore, layer: str, rows: np.ndarray):
        info = next(i for i in store.layer_info if i["key"] == layer)
        self.path = str(Path(store.path).resolve())
        self.layer = layer
        self.rows = np.asarray(rows)
        self.shape = (len(self.rows), int(np.prod(info["shape"])))
        self.ndim = 2
        self.dtype = np.dtype(np.float64)
        stat = os.stat(self.path)
        self.key = (
            self.path,
            stat.st_mtime_ns,
            stat.st_size,
            layer,
            hashlib.sha256(self.rows.tobytes()).hexdigest(),
        )

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, selection) -> np.ndarray:
        return _rows_codes(self)[selection]


_rows_cache: dict[tuple, np.ndarray] = {}  # per process: the latest rows read
_rows_lock = threading.Lock()


def _rows_codes(rows: StoreRows) -> np.ndarray:
    from tl.classifiers import as_features

    with _rows_lock:
        if rows.key not in _rows_cache:
            _rows_cache.clear()  # one search at a time: keep only its rows
            with FeatureStore(rows.path) as store:
                codes = store.read(rows.layer, rows.rows)
            _rows_cache[rows.key] = as_features(codes)
        return _rows_cache[rows.key]
