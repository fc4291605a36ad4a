"""The experiment as data: :class:`RunConfig` (model, recipe, data, training options, seed,
feature-cache folder) and :class:`DataConfig` (where the stages' data and the evaluation split
come from), YAML round-trippable.

A run config left without stage ``overrides`` gets the recipe's tiny-run defaults
(:func:`tiny_overrides`: :data:`TINY_OVERRIDES` plus the recipe's entry of
:data:`TINY_RECIPE_OVERRIDES`), tuned for random-init models on 2 CPU cores. Also here: where a
run's caches live (:func:`cache_root`) and the atomic text write the run folder's files use
(:func:`atomic_write`). :mod:`moe_vision.experiment.run` runs a config and re-exports these names.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from moe_vision.data.benchmark import SPLITS, BenchmarkSizes, generate_benchmark
from moe_vision.data.llava import LlavaDataset, read_skips
from moe_vision.data.mixture import is_mixture
from moe_vision.features.cache import default_cache_dir
from moe_vision.model.config import ModelConfig
from moe_vision.training.options import TrainOptions
from moe_vision.training.recipe_presets import get_recipe
from moe_vision.training.recipe_stages import Recipe

TINY_OVERRIDES: dict[str, dict[str, Any]] = {"*": {"batch_size": 16, "lr": 2e-3}}
"""Stage overrides every recipe gets in the default (tiny, CPU) run: tiny random-init models need
larger LRs than the papers' pretrained ones."""

TINY_RECIPE_OVERRIDES: dict[str, dict[str, dict[str, Any]]] = {
    "eagle": {
        # The LLM-frozen stages cannot teach a random-init LLM anything: keep them short.
        "prealign": {"max_steps": 4},
        "joint": {"max_steps": 4},
        # Adam at the paper's 0.1x expert LR moves random-init experts too far.
        "sft": {"epochs": 10, "lr": 1e-3, "lr_scale": {"experts.*": 0.01}},
    },
}
"""Per-recipe additions to :data:`TINY_OVERRIDES` (by recipe name, for the stages the recipe
has), tuned on the built-in benchmark; ``recipes/run_tiny.yaml`` spells the Eagle ones out."""


def tiny_overrides(recipe: Recipe) -> dict[str, dict[str, Any]]:
    """The default stage overrides of ``recipe`` in a tiny run: :data:`TINY_OVERRIDES` plus the
    recipe's entry of :data:`TINY_RECIPE_OVERRIDES` (stages the recipe lacks are left out)."""
    out = copy.deepcopy(TINY_OVERRIDES)
    names = {s.name for s in recipe.stages}
    for stage, fields in TINY_RECIPE_OVERRIDES.get(recipe.name, {}).items():
        if stage in names:
            out.setdefault(stage, {}).update(copy.deepcopy(fields))
    return out


@dataclass
class DataConfig:
    """Where the stages' data and the evaluation split come from.

    By default the built-in benchmark (``benchmark_seed``, ``benchmark_sizes``), generated once
    into ``benchmark_dir`` (default: ``<cache root>/benchmark/<seed>-<sizes hash>``). Real data:
    ``splits`` maps split names (``"align"``, ``"instruct"``, ``"test"``, ...) to LLaVA-format
    JSON files whose images live under ``image_root``. A stage's ``data`` may also be a JSON
    path directly. Wherever a data file goes, a mixture YAML (:mod:`moe_vision.data.mixture`)
    may go instead; its sources' images live under their own roots (default ``image_root``).

    Attributes:
        benchmark_seed: seed of the built-in benchmark.
        benchmark_sizes: records per split (``BenchmarkSizes`` fields); ``None``: defaults.
        benchmark_dir: where to generate it.
        splits: split name -> LLaVA JSON path (replaces the benchmark's splits of that name).
        image_root: image folder of ``splits`` (required with ``splits``).
        eval_split: split evaluated after training; on the built-in benchmark ``"val"``
            (choose recipes, budgets and hyper-parameters on it), ``"test"`` (the report) or
            ``"test_shifted"`` (needs ``benchmark_sizes.test_shifted > 0``).
        eval_limit: evaluate only the first N questions (``None``: all).
        on_bad_record: ``"error"`` or ``"skip"`` (logged, counted, replaced and listed in the
            run folder: ``skipped_train.jsonl``, ``skipped_eval.jsonl``).
        allow_outside_root: accept absolute and ``..`` image paths (refused by default).
        max_image_pixels: pixel limit of image files (``None``: the platform default,
            ``experts.images.MAX_IMAGE_PIXELS``).
    """

    benchmark_seed: int = 0
    benchmark_sizes: dict[str, int] | None = None
    benchmark_dir: str | None = None
    splits: dict[str, str] = field(default_factory=dict)
    image_root: str | None = None
    eval_split: str = "test"
    eval_limit: int | None = None
    on_bad_record: str = "error"
    allow_outside_root: bool = False
    max_image_pixels: int | None = None

    def __post_init__(self) -> None:
        plain = [v for v in self.splits.values() if not is_mixture(v)]
        if plain and not self.image_root:
            raise ValueError("DataConfig.splits needs image_root: the folder of the images")
        if self.on_bad_record not in ("error", "skip"):
            raise ValueError(f"on_bad_record must be 'error' or 'skip', not {self.on_bad_record!r}")
        if not self.splits:  # the built-in benchmark
            sizes = BenchmarkSizes(**(self.benchmark_sizes or {}))  # validates the fields
            if self.eval_split not in SPLITS:
                raise ValueError(
                    f"data.eval_split: {self.eval_split!r} is not a benchmark split; "
                    f"expected one of {list(SPLITS)}"
                )
            if getattr(sizes, self.eval_split) == 0:
                raise ValueError(
                    f"data.eval_split: the benchmark has no {self.eval_split!r} questions; "
                    f"set data.benchmark_sizes.{self.eval_split} to a positive number"
                )
        elif self.benchmark_sizes is not None:
            BenchmarkSizes(**self.benchmark_sizes)  # validates the fields

    def resolve(self, cache_root: Path) -> tuple[dict[str, Path], Path]:
        """``({split: json path}, image_root)``, generating the benchmark when needed."""
        if self.splits:
            paths = {k: Path(v).expanduser() for k, v in self.splits.items()}
            for name, p in paths.items():
                if not p.is_file():
                    raise FileNotFoundError(f"data split {name!r}: file not found: {p}")
            root = Path(str(self.image_root)).expanduser() if self.image_root else None
            return paths, root  # type: ignore[return-value]
        sizes = BenchmarkSizes(**(self.benchmark_sizes or {}))
        root = self.benchmark_dir
        if root is None:
            tag = hashlib.sha256(json.dumps(sizes.to_dict(), sort_keys=True).encode()).hexdigest()
            root = str(cache_root / "benchmark" / f"seed{self.benchmark_seed}-{tag[:10]}")
        bench = generate_benchmark(root, seed=self.benchmark_seed, sizes=sizes)
        names = [n for n in SPLITS if n != "test_shifted" or sizes.test_shifted]
        return {n: bench.split(n) for n in names}, bench.images


@dataclass
class RunConfig:
    """A whole experiment as data (:mod:`moe_vision.experiment.run` runs it).

    Attributes:
        model: the :class:`~moe_vision.model.config.ModelConfig`.
        recipe: a preset name (``moe_vision.training.recipe_presets.list_recipes()``), a YAML
            path, or a :class:`~moe_vision.training.recipe_stages.Recipe`.
        overrides: stage field overrides, ``{stage name | "*": {field: value}}``; ``None``
            (default): the tiny-run defaults of the recipe (:func:`tiny_overrides`); ``{}``: the
            recipe's own numbers.
        data: :class:`DataConfig`.
        train: :class:`~moe_vision.training.trainer.TrainOptions`.
        seed: seeds model init, data order and everything random.
        cache_dir: feature cache folder (``None``: ``~/.cache/moe-vision/features``);
            shared across runs.
        eval_batch_size: questions per ``generate`` call in the evaluation.
    """

    model: ModelConfig = field(
        default_factory=lambda: ModelConfig(experts=["clip-tiny", "convnext-tiny"])
    )
    recipe: str | Recipe = "eagle"
    overrides: dict[str, dict[str, Any]] | None = None
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainOptions = field(default_factory=TrainOptions)
    seed: int = 0
    cache_dir: str | None = None
    eval_batch_size: int = 64

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ModelConfig.from_dict(self.model)
        if isinstance(self.recipe, dict):
            self.recipe = Recipe.from_dict(self.recipe)
        if isinstance(self.data, dict):
            self.data = _build(DataConfig, self.data, "data")
        if isinstance(self.train, dict):
            self.train = _build(TrainOptions, self.train, "train")
        self.resolved_recipe()  # fail early on bad recipes/overrides

    def base_recipe(self) -> Recipe:
        """The recipe before overrides."""
        if isinstance(self.recipe, dict):
            self.recipe = Recipe.from_dict(self.recipe)
        return self.recipe if isinstance(self.recipe, Recipe) else get_recipe(self.recipe)

    def effective_overrides(self) -> dict[str, dict[str, Any]]:
        """:attr:`overrides`, or the recipe's tiny-run defaults when it is ``None``."""
        if self.overrides is None:
            return tiny_overrides(self.base_recipe())
        return self.overrides

    def resolved_recipe(self) -> Recipe:
        """The recipe with :meth:`effective_overrides` applied."""
        return self.base_recipe().with_overrides(self.effective_overrides())

    def to_dict(self, resolve: bool = False) -> dict[str, Any]:
        """Plain dict; ``resolve=True`` writes the recipe expanded with overrides applied."""
        recipe: Any = self.recipe.to_dict() if isinstance(self.recipe, Recipe) else self.recipe
        overrides = self.overrides
        if resolve:
            recipe, overrides = self.resolved_recipe().to_dict(), {}
        return {
            "model": self.model.to_dict(),
            "recipe": recipe,
            "overrides": overrides,
            "data": dataclasses.asdict(self.data),
            "train": self.train.to_dict(),
            "seed": self.seed,
            "cache_dir": self.cache_dir,
            "eval_batch_size": self.eval_batch_size,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        return _build(cls, data, "run config")

    def to_yaml(self, path: str | Path | None = None, resolve: bool = False) -> str:
        text = yaml.safe_dump(self.to_dict(resolve), sort_keys=False)
        if path is not None:
            atomic_write(Path(path), text)
        return text

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"run config not found: {p}")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"run config {p}: invalid YAML: {err}") from err
        except UnicodeDecodeError as err:
            raise ValueError(
                f"run config {p}: not UTF-8 text ({err.reason} at byte {err.start})"
            ) from None
        if not isinstance(data, dict):
            raise ValueError(f"run config {p}: expected a mapping, got {type(data).__name__}")
        return cls.from_dict(data)


def _build(cls: type, data: dict[str, Any], what: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{what}: expected a mapping, got {type(data).__name__}: {data!r}")
    valid = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(data) - valid)
    if bad:
        raise ValueError(f"{what}: unknown keys {bad}; valid keys are {sorted(valid)}")
    return cls(**data)


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file in the same folder, then a rename;
    parent folders are created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def cache_root(cfg: RunConfig) -> Path:
    """Root of the run's caches: the feature cache's parent folder."""
    return (Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()).parent


class DatasetCache:
    """``(stage data, model) -> LlavaDataset``, built once per data file and preprocessing.

    Datasets are indexes (nothing is parsed up front); bad records found while training are
    appended to ``<out>/skipped_train.jsonl`` under ``on_bad_record: skip``, and each data
    source's record counts go to ``<out>/data/<name>.sources.json``.
    """

    def __init__(
        self,
        cfg: RunConfig,
        splits: dict[str, Path],
        image_root: Path | None,
        out: Path | None = None,
    ) -> None:
        self.cfg, self.splits, self.image_root, self.out = cfg, splits, image_root, out
        self._built: dict[tuple, LlavaDataset] = {}
        self._written: set[str] = set()

    @property
    def skip_log(self) -> Path | None:
        return self.out / "skipped_train.jsonl" if self.out is not None else None

    @property
    def skipped(self) -> int:
        """Distinct training records skipped so far (all processes, DataLoader workers too)."""
        if self.skip_log is not None:
            return len(read_skips(self.skip_log))
        return len({(s.file, s.index) for ds in self._built.values() for s in ds.skipped})

    def path(self, data: str) -> Path:
        if data in self.splits:
            return self.splits[data]
        if data.endswith((".json", ".jsonl", ".yaml", ".yml")):
            if not Path(data).is_file():
                raise FileNotFoundError(f"stage data file not found: {data}")
            return Path(data)
        raise KeyError(
            f"stage data {data!r} is neither a split ({sorted(self.splits)}) nor a .json, .jsonl "
            "or mixture .yaml path"
        )

    def __call__(self, data: str, model: nn.Module) -> LlavaDataset:
        path = self.path(data)
        specs = tuple(json.dumps(e.spec.to_dict(), default=str) for e in model.experts)
        key = (str(path), specs, model.num_visual_tokens, model.max_length)
        if key not in self._built:
            d = self.cfg.data
            ds = LlavaDataset.for_model(
                path,
                self.image_root,
                model,
                on_bad_record=d.on_bad_record,  # type: ignore[arg-type]
                seed=self.cfg.seed,
                allow_outside_root=d.allow_outside_root,
                max_image_pixels=d.max_image_pixels,
                skip_log=self.skip_log,
            )
            self._built[key] = ds
        ds = self._built[key]
        if self.out is not None:  # per stage data name: two names may share one file
            name = data if data in self.splits else Path(data).stem
            if name not in self._written:
                counts = {"data": str(path), "records": len(ds), "sources": ds.source_counts}
                target = self.out / "data" / f"{name}.sources.json"
                atomic_write(target, json.dumps(counts, indent=1))
                self._written.add(name)
        return ds
