"""extract_features.py, called through main([...]) as a user would call it."""

from __future__ import annotations

import numpy as np
from conftest import SMALL

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
