"""Subcommands of ``moe-vision``; each module exposes ``register(subparsers)``.

Shared argument types and option checks live here (this package module is not a subcommand).
The checks run at the top of a command, before any work, and raise :class:`UsageError`, which
``moe_vision.cli`` prints as ``error: <flag> ...`` with exit code 2.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path


class UsageError(ValueError):
    """Flags that do not fit together, or that name something missing: ``moe_vision.cli`` prints
    ``error: <message>`` and exits with 2, as for any bad input (``-v``: the traceback)."""


def comma_list(text: str) -> list[str]:
    """``argparse`` type: ``"a, b,c"`` -> ``["a", "b", "c"]``; an empty list is an error."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return items


def check_at_least(flag: str, value: float | None, minimum: float) -> None:
    """Raise :class:`UsageError` unless ``value`` is ``None`` or a finite number >= ``minimum``."""
    if value is not None and not (math.isfinite(value) and value >= minimum):
        raise UsageError(f"{flag} {value}: expected a number >= {minimum:g}")


def check_positive(flag: str, value: float | None) -> None:
    """Raise :class:`UsageError` unless ``value`` is ``None`` or a finite number > 0."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise UsageError(f"{flag} {value}: expected a finite number > 0")


def check_folder(flag: str, path: str | Path | None) -> None:
    """Raise :class:`UsageError` unless ``path`` is ``None``, a folder, or can be created as one
    (its nearest existing ancestor is a folder)."""
    if path is None:
        return
    p = Path(path)
    for q in (p, *p.parents):
        if q.exists():
            if not q.is_dir():
                what = "is a file" if q == p else f"lies under the file {q}"
                raise UsageError(f"{flag} {p}: {what}; expected a folder (existing or new)")
            return


def check_output_file(flag: str, path: str | Path | None) -> None:
    """Raise :class:`UsageError` unless ``path`` is ``None`` or a file that can be written:
    not a folder, and under a folder (existing or new)."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{flag} {p}: is a folder; expected a file name to write")
    check_folder(flag, p.parent)


def check_device(flag: str, name: str | None) -> None:
    """Raise :class:`UsageError` unless ``name`` is ``None`` or a torch device this machine has
    (``cpu``, ``cuda``, ``cuda:N``, ``mps``, ...)."""
    if name is None:
        return
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(
            f"{flag} {name!r}: not a torch device; expected cpu, cuda, cuda:N or mps"
        ) from None
    if device.type == "cpu":
        return
    backend = getattr(torch, device.type, None)
    if device.type == "mps":
        backend = torch.backends.mps
    if backend is None or not backend.is_available():
        raise UsageError(
            f"{flag} {name}: this machine has no {device.type} device (torch "
            f"{torch.__version__}); use --device cpu"
        )
    count = getattr(backend, "device_count", lambda: 1)()
    if device.index is not None and device.index >= count:
        raise UsageError(f"{flag} {name}: only {count} {device.type} device(s) here")
