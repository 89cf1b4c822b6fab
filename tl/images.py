"""Input: index an image source, then decode and resize it in parallel with tf.data.

An `ImageIndex` is the deterministic list of images to process: a folder with one
sub-folder per class (sorted class names, sorted files, hidden entries ignored), a CSV
of `path,label`, or an unlabeled folder. `image_batches` turns positions of that index
into batches of resized RGB pixels in [0, 255]; files that cannot be decoded are
dropped from the stream, and `diagnose` says why, so callers can list them.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf

from tl.errors import TLError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
RESIZE_MODES = ("squash", "center-crop", "pad")
INTERPOLATIONS = ("bilinear", "bicubic", "area", "nearest", "lanczos3")
# PIL's decompression-bomb threshold: larger images are refused, not decoded.
DEFAULT_MAX_PIXELS = 89_478_485
UNLABELED = -1


@dataclasses.dataclass
class ImageIndex:
    """The images to process, in a stable order.

    Attributes:
        root: folder the paths are relative to.
        paths: one relative path per image.
        labels: class number per image (`UNLABELED` = -1 when there are no labels).
        class_names: name of each class number.
        ignored: entries skipped while indexing (loose files beside class folders).
    """

    root: Path
    paths: list[str]
    labels: np.ndarray
    class_names: list[str]
    ignored: list[str] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def absolute_paths(self) -> list[str]:
        return [str(self.root / path) for path in self.paths]

    def fingerprint(self) -> str:
        """SHA-256 of paths, labels and class names: the identity of a run's input."""
        digest = hashlib.sha256()
        for name in self.class_names:
            digest.update(f"class\t{name}\n".encode())
        for path, label in zip(self.paths, self.labels.tolist(), strict=True):
            digest.update(f"{path}\t{label}\n".encode())
        return digest.hexdigest()


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def is_image_file(name: str) -> bool:
    """A non-hidden file name with one of `IMAGE_EXTENSIONS` (any case)."""
    return name.lower().endswith(IMAGE_EXTENSIONS) and not _is_hidden(name)


def _images_under(folder: Path, root: Path) -> list[str]:
    """Image files below `folder` (recursively), relative to `root`, sorted."""
    found = []
    for directory, subdirs, files in os.walk(folder, followlinks=True):
        subdirs[:] = sorted(d for d in subdirs if not _is_hidden(d))
        base = Path(directory).relative_to(root)
        found.extend(str(base / name) for name in sorted(files) if is_image_file(name))
    return found


def index_folder(folder: str | Path, labels: str | None = "inferred") -> ImageIndex:
    """Index `folder`: one sub-folder per class, or an unlabeled folder.

    Args:
        folder: the image folder.
        labels: `inferred` takes class names from the sub-folders (sorted; images in
            nested folders belong to their top-level class); when there are no
            sub-folders the images are unlabeled. None indexes every image below
            `folder` as unlabeled.
    """
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise TLError(
            f"Image folder {str(folder)!r} does not exist or is not a folder."
        )
    entries = sorted(e for e in os.listdir(root) if not _is_hidden(e))
    class_dirs = [e for e in entries if (root / e).is_dir()]
    if labels not in ("inferred", None):
        raise TLError(f"labels must be 'inferred' or None, got {labels!r}.")
    if labels is None or not class_dirs:
        paths = _images_under(root, root)
        index = ImageIndex(root, paths, np.full(len(paths), UNLABELED, np.int32), [])
    else:
        paths, label_list = [], []
        for number, name in enumerate(class_dirs):
            found = _images_under(root / name, root)
            paths += found
            label_list += [number] * len(found)
        loose = [e for e in entries if is_image_file(e)]
        index = ImageIndex(
            root,
            paths,
            np.asarray(label_list, np.int32),
            class_dirs,
            ignored=[(name, "not inside a class folder") for name in loose],
        )
    if not index.paths:
        raise TLError(
            f"No images ({', '.join(IMAGE_EXTENSIONS)}) found in {str(root)!r}. "
            f"Expected one sub-folder per class holding image files."
        )
    return index


def index_csv(csv_path: str | Path) -> ImageIndex:
    """Index a CSV of `path,label` rows (a `path,label` header is optional).

    Relative paths are taken relative to the CSV's folder; a CSV with only a path
    column is unlabeled. Class names are the sorted distinct labels.
    """
    csv_path = Path(csv_path).expanduser().resolve()
    with open(csv_path, newline="", encoding="utf-8") as handle:
        rows = [row for row in csv.reader(handle) if row and any(row)]
    if rows and [c.strip().lower() for c in rows[0]][:2] in (
        ["path", "label"],
        ["path"],
    ):
        rows = rows[1:]
    if not rows:
        raise TLError(f"CSV {str(csv_path)!r} lists no images.")
    widths = {len(row) for row in rows}
    if not widths <= {1, 2} or len(widths) > 1:
        raise TLError(
            f"CSV {str(csv_path)!r} must have one column (path) or two (path,label) "
            f"in every row; found rows of {sorted(widths)} columns."
        )
    paths = [row[0].strip() for row in rows]
    if widths == {1}:
        labels = np.full(len(paths), UNLABELED, np.int32)
        class_names: list[str] = []
    else:
        names = [row[1].strip() for row in rows]
        class_names = sorted(set(names))
        number = {name: i for i, name in enumerate(class_names)}
        labels = np.asarray([number[name] for name in names], np.int32)
    return ImageIndex(csv_path.parent, paths, labels, class_names)


def index_images(source: str | Path, labels: str | None = "inferred") -> ImageIndex:
    """Index a folder (see `index_folder`) or a `.csv` file (see `index_csv`)."""
    if str(source).lower().endswith(".csv"):
        return index_csv(source)
    return index_folder(source, labels)


# ---------------------------------------------------------------------------------
# Decoding


@dataclasses.dataclass(frozen=True)
class ImageSettings:
    """How a file becomes a model input; recorded in feature stores.

    Attributes:
        size: output (height, width).
        resize: `squash` (ignore aspect ratio), `center-crop` (largest centred window
            of the target aspect ratio) or `pad` (fit inside, pad with black).
        interpolation: a `tf.image.resize` method.
        antialias: low-pass filter when downscaling (slower; Keras' image datasets
            default to no antialiasing).
        max_pixels: images with more pixels are refused before decoding.
    """

    size: tuple[int, int]
    resize: str = "squash"
    interpolation: str = "bilinear"
    antialias: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self):
        if self.resize not in RESIZE_MODES:
            raise TLError(
                f"Unknown resize mode {self.resize!r}; choose one of "
                f"{', '.join(RESIZE_MODES)}."
            )
        if self.interpolation not in INTERPOLATIONS:
            raise TLError(
                f"Unknown interpolation {self.interpolation!r}; choose one of "
                f"{', '.join(INTERPOLATIONS)}."
            )
        if len(self.size) != 2 or min(self.size) < 1:
            raise TLError(f"Image size must be two positive sides, got {self.size!r}.")
        object.__setattr__(self, "size", tuple(int(side) for side in self.size))


def _read_uint(contents: tf.Tensor, offset: int, length: int, little_endian: bool):
    raw = tf.cast(
        tf.io.decode_raw(tf.strings.substr(contents, offset, length), tf.uint8),
        tf.int64,
    )
    if little_endian:
        raw = tf.reverse(raw, [0])
    weights = tf.constant([256 ** (length - 1 - i) for i in range(length)], tf.int64)
    return tf.reduce_sum(raw * weights)


def _header_size(contents: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(height, width) from the file header, without decoding; (0, 0) if unknown."""
    magic = tf.strings.substr(contents, 0, 4)

    def jpeg():
        shape = tf.io.extract_jpeg_shape(contents, output_type=tf.int64)
        return shape[0], shape[1]

    def png():
        return _read_uint(contents, 20, 4, False), _read_uint(contents, 16, 4, False)

    def gif():
        return _read_uint(contents, 8, 2, True), _read_uint(contents, 6, 2, True)

    def bmp():
        height = _read_uint(contents, 22, 4, True)  # negative (top-down) as int32
        height = tf.where(height >= 2**31, 2**32 - height, height)
        return height, _read_uint(contents, 18, 4, True)

    def unknown():
        return tf.constant(0, tf.int64), tf.constant(0, tf.int64)

    prefix = tf.strings.substr(magic, 0, 2)
    return tf.case(
        [
            (tf.equal(prefix, b"\xff\xd8"), jpeg),
            (tf.equal(magic, b"\x89PNG"), png),
            (tf.equal(magic, b"GIF8"), gif),
            (tf.equal(prefix, b"BM"), bmp),
        ],
        default=unknown,
    )


def _resize(image: tf.Tensor, settings: ImageSettings) -> tf.Tensor:
    height, width = settings.size
    options = {"method": settings.interpolation, "antialias": settings.antialias}
    if settings.resize == "pad":
        resized = tf.image.resize_with_pad(image, height, width, **options)
    else:
        if settings.resize == "center-crop":
            shape = tf.cast(tf.shape(image)[:2], tf.float64)
            crop_h = tf.minimum(shape[0], tf.round(shape[1] * height / width))
            crop_w = tf.minimum(shape[1], tf.round(shape[0] * width / height))
            image = tf.image.crop_to_bounding_box(
                image,
                tf.cast((shape[0] - crop_h) // 2, tf.int32),
                tf.cast((shape[1] - crop_w) // 2, tf.int32),
                tf.cast(crop_h, tf.int32),
                tf.cast(crop_w, tf.int32),
            )
        resized = tf.image.resize(image, (height, width), **options)
    return tf.clip_by_value(tf.cast(resized, tf.float32), 0.0, 255.0)


def _decode_checked(contents: tf.Tensor, settings: ImageSettings) -> tf.Tensor:
    """Decode to uint8 RGB (gray, RGBA, palette, 16-bit all become 8-bit RGB)."""
    height, width = _header_size(contents)
    too_large = tf.debugging.assert_less_equal(
        height * width, tf.constant(settings.max_pixels, tf.int64), message="too large"
    )
    with tf.control_dependencies([too_large]):
        image = tf.io.decode_image(
            contents, channels=3, dtype=tf.uint8, expand_animations=False
        )
    image.set_shape([None, None, 3])
    return image


def load_image(path: tf.Tensor, settings: ImageSettings) -> tf.Tensor:
    """One file → resized float32 RGB pixels in [0, 255]; raises on a bad file."""
    return _resize(_decode_checked(tf.io.read_file(path), settings), settings)


def image_batches(
    paths: list[str],
    positions: np.ndarray,
    settings: ImageSettings,
    batch_size: int,
) -> tf.data.Dataset:
    """Batches of `(positions, images)` decoded in parallel, in input order.

    Files that fail to read, decode or pass the size limit are dropped from the
    stream; a caller finds them as the positions missing between batches and asks
    `diagnose` for the reason.
    """
    if len(paths) != len(positions):
        raise TLError(f"{len(paths)} paths but {len(positions)} positions.")

    @tf.autograph.experimental.do_not_convert
    def load(position, path):
        return position, load_image(path, settings)

    dataset = tf.data.Dataset.from_tensor_slices(
        (np.asarray(positions, np.int64), tf.constant(paths, tf.string))
    )
    dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.ignore_errors().batch(batch_size).prefetch(tf.data.AUTOTUNE)


@dataclasses.dataclass
class DecodedBatch:
    """Decoded images for `positions`, and the positions before `end` that could
    not be used, each with its reason (`images` is None for a last batch that only
    reports such files)."""

    positions: np.ndarray
    images: tf.Tensor | None
    skipped: list[tuple[int, str]]
    end: int


def decoded_batches(
    paths: Sequence[str], settings: ImageSettings, batch_size: int, first: int = 0
) -> Iterator[DecodedBatch]:
    """Batches of `paths[first:]` decoded in parallel, every dropped file diagnosed.

    Positions missing between two batches are files the pipeline dropped; they are
    reported with the batch that follows them, or in a last batch without images
    when they come after the last decodable file.
    """
    stop = len(paths)
    batches = image_batches(
        list(paths[first:]), np.arange(first, stop), settings, batch_size
    )
    expected = first

    def dropped(present: np.ndarray, end: int) -> list[tuple[int, str]]:
        present = set(present.tolist())
        return [
            (position, diagnose(paths[position], settings))
            for position in range(expected, end)
            if position not in present
        ]

    for positions, images in batches:
        positions = positions.numpy()
        end = int(positions[-1]) + 1
        yield DecodedBatch(positions, images, dropped(positions, end), end)
        expected = end
    if expected < stop:
        yield DecodedBatch(
            np.empty(0, np.int64), None, dropped(np.empty(0), stop), stop
        )


def _clean_tf_message(message: str) -> str:
    message = re.sub(r"\{\{[^}]*\}\}\s*", "", message)
    message = re.sub(r"\s*\[Op:[^\]]*\].*$", "", message, flags=re.S)
    return " ".join(message.split())


def diagnose(path: str, settings: ImageSettings) -> str:
    """Why `path` cannot become a model input: the reason stored for skipped files."""
    try:
        contents = Path(path).read_bytes()
    except OSError as error:
        return f"cannot read file: {error.strerror or error}"
    if not contents:
        return "empty file"
    tensor = tf.constant(contents)
    try:
        height, width = (int(side) for side in _header_size(tensor))
    except (tf.errors.OpError, UnicodeDecodeError):  # malformed header: decode says why
        height = width = 0
    if height * width > settings.max_pixels:
        return (
            f"image is {width}x{height} = {height * width / 1e6:.1f} megapixels, above "
            f"the limit of {settings.max_pixels / 1e6:.1f} megapixels; raise "
            f"--max-pixels to accept it"
        )
    try:
        _resize(_decode_checked(tensor, settings), settings)
    except tf.errors.OpError as error:
        return f"cannot decode: {_clean_tf_message(error.message)}"
    except UnicodeDecodeError:  # TensorFlow echoed binary bytes in its message
        return "cannot decode: malformed image data"
    return (
        "decoding failed in the input pipeline (was the file changed during the run?)"
    )
