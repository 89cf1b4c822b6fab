"""What the command-line scripts share: `main`, options, clean errors, outputs.

Every script's `main(argv)` is `run_cli(build_parser, command, argv)`. Every user
error is one line, `error: ...`, and exit code 2: `TLError`s (a bad parameter named
by its option), argument errors (`ArgumentParser`), outputs that cannot be written
(`check_output`, called before any expensive work) and the OS refusing a file later
on. The options the scripts share (backbone, images, `--list-*`) are declared once
here, with their defaults taken from the settings dataclasses.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from tl._checks import ParameterError
from tl.errors import TLError

if TYPE_CHECKING:
    from tl.backbones import BackboneSettings
    from tl.engines import EngineSettings
    from tl.images import ImageSettings

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


def run_cli(
    build_parser: Callable[[], argparse.ArgumentParser],
    command: Callable[[argparse.Namespace], int | None],
    argv: list[str] | None = None,
) -> int:
    """A script's `main`: parse `argv` with `build_parser()`, then run `command`.

    tl errors, argument errors and files the operating system refuses (no space, no
    permission, a read-only file system) become one line on stderr and exit code 2;
    a bad parameter value is named by its option (`--lr`, not `learning_rate`).
    Ctrl-C exits 130 with a note (the work done so far is kept). TensorFlow starts
    only once the arguments parsed, so `--help` and argument errors stay quick.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("tl")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    from tl._tensorflow import start_tensorflow

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        start_tensorflow()
        return command(args) or 0
    except ParameterError as error:
        print(f"error: {_with_option(parser, error)}", file=sys.stderr)
        return EXIT_ERROR
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


def _with_option(parser: argparse.ArgumentParser, error: ParameterError) -> str:
    """The error naming the command-line option whose `dest` is the parameter."""
    for action in parser._actions:  # argparse has no public list of its options
        if action.dest == error.parameter and action.option_strings:
            long = [flag for flag in action.option_strings if flag.startswith("--")]
            return error.message(f"The {(long or action.option_strings)[0]} option")
    return str(error)


# ---------------------------------------------------------------------------------
# Options the scripts share. Each option's `dest` is the settings' flat JSON key, so
# `Settings.from_json(vars(args))` builds the settings, and an error about a
# parameter names its option.


def add_backbone_options(
    parser: argparse.ArgumentParser,
    defaults: BackboneSettings,
    *,
    engine: EngineSettings | None = None,
    backbone_help: str = "backbone name (see --list-backbones)",
    seed_help: str = "random initialisation seed (--weights none)",
    weights_help: str = "imagenet, none (random, for tests) or a weights file",
) -> None:
    """-b/--backbone, -w/--weights, --precision and --seed on `parser` (or one of
    its argument groups), their defaults from `defaults`; with `engine`, the engine
    options too (`add_engine_options`), and --precision offers every engine's."""
    parser.add_argument("-b", "--backbone", default=defaults.name, help=backbone_help)
    parser.add_argument(
        "-w",
        "--weights",
        default=defaults.weights,
        help=weights_help,
    )
    add_precision_option(parser, defaults.precision, engines=engine is not None)
    parser.add_argument("--seed", type=int, default=defaults.seed, help=seed_help)
    if engine is not None:
        add_engine_options(parser, engine)


def add_precision_option(
    parser: argparse.ArgumentParser, default: str | None, *, engines: bool
) -> None:
    """--precision: the Keras engine's precisions, or with `engines` every engine's.
    A default of None means that of a model's training codes (predict.py)."""
    from tl.engines import PRECISIONS, get_engine, list_engines

    help = (
        "compute precision; the half types run the layers in half precision, with "
        "float32 weights, pooling and head"
    )
    choices = get_engine("keras").precisions
    if engines:
        choices = PRECISIONS
        for precision in PRECISIONS:
            names = [n for n in list_engines() if precision in get_engine(n).precisions]
            if len(names) < len(list_engines()):
                help += f"; {precision} with --engine {' or '.join(names)} only"
    if default is None:
        help += " [that of the training codes]"
    parser.add_argument("--precision", default=default, choices=choices, help=help)


def add_engine_options(
    parser: argparse.ArgumentParser, defaults: EngineSettings | None
) -> None:
    """--engine, --calibration-images and --calibration-source on `parser` (or one
    of its argument groups), their defaults from `defaults`; None means those of a
    model's training codes (predict.py)."""
    from tl.engines import DEFAULT_CALIBRATION_IMAGES, get_engine, list_engines

    trained = defaults is None
    values = (None,) * 3 if trained else dataclasses.astuple(defaults)
    name, images, source = values
    parser.add_argument(
        "--engine",
        default=name,
        choices=list_engines(),
        help="what runs the extractor: "
        + "; ".join(
            f"{name}, {get_engine(name).description}" for name in list_engines()
        )
        + (" [that of the training codes]" if trained else ""),
    )
    parser.add_argument(
        "--calibration-images",
        type=int,
        metavar="N",
        default=images,
        help="int8: calibrate on a stratified sample of N images "
        + ("[as the training codes]" if trained else f"[{DEFAULT_CALIBRATION_IMAGES}]"),
    )
    parser.add_argument(
        "--calibration-source",
        metavar="TRAIN",
        default=source,
        help="int8: the training images (folder or CSV) to calibrate on "
        + (
            "[those of the training codes]"
            if trained
            else "[SOURCE]; give it when SOURCE is a test folder, so that test "
            "images never calibrate"
        ),
    )


def add_image_options(
    parser: argparse.ArgumentParser,
    defaults: ImageSettings,
) -> None:
    """-s/--image-size, --resize, --interpolation, --antialias and --max-pixels on
    `parser` (or one of its argument groups), their defaults from `defaults`."""
    from tl.images import INTERPOLATIONS, RESIZE_MODES

    parser.add_argument(
        "-s",
        "--image-size",
        default=defaults.size,
        help="N or HxW [the backbone's default]",
    )
    parser.add_argument("--resize", default=defaults.resize, choices=RESIZE_MODES)
    parser.add_argument(
        "--interpolation", default=defaults.interpolation, choices=INTERPOLATIONS
    )
    parser.add_argument(
        "--antialias",
        action="store_true",
        default=defaults.antialias,
        help="low-pass filter when downscaling (slower)",
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=defaults.max_pixels,
        help="refuse larger images without decoding them",
    )


def add_class_weight_option(parser: argparse.ArgumentParser, help: str) -> None:
    """--class-weight none|balanced (the settings read `none` as None)."""
    from tl.classifiers import CLASS_WEIGHTS

    parser.add_argument(
        "--class-weight",
        choices=[str(weight).lower() for weight in CLASS_WEIGHTS],
        default="none",
        help=help,
    )


def add_info_options(parser: argparse.ArgumentParser) -> None:
    """--list-backbones and --list-layers (see `handle_info`)."""
    info = parser.add_argument_group("information")
    info.add_argument(
        "--list-backbones", action="store_true", help="list the backbones and exit"
    )
    info.add_argument(
        "--list-layers",
        metavar="BACKBONE",
        help="list the aliases and layers of BACKBONE (at --image-size) and exit",
    )


def handle_info(args: argparse.Namespace) -> bool:
    """Print what --list-backbones or --list-layers asked for; whether it did."""
    from tl.backbones import describe_backbones, describe_layers, get_backbone
    from tl.images import ImageSettings

    if args.list_backbones:
        print(describe_backbones())
        return True
    if args.list_layers:
        spec = get_backbone(args.list_layers)
        image = ImageSettings.from_json(vars(args)).resolved(spec)
        print(describe_layers(spec.name, image.size))
        return True
    return False


def print_precision_hint(backbone: BackboneSettings, *, training: bool = False):
    """After the work: a hint when this machine would run `backbone` much faster in
    bfloat16 (`tl.precision.half_precision_hint`). Printed last, so that a refusal
    of bad input stays one line."""
    from tl.precision import half_precision_hint

    hint = half_precision_hint(backbone.precision, backbone.name, training=training)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)


# ---------------------------------------------------------------------------------
# Argument parsing

_TRAILING = "_tl_trailing_values"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors, defaults shown in --help, and list options that
    leave the positional alone.

    Errors raise `TLError`, which `run_cli` prints as one line (exit code 2).
    Options with `action=ListOption` keep only their leading values; the rest go to
    their positional when it is otherwise missing, so `-c logreg STORE` works.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

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
