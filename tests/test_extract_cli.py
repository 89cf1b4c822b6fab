"""extract_features.py, called through main([...]) as a user would call it."""

from __future__ import annotations

import numpy as np
from conftest import SMALL, assert_one_line_error
from PIL import Image

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


def test_resume_flag_and_shards_and_merge(png_tree, tmp_path, capsys):
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
    before, modified = single.read_bytes(), single.stat().st_mtime_ns
    capsys.readouterr()
    assert extract_features.main(["--resume", str(single), "-q"]) == 0
    assert f"{single} is already complete; nothing to do." in capsys.readouterr().err
    assert single.read_bytes() == before
    assert single.stat().st_mtime_ns == modified


def _random_pixels(seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (SMALL, SMALL, 3), dtype=np.uint8))


def test_tiff_and_webp_give_the_codes_of_the_same_pixels_in_png(tmp_path, capsys):
    images = tmp_path / "images"
    for folder, name, seed in [("ant", "x", 1), ("bee", "y", 2)]:
        (images / folder).mkdir(parents=True)
        _random_pixels(seed).save(images / folder / f"{name}.png")
    _random_pixels(1).save(images / "ant" / "x.tif")
    _random_pixels(2).save(images / "bee" / "y.webp", lossless=True)
    data = (images / "ant" / "x.tif").read_bytes()
    (images / "bee" / "broken.tif").write_bytes(data[: len(data) // 2])
    (images / "bee" / "notes.txt").write_text("not an image")
    _random_pixels(3).save(images / "loose.png")
    output = tmp_path / "out.h5"
    code = extract_features.main(
        [str(images), *COMMON, "--layers", "block2", "--output", str(output)]
    )
    err = capsys.readouterr().err
    assert code == 0, err
    assert "ignored loose.png: not inside a class folder" in err
    assert "ignored bee/notes.txt: not an image file (.txt)" in err
    with FeatureStore(output) as store:
        assert store.paths == ["ant/x.png", "ant/x.tif", "bee/y.png", "bee/y.webp"]
        codes = store.read("block2_pool")
        [(_, path, reason)] = store.skipped
    assert path == "bee/broken.tif"
    assert reason.startswith("cannot decode: image file is truncated")
    assert np.isfinite(codes).all()
    np.testing.assert_allclose(codes[1], codes[0], rtol=1e-6)  # same pixels
    np.testing.assert_allclose(codes[3], codes[2], rtol=1e-6)
    assert not np.allclose(codes[0], codes[2])


def test_csv_header_typo_is_refused_in_one_line(png_tree, tmp_path, capsys):
    listing = tmp_path / "list.csv"
    listing.write_text(f"pth,label\n{png_tree}/ant/img_000.png,ant\n")
    output = tmp_path / "out.h5"
    args = [str(listing), *COMMON, "--output", str(output)]
    code = extract_features.main(args)
    assert_one_line_error(
        capsys, code, str(listing), "'pth', 'label'", "a 'path' column"
    )
    assert not output.exists()


def test_unlabeled_csv_extraction_and_missing_paths_skipped(png_tree, tmp_path):
    listing = tmp_path / "list.csv"
    rows = ["ant/img_000.png,ant", "bee/img_000.png,bee", "bee/gone.png,bee"]
    listing.write_text("path,label\n" + "\n".join(f"{png_tree}/{r}" for r in rows))
    output = tmp_path / "out.h5"
    args = [str(listing), *COMMON, "--layers", "block2", "--output", str(output)]
    assert extract_features.main([*args, "--unlabeled"]) == 0
    with FeatureStore(output) as store:
        assert store.class_names == []
        assert store.labels.tolist() == [-1, -1]
        assert store.paths == [f"{png_tree}/ant/img_000.png",
                               f"{png_tree}/bee/img_000.png"]  # fmt: skip
        [(_, path, reason)] = store.skipped
    assert path == f"{png_tree}/bee/gone.png"
    assert reason.startswith("cannot read file: No such file")


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
