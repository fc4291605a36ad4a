"""The ``moe-vision`` command line.

Each subcommand lives in its own module under :mod:`moe_vision.commands` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to a callable taking the
parsed ``argparse.Namespace`` and returning an exit code. Adding a command is one module.

Bad input is reported in one or two lines on stderr (``error: <what was wrong, where, what was
expected>``) with exit code 2: the project's input errors (bad records, images, fusion
configurations, recipes, checkpoints, run configs, missing user files, a sweep folder that
another sweep holds) and any ``ValueError`` / ``KeyError`` / ``FileNotFoundError`` raised by this
project's own code, which raises them where bad input enters (:func:`user_error`). Anything else
is a bug and keeps its traceback; ``moe-vision -v`` shows the traceback of input errors too.

Ctrl-C ends a command with one line and exit code 130 (``-v``: the traceback): ``interrupted``,
followed by what was kept and how to go on when the command said so by setting
``args.interrupt_hint`` (a string, or a callable returning one at the moment of the interrupt),
as ``train`` (``--resume``) and ``sweep`` (finished cells are kept) do.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence
from pathlib import Path

from moe_vision import commands
from moe_vision.console import configure_console

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
_OWN_CODE = tuple(
    str(Path(__file__).resolve().parents[1] / pkg) for pkg in ("experts", "fusion", "moe_vision")
)


def _input_error_types() -> tuple[type[BaseException], ...]:
    """The project's exception types that always mean bad input (imported lazily)."""
    from experts.images import ImageError
    from fusion.base import FusionConfigError
    from moe_vision.data.records import DataError
    from moe_vision.sweeps.sweep import SweepBusyError
    from moe_vision.training.checkpoint import CheckpointError
    from moe_vision.training.recipe_stages import RecipeError

    return (ImageError, DataError, FusionConfigError, RecipeError, CheckpointError, SweepBusyError)


def _close_progress_bars() -> None:
    """Close the tqdm bars an exception left open (each ends its line)."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def user_error(err: BaseException) -> str | None:
    """The one- or two-line message for an input error; ``None`` for anything else (a bug).

    ``ValueError``, ``KeyError`` and ``FileNotFoundError`` count as input errors only when the
    innermost frame that raised them is in ``experts``, ``fusion`` or ``moe_vision`` (our
    checks, e.g. an unknown expert name or a config key), not deep inside torch.
    """
    own_types = _input_error_types()
    if not isinstance(err, (*own_types, ValueError, KeyError, FileNotFoundError)):
        return None
    if not isinstance(err, own_types):
        tb = err.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is None or not tb.tb_frame.f_code.co_filename.startswith(_OWN_CODE):
            return None
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        return err.args[0]  # str(KeyError) would quote it
    return str(err) or type(err).__name__


def interrupted_message(args: argparse.Namespace) -> str:
    """``interrupted`` and, when the command set ``args.interrupt_hint``, what was kept and how
    to go on (the hint may be a callable, evaluated now)."""
    hint = getattr(args, "interrupt_hint", None)
    text = hint() if callable(hint) else hint
    return f"interrupted: {text}" if text else "interrupted"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-vision",
        description="Mixture-of-vision-experts multimodal LLMs: experts, fusion, training, sweeps.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log to the console (debug level)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # The console shows results and warnings (each once); libraries' INFO lines only with -v.
    # train and sweep send INFO to their run folders' log files on top of this.
    configure_console(args.verbose)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if args.verbose:
            raise
        _close_progress_bars()
        print(interrupted_message(args), file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        message = None if args.verbose else user_error(err)
        if message is None:
            raise
        _close_progress_bars()  # so the message starts its own line
        print(f"error: {message}", file=sys.stderr)
        print("(moe-vision -v ... shows the traceback)", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
