"""Sweep specs: expert combinations x fusion strategies x recipes x seeds, as data.

The experiment grid of Eagle (Shi et al., 2024, "Eagle: Exploring the Design Space for
Multimodal LLMs with Mixture of Encoders", section 3: a base CLIP expert plus every choice of
further experts, under several fusion designs) and of Cambrian-1 (Tong et al., 2024, its
encoder-combination study):

.. code-block:: yaml

    name: eagle-style
    experts:
      base: clip-tiny            # always included, first (its grid is the default target)
      pool: [convnext-tiny, sam-tiny, pix2struct-tiny]
      k: [2, 3]                  # experts per combination, base included
      combinations: [[clip-tiny]]   # explicit combinations, added to the k-subsets
    fusions:
      - channel_concat
      - {name: sequence_append, options: {dim: 64}}
    exclude: [{experts: [clip-tiny], fusion: sequence_append}]   # cells left out
    recipes: [llava]
    seeds: [0, 1]
    model: {llm: tiny-qwen2}     # shared ModelConfig fields
    data: {}                     # shared DataConfig fields
    run: {overrides: {"*": {max_steps: 20}}, train: {progress_bar: false}}  # other RunConfig
    executor: {kind: process, workers: 2}

:meth:`SweepSpec.expand` turns a spec into :class:`Cell` objects whose id is a readable name
plus a hash of the cell's resolved run config (and of the local weights its experts load), so
the same cell always lands in the same folder ``<sweep>/cells/<cell_id>/``. Running them is
:mod:`moe_vision.sweeps.sweep`. The grid's axes (expert combinations, fusion choices, ``exclude``
entries) are read in :mod:`moe_vision.sweeps.grid_axes`; a cell and its id are
:mod:`moe_vision.sweeps.cells`.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import itertools
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moe_vision import results
from moe_vision.sweeps.cells import (  # noqa: F401 - re-exported: a cell and its id
    HASHED_CHECKPOINT_BYTES,
    RUNTIME_KEYS,
    Cell,
    config_hash,
    weights_identity,
)
from moe_vision.sweeps.grid_axes import (  # noqa: F401 - re-exported: the grid's axes
    EXCLUDE_KEYS,
    ExpertCombos,
    FusionChoice,
    _as_list,
    _check_keys,
    _exclusion,
)

logger = logging.getLogger(__name__)


DEFAULT_ENTRYPOINT = "moe_vision.sweeps.sweep:run_cell"
Entrypoint = Callable[[dict[str, Any], Path], Mapping[str, Any]]
"""``(run_config_dict, cell_dir) -> metrics row``: what a sweep runs for each cell."""


# ---------------------------------------------------------------------------- spec
@dataclass
class SweepSpec:
    """A sweep: expert combinations x fusions x recipes x seeds, plus shared options.

    Attributes:
        name: the sweep's name (default output folder ``runs/sweeps/<name>``).
        experts: the expert combinations (:class:`ExpertCombos`).
        fusions: the fusion strategies (:class:`FusionChoice`).
        recipes: training recipes: preset names (``eagle``, ``cambrian``, ``llava``) or paths
            to recipe YAML files.
        seeds: random seeds; each is a separate cell.
        model: shared :class:`~moe_vision.model.ModelConfig` fields (not ``experts``/``fusion``).
        data: shared data config (:class:`moe_vision.training.run.DataConfig` fields).
        run: other shared :class:`moe_vision.training.run.RunConfig` fields (``overrides`` of the
            recipe's stages, ``train`` options, ``eval_batch_size``, ``cache_dir``...).
        executor: ``{"kind": "inline" | "process" | "submitit", **options}``
            (:mod:`moe_vision.sweeps.executors`).
        entrypoint: ``"module:function"`` run for each cell, ``(config, cell_dir) -> row``.
        output: the sweep folder (default ``runs/sweeps/<name>``).
        attribute: after each cell, evaluate it again with each expert ablated
            (:func:`moe_vision.analysis.attribution.attribute`) and add the accuracy drops
            ``drop/<expert>/<category>`` (with ``/lo``, ``/hi``) to its row.
        exclude: cells left out of the grid: each entry gives some of ``experts`` (a
            combination), ``fusion`` (a column label), ``recipe`` and ``seed``, and a cell
            matching every key of an entry is not run (e.g. one expert alone under only one of
            the fusions: ``{experts: [clip-mini], fusion: sequence_append}``). An entry that
            matches no cell is logged as a warning (a typo, or a grid narrowed by flags).
    """

    name: str = "sweep"
    experts: ExpertCombos = field(default_factory=ExpertCombos)
    fusions: list[FusionChoice] = field(default_factory=list)
    recipes: list[str] = field(default_factory=lambda: ["llava"])
    seeds: list[int] = field(default_factory=lambda: [0])
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)
    executor: dict[str, Any] = field(default_factory=lambda: {"kind": "inline"})
    entrypoint: str = DEFAULT_ENTRYPOINT
    output: str | None = None
    attribute: bool = False
    exclude: list[dict[str, Any]] = field(default_factory=list)

    # -------------------------------------------------------------- (de)serialisation
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SweepSpec:
        """From a YAML/JSON mapping; ``recipe`` / ``seed`` / ``fusion`` are accepted as
        singular aliases. Unknown keys raise with the valid ones listed."""
        data = dict(data)
        for single, plural in (("recipe", "recipes"), ("seed", "seeds"), ("fusion", "fusions")):
            if single in data:
                if plural in data:
                    raise ValueError(f"sweep spec: give {single!r} or {plural!r}, not both")
                data[plural] = data.pop(single)
        _check_keys(data, [f.name for f in dataclasses.fields(cls)], "the sweep spec")
        for key in ("model", "data", "run"):
            if key in data and not isinstance(data[key] or {}, Mapping):
                raise TypeError(f"sweep spec: {key} must be a mapping of options")
        for key in ("experts", "fusion"):
            if key in (data.get("model") or {}):
                raise ValueError(
                    f"sweep spec: model.{key} is set per cell by the sweep; use the top-level "
                    f"'experts' / 'fusions' keys instead"
                )
        executor = data.get("executor") or {"kind": "inline"}
        if isinstance(executor, str):
            executor = {"kind": executor}
        spec = cls(
            name=str(data.get("name", "sweep")),
            experts=ExpertCombos.from_dict(data.get("experts") or {}),
            fusions=[FusionChoice.from_dict(f) for f in _as_list(data.get("fusions"), "fusions")],
            recipes=[str(r) for r in _as_list(data.get("recipes", ["llava"]), "recipes")],
            seeds=[int(s) for s in _as_list(data.get("seeds", [0]), "seeds")],
            model=dict(data.get("model") or {}),
            data=dict(data.get("data") or {}),
            run=dict(data.get("run") or {}),
            executor=dict(executor),
            entrypoint=str(data.get("entrypoint", DEFAULT_ENTRYPOINT)),
            output=data.get("output"),
            attribute=bool(data.get("attribute", False)),
            exclude=[_exclusion(e) for e in _as_list(data.get("exclude"), "exclude")],
        )
        if "kind" not in spec.executor:
            raise ValueError(f"sweep spec: executor {spec.executor} needs a 'kind'")
        return spec

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> SweepSpec:
        """Load a spec from a YAML file (safe loader)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"sweep spec {path} does not exist")
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(data, Mapping):
            raise ValueError(
                f"sweep spec {path}: expected a YAML mapping, got {type(data).__name__}"
            )
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """A YAML/JSON-friendly dict that :meth:`from_dict` reads back to an equal spec."""
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | os.PathLike[str] | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            results.atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))
        return text

    def with_overrides(self, overrides: Mapping[str, Any]) -> SweepSpec:
        """A copy with dotted-key overrides applied, e.g. ``{"model.llm": "tiny-llama",
        "run.seed": 2}`` (the ``--set`` flag of ``moe-vision sweep``)."""
        data = self.to_dict()
        for dotted, value in overrides.items():
            keys = dotted.split(".")
            node = data
            for k in keys[:-1]:
                if not isinstance(node.get(k, {}), dict):
                    raise ValueError(f"--set {dotted}: {k!r} is not a mapping in the spec")
                node = node.setdefault(k, {})
            node[keys[-1]] = value
        return SweepSpec.from_dict(data)

    def output_dir(self) -> Path:
        return Path(self.output) if self.output else Path("runs") / "sweeps" / self.name

    # -------------------------------------------------------------- expansion
    def validate(self) -> None:
        """Check names against the registries, so typos fail before any cell runs."""
        import experts
        import fusion

        combos = self.experts.expand()
        known = set(experts.list_experts())
        unknown = sorted({e for c in combos for e in c} - known)
        if unknown:
            raise KeyError(
                f"sweep spec: unknown experts {unknown}; valid experts are {sorted(known)}"
            )
        # options for a known expert that this grid does not use are fine (the default spec
        # narrowed with --experts); a name the zoo does not know is a typo
        stray = sorted(set(self.model.get("expert_options") or {}) - known)
        if stray:
            raise ValueError(
                f"sweep spec: model.expert_options names unknown experts {stray}; valid experts "
                f"are {sorted(known)}"
            )
        if not self.fusions:
            raise ValueError("sweep spec: no fusion strategies; give 'fusions'")
        valid_fusions = set(fusion.list_fusions())
        bad = sorted({f.name for f in self.fusions} - valid_fusions)
        if bad:
            raise KeyError(
                f"sweep spec: unknown fusions {bad}; valid fusions are {sorted(valid_fusions)}"
            )
        labels = [f.column for f in self.fusions]
        if len(set(labels)) != len(labels):
            raise ValueError(
                f"sweep spec: fusion labels {labels} repeat; give repeated strategies a 'label'"
            )
        if not self.recipes:
            raise ValueError("sweep spec: no recipes; give 'recipes'")
        from moe_vision.training.recipes import get_recipe

        for recipe in self.recipes:
            get_recipe(recipe)  # raises naming the presets, or the missing YAML file
        if not self.seeds:
            raise ValueError("sweep spec: no seeds; give 'seeds'")

    def _excluded(self, cell: dict[str, Any], used: set[int]) -> bool:
        """Whether ``cell`` (experts, fusion, recipe, seed) matches an ``exclude`` entry; the
        indices of the entries that match go into ``used``."""
        hits = {i for i, e in enumerate(self.exclude) if all(cell[k] == v for k, v in e.items())}
        used |= hits
        return bool(hits)

    def _cell(
        self,
        combo: tuple[str, ...],
        choice: FusionChoice,
        recipe: str,
        seed: int,
        resolve: Callable[[dict[str, Any]], dict[str, Any]] | None,
    ) -> Cell:
        """One grid point as a :class:`Cell`: the shared options with the point's experts,
        fusion, recipe and seed set (resolved with ``resolve`` when the entrypoint has one)."""
        fusion_options = {**(self.model.get("fusion_options") or {}), **choice.options}
        model = copy.deepcopy(self.model)
        if "expert_options" in model:  # shared per-expert options: those of this cell's
            model["expert_options"] = {
                k: v for k, v in model["expert_options"].items() if k in combo
            }
        config = {
            **copy.deepcopy(self.run),
            "model": {
                **model,
                "experts": list(combo),
                "fusion": choice.name,
                "fusion_options": fusion_options,
            },
            "recipe": recipe,
            "data": copy.deepcopy(self.data),
            "seed": seed,
        }
        if resolve is not None:
            config = resolve(config)
        return Cell(
            experts=combo,
            fusion=choice.column,
            fusion_options=fusion_options,
            recipe=recipe,
            seed=seed,
            config=config,
        )

    def max_cells(self) -> int:
        """The grid's size before exclusions: an upper bound on the cells, found without
        importing the zoo or resolving any cell's config."""
        return len(self.experts.expand()) * len(self.fusions) * len(self.recipes) * len(self.seeds)

    def expand(self) -> list[Cell]:
        """The sweep's cells, in order experts x fusions x recipes x seeds.

        When the entrypoint has a ``resolve_config(config) -> dict`` attribute (the default
        :func:`run_cell` does: :class:`~moe_vision.training.run.RunConfig` defaults filled in,
        the recipe
        expanded), each cell's config is resolved with it, so a bad option fails here, before
        any cell runs, and the cell id hashes everything that defines the run.
        """
        self.validate()
        resolve = getattr(resolve_entrypoint(self.entrypoint), "resolve_config", None)
        cells = []
        used: set[int] = set()
        for combo, choice, recipe, seed in itertools.product(
            self.experts.expand(), self.fusions, self.recipes, self.seeds
        ):
            where = {
                "experts": list(combo),
                "fusion": choice.column,
                "recipe": recipe,
                "seed": seed,
            }
            if self._excluded(where, used):
                continue
            cells.append(self._cell(combo, choice, recipe, seed, resolve))
        unused = [e for i, e in enumerate(self.exclude) if i not in used]
        if unused:  # a typo, or a grid narrowed by flags: say so, do not stop
            logger.warning("sweep spec: exclude entries %s match no cell of the grid", unused)
        ids = [c.cell_id for c in cells]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"sweep spec: cells {dup} appear more than once")
        return cells


def resolve_entrypoint(entrypoint: str | Entrypoint) -> Entrypoint:
    """A ``"module:function"`` string to the function (callables pass through)."""
    if callable(entrypoint):
        return entrypoint
    module_name, sep, attr = str(entrypoint).partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"entrypoint {entrypoint!r} must look like 'package.module:function'")
    module = importlib.import_module(module_name)
    if not hasattr(module, attr):
        raise AttributeError(f"entrypoint {entrypoint!r}: module {module_name} has no {attr!r}")
    return getattr(module, attr)
