"""Staged training on ``accelerate``: one process, DDP, FSDP or DeepSpeed from the same loop.

:class:`Trainer` runs a :class:`~moe_vision.training.recipe_stages.Recipe` on a
:class:`~moe_vision.model.mllm.MoEVisionModel`. The recipe is expanded into *units*: one per stage,
or one per expert for a ``per_expert`` stage (Eagle's pre-alignment: each expert with its own
projector and the shared, frozen LLM; the expert's trained weights stay in the mixture, the
temporary fusion/projector are dropped).

Per unit: the stage's LoRA adapters are added (:func:`~.recipes.add_stage_adapters`; a resume adds
those of the finished units again before loading), :func:`~.recipes.apply_stage` sets exactly
the parameters the stage names trainable (and logs which modules train and which are frozen),
AdamW gets per-pattern learning
rates, a warm-up + cosine/linear schedule follows, and the loop uses
``accelerator.accumulate`` for gradient accumulation, ``accelerator.backward``, clipping on
synchronised steps, mixed precision (bf16 on CUDA only; fp32 on CPU) and the trackers set up
with ``accelerator.init_trackers`` (TensorBoard by default). Distributed settings (DDP, FSDP,
DeepSpeed) come from ``accelerate launch`` / ``accelerate config``; nothing here special-cases
them.

Data order is a pure function of ``(seed, unit, epoch)`` (:mod:`~.samplers`), sharded
across processes by accelerate; checkpoints (:mod:`moe_vision.training.checkpoint`) record the batch
position, so ``resume`` continues a killed run at the same unit, epoch, batch, optimiser,
scheduler and RNG state, ending with the same weights as an uninterrupted run.

Frozen experts (whole expert frozen, not driven by the fusion itself) are served from the
:class:`~moe_vision.features.cache.FeatureCache` when one is given; they run in ``eval`` mode
either way so that cached and uncached runs compute the same thing.

Non-finite losses: the batch is skipped on every process (no update) and counted; more than
``TrainOptions.max_nonfinite`` skips (default 0) raises :class:`NonFiniteLossError` naming the
unit, epoch, batch and sample ids. The number of skips is reported.

The loop's vocabulary (units, step events, timings, reports) is :mod:`~.units`; the pieces of
a step that need no trainer state (loss, optimiser and schedule, freezing unreached parameters)
are :mod:`~.steps`; serving frozen experts from the cache is :mod:`~.frozen_experts`; writing
checkpoints and finding where to resume is :mod:`~.resume`. Their public names are re-exported.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from moe_vision.data.llava import LlavaDataset
from moe_vision.features.cache import FeatureCache
from moe_vision.features.cache_keys import expert_cache_key
from moe_vision.training import checkpoint as ckpt
from moe_vision.training.checkpoint import CheckpointError
from moe_vision.training.distributed import gather_fsdp, shard_experts
from moe_vision.training.frozen_experts import cached_experts, served_maps, store_maps
from moe_vision.training.options import (
    TrainOptions,
)
from moe_vision.training.recipe_stages import Recipe
from moe_vision.training.recipes import add_stage_adapters, apply_stage
from moe_vision.training.resume import (  # load_weights: also the trainer's API
    check_fits_units,
    checkpoint_due,
    find_restore_point,
    last_unit_end,
    load_weights,
    save_checkpoint,
)
from moe_vision.training.samplers import EpochBatchSampler, batch_sampler
from moe_vision.training.steps import (  # batch_loss: also the trainer's API
    batch_loss,
    compile_llm_blocks,
    enable_gradient_checkpointing,
    freeze_unreached,
    make_optimizer,
    seed_everything,
)
from moe_vision.training.units import (  # the trainer's API too
    DatasetFactory,
    NonFiniteLossError,
    StepEvent,
    StepHook,
    StepTimings,
    TrainUnit,
    UnitModelFactory,
    UnitReport,
    expand_units,
    unit_seed,
)

logger = logging.getLogger(__name__)


class Trainer:
    """Runs every unit of a recipe on a mixture model, with checkpoints and resume.

    Args:
        model: the mixture :class:`~moe_vision.model.mllm.MoEVisionModel` (trained in place).
        recipe: the stages.
        datasets: ``(stage.data, model) -> Dataset`` (each model has its own preprocessing
            and visual token count, so datasets depend on the model).
        out_dir: the run folder; checkpoints go to ``out_dir/checkpoints``.
        accelerator: from :func:`make_accelerator`.
        options: :class:`TrainOptions`.
        seed: the run seed (data order, per-unit initialisation).
        unit_model: builds the single-expert model of a per-expert unit from the mixture.
        cache: the feature cache (``None``: frozen experts run every step).
        hooks: called after every optimiser step with a :class:`StepEvent`.
    """

    def __init__(
        self,
        model: nn.Module,
        recipe: Recipe,
        datasets: DatasetFactory,
        out_dir: str | Path,
        accelerator: Accelerator,
        options: TrainOptions,
        seed: int = 0,
        unit_model: UnitModelFactory | None = None,
        cache: FeatureCache | None = None,
        hooks: Sequence[StepHook] = (),
    ) -> None:
        self.model = model
        self.recipe = recipe
        self.datasets = datasets
        self.out_dir = Path(out_dir)
        self.ckpt_root = self.out_dir / "checkpoints"
        self.accelerator = accelerator
        self.options = options
        self.seed = seed
        self.unit_model = unit_model
        self.cache = cache if options.use_feature_cache else None
        self.hooks = list(hooks)
        self.timings = StepTimings()
        self.units = expand_units(recipe, len(model.experts))
        if any(u.expert is not None for u in self.units) and unit_model is None:
            raise ValueError("recipe has a per_expert stage but no unit_model factory was given")
        self.state = ckpt.TrainerState("unit_end", -1, "init")

    # -------------------------------------------------------------- checkpoints
    def _save_checkpoint(self, kind: str, base: str | None, model: nn.Module | None = None) -> str:
        """Write a checkpoint on every process (collective); returns its folder name.

        ``kind == "unit_end"`` saves ``model`` (the mixture, prepared or not) with
        ``accelerator.save_model`` (gathers FSDP/DeepSpeed shards, safetensors).
        """
        return save_checkpoint(
            self.accelerator,
            self.ckpt_root,
            self.state,
            kind,
            base,
            model if model is not None else self.model,
            self.options.keep_checkpoints,
        )

    def _restore(self) -> tuple[ckpt.TrainerState, Path] | None:
        """Load the newest usable checkpoint's mixture weights; return its state and folder.

        The main process picks it (:func:`~.resume.find_restore_point`: damaged newer ones are
        logged and moved aside) and tells the others.
        """
        check = functools.partial(check_fits_units, self.units)
        found = find_restore_point(self.accelerator, self.ckpt_root, check)
        if found is None:
            return None
        state, latest, end = found
        if end is not None:
            self._replay_adapters(ckpt.TrainerState.load(end).unit)
            load_weights(self.model, end)
        logger.info(
            "resuming from %s (%s, unit %s, epoch %d, batch %d)",
            latest,
            state.kind,
            state.unit_name,
            state.epoch,
            state.batches_done,
        )
        return state, latest

    def _mid_checkpoint(self, base: str | None, t_start: float) -> float:
        """Write a mid-unit checkpoint; its time counts as checkpoint time, not training time.
        Returns the new start of the training-time clock (after the checkpoint)."""
        mark = time.perf_counter()
        self.state.train_time_s += mark - t_start
        self._save_checkpoint("mid", base)
        return self.timings.add("checkpoint_s", mark)

    # -------------------------------------------------------------- main loop
    def fit(self, resume: bool = True) -> list[UnitReport]:
        """Train every unit (continuing from the newest checkpoint when ``resume``)."""
        if not resume and ckpt.latest_checkpoint(self.ckpt_root) is not None:
            raise FileExistsError(
                f"{self.ckpt_root} already holds checkpoints; resume, or pick a new run folder"
            )
        restored = self._restore() if resume else None
        start_unit, mid = 0, None
        if restored is not None:
            state, folder = restored
            self.state = state
            if state.kind == "unit_end":
                start_unit = state.unit + 1
            else:
                start_unit, mid = state.unit, folder
        self.model.to(self.accelerator.device)
        for unit in self.units[start_unit:]:
            self._train_unit(unit, mid)
            mid = None
        return [UnitReport(**r) for r in self.state.unit_reports]

    def _unit_module(self, unit: TrainUnit) -> nn.Module:
        if unit.expert is None:
            return self.model
        assert self.unit_model is not None
        torch.manual_seed(unit_seed(self.seed, unit))  # the temporary projector's init
        return self.unit_model(self.model, unit).to(self.accelerator.device)

    def _replay_adapters(self, last: int) -> None:
        """Add the LoRA adapters that units ``0..last`` added, as they added them, so that a
        checkpoint of unit ``last`` loads (:mod:`~.lora`: adapters stay in the model)."""
        for unit in self.units[: last + 1]:
            if unit.stage.lora:
                model = self._unit_module(unit)
                add_stage_adapters(model, unit.stage, unit_seed(self.seed, unit))

    def _cached_experts(self, model: nn.Module) -> list[int]:
        """The frozen experts the cache serves (all frozen experts set to ``eval``)."""
        return cached_experts(model, self.cache)

    def _loader(self, unit: TrainUnit, dataset: Any) -> tuple[EpochBatchSampler, DataLoader]:
        """The unit's batch sampler (a pure function of seed, unit and epoch; by length with
        ``group_by_length``) and its DataLoader."""
        lengths = getattr(dataset, "lengths", None) if self.options.group_by_length else None
        sampler = batch_sampler(
            len(dataset), unit.stage.batch_size, unit_seed(self.seed, unit), lengths
        )
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=dataset.collate,
            num_workers=self.options.num_workers,
            generator=torch.Generator().manual_seed(unit_seed(self.seed, unit)),
        )
        return sampler, loader

    def _start_position(
        self, unit: TrainUnit, mid: Path | None, batches: int, total_steps: int
    ) -> tuple[int, int]:
        """``(epoch, batches to skip)`` where the unit starts: a mid-unit checkpoint's position
        (its accelerate state loaded), else the start (state reset, RNGs seeded for the unit).

        ``batches`` (per epoch) and ``total_steps`` bound the checkpoint's position: one past
        them is refused (:class:`~.checkpoint.CheckpointError` naming its state file)."""
        acc = self.accelerator
        if mid is not None:
            st = self.state
            if st.batches_done > batches or st.optimizer_steps > total_steps:
                raise CheckpointError(
                    f"{mid / ckpt.STATE_FILE}: batches_done {st.batches_done} / optimizer_steps "
                    f"{st.optimizer_steps} out of range (unit {unit.name!r} has {batches} "
                    f"batches per epoch, {total_steps} optimiser steps)"
                )
            acc.load_state(str(mid / "accelerate"))
            ckpt.check_rng_restored(mid / "accelerate", acc.process_index)
            return self.state.epoch, self.state.batches_done
        self.state.kind, self.state.unit, self.state.unit_name = "mid", unit.index, unit.name
        self.state.optimizer_steps = 0
        seed_everything(unit_seed(self.seed, unit))
        return 0, 0

    def _train_unit(self, unit: TrainUnit, mid: Path | None) -> None:
        """Train one unit and write its ``unit_end`` checkpoint."""
        acc, stage = self.accelerator, unit.stage
        model = self._unit_module(unit)
        add_stage_adapters(model, stage, unit_seed(self.seed, unit))  # LoRA: before apply_stage
        groups = apply_stage(model, stage)
        if self.options.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        if self.options.compile_llm:
            compile_llm_blocks(model)
        model.train()
        dataset = self.datasets(stage.data, model)
        if acc.num_processes > 1 and not self.options.find_unused_parameters:
            freeze_unreached(model, dataset, acc.device, unit.name)
        cached = self._cached_experts(model)
        keys = {i: expert_cache_key(model.experts[i]) for i in cached}
        store_maps(self.cache, model, dataset, cached, keys, acc, self.options, self.timings)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        logger.info(
            "unit %s: %d/%d parameters train; data %r; experts from cache: %s",
            unit.name,
            trainable,
            total,
            stage.data,
            cached or "none",
        )

        sampler, loader = self._loader(unit, dataset)
        optimizer, scheduler, total_steps = make_optimizer(
            model, stage, len(sampler), acc.num_processes
        )
        acc.gradient_accumulation_steps = stage.grad_accum
        shard_experts(model, acc)  # FSDP2: each expert a unit of its own (distributed.py)
        prepared, optimizer, scheduler, loader = acc.prepare(model, optimizer, scheduler, loader)

        start_epoch, skip = self._start_position(unit, mid, len(sampler), total_steps)
        base = self.state.base if mid is not None else last_unit_end(self.ckpt_root)
        trainable_params = [p for p in model.parameters() if p.requires_grad]
        bar = tqdm(
            total=total_steps,
            initial=self.state.optimizer_steps,
            desc=unit.name,
            disable=not (self.options.progress_bar and acc.is_local_main_process),
        )
        last_loss: float | None = None
        running, running_n = 0.0, 0
        samples = 0
        done = self.state.optimizer_steps >= total_steps
        t_start = time.perf_counter()
        last_checkpoint = time.monotonic()
        for epoch in range(start_epoch, stage.epochs):
            if done:
                break
            sampler.epoch = epoch
            batches = acc.skip_first_batches(loader, skip) if skip else loader
            self.state.epoch, self.state.batches_done = epoch, skip
            skip = 0
            mark = time.perf_counter()
            for batch in batches:
                mark = self.timings.add("data_s", mark)  # waiting for the loader
                with acc.accumulate(prepared), acc.autocast():
                    precomputed = served_maps(self.cache, model, cached, keys, batch, acc.device)
                    mark = self.timings.add("features_s", mark)  # cache reads / frozen experts
                    loss = batch_loss(prepared, batch, precomputed)
                    value = self._optimise(
                        loss, unit, epoch, batch, optimizer, scheduler, trainable_params
                    )
                    if value is not None:
                        running += value
                        running_n += 1
                mark = self.timings.add("step_s", mark)  # forward, backward, optimiser
                n = len(batch["ids"]) * acc.num_processes
                samples += n
                self.state.samples_seen += n
                self.state.batches_done += 1
                if acc.sync_gradients:
                    self.state.optimizer_steps += 1
                    self.state.global_step += 1
                    last_loss = running / max(running_n, 1)
                    running, running_n = 0.0, 0
                    bar.update(1)
                    bar.set_postfix(loss=f"{last_loss:.4f}")
                    self._log_step(unit, last_loss, scheduler)
                    done = self.state.optimizer_steps >= total_steps
                    if not done and checkpoint_due(
                        acc, self.options, self.state.optimizer_steps, last_checkpoint
                    ):
                        t_start = self._mid_checkpoint(base, t_start)
                        last_checkpoint = time.monotonic()
                    self._run_hooks(unit, epoch, last_loss)
                    if done:
                        break
                mark = time.perf_counter()
        bar.close()
        self.state.train_time_s += time.perf_counter() - t_start
        report = UnitReport(
            unit.name,
            trainable,
            total,
            self.state.optimizer_steps,
            samples,
            last_loss,
            groups["train"] + groups["partial"],
            groups["frozen"],
            cached,
        )
        self._end_unit(unit, report, model, prepared, dataset)

    def _optimise(
        self,
        loss: torch.Tensor,
        unit: TrainUnit,
        epoch: int,
        batch: dict,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        params: list[nn.Parameter],
    ) -> float | None:
        """Backward on ``loss`` and an optimiser step (``params`` clipped on synchronised steps);
        returns the loss, or ``None`` when it was not finite on some process (batch skipped)."""
        acc, stage = self.accelerator, unit.stage
        if not self._finite(loss, unit, epoch, batch):
            optimizer.zero_grad()
            return None
        acc.backward(loss)
        if acc.sync_gradients and stage.max_grad_norm is not None:
            acc.clip_grad_norm_(params, stage.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        return float(loss.detach())

    def _log_step(self, unit: TrainUnit, loss: float, scheduler: Any) -> None:
        """Send the loss and learning rate to the trackers every ``log_every`` steps."""
        if self.state.global_step % self.options.log_every == 0:
            self.accelerator.log(
                {
                    f"train/loss/{unit.name}": loss,
                    "train/lr": scheduler.get_last_lr()[0],
                },
                step=self.state.global_step,
            )

    def _run_hooks(self, unit: TrainUnit, epoch: int, loss: float) -> None:
        """Call every step hook with this optimiser step's :class:`StepEvent`."""
        event = StepEvent(
            unit,
            epoch,
            self.state.batches_done,
            self.state.optimizer_steps,
            self.state.global_step,
            loss,
        )
        for hook in self.hooks:
            hook(event)

    def _end_unit(
        self,
        unit: TrainUnit,
        report: UnitReport,
        model: nn.Module,
        prepared: nn.Module,
        dataset: Any,
    ) -> None:
        """Record the finished unit's report, flush its cached maps, write its ``unit_end``
        checkpoint and free what it held."""
        cached = report.cached_experts
        if self.cache is not None and cached:
            logger.info(
                "feature cache after %s: %d hits, %d misses",
                unit.name,
                self.cache.hits,
                self.cache.misses,
            )
        self.state.unit_reports.append(dataclasses.asdict(report))
        self.state.epoch = self.state.batches_done = self.state.optimizer_steps = 0
        if self.cache is not None and cached:
            self.cache.flush()  # this unit's maps, for later units and runs
        if isinstance(dataset, LlavaDataset):
            dataset.cached_keys = {}  # the next unit's experts may differ
        self._save_checkpoint("unit_end", None, prepared if unit.expert is None else self.model)
        self.accelerator.free_memory()
        gather_fsdp(model)  # FSDP: plain full tensors again for the next unit (collective)
        for p in model.parameters():
            p.grad = None

    def _finite(self, loss: torch.Tensor, unit: TrainUnit, epoch: int, batch: dict) -> bool:
        """Whether every process's loss is finite; counts skips and raises past the limit."""
        ok = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
        if self.accelerator.num_processes > 1:
            ok = self.accelerator.reduce(ok, reduction="sum") / self.accelerator.num_processes
        if bool(ok.item() == 1.0):
            return True
        self.state.nonfinite_skipped += 1
        msg = (
            f"non-finite loss ({float(loss.detach())}) in unit {unit.name!r}, epoch {epoch}, "
            f"batch {self.state.batches_done} (sample ids {batch['ids'][:8]})"
        )
        if self.state.nonfinite_skipped > self.options.max_nonfinite:
            raise NonFiniteLossError(
                f"{msg}; {self.state.nonfinite_skipped} non-finite losses exceed "
                f"max_nonfinite={self.options.max_nonfinite}. Lower the learning rate, check the "
                "data, or raise train.max_nonfinite to skip such batches."
            )
        logger.warning("%s: batch skipped (%d so far)", msg, self.state.nonfinite_skipped)
        return False
