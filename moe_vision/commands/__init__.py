"""Subcommands of ``moe-vision``; each module exposes ``register(subparsers)``.

Shared argument types live here (this package module is not a subcommand)."""

from __future__ import annotations

import argparse


class UsageError(ValueError):
    """Flags that do not fit together, or that name something missing: ``moe_vision.cli`` prints
    ``error: <message>`` and exits with 2, as for any bad input (``-v``: the traceback)."""


def comma_list(text: str) -> list[str]:
    """``argparse`` type: ``"a, b,c"`` -> ``["a", "b", "c"]``; an empty list is an error."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return items
