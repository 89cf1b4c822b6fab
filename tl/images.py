"""Input: index an image source, then decode and resize it in parallel with tf.data.

An `ImageIndex` is the deterministic list of images to process: a folder with one
sub-folder per class (sorted class names, sorted files), a CSV with a `path` (and
optionally `label`) column, or an unlabeled folder. Every file of a folder is either
indexed or listed in `ImageIndex.ignored` with the reason; hidden files and folders
are the only silent exception. `image_batches` turns positions of that index into
batches of resized RGB pixels in [0, 255]; files that cannot be decoded are dropped
from the stream, and `diagnose` says why, so callers can list them.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import numbers
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import tensorflow as tf
from PIL import Image, UnidentifiedImageError

from tl._checks import ParameterError, check_choice, check_interval
from tl._settings import FlatSettings
from tl.errors import TLError

if TYPE_CHECKING:
    from tl.backbones import BackboneSpec

IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff",
)  # fmt: skip
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
        paths: one path per image, relative to `root` (or absolute).
        labels: class number per image (`UNLABELED` = -1 when there are no labels).
        class_names: name of each class number.
        ignored: `(relative path, reason)` for every entry of a folder that is not
            indexed (a loose file beside class folders, a duplicate, a symlink
            loop, a file that is not an image...), hidden ones excepted.
    """

    root: Path
    paths: list[str]
    labels: np.ndarray
    class_names: list[str]
    ignored: list[tuple[str, str]] = dataclasses.field(default_factory=list)

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


@dataclasses.dataclass
class _TreeWalk:
    """One pass over a folder tree that never loops and never takes a file twice.

    Entries are visited in sorted order, a folder's own files before its
    sub-folders. Symlinks are followed, but a folder or file is taken once by its
    real path: a symlink to a folder that contains it is a loop, and a symlink to
    something reached without symlinks (a non-hidden path inside the tree), or
    already reached through another symlink, is a duplicate of that path. So
    whatever the links, an image is labelled by the class folder it really lives in.
    Everything not taken lands in `ignored` with its reason.

    Attributes:
        root: the real path of the top folder.
        labeled: files directly in `root` are loose (not inside a class folder).
    """

    root: str
    labeled: bool
    ignored: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    _folders: dict[str, str] = dataclasses.field(default_factory=dict)
    _files: dict[str, str] = dataclasses.field(default_factory=dict)

    def images(self, relative: str, real: str, within: frozenset[str]) -> list[str]:
        """Image files below the folder `relative` (real path `real`), recursively.

        `within` holds the real paths of the folders that contain it.
        """
        within = within | {real}
        found, folders = self.entries(relative, real, within)
        for path, folder in folders:
            found += self.images(path, folder, within)
        return found

    def entries(
        self, relative: str, real: str, within: frozenset[str]
    ) -> tuple[list[str], list[tuple[str, str]]]:
        """The images of one folder, and its sub-folders to walk as (path, real)."""
        images, folders = [], []
        for entry in self._listing(relative, real):
            path = os.path.join(relative, entry.name)
            kind, detail = self._classify(entry, path, real, within)
            if kind == "image":
                images.append(path)
            elif kind == "folder":
                folders.append((path, detail))
            else:
                self.ignored.append((path, detail))
        return images, folders

    def _listing(self, relative: str, real: str) -> list[os.DirEntry]:
        try:
            with os.scandir(real) as entries:
                shown = [entry for entry in entries if not _is_hidden(entry.name)]
        except OSError as error:
            reason = f"cannot read folder: {error.strerror or error}"
            self.ignored.append((relative or ".", reason))
            return []
        return sorted(shown, key=lambda entry: entry.name)

    def _classify(
        self, entry: os.DirEntry, path: str, parent: str, within: frozenset[str]
    ) -> tuple[str | None, str]:
        """("image", real path), ("folder", real path) or (None, why it is ignored)."""
        if entry.is_symlink():
            try:
                entry.stat()  # follows the link; the entry keeps the result
            except FileNotFoundError:
                return None, "broken symlink"
            except OSError as error:
                return None, f"broken symlink: {error.strerror or error}"
            real = os.path.realpath(entry.path)
        else:  # no system call: the listing tells folders from files
            real = os.path.join(parent, entry.name)
        if entry.is_dir():
            return self._folder(path, real, within)
        if not entry.is_file():
            return None, "not a regular file"
        return self._file(path, real)

    def _folder(self, path: str, real: str, within: frozenset[str]):
        if real in within:
            return None, f"symlink loop to {real} (a folder that contains it)"
        first = self._direct(real) or self._folders.get(real, path)
        if first != path:
            return None, f"duplicate of folder {first} (same folder through a symlink)"
        self._folders[real] = path
        return "folder", real

    def _file(self, path: str, real: str):
        name = os.path.basename(path)
        if not is_image_file(name):
            extension = os.path.splitext(name)[1] or "no extension"
            return None, f"not an image file ({extension})"
        if not self._takes(path):
            return None, "not inside a class folder"
        direct = self._direct(real)
        if direct and not self._takes(direct):
            direct = None  # the walk does not take the target itself: take the link
        first = direct or self._files.get(real, path)
        if first != path:
            return None, f"duplicate of {first} (same file through a symlink)"
        self._files[real] = path
        return "image", real

    def _takes(self, path: str) -> bool:
        """Whether an image file at `path` (relative) belongs in the index."""
        return is_image_file(os.path.basename(path)) and (
            os.sep in path or not self.labeled
        )

    def _direct(self, real: str) -> str | None:
        """The path of `real` from the top folder when the walk reaches it without
        symlinks (inside the tree, no hidden part), else None."""
        if not real.startswith(self.root + os.sep):
            return None
        relative = real[len(self.root) + 1 :]
        if any(_is_hidden(part) for part in relative.split(os.sep)):
            return None
        return relative


def _check_labels(labels: str | None) -> None:
    check_choice("labels", labels, ("inferred", None))


def index_folder(folder: str | Path, labels: str | None = "inferred") -> ImageIndex:
    """Index `folder`: one sub-folder per class, or an unlabeled folder.

    A class folder may be a symlink: the class is named after the link and holds
    the images of its target, unless the target is another folder of the tree
    (then the link is a duplicate, listed in `ignored`, and no class). Symlinks
    further down are followed the same way, each real folder once.

    Args:
        folder: the image folder.
        labels: `inferred` takes class names from the sub-folders (sorted; images in
            nested folders belong to their top-level class); when there are no
            sub-folders the images are unlabeled. None indexes every image below
            `folder` as unlabeled.
    """
    _check_labels(labels)
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise TLError(
            f"Image folder {str(folder)!r} does not exist or is not a folder."
        )
    walk = _TreeWalk(str(root), labeled=labels == "inferred")
    if walk.labeled:
        top = frozenset({str(root)})
        _, classes = walk.entries("", str(root), top)  # loose files: ignored
        if not classes:
            return index_folder(root, labels=None)
        paths, label_list = [], []
        for number, (name, real) in enumerate(classes):
            found = walk.images(name, real, top)
            paths += found
            label_list += [number] * len(found)
        labels_array = np.asarray(label_list, np.int32)
        class_names = [name for name, _ in classes]
    else:
        paths = walk.images("", str(root), frozenset())
        labels_array = np.full(len(paths), UNLABELED, np.int32)
        class_names = []
    if not paths:
        first = (
            f" Ignored {len(walk.ignored)} entries, e.g. {walk.ignored[0][0]}: "
            f"{walk.ignored[0][1]}."
            if walk.ignored
            else ""
        )
        raise TLError(
            f"No images ({', '.join(IMAGE_EXTENSIONS)}) found in {str(root)!r}. "
            f"Expected one sub-folder per class holding image files.{first}"
        )
    return ImageIndex(root, paths, labels_array, class_names, walk.ignored)


def index_csv(csv_path: str | Path, labels: str | None = "inferred") -> ImageIndex:
    """Index a CSV whose header row names a `path` column and optionally a `label`
    column, in either order.

    The header is required, so that a typo in it is refused instead of being read
    as an image of a class. Relative paths are taken relative to the CSV's folder.
    Class names are the sorted distinct labels; without a label column, or with
    `labels=None`, the images are unlabeled.
    """
    _check_labels(labels)
    csv_path = Path(csv_path).expanduser().resolve()
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:  # BOM ok
            reader = csv.reader(handle)
            rows = [(reader.line_num, row) for row in reader if "".join(row).strip()]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        reason = getattr(error, "strerror", None) or error
        raise TLError(f"Cannot read the CSV {str(csv_path)!r}: {reason}.") from None
    header = [cell.strip().lower() for cell in rows[0][1]] if rows else []
    if sorted(header) not in (["path"], ["label", "path"]):
        found = ", ".join(map(repr, rows[0][1])) if rows else "no row at all"
        raise TLError(
            f"CSV {str(csv_path)!r} must start with a header row naming a 'path' "
            f"column and optionally a 'label' column (in either order); its first "
            f"row has {found}. Fix the header, e.g. 'path,label'."
        )
    rows = rows[1:]
    if not rows:
        raise TLError(f"CSV {str(csv_path)!r} lists no images.")
    for line, row in rows:
        if len(row) != len(header):
            raise TLError(
                f"Line {line} of CSV {str(csv_path)!r} has {len(row)} columns, its "
                f"header {len(header)} ({','.join(header)})."
            )
    paths = _csv_column(csv_path, rows, header, "path")
    if labels is None or "label" not in header:
        return ImageIndex(
            csv_path.parent, paths, np.full(len(paths), UNLABELED, np.int32), []
        )
    names = _csv_column(csv_path, rows, header, "label")
    class_names = sorted(set(names))
    number = {name: i for i, name in enumerate(class_names)}
    return ImageIndex(
        csv_path.parent,
        paths,
        np.asarray([number[name] for name in names], np.int32),
        class_names,
    )


def _csv_column(
    csv_path: Path, rows: list[tuple[int, list[str]]], header: list[str], name: str
) -> list[str]:
    """The stripped cells of column `name`, refusing an empty one."""
    number = header.index(name)
    cells = [row[number].strip() for _, row in rows]
    for (line, _), cell in zip(rows, cells, strict=True):
        if not cell:
            raise TLError(
                f"Line {line} of CSV {str(csv_path)!r} has an empty {name}; fill it "
                f"in or remove the line."
            )
    return cells


def index_images(source: str | Path, labels: str | None = "inferred") -> ImageIndex:
    """Index a folder (see `index_folder`) or a `.csv` file (see `index_csv`)."""
    if str(source).lower().endswith(".csv"):
        return index_csv(source, labels)
    return index_folder(source, labels)


# ---------------------------------------------------------------------------------
# Decoding


_SIZE = "N or HxW with positive sides (e.g. 224 or 224x299)"


def _size_pair(size) -> tuple[int, int] | None:
    """`N`, `HxW`, `H,W`, an int or a pair as (height, width); None stays None."""
    if size is None:
        return None
    if isinstance(size, str):
        match = re.fullmatch(r"\s*(\d+)\s*(?:[x,]\s*(\d+))?\s*", size)
        pair = (int(match[1]), int(match[2] or match[1])) if match else ()
    elif isinstance(size, numbers.Integral):
        pair = (int(size), int(size))
    else:
        try:
            pair = tuple(int(side) for side in size)
        except (TypeError, ValueError):
            pair = ()
    if len(pair) != 2 or min(pair) < 1:
        raise ParameterError("image_size", _SIZE, size)
    return pair


@dataclasses.dataclass(frozen=True)
class ImageSettings(FlatSettings):
    """How a file becomes a model input; recorded in feature stores.

    Stored flat as `image_size`, `resize`, `interpolation`, `antialias`,
    `max_pixels`.

    Attributes:
        size: output (height, width), also given as N or "HxW"; None takes the
            backbone's default size (see `resolved`).
        resize: `squash` (ignore aspect ratio), `center-crop` (largest centred window
            of the target aspect ratio) or `pad` (fit inside, pad with black).
        interpolation: a `tf.image.resize` method.
        antialias: low-pass filter when downscaling (slower; Keras' image datasets
            default to no antialiasing).
        max_pixels: images with more pixels are refused before decoding.
    """

    size: tuple[int, int] | None = None
    resize: str = "squash"
    interpolation: str = "bilinear"
    antialias: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS

    JSON_NAMES: ClassVar[dict[str, str]] = {"size": "image_size"}

    def __post_init__(self):
        check_choice("resize", self.resize, RESIZE_MODES)
        check_choice("interpolation", self.interpolation, INTERPOLATIONS)
        check_interval("max_pixels", self.max_pixels, low=1, integer=True)
        object.__setattr__(self, "size", _size_pair(self.size))

    def resolved(self, spec: BackboneSpec) -> ImageSettings:
        """These settings with the size filled in: `spec`'s default when unset. The
        one place where a backbone's default input size is applied."""
        if self.size is not None:
            return self
        return dataclasses.replace(self, size=(spec.default_size, spec.default_size))


# The file's first bytes tell its format and size; past the end of a short file they
# read as zeros.
_HEAD_BYTES = 32


def _head(contents: tf.Tensor) -> tf.Tensor:
    """The first `_HEAD_BYTES` bytes of `contents`, as uint8."""
    padded = tf.strings.join(
        [tf.strings.substr(contents, 0, _HEAD_BYTES), b"\0" * _HEAD_BYTES]
    )
    return tf.io.decode_raw(padded, tf.uint8)[:_HEAD_BYTES]


def _read_uint(head: tf.Tensor, offset: int, length: int, little_endian: bool):
    weights = [256**i for i in range(length)]
    if not little_endian:
        weights.reverse()
    raw = tf.cast(head[offset : offset + length], tf.int64)
    return tf.reduce_sum(raw * tf.constant(weights, tf.int64))


def _bits(value: tf.Tensor, shift: int, width: int) -> tf.Tensor:
    return tf.bitwise.bitwise_and(tf.bitwise.right_shift(value, shift), 2**width - 1)


def _jpeg_size(contents, head):
    shape = tf.io.extract_jpeg_shape(contents, output_type=tf.int64)
    return shape[0], shape[1]


def _png_size(contents, head):
    return _read_uint(head, 20, 4, False), _read_uint(head, 16, 4, False)


def _gif_size(contents, head):
    return _read_uint(head, 8, 2, True), _read_uint(head, 6, 2, True)


def _bmp_size(contents, head):
    height = _read_uint(head, 22, 4, True)  # negative (top-down) as int32
    height = tf.where(height >= 2**31, 2**32 - height, height)
    return height, _read_uint(head, 18, 4, True)


def _webp_lossy_size(contents, head):  # 14-bit sides after the VP8 start code
    return (
        _bits(_read_uint(head, 28, 2, True), 0, 14),
        _bits(_read_uint(head, 26, 2, True), 0, 14),
    )


def _webp_lossless_size(contents, head):  # 14-bit sides minus one, packed
    bits = _read_uint(head, 21, 4, True)
    return _bits(bits, 14, 14) + 1, _bits(bits, 0, 14) + 1


def _webp_extended_size(contents, head):  # 24-bit canvas sides minus one
    return _read_uint(head, 27, 3, True) + 1, _read_uint(head, 24, 3, True) + 1


def _signature(*pieces: tuple) -> tuple[np.ndarray, np.ndarray]:
    """(value, mask): a file's head matches when `head & mask == value`. Each piece
    is (offset, bytes) or (offset, bytes, mask bytes)."""
    value = np.zeros(_HEAD_BYTES, np.uint8)
    mask = np.zeros(_HEAD_BYTES, np.uint8)
    for offset, data, *bits in pieces:
        value[offset : offset + len(data)] = list(data)
        mask[offset : offset + len(data)] = list(
            bits[0] if bits else b"\xff" * len(data)
        )
    return value, mask


# What `tf.io.decode_image` decodes: (signature of the first bytes, (height, width)
# from the header). Any other file, an animated WEBP included, goes to Pillow.
_TENSORFLOW_FORMATS = (
    (_signature((0, b"\xff\xd8")), _jpeg_size),
    (_signature((0, b"\x89PNG")), _png_size),
    (_signature((0, b"GIF8")), _gif_size),
    (_signature((0, b"BM")), _bmp_size),
    (_signature((0, b"RIFF"), (8, b"WEBPVP8 ")), _webp_lossy_size),
    (_signature((0, b"RIFF"), (8, b"WEBPVP8L")), _webp_lossless_size),
    (  # animation flag clear
        _signature((0, b"RIFF"), (8, b"WEBPVP8X"), (20, b"\0", b"\x02")),
        _webp_extended_size,
    ),
)
_SIGNATURE_VALUES = np.stack([value for (value, _), _ in _TENSORFLOW_FORMATS])
_SIGNATURE_MASKS = np.stack([mask for (_, mask), _ in _TENSORFLOW_FORMATS])


def _format_number(head: tf.Tensor) -> tf.Tensor:
    """Position of the file's format in `_TENSORFLOW_FORMATS`; its length for the
    rest (Pillow). A few vector operations, whatever the number of formats."""
    matches = tf.reduce_all(
        tf.equal(tf.bitwise.bitwise_and(head, _SIGNATURE_MASKS), _SIGNATURE_VALUES),
        axis=1,
    )
    return tf.argmax(
        tf.concat([tf.cast(matches, tf.int32), [1]], 0), output_type=tf.int32
    )


def _tensorflow_decodes(contents: tf.Tensor) -> tf.Tensor:
    return _format_number(_head(contents)) < len(_TENSORFLOW_FORMATS)


def _header_size(contents: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(height, width) from the file header, without decoding; (0, 0) if unknown."""
    head = _head(contents)
    return _size_of(contents, head, _format_number(head))


def _size_of(contents: tf.Tensor, head: tf.Tensor, number: tf.Tensor):
    def unknown():
        return tf.constant(0, tf.int64), tf.constant(0, tf.int64)

    sizes = [functools.partial(size, contents, head) for _, size in _TENSORFLOW_FORMATS]
    return tf.switch_case(number, [*sizes, unknown])


def _pillow_pixels(contents: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode with Pillow to 8-bit RGB (the first frame), for the files TensorFlow
    does not decode.

    The size comes from the header (Pillow opens lazily), so an image above
    `max_pixels` is refused before decoding. 16-bit gray keeps the high byte, as
    TensorFlow does for 16-bit PNG; palette, CMYK, gray and alpha become RGB by
    Pillow's conversion.
    """
    with Image.open(io.BytesIO(contents)) as image:
        width, height = image.size
        if width * height > max_pixels:
            raise _TooLarge(_too_large(width, height, max_pixels))
        if image.mode.startswith("I;16"):
            high = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
            return np.repeat(high[:, :, np.newaxis], 3, axis=2)
        return np.asarray(image.convert("RGB"))


def _pillow_tensor(contents: bytes | np.ndarray, max_pixels: int) -> np.ndarray:
    """`_pillow_pixels` for `tf.numpy_function`, which passes the file's bytes in a
    graph but a 0-d object array when run eagerly."""
    if isinstance(contents, np.ndarray):
        contents = contents.item()
    return _pillow_pixels(contents, max_pixels)


class _TooLarge(ValueError):
    """An image above the pixel limit, found from its header."""


def _too_large(width: int, height: int, max_pixels: int) -> str:
    return (
        f"image is {width}x{height} = {height * width / 1e6:.1f} megapixels, above "
        f"the limit of {max_pixels / 1e6:.1f} megapixels; raise --max-pixels to "
        f"accept it"
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
    """Decode to uint8 RGB (gray, RGBA, palette, 16-bit all become 8-bit RGB).

    TensorFlow decodes the formats of `_TENSORFLOW_FORMATS`; other files (TIFF...) go
    through Pillow in a `tf.numpy_function`. Both refuse an image above the pixel
    limit from its header, before decoding.
    """
    head = _head(contents)
    number = _format_number(head)
    height, width = _size_of(contents, head, number)
    too_large = tf.debugging.assert_less_equal(
        height * width, tf.constant(settings.max_pixels, tf.int64), message="too large"
    )

    def with_tensorflow():
        return tf.io.decode_image(
            contents, channels=3, dtype=tf.uint8, expand_animations=False
        )

    def with_pillow():  # checks the size itself: (0, 0) above
        return tf.numpy_function(
            functools.partial(_pillow_tensor, max_pixels=settings.max_pixels),
            [contents],
            tf.uint8,
            stateful=False,
        )

    with tf.control_dependencies([too_large]):
        image = tf.cond(number < len(_TENSORFLOW_FORMATS), with_tensorflow, with_pillow)
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


def _pillow_failure(contents: bytes, settings: ImageSettings) -> str | None:
    """Why Pillow cannot make pixels of `contents` (size first), or None."""
    try:
        _pillow_pixels(contents, settings.max_pixels)
    except _TooLarge as error:
        return str(error)
    except UnidentifiedImageError:
        if contents[:4] in (b"II*\0", b"MM\0*"):
            return "cannot decode: damaged or truncated TIFF (its header is unreadable)"
        return (
            "cannot decode: Unknown image file format (not JPEG, PNG, GIF, BMP, "
            "WEBP, TIFF or another format Pillow reads)"
        )
    except Exception as error:  # Pillow's decoders raise many types on bad data
        return f"cannot decode: {error or type(error).__name__}"
    return None


def diagnose(path: str, settings: ImageSettings) -> str:
    """Why `path` cannot become a model input: the reason stored for skipped files."""
    try:
        contents = Path(path).read_bytes()
    except OSError as error:
        return f"cannot read file: {error.strerror or error}"
    if not contents:
        return "empty file"
    tensor = tf.constant(contents)
    if bool(_tensorflow_decodes(tensor)):
        failure = _tensorflow_failure(tensor, settings)
    else:
        failure = _pillow_failure(contents, settings)
    return failure or (
        "decoding failed in the input pipeline (was the file changed during the run?)"
    )


def _tensorflow_failure(tensor: tf.Tensor, settings: ImageSettings) -> str | None:
    """Why TensorFlow cannot make pixels of `tensor` (size first), or None."""
    try:
        height, width = (int(side) for side in _header_size(tensor))
    except (tf.errors.OpError, UnicodeDecodeError):  # malformed header: decode says why
        height = width = 0
    if height * width > settings.max_pixels:
        return _too_large(width, height, settings.max_pixels)
    try:
        _resize(_decode_checked(tensor, settings), settings)
    except tf.errors.OpError as error:
        return f"cannot decode: {_clean_tf_message(error.message)}"
    except UnicodeDecodeError:  # TensorFlow echoed binary bytes in its message
        return "cannot decode: malformed image data"
    return None
