"""What the command-line scripts share: logging, clean errors, default outputs.

Every user error is one line, `error: ...`, and exit code 2: `TLError`s, argument
errors (`ArgumentParser`), outputs that cannot be written (`check_output`, called
before any expensive work) and the OS refusing a file later on (`run_cli`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from tl.errors import TLError

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def default_output(folder: str, source: str, backbone: str, suffix: str = "") -> str:
    """`<folder>/<source name>_<backbone><suffix>`: where a script writes by default."""
    name = Path(source.rstrip("/")).stem or "images"
    return str(Path(folder) / f"{name}_{backbone.lower()}{suffix}")


def check_output(path: str | Path, option: str, *, folder: bool = False) -> Path:
    """Refuse, in one line, an output that cannot be written: call it before any
    expensive work, so that a typo costs nothing.

    Nothing is created: a missing folder on the way is fine when the nearest
    existing one above it takes new files.

    Args:
        path: the file to write, or with `folder` the folder to write into.
        option: the command-line option that named it, for the message.

    Returns:
        `path` as a `Path`.
    """
    path = Path(path).expanduser()
    shown = f"{option} {str(path)!r}"
    try:
        if path.is_dir() and not folder:
            raise TLError(f"{shown} is a folder; give the file to write in it.")
        if path.exists() and not path.is_dir() and folder:
            raise TLError(f"{shown} is a file; give a folder to write into.")
        nearest = path if folder else path.parent
        while not nearest.exists():
            nearest = nearest.parent
        if not nearest.is_dir():
            raise TLError(
                f"{shown} lies inside {str(nearest)!r}, which is a file, not a folder."
            )
        if path.is_file():
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
        with tempfile.TemporaryFile(dir=nearest):
            pass
    except OSError as error:
        raise TLError(
            f"Cannot write {shown}: {error.strerror or error}. Choose a writable "
            f"location."
        ) from None
    return path


def describe_os_error(error: OSError) -> str:
    """One line: what the operating system refused, and for which file."""
    names = [os.fsdecode(n) for n in (error.filename, error.filename2) if n]
    text = error.strerror or str(error)
    if names:
        text += ": " + " -> ".join(map(repr, names))
    return " ".join(text.split())


def run_cli(command: Callable[[], int | None]) -> int:
    """Run a script's command: tl errors, and files the operating system refuses
    (no space, no permission, a read-only file system), become one line on stderr
    and exit code 2; Ctrl-C exits 130 with a note (the work done so far is kept)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("tl")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    from tl._tensorflow import start_tensorflow

    try:
        start_tensorflow()
        return command() or 0
    except TLError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as error:
        print(f"error: {describe_os_error(error)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(
            "\ninterrupted: what was done so far is saved; re-run the same command "
            "to continue.",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED


# ---------------------------------------------------------------------------------
# Argument parsing

_TRAILING = "_tl_trailing_values"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors, and list options that leave the positional alone.

    Errors raise `TLError`, which `run_cli` prints as one line (exit code 2).
    Options with `action=ListOption` keep only their leading values; the rest go to
    their positional when it is otherwise missing, so `-c logreg STORE` works.
    """

    def error(self, message: str):
        raise TLError(f"{message}; see --help.")

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        for option, trailing in vars(namespace).pop(_TRAILING, []):
            option.hand_over(self, namespace, trailing)
        return namespace, extras


class ListOption(argparse.Action):
    """A list option (nargs "+" or "*") that does not swallow the positional after it.

    argparse gives every value up to the next flag to the option, so in
    `train_classifier.py -c logreg STORE` the store is taken for a classifier. This
    action keeps the leading values that belong to the option: one of `choices`, a
    valid value of `type`, or else (free text, such as layer names) anything but an
    existing path. `ArgumentParser` hands the rest to the positional named
    `positional` when the command line gives it nowhere else, and otherwise reports
    the first of them as an invalid value (free text: keeps them as values).
    """

    def __init__(
        self,
        option_strings,
        dest,
        *,
        positional: str,
        choices=None,
        type=None,
        nargs="+",
        metavar=None,
        **kwargs,
    ):
        if choices is not None and metavar is None:
            metavar = "{" + ",".join(choices) + "}"
        super().__init__(option_strings, dest, nargs=nargs, metavar=metavar, **kwargs)
        self.positional = positional
        self.allowed = None if choices is None else list(choices)
        self.convert = type

    def _value(self, text: str, first: bool):
        """The value of `text` for this option, or None when it does not belong (the
        first free-text value always does)."""
        if self.allowed is not None:
            return text if text in self.allowed else None
        if self.convert is not None:
            try:
                return self.convert(text)
            except (TypeError, ValueError):
                return None
        return text if first or not Path(text).exists() else None

    def __call__(self, parser, namespace, values, option_string=None):
        kept = []
        for text in values:
            value = self._value(text, first=not kept)
            if value is None:
                break
            kept.append(value)
        setattr(namespace, self.dest, kept)
        if len(kept) < len(values):
            trailing = list(values[len(kept) :])
            vars(namespace).setdefault(_TRAILING, []).append((self, trailing))

    def hand_over(self, parser, namespace, trailing: list[str]) -> None:
        """Give `trailing` to the positional if it is missing, else refuse or keep."""
        flags = "/".join(self.option_strings)
        if getattr(namespace, self.positional, None) is None and len(trailing) == 1:
            setattr(namespace, self.positional, trailing[0])
            if self.nargs == "+" and not getattr(namespace, self.dest):
                parser.error(f"argument {flags}: expected at least one argument")
            return
        if self.allowed is not None:
            parser.error(
                f"argument {flags}: invalid choice: {trailing[0]!r} (choose from "
                f"{', '.join(self.allowed)})"
            )
        if self.convert is not None:
            name = getattr(self.convert, "__name__", repr(self.convert))
            parser.error(f"argument {flags}: invalid {name} value: {trailing[0]!r}")
        getattr(namespace, self.dest).extend(trailing)


def add_dask_option(group) -> None:
    """`--dask CLUSTER`: run the script's parallel work on Dask (`tl.distributed`)."""
    group.add_argument(
        "--dask",
        metavar="CLUSTER",
        help="run on Dask (pip install 'tl[dask]'): local:N for N worker processes "
        "on this machine, or a scheduler address such as tcp://host:8786",
    )
