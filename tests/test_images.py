"""Indexing image sources and decoding odd files."""

from __future__ import annotations

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
    assert index.ignored == [("loose.png", "not inside a class folder")]
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
    (tmp_path / "plain.csv").write_text("imgs/one.png\n")
    assert index_csv(tmp_path / "plain.csv").labels.tolist() == [UNLABELED]
    (tmp_path / "bad.csv").write_text("a.png,x\nb.png\n")
    with pytest.raises(TLError, match="one column"):
        index_csv(tmp_path / "bad.csv")


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
    Image.new("RGB", (10, 10)).save(tmp_path / "small.png")
    settings = ImageSettings((8, 8), max_pixels=100_000)
    names = ["big.png", "big.jpg", "big.gif", "big.bmp", "small.png"]
    paths = [str(tmp_path / n) for n in names]
    kept = [int(p) for batch, _ in image_batches(paths, np.arange(5), settings, 8)
            for p in batch.numpy()]  # fmt: skip
    assert kept == [4]
    for path in paths[:4]:
        assert "400x300 = 0.1 megapixels, above the limit" in diagnose(path, settings)


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
    with pytest.raises(TLError, match="Unknown resize mode 'stretch'"):
        ImageSettings((8, 8), resize="stretch")
    with pytest.raises(TLError, match="Unknown interpolation"):
        ImageSettings((8, 8), interpolation="cubic")
