"""The HDF5 feature store on its own: schema, appends, resume truncation, readers."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from tl.errors import TLError
from tl.store import FeatureStore, StoreWriter

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
