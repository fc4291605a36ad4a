"""One experiment: build the model, train every stage of a recipe, evaluate, write the run folder.

:class:`RunConfig` is the whole experiment as data (model, recipe, data, training options, seed,
feature-cache folder), YAML round-trippable; :func:`run_experiment` runs it and returns the
metrics row the sweeps collect (Prismatic-style: the run folder holds the resolved config).

Run folder layout::

    out_dir/config.yaml        resolved RunConfig (recipe expanded, overrides applied)
    out_dir/checkpoints/       atomic, resumable checkpoints (moe_vision.training.checkpoint)
    out_dir/model/             the trained model (MoEVisionModel.save_pretrained)
    out_dir/predictions.json   the evaluation's answers
    out_dir/metrics.json       the metrics row (written last, atomically)
    out_dir/data/*.sources.json  records per data source of each dataset (mixtures)
    out_dir/skipped_train.jsonl  records skipped while training (on_bad_record: skip)
    out_dir/skipped_eval.jsonl   records skipped by the evaluation
    out_dir/logs/              tracker logs (TensorBoard by default)

Metrics row: ``accuracy/<category>`` and ``accuracy/overall`` on the evaluation split, each with
its 95% interval (``accuracy/<category>/lo``, ``/hi``) and question count ``n/<category>``,
``params_total`` (the mixture model, LoRA adapters included), ``params_adapter`` (its LoRA
adapters), ``params_trainable`` (the most any unit trained, adapters included and the frozen base
weights under them not; per unit in ``params_trainable/<unit>``), ``visual_tokens``,
``train_time_s``, ``throughput_samples_s`` (training samples per second, all processes),
``peak_memory_mb`` (CUDA: peak allocated; CPU: peak resident set size of the process),
``flops_per_sample`` (forward FLOPs of one training sample, measured with
``torch.utils.flop_counter``), ``eval_time_s``, ``nonfinite_skipped``,
``skipped_records`` (and ``skipped_records/train``, ``skipped_records/eval``), ``cache_hits`` /
``cache_misses``, and where this process's training loop spent its time: ``time/data_s``,
``time/features_s``, ``time/step_s``, ``time/checkpoint_s``
(:class:`~moe_vision.training.trainer.StepTimings`). The run's log is ``out_dir/train.log``.

The default :class:`RunConfig` is the laptop run: tiny experts, the tiny LLM, the built-in
benchmark at its default sizes, the Eagle recipe and the recipe's tiny-run stage overrides
(:func:`tiny_overrides`), tuned for random-init models: every stage plus evaluation in under two
minutes on 2 CPU cores.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from experts import FeatureMap
from moe_vision.console import logs_to_run_folder
from moe_vision.data.benchmark import BenchmarkSizes, generate_benchmark
from moe_vision.data.llava import LlavaDataset, read_skips
from moe_vision.data.mixture import is_mixture
from moe_vision.model.mllm import ModelConfig, MoEVisionModel
from moe_vision.training import lora
from moe_vision.training.cache import FeatureCache, default_cache_dir
from moe_vision.training.recipes import Recipe, get_recipe
from moe_vision.training.trainer import StepHook, Trainer, TrainOptions, TrainUnit, make_accelerator

logger = logging.getLogger(__name__)

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
        eval_split: split evaluated after training.
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
        if self.benchmark_sizes is not None:
            BenchmarkSizes(**self.benchmark_sizes)  # validates the fields

    def uses_benchmark(self) -> bool:
        return not self.splits

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
        names = ("align", "instruct", "val", "test")
        return {n: bench.split(n) for n in names}, bench.images


@dataclass
class RunConfig:
    """A whole experiment as data (see the module docstring).

    Attributes:
        model: the :class:`~moe_vision.model.mllm.ModelConfig`.
        recipe: a preset name (``moe_vision.training.recipes.list_recipes()``), a YAML path, or a
            :class:`~moe_vision.training.recipes.Recipe`.
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
            _atomic_write(Path(path), text)
        return text

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"run config not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"run config {p}: invalid YAML: {err}") from err
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


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def cache_root(cfg: RunConfig) -> Path:
    """Root of the run's caches: the feature cache's parent folder."""
    return (Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()).parent


# ------------------------------------------------------------------------------ pieces
def single_expert_model(mixture: MoEVisionModel, unit: TrainUnit) -> MoEVisionModel:
    """Eagle pre-alignment model: mixture expert ``unit.expert`` (shared, trained in place) +
    a fresh fusion/projector + the mixture's LLM and tokenizer (shared)."""
    cfg = mixture.config
    name = cfg.experts[unit.expert]  # type: ignore[index]
    sub = ModelConfig.from_dict(
        {
            **cfg.to_dict(),
            "experts": [name],
            "expert_options": {name: cfg.expert_options.get(name, {})},
            "fusion": unit.stage.per_expert_fusion,
            "fusion_options": dict(unit.stage.per_expert_fusion_options),
        }
    )
    model = MoEVisionModel(
        sub, llm=mixture.llm, tokenizer=mixture.tokenizer, load_checkpoints=False
    )
    model.experts[0] = mixture.experts[unit.expert]  # type: ignore[index]
    return model


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
            ds = LlavaDataset(
                path,
                self.image_root,
                model.preprocessors,
                model.tokenizer,
                image_token=model.config.image_token,
                max_length=model.max_length,
                num_visual_tokens=model.num_visual_tokens,
                on_bad_record=d.on_bad_record,  # type: ignore[arg-type]
                seed=self.cfg.seed,
                allow_outside_root=d.allow_outside_root,
                max_image_pixels=d.max_image_pixels,
                skip_log=self.skip_log,
            )
            if self.out is not None:
                name = data if data in self.splits else Path(data).stem
                counts = {"data": str(path), "records": len(ds), "sources": ds.source_counts}
                _atomic_write(
                    self.out / "data" / f"{name}.sources.json", json.dumps(counts, indent=1)
                )
            self._built[key] = ds
        return self._built[key]


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated memory; CPU: peak resident set size of this process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def flops_per_sample(model: MoEVisionModel, dataset: LlavaDataset, n: int = 2) -> float | None:
    """Forward FLOPs of one sample (``torch.utils.flop_counter`` over ``n`` samples).

    The experts the fusion does not drive are counted on ``meta``-device twins (same spec, no
    weights, nothing computed), and the rest of the model reads zero maps of their shapes: a
    run whose experts are served from the feature cache never runs them for this metric.
    Attention is counted through PyTorch's math backend (the counter has no formula for the
    fused CPU kernel, so it would leave attention out)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    try:
        batch = dataset.collate([dataset[i] for i in range(min(n, len(dataset)))])
        dev = model.device
        images = batch["images"]
        math = sdpa_kernel(SDPBackend.MATH)
        with torch.no_grad(), math, FlopCounterMode(display=False) as counter:
            precomputed = _meta_expert_maps(model, images, dev) if images is not None else None
            if images is not None:
                images = [
                    {} if i in precomputed else {k: v.to(dev) for k, v in x.items()}
                    for i, x in enumerate(images)
                ]
            model(
                input_ids=batch["input_ids"].to(dev),
                attention_mask=batch["attention_mask"].to(dev),
                images=images,
                precomputed=precomputed or None,
            )
        return counter.get_total_flops() / len(batch["ids"])
    except Exception as err:  # noqa: BLE001 - a metric must not fail a finished run
        logger.warning("could not count FLOPs: %s", err)
        return None


def _meta_expert_maps(
    model: MoEVisionModel, images: list[dict[str, torch.Tensor]], device: torch.device
) -> dict[int, FeatureMap]:
    """Expert index -> zero map of the shape its ``meta`` twin outputs (FLOPs counted by the
    enclosing counter), for the experts the fusion does not drive."""
    staged = set(model.fusion.staged_experts())
    out = {}
    for i, expert in enumerate(model.experts):
        if i in staged:
            continue
        try:
            with torch.device("meta"):
                twin = type(expert)(expert.spec.replace(checkpoint=None))
            fmap = twin({k: v.to("meta") for k, v in images[i].items()})
        except (NotImplementedError, RuntimeError) as err:  # an op without a meta kernel
            logger.debug("FLOPs of %s counted on the expert itself: %s", expert.spec.name, err)
            continue
        if fmap.thumbnail is not None:  # tiled with a thumbnail: counted on the real expert
            continue
        out[i] = FeatureMap(
            torch.zeros(fmap.features.shape, device=device),
            fmap.stride,
            fmap.source,
            None if fmap.mask is None else torch.ones_like(fmap.mask, device=device),
        )
    return out


# ------------------------------------------------------------------------------ the run
@logs_to_run_folder  # library logging of the run goes to <out_dir>/train.log
def run_experiment(
    cfg: RunConfig,
    out_dir: str | Path,
    resume: bool = True,
    hooks: list[StepHook] | None = None,
) -> dict[str, Any]:
    """Train every stage of ``cfg``, evaluate on ``cfg.data.eval_split``, write the run folder.

    Args:
        cfg: the experiment.
        out_dir: run folder (created). A finished run (``metrics.json``) with the same config
            is not run again when ``resume``; an unfinished one continues from its newest
            checkpoint.
        resume: continue/reuse what is in ``out_dir``; ``False`` refuses a non-empty folder's
            checkpoints.
        hooks: called after every optimiser step (:class:`~moe_vision.training.trainer.StepEvent`).

    Returns:
        The metrics row (see the module docstring).
    """
    from moe_vision.evaluation.evaluate import evaluate

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    resolved = cfg.to_dict(resolve=True)
    config_path = out / "config.yaml"
    if config_path.is_file():
        previous = yaml.safe_load(config_path.read_text())
        if previous != yaml.safe_load(yaml.safe_dump(resolved, sort_keys=False)):
            if resume:
                raise ValueError(
                    f"{out} holds a run of a different config ({config_path}); use another "
                    "folder, or resume=False after removing it"
                )
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
        elif resume and (out / "metrics.json").is_file():
            logger.info("%s is finished; reading its metrics", out)
            return json.loads((out / "metrics.json").read_text())
    elif not resume and (out / "checkpoints").exists():
        shutil.rmtree(out / "checkpoints")

    options = cfg.train
    accelerator = make_accelerator(options, out / "logs")
    if accelerator.is_main_process:
        cfg.to_yaml(config_path, resolve=True)
    recipe = cfg.resolved_recipe()

    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    model = MoEVisionModel.from_config(cfg.model)
    splits, image_root = cfg.data.resolve(cache_root(cfg))
    datasets = DatasetCache(cfg, splits, image_root, out)
    cache = FeatureCache(cfg.cache_dir) if options.use_feature_cache else None
    accelerator.init_trackers("moe-vision", config=_flat(resolved))

    trainer = Trainer(
        model,
        recipe,
        datasets,
        out,
        accelerator,
        options,
        seed=cfg.seed,
        unit_model=single_expert_model,
        cache=cache,
        hooks=hooks or [],
    )
    reports = trainer.fit(resume=resume)
    state = trainer.state

    metrics: dict[str, Any] = {}
    if accelerator.is_main_process:
        model.eval()
        final = out / "model"
        tmp = out / ".model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)

        eval_path = datasets.path(cfg.data.eval_split)
        t0 = time.perf_counter()
        result = evaluate(
            model,
            eval_path,
            image_root,
            batch_size=cfg.eval_batch_size,
            on_bad_record=cfg.data.on_bad_record,  # type: ignore[arg-type]
            limit=cfg.data.eval_limit,
            allow_outside_root=cfg.data.allow_outside_root,
            max_image_pixels=cfg.data.max_image_pixels,
            cache=cache,
        )
        _atomic_write(
            out / "skipped_eval.jsonl",
            "".join(json.dumps(dataclasses.asdict(s)) + "\n" for s in result.skipped),
        )
        eval_time = time.perf_counter() - t0
        _atomic_write(out / "predictions.json", json.dumps(result.predictions, indent=1))
        flops_data = recipe.stages[-1].data
        metrics = dict(result.to_metrics())  # accuracies with 95% intervals and counts
        counts = lora.count_parameters(model)  # LoRA adapters counted; 4-bit weights unpacked
        metrics["params_total"] = counts["total"]
        metrics["params_adapter"] = counts["adapter"]
        metrics["params_trainable"] = max(r.params_trainable for r in reports)
        for r in reports:
            metrics[f"params_trainable/{r.unit}"] = r.params_trainable
        metrics["visual_tokens"] = int(model.num_visual_tokens)
        metrics["train_time_s"] = round(state.train_time_s, 3)
        metrics["throughput_samples_s"] = (
            state.samples_seen / state.train_time_s if state.train_time_s > 0 else None
        )
        metrics["peak_memory_mb"] = round(peak_memory_mb(accelerator.device), 1)
        metrics["flops_per_sample"] = flops_per_sample(model, datasets(flops_data, model))
        metrics["eval_time_s"] = round(eval_time, 3)
        for name, seconds in dataclasses.asdict(trainer.timings).items():  # this process's loop
            metrics[f"time/{name}"] = round(seconds, 3)
        metrics["eval_samples"] = len(result.predictions)
        metrics["nonfinite_skipped"] = state.nonfinite_skipped
        metrics["skipped_records"] = datasets.skipped + len(result.skipped)
        metrics["skipped_records/train"] = datasets.skipped
        metrics["skipped_records/eval"] = len(result.skipped)
        metrics["cache_hits"] = cache.hits if cache is not None else 0
        metrics["cache_misses"] = cache.misses if cache is not None else 0
        for r in reports:
            metrics[f"final_loss/{r.unit}"] = r.final_loss
        _atomic_write(out / "metrics.json", json.dumps(metrics, indent=1))
        logger.info("run %s: overall accuracy %.3f", out, metrics["accuracy/overall"])
        accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Tracker-friendly config: nested keys joined by ``/``, lists as strings."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "/"))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        else:
            out[key] = str(v)
    return out
