"""What every saved model folder shares: its metadata.json and the hashes of its files.

A model folder is data that `predict.py` (and `fine_tune.py --init-head`) read back,
possibly after it was copied, edited or damaged. `metadata.json` describes the model
and records the SHA-256 of each file the model is loaded from (`"files"`); loading
checks the metadata and those hashes before it reads anything else, so that a
truncated, edited or replaced file is refused with one line naming it instead of
failing deep inside a deserialiser. The formats themselves (scikit-learn pipelines,
Keras models) live in `tl.classifiers` and `tl.finetune`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tl.errors import TLError

METADATA = "metadata.json"


def _sha256(path: Path) -> str:
    from tl.backbones import sha256_of_file  # loads Keras: only when hashing

    return sha256_of_file(path)


def file_hashes(directory: Path, names: list[str]) -> dict[str, str]:
    """SHA-256 of the named files of `directory`, for metadata.json's `files`."""
    return {name: _sha256(directory / name) for name in names}


def read_metadata(directory: Path, remedy: str) -> dict:
    """The folder's metadata.json as a dict.

    Raises:
        TLError: the file is not valid JSON or not a JSON object; `remedy` says what
            to do instead. (A missing file is for the caller to report: what the
            folder should have been depends on the format.)
    """
    path = directory / METADATA
    try:
        metadata = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TLError(
            f"{str(path)!r} is damaged (not valid JSON: {error}); {remedy}."
        ) from None
    if not isinstance(metadata, dict):
        raise TLError(f"{str(path)!r} is damaged (not a JSON object); {remedy}.")
    return metadata


def model_format(directory: str | Path) -> str | None:
    """The `format` a folder's metadata.json names; None without a metadata.json."""
    directory = Path(directory)
    if not (directory / METADATA).is_file():
        return None
    remedy = "restore it, or save the model again (train_classifier.py, fine_tune.py)"
    return read_metadata(directory, remedy).get("format")


def check_schema(metadata: dict, directory: Path, current: int, remedy: str) -> int:
    """The folder's schema version, refusing one newer than `current`."""
    version = metadata.get("schema_version")
    if not isinstance(version, int):
        raise TLError(
            f"{str(directory / METADATA)!r} has no valid schema_version (got "
            f"{version!r}); it was edited or damaged: {remedy}."
        )
    if version > current:
        raise TLError(
            f"{str(directory)!r} was saved by a newer tl (schema {version}, this tl "
            f"reads up to {current}); upgrade tl."
        )
    return version


def require_keys(metadata: dict, keys: tuple[str, ...], directory: Path, remedy: str):
    """Refuse a metadata.json that lacks any of `keys`."""
    missing = [key for key in keys if key not in metadata]
    if missing:
        raise TLError(
            f"{str(directory / METADATA)!r} lacks {', '.join(map(repr, missing))}; it "
            f"was edited or damaged: {remedy}."
        )


def check_files(
    metadata: dict, directory: Path, required: tuple[str, ...], remedy: str
) -> None:
    """Check every file metadata.json's `files` records against its SHA-256.

    `required` names the files loading will read: each must be recorded, so that
    emptying the record does not skip the check.

    Raises:
        TLError: naming the first file that is missing, unrecorded or changed.
    """
    files = metadata.get("files")
    meta_path = str(directory / METADATA)
    if not isinstance(files, dict) or not all(
        isinstance(value, str) for value in files.values()
    ):
        raise TLError(
            f"{meta_path!r} has no valid 'files' (name: SHA-256); it was edited or "
            f"damaged: {remedy}."
        )
    for name in required:
        if name not in files:
            raise TLError(
                f"{meta_path!r} records no SHA-256 for {name!r}; it was edited: "
                f"{remedy}."
            )
    for name, expected in files.items():
        path = directory / name
        if Path(name).name != name:
            raise TLError(
                f"{meta_path!r} names the file {name!r} outside the model folder; it "
                f"was edited: {remedy}."
            )
        if not path.is_file():
            raise TLError(f"{str(path)!r} is missing from the model folder; {remedy}.")
        actual = _sha256(path)
        if actual != expected:
            raise TLError(
                f"{str(path)!r} was changed or truncated since the model was saved "
                f"({path.stat().st_size} bytes, SHA-256 {actual[:16]}..., "
                f"metadata.json records {expected[:16]}...); {remedy}."
            )


def unreadable(path: Path, error: Exception, remedy: str) -> TLError:
    """The one-line error for a model file its reader failed on: the first sentence
    of the reader's message (the rest advises on the reader's own options)."""
    first = re.split(r"(?<=\.)\s|\n", str(error).strip(), maxsplit=1)[0]
    return TLError(
        f"{str(path)!r} cannot be read ({type(error).__name__}: {first}); {remedy}."
    )


def check_unedited(
    metadata: dict, key: str, saved, directory: Path, model_file: str, remedy: str
) -> None:
    """Refuse a metadata.json whose `key` differs from the model file's own copy."""
    if metadata[key] != saved:
        raise TLError(
            f"{str(directory / METADATA)!r} was edited: its {key} {metadata[key]!r} "
            f"differs from {saved!r}, which {model_file} was trained with; restore "
            f"metadata.json, or {remedy}."
        )
