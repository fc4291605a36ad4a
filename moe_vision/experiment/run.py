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

The experiment as data (:class:`RunConfig`, :class:`DataConfig`, the tiny-run defaults) lives in
:mod:`~.run_config`, the metrics row and its costs (peak memory, FLOPs) in :mod:`~.run_metrics`;
both are re-exported here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from moe_vision.console import logs_to_run_folder
from moe_vision.experiment.run_config import (
    DatasetCache,
    RunConfig,
    atomic_write,
    cache_root,
)
from moe_vision.experiment.run_metrics import (
    metrics_row,
)
from moe_vision.features.cache import FeatureCache
from moe_vision.model.config import ModelConfig
from moe_vision.model.mllm import MoEVisionModel
from moe_vision.training.options import make_accelerator
from moe_vision.training.steps import eager
from moe_vision.training.trainer import Trainer
from moe_vision.training.units import StepHook, TrainUnit

logger = logging.getLogger(__name__)


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
    finished = _check_run_folder(out, resolved, resume)
    if finished is not None:
        return finished

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

    metrics: dict[str, Any] = {}
    if accelerator.is_main_process:
        with eager():  # compiled LLM blocks (train.compile_llm) run eagerly here
            model.eval()
            _save_model(model, out)

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
            atomic_write(
                out / "skipped_eval.jsonl",
                "".join(json.dumps(dataclasses.asdict(s)) + "\n" for s in result.skipped),
            )
            eval_time = time.perf_counter() - t0
            atomic_write(out / "predictions.json", json.dumps(result.predictions, indent=1))
            metrics = metrics_row(result, model, trainer, reports, datasets, cache, eval_time)
            atomic_write(out / "metrics.json", json.dumps(metrics, indent=1))
            logger.info("run %s: overall accuracy %.3f", out, metrics["accuracy/overall"])
        accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def _check_run_folder(out: Path, resolved: dict[str, Any], resume: bool) -> dict[str, Any] | None:
    """Check ``out`` against the resolved config about to run in it; returns the metrics row of
    a finished run of the same config (when ``resume``), else ``None``.

    A different config raises when ``resume`` (else its checkpoints are removed); without
    ``resume``, the folder's checkpoints are removed.
    """
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
    return None


def _save_model(model: MoEVisionModel, out: Path) -> None:
    """``model.save_pretrained`` into ``out/model`` (written to ``out/.model.tmp``, then moved)."""
    final = out / "model"
    tmp = out / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


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
