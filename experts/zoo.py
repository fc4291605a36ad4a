"""The zoo as a table: every registered expert preset with its spec and parameter count.

:func:`zoo_table` builds each preset on the ``meta`` device (no allocation, no download) to
count its parameters, so the table is cheap even for billion-parameter towers. ``moe-vision
experts`` prints it.
"""

from __future__ import annotations

import functools

import pandas as pd

from experts.registry import create_expert, get_spec, list_experts
from experts.spec import ExpertSpec

COLUMNS: tuple[str, ...] = (
    "name",
    "family",
    "role",
    "library",
    "checkpoint",
    "input size",
    "grid",
    "channels",
    "parameters",
    "stride",
    "stages",
)


@functools.cache
def count_parameters(name: str) -> int:
    """Parameters of preset ``name``, counted on the ``meta`` device (nothing allocated)."""
    expert = create_expert(name, device="meta")
    return sum(p.numel() for p in expert.parameters())


def _size(spec: ExpertSpec) -> str:
    h, w = spec.input_size
    if spec.variable_resolution:
        return f"<={spec.max_patches} patches of {spec.patch_size}px (grid {h}x{w}px)"
    return f"{h}x{w}"


def zoo_row(name: str) -> dict[str, object]:
    """One table row for preset ``name``."""
    spec = get_spec(name)
    return {
        "name": spec.name,
        "family": spec.family,
        "role": spec.role,
        "library": spec.library,
        "checkpoint": spec.checkpoint or "(random init)",
        "input size": _size(spec),
        "grid": f"{spec.grid[0]}x{spec.grid[1]}",
        "channels": spec.channels,
        "parameters": count_parameters(name),
        "stride": spec.patch_size,
        "stages": spec.num_stages,
    }


def zoo_table(pattern: str | None = None) -> pd.DataFrame:
    """The registered experts matching ``pattern`` (fnmatch, e.g. ``"*-tiny"``) as a DataFrame.

    Columns: see :data:`COLUMNS`. Raises ``KeyError`` when nothing matches, listing the names.
    """
    names = list_experts(pattern)
    if not names:
        raise KeyError(
            f"no expert matches {pattern!r}; valid experts are: {', '.join(list_experts())}"
        )
    return pd.DataFrame([zoo_row(n) for n in names], columns=list(COLUMNS))
