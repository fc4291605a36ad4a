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
    controls: [random_init, equal_tokens]   # control cells (moe_vision.sweeps.controls)

:meth:`SweepSpec.expand` turns a spec into :class:`Cell` objects whose id is a readable name
plus a hash of the cell's resolved run config (and of the local weights its experts load), so
the same cell always lands in the same folder ``<sweep>/cells/<cell_id>/``. Running them is
:mod:`moe_vision.sweeps.sweep`. The grid's axes (expert combinations, fusion choices, ``exclude``
entries) are read in :mod:`moe_vision.sweeps.grid_axes`; a cell and its id are
:mod:`moe_vision.sweeps.cells`; the control cells (random-init twins, equal-token base) are
:mod:`moe_vision.sweeps.controls`. A spec that cannot be read raises :class:`SweepSpecError`
naming the file, the key, what it holds and what was expected.
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

from moe_vision.io import atomic_write
from moe_vision.sweeps.cells import (
    Cell,
)
from moe_vision.sweeps.controls import (
    EQUAL_TOKENS,
    RANDOM_INIT,
    Variant,
    added_experts,
    check_controls,
    variants,
)
from moe_vision.sweeps.grid_axes import (
    ExpertCombos,
    FusionChoice,
    SweepSpecError,
    as_list,
    check_keys,
    exclusion,
)

logger = logging.getLogger(__name__)


DEFAULT_ENTRYPOINT = "moe_vision.sweeps.sweep:run_cell"
Entrypoint = Callable[[dict[str, Any], Path], Mapping[str, Any]]
"""``(run_config_dict, cell_dir) -> metrics row``: what a sweep runs for each cell."""


# ---------------------------------------------------------------------------- spec
_EXPECTED: dict[str, tuple[tuple[type, ...], str]] = {
    "name": ((str,), "a string"),
    "experts": ((Mapping, list), "a mapping (base, pool, k, combinations) or a list of lists"),
    "fusions": ((str, Mapping, list), "a fusion name, or a list of names or {name, options}"),
    "recipes": ((str, list), "a recipe name or a list of them"),
    "seeds": ((int, list), "an integer or a list of integers"),
    "model": ((Mapping,), "a mapping of ModelConfig options"),
    "data": ((Mapping,), "a mapping of DataConfig options"),
    "run": ((Mapping,), "a mapping of RunConfig options"),
    "executor": ((str, Mapping), "an executor kind or a mapping {kind: ..., <options>}"),
    "entrypoint": ((str,), "a 'module:function' string"),
    "output": ((str,), "a folder path"),
    "attribute": ((bool,), "true or false"),
    "exclude": ((list,), "a list of mappings"),
    "controls": ((str, list), "a list of control names (random_init, equal_tokens)"),
}
"""Each top-level key's accepted YAML types and what the error says was expected (an empty
value, ``null``, means the key's default)."""


def _check_types(data: Mapping[str, Any]) -> None:
    """Raise :class:`SweepSpecError` for the first top-level key holding the wrong type."""
    for key, value in data.items():
        types, expected = _EXPECTED[key]
        wrong_bool = isinstance(value, bool) and bool not in types
        if value is not None and (not isinstance(value, types) or wrong_bool):
            raise SweepSpecError(
                f"sweep spec: {key} must be {expected}, got {value!r} ({type(value).__name__})"
            )


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
        data: shared data config (:class:`moe_vision.experiment.run_config.DataConfig` fields).
        run: other shared :class:`moe_vision.experiment.run.RunConfig` fields (``overrides`` of the
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
            An entry with ``control`` matches only that control's cells; a cell left out takes
            its controls with it.
        controls: control cells added next to every cell whose combination adds experts to
            the base: ``random_init`` (each added expert's random-init twin) and
            ``equal_tokens`` (the base repeated to the mixture's tokens and channels); see
            :mod:`moe_vision.sweeps.controls`.
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
    controls: list[str] = field(default_factory=list)

    # -------------------------------------------------------------- (de)serialisation
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SweepSpec:
        """From a YAML/JSON mapping; ``recipe`` / ``seed`` / ``fusion`` are accepted as
        singular aliases. Unknown keys, and values of the wrong type, raise
        :class:`SweepSpecError` naming the key and what was expected."""
        if not isinstance(data, Mapping):
            raise SweepSpecError(
                f"sweep spec: expected a mapping of keys (name, experts, fusions, ...), got "
                f"{type(data).__name__}"
            )
        data = dict(data)
        for single, plural in (("recipe", "recipes"), ("seed", "seeds"), ("fusion", "fusions")):
            if single in data:
                if plural in data:
                    raise SweepSpecError(f"sweep spec: give {single!r} or {plural!r}, not both")
                data[plural] = data.pop(single)
        check_keys(data, [f.name for f in dataclasses.fields(cls)], "the sweep spec")
        _check_types(data)
        for key in ("experts", "fusion"):
            if key in (data.get("model") or {}):
                raise SweepSpecError(
                    f"sweep spec: model.{key} is set per cell by the sweep; use the top-level "
                    f"'experts' / 'fusions' keys instead"
                )
        executor = data.get("executor") or {"kind": "inline"}
        if isinstance(executor, str):
            executor = {"kind": executor}
        spec = cls(
            name=str(data.get("name", "sweep")),
            experts=ExpertCombos.from_dict(data.get("experts") or {}),
            fusions=[FusionChoice.from_dict(f) for f in as_list(data.get("fusions"), "fusions")],
            recipes=as_list(data.get("recipes", ["llava"]), "recipes", str),
            seeds=as_list(data.get("seeds", [0]), "seeds", int),
            model=dict(data.get("model") or {}),
            data=dict(data.get("data") or {}),
            run=dict(data.get("run") or {}),
            executor=dict(executor),
            entrypoint=str(data.get("entrypoint", DEFAULT_ENTRYPOINT)),
            output=data.get("output"),
            attribute=bool(data.get("attribute", False)),
            exclude=[exclusion(e) for e in as_list(data.get("exclude"), "exclude")],
            controls=check_controls(data.get("controls")),
        )
        if "kind" not in spec.executor:
            raise SweepSpecError(f"sweep spec: executor {spec.executor} needs a 'kind'")
        return spec

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> SweepSpec:
        """Load a spec from a YAML file (safe loader). A file that cannot be read (missing, a
        folder, not UTF-8, not YAML) or a spec that cannot be read raises
        :class:`SweepSpecError` (``FileNotFoundError`` when missing) naming the file."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"sweep spec {path} does not exist")
        if not path.is_file():
            raise SweepSpecError(f"sweep spec {path} is a folder; expected a YAML file")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise SweepSpecError(
                f"sweep spec {path} is not UTF-8 text (byte {e.start}); expected a YAML file"
            ) from None
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise SweepSpecError(f"sweep spec {path}: invalid YAML{at}: {problem}") from None
        try:
            return cls.from_dict(data)
        except ValueError as e:  # SweepSpecError and the axes' checks: name the file
            message = str(e)
            if message.startswith("sweep spec:"):
                message = f"sweep spec {path}:" + message[len("sweep spec:") :]
            raise SweepSpecError(message) from e

    def to_dict(self) -> dict[str, Any]:
        """A YAML/JSON-friendly dict that :meth:`from_dict` reads back to an equal spec."""
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | os.PathLike[str] | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            atomic_write(path, text)
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
        from moe_vision.training.recipe_presets import get_recipe

        for recipe in self.recipes:
            get_recipe(recipe)  # raises naming the presets, or the missing YAML file
        if not self.seeds:
            raise ValueError("sweep spec: no seeds; give 'seeds'")

    def _excluded(self, cell: dict[str, Any], used: set[int]) -> bool:
        """Whether ``cell`` (experts, fusion, recipe, seed, control) matches an ``exclude``
        entry; the indices of the entries that match go into ``used``. A control cell is
        matched only by entries naming its control."""
        hits = {
            i
            for i, e in enumerate(self.exclude)
            if ("control" in e or cell["control"] is None)
            and all(cell.get(k) == v for k, v in e.items())
        }
        used |= hits
        return bool(hits)

    def _cell(
        self,
        variant: Variant,
        choice: FusionChoice,
        recipe: str,
        seed: int,
        resolve: Callable[[dict[str, Any]], dict[str, Any]] | None,
    ) -> Cell:
        """One grid point as a :class:`Cell`: the shared options with the point's experts (as
        ``variant`` builds them), fusion, recipe and seed set (resolved with ``resolve`` when
        the entrypoint has one)."""
        fusion_options = {
            **(self.model.get("fusion_options") or {}),
            **choice.options,
            **variant.fusion_options,
        }
        model = copy.deepcopy(self.model)
        if variant.expert_options is not None:
            model["expert_options"] = copy.deepcopy(variant.expert_options)
        elif "expert_options" in model:  # shared per-expert options: those of this cell's
            model["expert_options"] = {
                k: v for k, v in model["expert_options"].items() if k in variant.experts
            }
        config = {
            **copy.deepcopy(self.run),
            "model": {
                **model,
                "experts": list(variant.experts),
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
            experts=variant.experts,
            fusion=choice.column,
            fusion_options=fusion_options,
            recipe=recipe,
            seed=seed,
            config=config,
            control=variant.control,
            labels=variant.labels if variant.labels != variant.experts else None,
        )

    def max_cells(self) -> int:
        """The grid's size before exclusions, controls included: an upper bound on the cells,
        found without importing the zoo or resolving any cell's config."""
        combos = self.experts.expand()
        per_combo = sum(
            1
            + (len(added_experts(c, self.experts.base)) if RANDOM_INIT in self.controls else 0)
            + (1 if EQUAL_TOKENS in self.controls and len(c) > 1 else 0)
            for c in combos
        )
        return per_combo * len(self.fusions) * len(self.recipes) * len(self.seeds)

    def expand(self) -> list[Cell]:
        """The sweep's cells, in order experts x fusions x recipes, then the cell and its
        controls (``controls``), then seeds.

        When the entrypoint has a ``resolve_config(config) -> dict`` attribute (the default
        :func:`run_cell` does: :class:`~moe_vision.experiment.run.RunConfig` defaults filled in,
        the recipe
        expanded), each cell's config is resolved with it, so a bad option fails here, before
        any cell runs, and the cell id hashes everything that defines the run.
        """
        self.validate()
        resolve = getattr(resolve_entrypoint(self.entrypoint), "resolve_config", None)
        cells = []
        used: set[int] = set()
        expert_options = self.model.get("expert_options") or {}
        for combo, choice, recipe in itertools.product(
            self.experts.expand(), self.fusions, self.recipes
        ):
            fusion_options = {**(self.model.get("fusion_options") or {}), **choice.options}
            kept: set[int] = set()  # seeds whose cell itself is kept: its controls may run
            for variant in variants(
                combo, self.experts.base, self.controls, expert_options, choice.name, fusion_options
            ):
                for seed in self.seeds:
                    where = {
                        "experts": list(combo),
                        "fusion": choice.column,
                        "recipe": recipe,
                        "seed": seed,
                        "control": variant.control,
                    }
                    if variant.control is not None and seed not in kept:
                        continue  # the cell it controls is left out
                    if self._excluded(where, used):
                        continue
                    kept.add(seed)
                    cells.append(self._cell(variant, choice, recipe, seed, resolve))
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
