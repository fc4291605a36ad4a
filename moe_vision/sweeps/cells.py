"""A sweep's cells and their ids: one run each, named for what it runs.

A :class:`Cell` is one point of the grid (expert combination, fusion column, recipe, seed) with
the run config the sweep's entrypoint receives. Its id is a readable name plus a hash of that
config (:func:`config_hash`: the :data:`RUNTIME_KEYS` left out, the identity of the local
weights its experts load added, :func:`weights_identity`), so the same cell always lands in the
same folder ``<sweep>/cells/<cell_id>/`` and regenerated weights make new cells. Expanding a
spec into cells is :meth:`moe_vision.sweeps.spec.SweepSpec.expand`.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RUNTIME_KEYS: frozenset[str] = frozenset(
    {
        "cache_dir",
        "train.progress_bar",
        "train.num_workers",
        "train.log_with",
        "train.log_every",
        "train.keep_checkpoints",
        "train.checkpoint_every",
        "train.checkpoint_interval_s",
    }
)
"""Dotted run-config keys that say *where* or *how visibly* a cell runs, not *what* it
computes: they are left out of the cell id's hash (moving the feature cache or turning off
progress bars does not make a finished cell stale)."""


def _slug(text: str, limit: int = 80) -> str:
    slug = re.sub(r"[^A-Za-z0-9.+_-]+", "_", text).strip("_")
    return slug[:limit]


OMITTED_AT_DEFAULT: Mapping[str, Any] = {"train.compile_llm": False}
"""Dotted run-config keys added after cells were published, with their defaults: left out of the
cell id's hash while at the default, so finished cells keep their ids (a key set to another
value is hashed: a compiled run computes in other last bits)."""


def _pop_dotted(config: dict[str, Any], dotted: str, only_if: Any = ...) -> None:
    """Remove ``dotted`` from ``config`` (when its value is ``only_if``, if given)."""
    *parents, last = dotted.split(".")
    node: Any = config
    for key in parents:
        node = node.get(key) if isinstance(node, dict) else None
    if isinstance(node, dict) and last in node and (only_if is ... or node[last] == only_if):
        node.pop(last)


def config_hash(config: Mapping[str, Any]) -> str:
    """Stable hash of a run config (canonical JSON, sorted keys, ``RUNTIME_KEYS`` left out, and
    ``OMITTED_AT_DEFAULT`` keys while at their defaults)."""
    identity = copy.deepcopy(dict(config))
    for dotted in RUNTIME_KEYS:
        _pop_dotted(identity, dotted)
    for dotted, default in OMITTED_AT_DEFAULT.items():
        _pop_dotted(identity, dotted, only_if=default)
    weights = weights_identity(identity)
    if weights:  # cells on local weights: new weights are a new cell, not a stale result
        identity["_weights"] = weights
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


HASHED_CHECKPOINT_BYTES = 256 * 2**20
"""Local checkpoint files up to this size are identified by content, larger ones by size and
modification time."""


def weights_identity(config: Mapping[str, Any]) -> dict[str, str]:
    """Expert name -> identity of the local weights it loads (content hash of a checkpoint file,
    size and time of a large one or of a folder's files); experts at random init or loading a
    hub id are left out. Part of the cell id, so that regenerated weights (``moe-vision
    pretrain``) give new cells."""
    import experts

    model = config.get("model") or {}
    options = model.get("expert_options") or {}
    out = {}
    for name in model.get("experts") or []:
        opts = options.get(name) or {}
        path = opts.get("checkpoint")
        if path is None and opts.get("pretrained"):
            path = experts.get_spec(name).checkpoint
        if path is not None and Path(path).exists():
            out[name] = _file_identity(Path(path))
    return out


def _file_identity(path: Path) -> str:
    if path.is_file() and path.stat().st_size <= HASHED_CHECKPOINT_BYTES:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    return ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)


@dataclass(frozen=True)
class Cell:
    """One run of a sweep.

    Attributes:
        experts: the expert combination the model builds, in order.
        fusion: the fusion column label (the strategy's name unless labelled).
        fusion_options: the strategy's resolved options.
        recipe: recipe preset name or YAML path.
        seed: random seed.
        config: the run config handed to the entrypoint
            (``moe_vision.experiment.run.RunConfig`` as a dict); its hash is the id's suffix.
        control: ``None``, or the control this cell is (:mod:`moe_vision.sweeps.controls`:
            ``random_init``, ``equal_tokens``).
        labels: how the tables name the experts when not by their names (a control's
            ``convnext-mini (random init)``); ``None``: ``experts``.
    """

    experts: tuple[str, ...]
    fusion: str
    fusion_options: dict[str, Any]
    recipe: str
    seed: int
    config: dict[str, Any]
    control: str | None = None
    labels: tuple[str, ...] | None = None

    @property
    def name(self) -> str:
        """Readable name: ``experts__fusion__recipe__s<seed>`` (the experts by their labels)."""
        recipe = Path(self.recipe).stem if self.recipe.endswith((".yaml", ".yml")) else self.recipe
        return f"{'+'.join(self.labels or self.experts)}__{self.fusion}__{recipe}__s{self.seed}"

    @functools.cached_property
    def cell_id(self) -> str:
        """``<slug of name>-<10 hex digits of the config hash>``: stable and unique (computed
        once per cell: the hash reads the local checkpoints' bytes)."""
        return f"{_slug(self.name)}-{config_hash(self.config)[:10]}"

    def settings(self) -> dict[str, Any]:
        """The manifest entry (the settings columns of the results row): ``experts`` are the
        labels, so that a control is a setting of its own; ``control`` says which it is."""
        return {
            "cell_id": self.cell_id,
            "name": self.name,
            "experts": list(self.labels or self.experts),
            "fusion": self.fusion,
            "fusion_options": self.fusion_options,
            "recipe": self.recipe,
            "seed": self.seed,
            "control": self.control,
        }
