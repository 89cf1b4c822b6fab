"""The HDF5 feature store on its own: schema, appends, resume truncation, readers."""

from __future__ import annotations

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from tl.errors import TLError
from tl.locking import acquire
from tl.store import FeatureStore, StoreWriter, estimated_bytes, merge_stores

LAYERS = [
    {"key": "a", "shape": [3], "dtype": "float32"},
    {"key": "b", "shape": [2, 2, 1], "dtype": "float16"},
]


def _create(path, compression=None):
    return StoreWriter.create(
        path,
        settings={"backbone": "x"},
        provenance={"who": "test"},
        layers=LAYERS,
        class_names=["neg", "pos"],
        num_images=6,
        index_sha256="abc",
        compression=compression,
    )


def _batch(rows):
    rows = np.asarray(rows)
    return (
        {
            "a": np.stack([rows * 1.0] * 3, 1),
            "b": np.ones((len(rows), 2, 2, 1)) * rows[:, None, None, None],
        },
        rows,
        rows % 2,
        [f"img{r}.png" for r in rows],
    )


@pytest.mark.parametrize("compression", [None, "lzf", "gzip"])
def test_rows_round_trip_with_metadata(tmp_path, compression):
    path = tmp_path / "s.h5"
    with _create(path, compression) as writer:
        writer.write_batch(*_batch([0, 1]), skipped=[], images_done=2)
        writer.write_batch(
            *_batch([3, 4]), skipped=[(2, "img2.png", "broken")], images_done=5
        )
        writer.write_batch(
            *_batch([]), skipped=[(5, "img5.png", "empty")], images_done=6
        )
        writer.finish()
    with FeatureStore(path) as store:
        assert len(store) == 4 and store.complete
        assert store.layers == ["a", "b"]
        np.testing.assert_array_equal(store.read("a")[:, 0], [0, 1, 3, 4])
        assert (
            store.read("b").shape == (4, 2, 2, 1)
            and store.read("b").dtype == np.float16
        )
        np.testing.assert_array_equal(store.read("a", np.array([3, 0]))[:, 0], [4, 0])
        chunks = list(store.iter_chunks("a", chunk_rows=3))
        assert [len(c) for c in chunks] == [3, 1]
        picked = list(store.iter_rows("a", np.array([3, 1]), chunk_rows=2))
        assert [rows.tolist() for rows, _ in picked] == [[1], [3]]
        np.testing.assert_array_equal(
            np.concatenate([c for _, c in picked]), store.read("a")[[1, 3]]
        )
        assert store.labels.tolist() == [0, 1, 1, 0]
        assert store.paths == ["img0.png", "img1.png", "img3.png", "img4.png"]
        assert store.skipped == [(2, "img2.png", "broken"), (5, "img5.png", "empty")]
        assert store.class_names == ["neg", "pos"]
        assert store.settings == {"backbone": "x"}
        with pytest.raises(TLError, match=r"Unknown layer 'c'.*Layers: a, b"):
            store.read("c")


def test_resume_drops_rows_past_the_last_commit(tmp_path):
    path = tmp_path / "s.h5"
    writer = _create(path)
    writer.write_batch(*_batch([0, 1]), skipped=[], images_done=2)
    # a batch written but not committed: data appended, counters not moved
    handle = writer._file
    for name in ("features/a", "features/b", "labels", "positions", "paths"):
        handle[name].resize(3, axis=0)
    handle["skipped/positions"].resize(1, axis=0)
    handle["skipped/positions"][0] = 2
    writer.close()
    with FeatureStore(path, require_complete=False) as store:
        assert len(store) == 2
    resumed = StoreWriter.resume(path)
    assert resumed.images_done == 2 and resumed.rows == 2
    assert resumed._file["features/a"].shape[0] == 2
    assert resumed._file["skipped/positions"].shape[0] == 0
    resumed.close()


def test_incomplete_newer_and_foreign_files_are_refused(tmp_path):
    path = tmp_path / "s.h5"
    _create(path).close()
    with pytest.raises(TLError, match=r"incomplete \(0 of 6 images processed\)"):
        FeatureStore(path)
    with h5py.File(path, "r+") as handle:
        handle.attrs["schema_version"] = 99
    with pytest.raises(TLError, match="schema version 99"):
        FeatureStore(path, require_complete=False)
    with h5py.File(tmp_path / "other.h5", "w") as handle:
        handle["x"] = 1
    with pytest.raises(TLError, match="not a tl feature store"):
        FeatureStore(tmp_path / "other.h5")
    (tmp_path / "text.h5").write_text("hi")
    with pytest.raises(TLError, match=r"not a tl feature store \(not an HDF5 file\)"):
        FeatureStore(tmp_path / "text.h5")
    damaged = tmp_path / "damaged.h5"
    data = bytearray(path.read_bytes())
    data[8:64] = b"\xff" * 56  # the superblock after the signature
    damaged.write_bytes(bytes(data))
    with pytest.raises(TLError, match=r"Cannot open .* damaged.*--overwrite"):
        FeatureStore(damaged)
    with pytest.raises(TLError, match="does not exist"):
        FeatureStore(tmp_path / "none.h5")


@pytest.mark.parametrize(
    "rows",
    [
        np.array([4, 1, 1, 3]),  # unsorted, repeated
        [2, 2, 2],
        np.array([-1, 0]),
        np.array([True, False, True, True, False]),  # a mask, not rows 0 and 1
        slice(1, None),
        slice(None, None, 2),
        slice(None, None, -1),
        slice(3, 99),
        np.array([], int),
    ],
)
def test_read_selects_rows_as_numpy_indexing_does(tmp_path, rows):
    path = tmp_path / "s.h5"
    with _create(path) as writer:
        writer.write_batch(*_batch([0, 1, 2, 3, 4]), skipped=[], images_done=6)
        writer.finish()
    with FeatureStore(path) as store:
        full = store.read("a")
        np.testing.assert_array_equal(store.read("a", rows), full[rows])


def test_only_committed_rows_are_seen(tmp_path):
    path = tmp_path / "s.h5"
    writer = _create(path)
    writer.write_batch(*_batch([0, 1]), skipped=[(2, "img2.png", "bad")], images_done=3)
    handle = writer._file  # a batch appended but not committed
    for name in ("features/a", "features/b", "labels", "positions", "paths"):
        handle[name].resize(4, axis=0)
    handle["skipped/positions"].resize(2, axis=0)
    handle["skipped/paths"].resize(2, axis=0)
    handle["skipped/reasons"].resize(2, axis=0)
    writer.close()
    with FeatureStore(path, require_complete=False) as store:
        assert len(store.read("a")) == len(store.read("a", slice(None))) == 2
        assert len(store.paths) == len(store.labels) == 2
        assert store.skipped == [(2, "img2.png", "bad")]


def test_resume_refuses_a_store_whose_committed_rows_are_missing(tmp_path):
    path = tmp_path / "s.h5"
    writer = _create(path)
    writer.write_batch(*_batch([0, 1, 2]), skipped=[], images_done=3)
    writer.close()
    with h5py.File(path, "r+") as handle:
        handle["labels"].resize(1, axis=0)
    with pytest.raises(TLError) as refused:
        StoreWriter.resume(path)
    message = str(refused.value)
    assert "is damaged (labels holds 1 rows of the 3 committed)" in message
    assert "Start over with --overwrite" in message and "\n" not in message


def test_version_1_store_still_reads(tmp_path):
    path = tmp_path / "s.h5"
    with _create(path) as writer:
        writer.write_batch(
            *_batch([0, 1]), skipped=[(2, "img2.png", "broken")], images_done=3
        )
        writer.finish()
    with h5py.File(path, "r+") as handle:  # what schema version 1 wrote
        del handle["ignored"]
        del handle.attrs["skipped_rows"]
        handle.attrs["schema_version"] = 1
    with FeatureStore(path) as store:
        assert store.ignored == []
        assert store.skipped == [(2, "img2.png", "broken")]
        np.testing.assert_array_equal(store.read("a")[:, 0], [0, 1])


def test_ignored_files_are_kept_with_their_reasons(tmp_path):
    path = tmp_path / "s.h5"
    ignored = [("loose.png", "not inside a class folder"), ("a/x.tif", "unsupported")]
    writer = StoreWriter.create(
        path,
        settings={},
        provenance={},
        layers=LAYERS,
        class_names=["neg", "pos"],
        num_images=0,
        index_sha256="abc",
        ignored=ignored,
    )
    writer.finish()
    with FeatureStore(path) as store:
        assert store.ignored == ignored


@pytest.mark.parametrize("images", [7, 10_000])
def test_estimated_size_is_within_a_quarter_of_the_file(tmp_path, images):
    """The estimate that the free-space checks use, against a store written in
    batches of 32 the way an extraction writes it (3 layers, realistic paths)."""
    layers = [
        {"key": key, "shape": [width], "dtype": "float32"}
        for key, width in (("block3_pool", 256), ("block4_pool", 512), ("last", 512))
    ]
    paths = [f"class_{i % 37:02d}/IMG_2019{i:06d}_holiday.jpg" for i in range(images)]
    path = tmp_path / "s.h5"
    writer = StoreWriter.create(
        path,
        settings={"backbone": "vgg16", "layers": ["block3", "block4", "last"]},
        provenance={"tl_version": "0.1.0", "source": "/data/" + "x" * 1000},
        layers=layers,
        class_names=[f"class_{i:02d}" for i in range(37)],
        num_images=images,
        index_sha256="0" * 64,
    )
    rng = np.random.default_rng(0)
    with writer:
        for start in range(0, images, 32):
            rows = np.arange(start, min(start + 32, images))
            writer.write_batch(
                {
                    info["key"]: rng.random((len(rows), info["shape"][0]), np.float32)
                    for info in layers
                },
                rows,
                rows % 37,
                paths[start : start + 32],
                [],
                rows[-1] + 1,
            )
        writer.finish()
    estimate = estimated_bytes(
        layers, images, images, sum(len(p.encode()) for p in paths)
    )
    size = os.path.getsize(path)
    print(f"{images} images: estimated {estimate} bytes, file {size} bytes")
    assert 0.75 * size <= estimate <= 1.25 * size


def test_store_held_open_for_writing_elsewhere_is_named_so(tmp_path):
    """HDF5 refuses to open a file another process writes ("unable to lock file");
    without a tl writer's lock file, that is all there is to say."""
    path = tmp_path / "s.h5"
    _create(path).close()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import h5py, sys; f = h5py.File({str(path)!r}, 'r+'); "
            f"print('open', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "open\n"
        with pytest.raises(TLError) as refused:
            FeatureStore(path, require_complete=False)
        message = str(refused.value)
        assert "is open for writing by another process" in message
        assert "--overwrite" not in message
    finally:
        holder.communicate("")


def test_merge_holds_the_writer_lock_and_keeps_foreign_files(tmp_path):
    output = tmp_path / "merged.h5"
    with (
        acquire(output, "extraction"),
        pytest.raises(TLError, match="being written by another extraction"),
    ):
        merge_stores([tmp_path / "shard0.h5"], output, overwrite=True)
    output.write_text("my notes")
    with pytest.raises(TLError, match=r"not a tl feature store .* not be replaced"):
        merge_stores([tmp_path / "shard0.h5"], output, overwrite=True)
    assert output.read_text() == "my notes"


def _create_shard(path, index, count, num_images):
    return StoreWriter.create(
        path,
        settings={"backbone": "x"},
        provenance={},
        layers=LAYERS,
        class_names=["neg", "pos"],
        num_images=num_images,
        index_sha256="abc",
        shard={"index": index, "count": count},
    )


def test_resumed_version_1_shard_keeps_its_committed_skipped_files(tmp_path):
    """Shard 1 of 2 covers positions 6..11. Its skipped positions count from the
    start of the index, its images_done from 6: a version 1 file (no skipped_rows
    counter) kept none of them on resume."""
    path = tmp_path / "shard1.h5"
    writer = _create_shard(path, 1, 2, 6)
    writer.write_batch(*_batch([7]), skipped=[(6, "img6.png", "bad")], images_done=2)
    writer.write_batch(*_batch([8]), skipped=[(9, "img9.png", "bad")], images_done=4)
    handle = writer._file  # a batch appended but not committed: row 10, 11 skipped
    for name in ("features/a", "features/b", "labels", "positions", "paths"):
        handle[name].resize(3, axis=0)
    handle["positions"][2] = 10
    for name in ("skipped/positions", "skipped/paths", "skipped/reasons"):
        handle[name].resize(3, axis=0)
    handle["skipped/positions"][2] = 11
    writer.close()
    with h5py.File(path, "r+") as handle:  # what schema version 1 wrote
        del handle["ignored"]
        del handle.attrs["skipped_rows"]
        handle.attrs["schema_version"] = 1
    with FeatureStore(path, require_complete=False) as partial:
        assert [p for p, _, _ in partial.skipped] == [6, 9]
    resumed = StoreWriter.resume(path)
    resumed.write_batch(*_batch([10, 11]), skipped=[], images_done=6)
    resumed.finish()
    with FeatureStore(path) as store:
        assert store.positions.tolist() == [7, 8, 10, 11]
        assert store.skipped == [(6, "img6.png", "bad"), (9, "img9.png", "bad")]


def test_merge_copies_every_block_of_rows_once_in_order(tmp_path, monkeypatch):
    import tl.store

    monkeypatch.setattr(tl.store, "_MERGE_BLOCK_ROWS", 2)
    shards = []
    for index, (rows, skipped) in enumerate([([0, 1, 3, 4], 2), ([5, 6, 7, 9], 8)]):
        shards.append(tmp_path / f"shard{index}.h5")
        with _create_shard(shards[-1], index, 2, 5) as writer:
            writer.write_batch(
                *_batch(rows),
                skipped=[(skipped, f"img{skipped}.png", "bad")],
                images_done=5,
            )
            writer.finish()
    merged = merge_stores(shards[::-1], tmp_path / "merged.h5")
    with FeatureStore(merged) as store:
        expected = [0, 1, 3, 4, 5, 6, 7, 9]
        assert store.positions.tolist() == expected
        assert store.paths == [f"img{r}.png" for r in expected]
        assert store.labels.tolist() == [r % 2 for r in expected]
        np.testing.assert_array_equal(store.read("a")[:, 0], expected)
        np.testing.assert_array_equal(store.read("b")[:, 0, 0, 0], expected)
        assert [p for p, _, _ in store.skipped] == [2, 8]
        assert store.num_images == 10 and store.complete
