"""Dask: sharded extraction and classifier searches on a LocalCluster of 2 processes.

One cluster serves the whole module (its workers import TensorFlow once). Without the
`dask` extra these tests skip, except the one that checks the install hint.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import (
    assert_one_line_error,
    assert_same_store,
    blobs,
    settings,
    write_png_tree,
    write_store,
)

import extract_features
from tl import reports
from tl.errors import TLError
from tl.evaluation import compare
from tl.features import extract
from tl.locking import lock_path
from tl.store import FeatureStore

needs_dask = pytest.mark.skipif(
    importlib.util.find_spec("distributed") is None,
    reason="the dask extra is not installed (pip install 'tl[dask]')",
)
LAYERS = ("block2", "block5")
CLI_SETTINGS = ["--weights", "none", "--image-size", "32", "--layers", *LAYERS]


@pytest.fixture(scope="module")
def client():
    from tl.distributed import connected

    with connected("local:2") as client:
        yield client


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """24 images in 3 classes (8 shards of 3 on 2 workers), one of them corrupt,
    and a loose file that the index ignores."""
    root = write_png_tree(
        tmp_path_factory.mktemp("dask") / "images", {"ant": 9, "bee": 7, "cat": 8}
    )
    (root / "bee" / "img_002.png").write_bytes(b"\x89PNG broken")
    (root / "notes.png").write_bytes((root / "ant" / "img_000.png").read_bytes())
    return root


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory):
    """The store a single process writes."""
    path = tmp_path_factory.mktemp("reference") / "codes.h5"
    extract(images, path, settings(layers=LAYERS), batch_size=4, progress=False)
    return path


@needs_dask
def test_cli_on_a_scheduler_address_writes_the_single_process_store(
    client, images, reference, tmp_path
):
    output = tmp_path / "codes.h5"
    address = client.scheduler.address
    assert address.startswith("tcp://")
    code = extract_features.main(
        [str(images), *CLI_SETTINGS, "-o", str(output), "--dask", address, "-q"]
    )
    assert code == 0
    assert_same_store(reference, output)
    with FeatureStore(output) as store:
        assert store.ignored == [("notes.png", "not inside a class folder")]
        assert [path for _, path, _ in store.skipped] == ["bee/img_002.png"]
    assert not (tmp_path / "codes.h5.shards").exists()
    assert not lock_path(output).exists()


def _extraction_topics(dask_scheduler=None) -> list[str]:
    """The topics of the progress events that extractions have sent so far."""
    return [t for t in dask_scheduler.get_events() if t.startswith("tl-extraction-")]


def _reported(client, topics_before: set[str]) -> dict[int, list[int]]:
    """The images done that the workers reported per shard, in the one extraction
    run since `topics_before`."""
    (topic,) = set(client.run_on_scheduler(_extraction_topics)) - topics_before
    reported = {}
    for _, (shard, done) in client.get_events(topic):
        reported.setdefault(shard, []).append(done)
    return reported


@needs_dask
def test_finished_shards_are_never_extracted_again(client, images, reference, tmp_path):
    from distributed import get_task_stream

    output = tmp_path / "codes.h5"
    options = dict(progress=False, client=client, keep_shards=True)
    topics = set(client.run_on_scheduler(_extraction_topics))
    seen = []
    extract(
        images,
        output,
        settings(layers=LAYERS),
        batch_size=1,
        on_batch=lambda done, total: seen.append((done, total)),
        **options,
    )
    shards = sorted((tmp_path / "codes.h5.shards").glob("*.h5"))
    assert len(shards) == 8
    written = output.stat().st_mtime_ns
    # every batch a worker commits is reported, and the progress adds them up
    assert _reported(client, topics) == {shard: [1, 2, 3] for shard in range(8)}
    assert seen[-1] == (24, 24) and seen == sorted(seen)

    with get_task_stream(client) as tasks:
        again = extract(images, output, settings(layers=LAYERS), **options)
    assert tasks.data == [] and again.images_processed == 0
    assert output.stat().st_mtime_ns == written

    output.unlink()  # the merge only: every shard is complete
    shards[5].unlink()  # ...but one
    with get_task_stream(client) as tasks:
        redone = extract(images, output, settings(layers=LAYERS), **options)
    assert [task["key"].split("-of-")[0] for task in tasks.data] == ["tl-shard-5"]
    assert redone.images_processed == 3
    assert_same_store(reference, output)


def _kill_in_the_last_shard_once(flag: str) -> None:
    """In a worker: the task of the last shard (8 of 8) kills its own worker process
    once it has committed 2 of its 3 images, if it can delete `flag` (so, once).
    Late in the run, so that the replacement worker (which would have to import
    TensorFlow first) is seldom needed."""
    from tl.store import StoreWriter

    write_batch = StoreWriter.write_batch

    def killing_write_batch(self, *args, **kwargs):
        write_batch(self, *args, **kwargs)
        if self.path.name.startswith("shard-00007") and self.images_done == 2:
            try:
                os.unlink(flag)
            except FileNotFoundError:
                return
            os.kill(os.getpid(), signal.SIGKILL)

    killing_write_batch.original = write_batch
    StoreWriter.write_batch = killing_write_batch


def _kill_every_shard_task() -> None:
    """In a worker: every shard task kills its worker process as it starts."""
    import tl.distributed

    def kill(settings):
        os.kill(os.getpid(), signal.SIGKILL)

    kill.original = tl.distributed._worker_extractor
    tl.distributed._worker_extractor = kill


def _stop_killing_and_wait(client, timeout: float = 120.0) -> None:
    """Undo the killing hooks, then wait until both workers answer again: a worker
    killed late may still be shutting down or restarting when the test ends, and the
    next test would meet it dying."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            client.wait_for_workers(2, timeout=timeout)
            answers = client.run(_stop_killing)
        except (OSError, TimeoutError):
            answers = {}
        if len(answers) == 2:
            return
        if time.monotonic() > deadline:
            raise TimeoutError("the test cluster did not get its 2 workers back")
        time.sleep(0.5)


def _stop_killing() -> None:
    import tl.distributed
    from tl.store import StoreWriter

    for owner, name in (
        (StoreWriter, "write_batch"),
        (tl.distributed, "_worker_extractor"),
    ):
        function = getattr(owner, name)
        setattr(owner, name, getattr(function, "original", function))


@needs_dask
def test_worker_killed_in_a_shard_is_replaced_and_the_store_is_identical(
    client, images, reference, tmp_path
):
    flag = tmp_path / "kill-once"
    flag.touch()
    pids = set(client.run(os.getpid).values())
    topics = set(client.run_on_scheduler(_extraction_topics))
    client.run(_kill_in_the_last_shard_once, str(flag))
    try:
        result = extract(
            images,
            tmp_path / "codes.h5",
            settings(layers=LAYERS),
            batch_size=1,
            progress=False,
            client=client,
        )
    finally:
        _stop_killing_and_wait(client)
    assert not flag.exists()  # a worker was killed...
    assert len(pids - set(client.run(os.getpid).values())) == 1  # ...and replaced
    assert result.images_processed == 24
    assert_same_store(reference, tmp_path / "codes.h5")
    # the retried shard resumed after its 2 committed images: it reported 3 next,
    # not 1 and 2 again (a report sent just before the kill may be lost)
    reported = _reported(client, topics)
    assert {shard: reported[shard] for shard in range(7)} == {
        shard: [1, 2, 3] for shard in range(7)
    }
    assert reported[7][-1] == 3 and reported[7] == sorted(set(reported[7]))


@needs_dask
def test_shard_that_keeps_killing_its_worker_stops_the_run_in_one_line(
    client, images, tmp_path, capsys
):
    """The scheduler gives up on a task whose workers died `allowed-failures` + 1
    times (3 + 1 by default; 0 + 1 here)."""

    def allow_failures(count, dask_scheduler=None):
        previous, dask_scheduler.allowed_failures = (
            dask_scheduler.allowed_failures,
            count,
        )
        return previous

    client.run(_kill_every_shard_task)
    allowed = client.run_on_scheduler(allow_failures, 0)
    try:
        output = tmp_path / "codes.h5"
        dask = ["--dask", client.scheduler.address, "-q"]
        code = extract_features.main(
            [str(images), *CLI_SETTINGS, "-o", str(output), *dask]
        )
    finally:
        client.run_on_scheduler(allow_failures, allowed)
        _stop_killing_and_wait(client)
    err = capsys.readouterr().err  # after the plan: a failure during the run
    assert code == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: Shard ") and "lost its worker every time" in last
    assert not output.exists() and (tmp_path / "codes.h5.shards").is_dir()


def _comparable(result) -> tuple[pd.DataFrame, list[dict]]:
    """The leaderboard and result rows, without the times they took."""
    table = reports.leaderboard(result).drop(columns="fit_seconds")
    rows = [row for row in result.rows if row["metric"] != "fit_seconds"]
    return table, rows


@needs_dask
@pytest.mark.parametrize("protocol", ["holdout", "cv"])
def test_leaderboard_on_dask_equals_the_local_one(client, tmp_path, protocol):
    codes, labels = blobs(n_per_class=30, dim=16, separation=1.0)
    store = write_store(
        tmp_path / "codes.h5",
        {"low": codes[:, :8], "high": codes},
        labels,
        ["a", "b", "c"],
    )
    options = dict(
        classifiers=("logreg",),
        folds=3,
        protocol=protocol,
        search_rows=60,  # a subsample: the workers read those rows, not all
        progress=False,
    )
    local = compare(store, **options)
    on_dask = compare(store, client=client, **options)
    local_table, local_rows = _comparable(local)
    dask_table, dask_rows = _comparable(on_dask)
    pd.testing.assert_frame_equal(dask_table, local_table)
    assert dask_rows == local_rows
    assert (on_dask.winner.layer, on_dask.winner.classifier) == (
        local.winner.layer,
        local.winner.classifier,
    )

    def rows_read():
        from tl.distributed import _rows_cache

        return [(key[0], key[3], len(codes)) for key, codes in _rows_cache.items()]

    read = [entry for entries in client.run(rows_read).values() for entry in entries]
    assert read and {path for path, _, _ in read} == {str(store.resolve())}
    assert all(rows == 60 for _, _, rows in read)


@needs_dask
def test_unreachable_scheduler_or_unknown_cluster_is_one_line(images, tmp_path, capsys):
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    output = tmp_path / "codes.h5"
    code = extract_features.main(
        [str(images), *CLI_SETTINGS, "-o", str(output), "--dask", address]
    )
    assert_one_line_error(capsys, code, "Cannot reach the Dask scheduler", address)
    assert not output.exists() and not (tmp_path / "codes.h5.shards").exists()
    assert not lock_path(output).exists()

    code = extract_features.main([str(images), "-o", str(output), "--dask", "local"])
    assert_one_line_error(capsys, code, "Unknown Dask cluster 'local'", "local:N")
    code = extract_features.main(
        [str(images), "-o", str(output), "--dask", "local:2", "--shard", "0/2"]
    )
    assert_one_line_error(capsys, code, "--dask", "drop --shard")


def test_dask_options_without_the_extra_name_the_install(
    images, tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if not installed
    output = tmp_path / "codes.h5"
    code = extract_features.main([str(images), "-o", str(output), "--dask", "local:2"])
    assert_one_line_error(capsys, code, "pip install 'tl[dask]'")
    store = write_store(tmp_path / "s.h5", {"a": np.eye(4)}, [0, 0, 1, 1], ["x", "y"])
    with pytest.raises(TLError, match=r"pip install 'tl\[dask\]'"):
        compare(store, client="local:2", progress=False)
