"""extract_features.py, called through main([...]) as a user would call it."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SMALL, assert_one_line_error

import extract_features
from tl.store import FeatureStore

COMMON = ["--backbone", "vgg16", "--weights", "none", "--image-size", str(SMALL), "-q"]


def test_extracts_three_layers_into_the_store(png_tree, tmp_path):
    output = tmp_path / "out.h5"
    code = extract_features.main(
        [str(png_tree), *COMMON, "--layers", "block3", "block4", "block5",
         "--pooling", "avg", "grid:2x2", "max", "--output", str(output)]
    )  # fmt: skip
    assert code == 0
    with FeatureStore(output) as store:
        assert store.layers == ["block3_pool", "block4_pool", "block5_pool"]
        assert store.read("block4_pool").shape == (15, 4 * 512)
        assert store.settings["pooling"] == ["avg", "grid:2x2", "max"]


def test_lists_backbones_and_layers(capsys):
    assert extract_features.main(["--list-backbones"]) == 0
    out = capsys.readouterr().out
    assert "efficientnetv2s" in out and "convnextxlarge" in out
    assert extract_features.main(["--list-layers", "vgg16", "--image-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "block4_pool" in out and "4x4x512" in out


def test_errors_exit_2_with_a_message_before_reading_images(png_tree, tmp_path, capsys):
    output = tmp_path / "out.h5"
    code = extract_features.main(
        [str(png_tree), *COMMON, "--layers", "blok5", "--output", str(output)]
    )
    assert code == 2
    assert "Unknown layer 'blok5' for vgg16" in capsys.readouterr().err
    assert not output.exists()
    code = extract_features.main([str(tmp_path / "missing"), *COMMON])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_resume_flag_and_shards_and_merge(png_tree, tmp_path):
    shards = [str(tmp_path / f"s{i}.h5") for i in range(2)]
    for i, shard in enumerate(shards):
        args = [str(png_tree), *COMMON, "--shard", f"{i}/2", "--output", shard]
        assert extract_features.main(args) == 0
    merged = tmp_path / "merged.h5"
    assert extract_features.main(["--merge", *shards, "--output", str(merged)]) == 0
    single = tmp_path / "single.h5"
    assert extract_features.main([str(png_tree), *COMMON, "--output", str(single)]) == 0
    with FeatureStore(merged) as a, FeatureStore(single) as b:
        assert a.paths == b.paths
        np.testing.assert_allclose(
            a.read("block5_pool"), b.read("block5_pool"), rtol=1e-5
        )
    assert (
        extract_features.main(["--resume", str(single), "-q"]) == 0
    )  # complete: no-op


@pytest.fixture
def no_precision_hint(monkeypatch):
    """This CPU gets a bfloat16 hint line before any run; errors are what is tested."""
    import tl.precision

    monkeypatch.setattr(tl.precision, "half_precision_hint", lambda precision: None)


@pytest.mark.usefixtures("no_precision_hint")
def test_a_file_that_is_not_a_store_is_never_replaced(png_tree, tmp_path, capsys):
    import h5py

    text = tmp_path / "notes.h5"
    text.write_text("my notes")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as handle:
        handle["mine"] = [1, 2, 3]
    for output, reason in ((text, "not an HDF5 file"), (foreign, "format tag")):
        before = output.read_bytes()
        for overwrite in ([], ["--overwrite"]):
            code = extract_features.main(
                [str(png_tree), *COMMON, "--output", str(output), *overwrite]
            )
            line = assert_one_line_error(
                capsys, code, "is not a tl feature store", reason, "not be replaced"
            )
            assert "--overwrite" not in line
            assert output.read_bytes() == before
    # a damaged store (HDF5, but unreadable) is still replaced on request
    damaged = tmp_path / "damaged.h5"
    assert extract_features.main([str(png_tree), *COMMON, "-o", str(damaged)]) == 0
    capsys.readouterr()
    data = bytearray(damaged.read_bytes())
    data[8:64] = b"\xff" * 56
    damaged.write_bytes(bytes(data))
    code = extract_features.main([str(png_tree), *COMMON, "-o", str(damaged)])
    assert_one_line_error(capsys, code, "Cannot open", "damaged", "--overwrite")
    args = [str(png_tree), *COMMON, "-o", str(damaged), "--overwrite"]
    assert extract_features.main(args) == 0
    with FeatureStore(damaged) as store:
        assert len(store) == 15
