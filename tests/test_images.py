"""Indexing image sources and decoding odd files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tl.errors import TLError
from tl.images import (
    UNLABELED,
    ImageSettings,
    diagnose,
    image_batches,
    index_csv,
    index_folder,
    index_images,
    load_image,
)


def _touch_image(path, size=(8, 8), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size).save(path)


def test_folder_index_is_sorted_recursive_and_ignores_hidden(tmp_path):
    for rel in ["b/2.png", "b/10.JPG", "a/x.jpeg", "a/sub/y.bmp", "c/z.GIF",
                "a/.hidden.png", ".cache/q.png", "a/.git/r.png"]:  # fmt: skip
        _touch_image(tmp_path / rel)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    _touch_image(tmp_path / "loose.png")
    index = index_folder(tmp_path)
    assert index.class_names == ["a", "b", "c"]
    assert index.paths == ["a/x.jpeg", "a/sub/y.bmp", "b/10.JPG", "b/2.png", "c/z.GIF"]
    assert index.labels.tolist() == [0, 0, 1, 1, 2]
    assert index.ignored == [
        ("loose.png", "not inside a class folder"),
        ("a/notes.txt", "not an image file (.txt)"),
    ]
    assert index.fingerprint() == index_folder(tmp_path).fingerprint()


def test_folder_without_subfolders_is_unlabeled(tmp_path):
    for name in ["b.png", "a.jpg"]:
        _touch_image(tmp_path / name)
    index = index_folder(tmp_path)
    assert index.paths == ["a.jpg", "b.png"]
    assert index.labels.tolist() == [UNLABELED, UNLABELED]
    assert index.class_names == []
    _touch_image(tmp_path / "sub" / "c.png")
    assert index_folder(tmp_path, labels=None).paths == ["a.jpg", "b.png", "sub/c.png"]


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
    (tmp_path / "cls").mkdir()
    with pytest.raises(TLError, match="No images"):
        index_folder(tmp_path)
    with pytest.raises(TLError, match="does not exist"):
        index_folder(tmp_path / "nope")


def test_csv_index_with_and_without_labels(tmp_path):
    _touch_image(tmp_path / "imgs" / "one.png")
    (tmp_path / "list.csv").write_text(
        "path,label\nimgs/one.png,zebra\n/abs/two.png,ant\n"
    )
    index = index_images(tmp_path / "list.csv")
    assert index.class_names == ["ant", "zebra"]
    assert index.labels.tolist() == [1, 0]
    assert index.absolute_paths() == [str(tmp_path / "imgs/one.png"), "/abs/two.png"]
    (tmp_path / "swapped.csv").write_text(  # as spreadsheets save it, with a BOM
        "\ufeffLabel, Path\nzebra,imgs/one.png\n", encoding="utf-8"
    )
    swapped = index_csv(tmp_path / "swapped.csv")
    assert (swapped.paths, swapped.class_names) == (["imgs/one.png"], ["zebra"])
    (tmp_path / "plain.csv").write_text("path\nimgs/one.png\n")
    assert index_csv(tmp_path / "plain.csv").labels.tolist() == [UNLABELED]
    (tmp_path / "bad.csv").write_text("path,label\na.png,x\nb.png\n")
    with pytest.raises(TLError, match=r"Line 3 of CSV .* has 1 columns, its header 2"):
        index_csv(tmp_path / "bad.csv")
    (tmp_path / "blank.csv").write_text("path,label\na.png,x\nb.png, \n")
    with pytest.raises(TLError, match=r"Line 3 of CSV .* has an empty label"):
        index_csv(tmp_path / "blank.csv")
    with pytest.raises(TLError, match=r"Cannot read the CSV .*: No such file"):
        index_csv(tmp_path / "missing.csv")


@pytest.mark.parametrize(
    "first_row", ["pth,label", "imgs/one.png,zebra", "path,label,extra", "path,path"]
)
def test_csv_without_a_path_header_is_refused_never_read_as_data(tmp_path, first_row):
    (tmp_path / "list.csv").write_text(f"{first_row}\nimgs/one.png,zebra\n")
    with pytest.raises(TLError) as error:
        index_images(tmp_path / "list.csv")
    message = str(error.value)
    assert "\n" not in message
    assert "'path' column and optionally a 'label' column" in message
    assert ", ".join(map(repr, first_row.split(","))) in message


def test_unlabeled_csv_ignores_its_label_column(tmp_path):
    (tmp_path / "list.csv").write_text("path,label\na.png,zebra\nb.png,ant\n")
    index = index_images(tmp_path / "list.csv", labels=None)
    assert index.paths == ["a.png", "b.png"]
    assert index.labels.tolist() == [UNLABELED, UNLABELED]
    assert index.class_names == []


def _tree(root, counts):
    for name, count in counts.items():
        for i in range(count):
            _touch_image(root / name / f"{i}.png")


def _own_class(index):
    """The class each indexed image really lives in, by its path's first folder."""
    return [index.class_names[label] for label in index.labels] == [
        path.split("/")[0] for path in index.paths
    ]


def test_symlink_loop_in_a_class_folder_is_listed_not_followed(tmp_path):
    _tree(tmp_path, {"a": 5, "b": 5})
    (tmp_path / "a" / "loop").symlink_to("..")
    index = index_folder(tmp_path)
    assert index.paths == [f"{c}/{i}.png" for c in "ab" for i in range(5)]
    assert _own_class(index)
    assert index.ignored == [
        ("a/loop", f"symlink loop to {tmp_path.resolve()} (a folder that contains it)")
    ]
    unlabeled = index_folder(tmp_path, labels=None)
    assert unlabeled.paths == index.paths
    assert unlabeled.ignored == index.ignored


def test_symlinked_duplicates_are_indexed_once_under_their_real_class(tmp_path):
    _tree(tmp_path / "tree", {"a": 2, "b": 2})
    _tree(tmp_path / "outside", {"cats": 3})
    tree = tmp_path / "tree"
    (tree / "a" / "0_copy.png").symlink_to("../b/1.png")  # a file of class b
    (tree / "a" / "alias").symlink_to("../b")  # the whole folder of class b
    (tree / "c").symlink_to(tmp_path / "outside" / "cats")  # a class elsewhere
    (tree / "d").symlink_to(tmp_path / "outside" / "cats")  # the same one again
    (tree / "e").symlink_to("b")  # a class folder that is another class
    (tree / "c" / "link.png").symlink_to("0.png")  # inside the followed folder
    index = index_folder(tree)
    assert index.class_names == ["a", "b", "c"]
    assert index.paths == ["a/0.png", "a/1.png", "b/0.png", "b/1.png",
                           "c/0.png", "c/1.png", "c/2.png"]  # fmt: skip
    assert _own_class(index)
    assert sorted(index.ignored) == [
        ("a/0_copy.png", "duplicate of b/1.png (same file through a symlink)"),
        ("a/alias", "duplicate of folder b (same folder through a symlink)"),
        ("c/link.png", "duplicate of c/0.png (same file through a symlink)"),
        ("d", "duplicate of folder c (same folder through a symlink)"),
        ("e", "duplicate of folder b (same folder through a symlink)"),
    ]
    assert len({os.path.realpath(p) for p in index.absolute_paths()}) == len(index)


def _every_entry(root):
    """Every non-hidden file, link and folder below `root`, without following links."""
    found = set()
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        for name in files + subfolders:
            if not name.startswith("."):
                found.add(os.path.relpath(os.path.join(folder, name), root))
    return found


def test_every_file_is_indexed_or_listed_with_a_reason(tmp_path):
    _tree(tmp_path, {"a": 1, "b": 1})
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "scan.tif")
    Image.new("RGB", (8, 8)).save(tmp_path / "b" / "photo.WEBP", lossless=True)
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    (tmp_path / "b" / "README").write_text("no extension")
    (tmp_path / "b" / "gone.png").symlink_to("nowhere.png")
    _touch_image(tmp_path / "loose.png")
    _touch_image(tmp_path / "a" / ".hidden.png")
    _touch_image(tmp_path / ".thumbs" / "x.png")
    index = index_folder(tmp_path)
    assert index.paths == ["a/0.png", "a/scan.tif", "b/0.png", "b/photo.WEBP"]
    assert dict(index.ignored) == {
        "loose.png": "not inside a class folder",
        "b/README": "not an image file (no extension)",
        "b/gone.png": "broken symlink",
        "b/notes.txt": "not an image file (.txt)",
    }
    folders = set(index.class_names)
    assert set(index.paths) | set(dict(index.ignored)) | folders == _every_entry(
        tmp_path
    )


def test_a_folder_that_cannot_be_read_is_listed(tmp_path, monkeypatch):
    _tree(tmp_path, {"a": 1, "b": 1})
    _touch_image(tmp_path / "b" / "locked" / "x.png")
    real_scandir = os.scandir

    def scandir(path):  # chmod 000 does not stop root, who may run the tests
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    index = index_folder(tmp_path)
    assert index.paths == ["a/0.png", "b/0.png"]
    assert index.ignored == [("b/locked", "cannot read folder: Permission denied")]


@pytest.fixture
def odd_images(tmp_path):
    """The same 6x5 picture saved in many modes, plus broken files."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    base = Image.fromarray(rgb)
    files = {
        "rgb.png": base,
        "gray.png": base.convert("L"),
        "rgba.png": base.convert("RGBA"),
        "palette.png": base.convert("P"),
        "palette.gif": base.convert("P"),
        "image.bmp": base,
    }
    for name, image in files.items():
        image.save(tmp_path / name)
    gray16 = (np.asarray(base.convert("L"), np.uint16) * 257).astype(np.uint16)
    Image.fromarray(gray16).save(tmp_path / "gray16.png")
    base.save(tmp_path / "photo.jpg", quality=95)
    data = (tmp_path / "photo.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.jpg").write_text("hello, I am not a JPEG")
    (tmp_path / "empty.png").write_bytes(b"")
    return tmp_path, base


def _load(path, size=(5, 6)):
    return load_image(tf.constant(str(path)), ImageSettings(size)).numpy()


def test_gray_rgba_palette_and_16bit_become_rgb(odd_images):
    folder, base = odd_images
    expected = {
        "rgb.png": np.asarray(base),
        "gray.png": np.asarray(base.convert("L").convert("RGB")),
        "rgba.png": np.asarray(base),
        "palette.png": np.asarray(base.convert("P").convert("RGB")),
        "palette.gif": np.asarray(base.convert("P").convert("RGB")),
        "image.bmp": np.asarray(base),
        "gray16.png": np.asarray(base.convert("L").convert("RGB")),
    }
    for name, pixels in expected.items():
        got = _load(folder / name)
        assert got.shape == (5, 6, 3), name
        np.testing.assert_allclose(got, pixels, atol=1.0, err_msg=name)


def test_broken_files_are_dropped_and_diagnosed(odd_images):
    folder, _ = odd_images
    names = ["rgb.png", "truncated.jpg", "text.jpg", "photo.jpg", "empty.png",
             "missing.png"]  # fmt: skip
    settings = ImageSettings((5, 6))
    paths = [str(folder / name) for name in names]
    kept = [int(p) for batch, _ in image_batches(paths, np.arange(6), settings, 2)
            for p in batch.numpy()]  # fmt: skip
    assert kept == [0, 3]
    reasons = {names[i]: diagnose(paths[i], settings) for i in (1, 2, 4, 5)}
    assert "Invalid JPEG data" in reasons["truncated.jpg"]
    assert "Unknown image file format" in reasons["text.jpg"]
    assert reasons["empty.png"] == "empty file"
    assert "No such file" in reasons["missing.png"]


def test_images_above_the_pixel_limit_are_refused_before_decoding(tmp_path):
    Image.new("RGB", (400, 300)).save(tmp_path / "big.png")
    Image.new("RGB", (400, 300)).save(tmp_path / "big.jpg")
    Image.new("RGB", (400, 300)).save(tmp_path / "big.gif")
    Image.new("RGB", (400, 300)).save(tmp_path / "big.bmp")
    Image.new("RGB", (400, 300)).save(tmp_path / "big.tif")
    Image.new("RGB", (400, 300)).save(tmp_path / "lossy.webp")
    Image.new("RGB", (400, 300)).save(tmp_path / "lossless.webp", lossless=True)
    Image.new("RGB", (400, 300)).save(tmp_path / "extended.webp", exif=b"Exif")
    Image.new("RGB", (10, 10)).save(tmp_path / "small.png")
    settings = ImageSettings((8, 8), max_pixels=100_000)
    names = ["big.png", "big.jpg", "big.gif", "big.bmp", "big.tif", "lossy.webp",
             "lossless.webp", "extended.webp", "small.png"]  # fmt: skip
    paths = [str(tmp_path / n) for n in names]
    kept = [int(p) for batch, _ in image_batches(paths, np.arange(9), settings, 8)
            for p in batch.numpy()]  # fmt: skip
    assert kept == [8]
    for path in paths[:8]:
        assert "400x300 = 0.1 megapixels, above the limit" in diagnose(path, settings)


@pytest.fixture
def pillow_only(tmp_path):
    """TIFFs in many modes and WEBPs (still and animated) of one 6x5 picture."""
    rng = np.random.default_rng(1)
    base = Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8))
    for mode in ["RGB", "RGBA", "L", "P", "CMYK"]:
        base.convert(mode).save(tmp_path / f"{mode.lower()}.tif")
    base.save(tmp_path / "lzw.tiff", compression="tiff_lzw")
    base.save(tmp_path / "lossless.webp", lossless=True)
    base.convert("RGBA").save(tmp_path / "alpha.webp", lossless=True)
    flipped = base.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    base.save(tmp_path / "animated.webp", save_all=True, append_images=[flipped],
              lossless=True)  # fmt: skip
    gray16 = Image.fromarray(rng.integers(0, 2**16, (5, 6), dtype=np.uint16))
    gray16.save(tmp_path / "gray16.tif")
    gray16.save(tmp_path / "gray16.png")
    return tmp_path, base


def test_tiff_and_webp_give_exactly_the_pixels_pillow_reads(pillow_only):
    folder, base = pillow_only
    for name in ["rgb.tif", "rgba.tif", "l.tif", "p.tif", "cmyk.tif", "lzw.tiff",
                 "lossless.webp", "alpha.webp"]:  # fmt: skip
        with Image.open(folder / name) as image:
            expected = np.asarray(image.convert("RGB"))
        np.testing.assert_array_equal(_load(folder / name), expected, err_msg=name)
    np.testing.assert_array_equal(_load(folder / "rgb.tif"), np.asarray(base))
    np.testing.assert_array_equal(_load(folder / "animated.webp"), np.asarray(base))
    high_byte = np.asarray(Image.open(folder / "gray16.tif"), np.uint16) >> 8
    np.testing.assert_array_equal(_load(folder / "gray16.tif")[..., 1], high_byte)
    np.testing.assert_array_equal(  # as TensorFlow makes 8 bits of a 16-bit PNG
        _load(folder / "gray16.tif"), _load(folder / "gray16.png")
    )


@pytest.mark.filterwarnings("ignore:Truncated File Read")  # Pillow, on the cut TIFF
def test_bad_tiff_and_webp_are_dropped_and_diagnosed(pillow_only):
    folder, _ = pillow_only
    for name in ["rgb.tif", "lossless.webp"]:
        data = (folder / name).read_bytes()
        (folder / f"cut_{name}").write_bytes(data[: len(data) // 2])
    names = ["cut_rgb.tif", "rgb.tif", "cut_lossless.webp", "lossless.webp"]
    settings = ImageSettings((5, 6))
    paths = [str(folder / name) for name in names]
    kept = [int(p) for batch, _ in image_batches(paths, np.arange(4), settings, 4)
            for p in batch.numpy()]  # fmt: skip
    assert kept == [1, 3]
    assert diagnose(paths[0], settings) == (
        "cannot decode: damaged or truncated TIFF (its header is unreadable)"
    )
    assert diagnose(paths[2], settings) == "cannot decode: Failed to decode WebP image."


def test_resize_modes_keep_or_ignore_aspect_ratio(tmp_path):
    # a 20x10 (w x h) image: left half red, right half blue
    pixels = np.zeros((10, 20, 3), np.uint8)
    pixels[:, :10, 0] = 255
    pixels[:, 10:, 2] = 255
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    path = tf.constant(str(tmp_path / "wide.png"))
    squash = load_image(path, ImageSettings((10, 10), "squash", "nearest")).numpy()
    assert squash[:, :5, 0].min() == 255 and squash[:, 5:, 2].min() == 255
    crop = load_image(path, ImageSettings((10, 10), "center-crop", "nearest")).numpy()
    assert crop[:, :5, 0].min() == 255 and crop[:, 5:, 2].min() == 255  # centre 10x10
    pad = load_image(path, ImageSettings((20, 20), "pad", "nearest")).numpy()
    assert pad[:5].max() == 0 and pad[15:].max() == 0  # black bars top and bottom
    assert pad[5:15, :10, 0].min() == 255


def test_bad_settings_are_named():
    with pytest.raises(
        TLError,
        match=r"^The 'resize' parameter must be one of 'squash', 'center-crop', "
        r"'pad'\. Got 'stretch' instead\.$",
    ):
        ImageSettings((8, 8), resize="stretch")
    with pytest.raises(TLError, match=r"'interpolation' .* Got 'cubic' instead"):
        ImageSettings((8, 8), interpolation="cubic")
    for size in ("8y8", (8, 0), 0, (1, 2, 3)):
        with pytest.raises(TLError, match=r"'image_size' parameter must be N or HxW"):
            ImageSettings(size)
