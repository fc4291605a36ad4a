"""Staged training on ``accelerate``: one process, DDP, FSDP or DeepSpeed from the same loop.

:class:`Trainer` runs a :class:`~moe_vision.training.recipes.Recipe` on a
:class:`~moe_vision.model.mllm.MoEVisionModel`. The recipe is expanded into *units*: one per stage,
or one per expert for a ``per_expert`` stage (Eagle's pre-alignment: each expert with its own
projector and the shared, frozen LLM; the expert's trained weights stay in the mixture, the
temporary fusion/projector are dropped).

Per unit: the stage's LoRA adapters are added (:func:`~.lora.add_stage_adapters`; a resume adds
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
:class:`~.cache.FeatureCache` when one is given; they run in ``eval`` mode either way
so that cached and uncached runs compute the same thing.

Non-finite losses: the batch is skipped on every process (no update) and counted; more than
``TrainOptions.max_nonfinite`` skips (default 0) raises :class:`NonFiniteLossError` naming the
unit, epoch, batch and sample ids. The number of skips is reported.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import get_scheduler

from moe_vision.data.llava import LlavaDataset
from moe_vision.training import checkpoint as ckpt
from moe_vision.training.cache import FeatureCache, expert_cache_key
from moe_vision.training.lora import add_stage_adapters
from moe_vision.training.options import (  # noqa: F401 - re-exported: the trainer's API
    KNOWN_TRACKERS,
    TrainOptions,
    available_trackers,
    make_accelerator,
    resolve_mixed_precision,
)
from moe_vision.training.precompute import precompute_maps
from moe_vision.training.recipes import Recipe, Stage, apply_stage, param_groups
from moe_vision.training.samplers import batch_sampler

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf more often than ``TrainOptions.max_nonfinite`` allows."""


# ------------------------------------------------------------------------------ units
@dataclass(frozen=True)
class TrainUnit:
    """One pass of the loop: a stage, or one expert of a ``per_expert`` stage."""

    index: int
    stage: Stage
    expert: int | None = None

    @property
    def name(self) -> str:
        return self.stage.name if self.expert is None else f"{self.stage.name}[{self.expert}]"


def expand_units(recipe: Recipe, num_experts: int) -> list[TrainUnit]:
    """The recipe's stages as units (a ``per_expert`` stage becomes one unit per expert)."""
    units: list[TrainUnit] = []
    for stage in recipe.stages:
        for e in range(num_experts) if stage.per_expert else [None]:
            units.append(TrainUnit(len(units), stage, e))
    return units


@dataclass
class StepEvent:
    """What a step hook sees after each optimiser step."""

    unit: TrainUnit
    epoch: int
    batches_done: int
    optimizer_steps: int
    global_step: int
    loss: float


@dataclass
class StepTimings:
    """Where this process's training loop spent its wall time (seconds, all units): storing the
    frozen experts' maps before each unit (:mod:`~.precompute`), waiting for batches, frozen
    experts' maps (cache reads or forwards), training steps (forward, backward, optimiser) and
    mid-unit checkpoints."""

    precompute_s: float = 0.0
    data_s: float = 0.0
    features_s: float = 0.0
    step_s: float = 0.0
    checkpoint_s: float = 0.0

    def add(self, name: str, since: float) -> float:
        """Add the time since ``since`` to ``name``; returns now."""
        now = time.perf_counter()
        setattr(self, name, getattr(self, name) + now - since)
        return now


StepHook = Callable[[StepEvent], None]
DatasetFactory = Callable[[str, nn.Module], Dataset]
"""``(stage.data, model) -> Dataset``: a stage's data for a model (its preprocessors/tokens)."""
UnitModelFactory = Callable[[nn.Module, TrainUnit], nn.Module]
"""``(mixture, unit) -> model`` for per-expert units (see :func:`moe_vision.model.mllm` helpers)."""


def load_weights(model: nn.Module, folder: str | Path) -> None:
    """Load ``accelerator.save_model`` output (one file or sharded) into ``model`` in place.

    Tied parameters (saved once) are allowed to be missing; anything else missing or
    unexpected raises, naming the keys.
    """
    folder = Path(folder)
    state: dict[str, torch.Tensor] = {}
    for path in ckpt.weight_files(folder):
        state.update(ckpt.read_safetensors(path))  # CheckpointError names a missing/bad file
    missing, unexpected = model.load_state_dict(state, strict=False)
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    loaded = set(state)
    really_missing = [
        k
        for k in missing
        if not any(a in loaded for names in aliases.values() if k in names for a in names)
    ]
    if really_missing or unexpected:
        raise ValueError(
            f"checkpoint {folder} does not fit the model: missing {really_missing[:10]}, "
            f"unexpected {list(unexpected)[:10]}"
        )


def _seed_everything(seed: int) -> None:
    from accelerate.utils import set_seed

    set_seed(seed)


def _unit_seed(seed: int, unit: TrainUnit) -> int:
    return seed * 7919 + unit.index * 104_729 + 1


def batch_loss(
    module: nn.Module, batch: dict[str, Any], precomputed: dict[int, Any] | None = None
) -> torch.Tensor:
    """The training loss of ``batch`` (a ``collate`` output) through ``module`` (the model or its
    accelerate wrapper); ``precomputed`` holds cached expert maps by expert index."""
    images = batch["images"]
    if images is not None and precomputed:  # served experts' inputs may hold only some rows
        images = [{} if i in precomputed else x for i, x in enumerate(images)]
    out = module(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        labels=batch["labels"],
        images=images,
        precomputed=precomputed or None,
        logits="labels",  # the LM head only where a label is predicted
    )
    return out.loss


def _freeze_unreached(model: nn.Module, dataset: Any, device: torch.device, unit: str) -> list[str]:
    """Freeze the trainable parameters the loss never reaches; return their names.

    DDP (without ``find_unused_parameters``) fails at the second step when a parameter that
    requires a gradient gets none, and mixtures have such parameters by design: CLIP is read at
    its penultimate block, so the last block and the final norm of a trained CLIP expert never
    reach the loss. One forward/backward on the stage's first samples finds them (the model has
    no data-dependent routing, so the set does not depend on the batch); every process computes
    the same set. They receive no gradient in any case, so training is unchanged.
    """
    first = [dataset[i] for i in range(min(2, len(dataset)))]
    batch = send_to_device(dataset.collate(first), device)
    model.to(device)
    batch_loss(model, batch).backward()
    unreached = []
    for name, p in model.named_parameters():
        if p.requires_grad and p.grad is None:
            p.requires_grad_(False)
            unreached.append(name)
        p.grad = None
    if unreached:
        logger.info(
            "unit %s: %d trainable tensors never reach the loss (e.g. %s); left frozen so that "
            "DDP needs no find_unused_parameters",
            unit,
            len(unreached),
            ", ".join(unreached[:3]),
        )
    return unreached


def _enable_gradient_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing through the model's own switch (LLM and capable experts)."""
    switch = getattr(model, "gradient_checkpointing_enable", None)
    if not callable(switch):
        raise TypeError(f"{type(model).__name__} has no gradient_checkpointing_enable()")
    switch()


@dataclass
class UnitReport:
    """Summary of a finished unit."""

    unit: str
    params_trainable: int
    params_total: int
    optimizer_steps: int
    samples: int
    final_loss: float | None
    train: list[str]
    frozen: list[str]
    cached_experts: list[int]


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
        acc = self.accelerator
        final, tmp = (
            ckpt.next_checkpoint_dir(self.ckpt_root) if acc.is_main_process else (None, None)
        )
        names = [str(final), str(tmp)]
        if acc.num_processes > 1:
            import torch.distributed as dist

            dist.broadcast_object_list(names, src=0)
        final, tmp = Path(names[0]), Path(names[1])
        tmp.mkdir(parents=True, exist_ok=True)  # every rank writes into it (RNG states)
        acc.wait_for_everyone()
        if kind == "mid":
            acc.save_state(str(tmp / "accelerate"), safe_serialization=True)
        else:
            acc.save_model(
                model if model is not None else self.model, str(tmp), safe_serialization=True
            )
        acc.wait_for_everyone()
        if acc.is_main_process:
            self.state.kind = kind  # type: ignore[assignment]
            self.state.base = base
            ckpt.write_state(tmp, self.state)
            ckpt.commit(tmp, final)
            ckpt.prune(self.ckpt_root, self.options.keep_checkpoints)
        acc.wait_for_everyone()
        return final.name

    def _restore(self) -> tuple[ckpt.TrainerState, Path] | None:
        """Load the newest usable checkpoint's mixture weights; return its state and folder.

        The main process picks it (:func:`~.checkpoint.find_resumable`: damaged newer ones are
        logged and moved aside) and tells the others.
        """
        acc = self.accelerator
        names = [None]
        if acc.is_main_process:
            found = ckpt.find_resumable(self.ckpt_root, acc.num_processes)
            names = [found[0].name if found else None]
        if acc.num_processes > 1:
            import torch.distributed as dist

            dist.broadcast_object_list(names, src=0)
        if names[0] is None:
            return None
        latest = self.ckpt_root / names[0]
        state = ckpt.TrainerState.load(latest)
        end = (
            latest
            if state.kind == "unit_end"
            else (self.ckpt_root / state.base if state.base else None)
        )
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
        torch.manual_seed(_unit_seed(self.seed, unit))  # the temporary projector's init
        return self.unit_model(self.model, unit).to(self.accelerator.device)

    def _replay_adapters(self, last: int) -> None:
        """Add the LoRA adapters that units ``0..last`` added, as they added them, so that a
        checkpoint of unit ``last`` loads (:mod:`~.lora`: adapters stay in the model)."""
        for unit in self.units[: last + 1]:
            if unit.stage.lora:
                model = self._unit_module(unit)
                add_stage_adapters(model, unit.stage, _unit_seed(self.seed, unit))

    def _cached_experts(self, model: nn.Module) -> list[int]:
        staged = set(model.fusion.staged_experts())
        out = []
        for i, expert in enumerate(model.experts):
            frozen = not any(p.requires_grad for p in expert.parameters())
            if frozen:
                expert.eval()
                if self.cache is not None and i not in staged:
                    out.append(i)
        return out

    def _precompute(
        self, model: nn.Module, dataset: Any, cached: list[int], keys: dict[int, str]
    ) -> None:
        """Store the frozen experts' maps of every training image before the unit trains
        (:mod:`~.precompute`), so the data path decodes no image the cache serves."""
        if self.cache is None or not cached:
            return
        acc = self.accelerator
        for i in cached:
            if acc.is_main_process:
                self.cache.describe(model.experts[i], keys[i])
        if not isinstance(dataset, LlavaDataset):
            return
        mark = time.perf_counter()
        precompute_maps(
            self.cache,
            dataset,
            {i: (model.experts[i], keys[i]) for i in cached},
            acc.device,
            rank=acc.process_index,
            world=acc.num_processes,
            barrier=acc.wait_for_everyone,
            num_workers=self.options.num_workers,
            progress=self.options.progress_bar and acc.is_local_main_process,
        )
        self.timings.add("precompute_s", mark)

    def _train_unit(self, unit: TrainUnit, mid: Path | None) -> None:
        """Train one unit and write its ``unit_end`` checkpoint."""
        acc, stage = self.accelerator, unit.stage
        model = self._unit_module(unit)
        add_stage_adapters(model, stage, _unit_seed(self.seed, unit))  # LoRA: before apply_stage
        groups = apply_stage(model, stage)
        if self.options.gradient_checkpointing:
            _enable_gradient_checkpointing(model)
        model.train()
        dataset = self.datasets(stage.data, model)
        if acc.num_processes > 1 and not self.options.find_unused_parameters:
            _freeze_unreached(model, dataset, acc.device, unit.name)
        cached = self._cached_experts(model)
        keys = {i: expert_cache_key(model.experts[i]) for i in cached}
        self._precompute(model, dataset, cached, keys)
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

        lengths = getattr(dataset, "lengths", None) if self.options.group_by_length else None
        sampler = batch_sampler(
            len(dataset), stage.batch_size, _unit_seed(self.seed, unit), lengths
        )
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=dataset.collate,
            num_workers=self.options.num_workers,
            generator=torch.Generator().manual_seed(_unit_seed(self.seed, unit)),
        )
        groups_opt = param_groups(model, stage)
        optimizer = torch.optim.AdamW(
            [{k: v for k, v in g.items() if k != "names"} for g in groups_opt],
            lr=stage.lr,
            weight_decay=stage.weight_decay,
        )
        batches_per_epoch = math.ceil(len(sampler) / acc.num_processes)
        steps_per_epoch = math.ceil(batches_per_epoch / stage.grad_accum)
        total_steps = steps_per_epoch * stage.epochs
        if stage.max_steps is not None:
            total_steps = min(total_steps, stage.max_steps)
        # AcceleratedScheduler steps once per process per optimiser step (split_batches=False).
        scheduler = get_scheduler(
            stage.scheduler,
            optimizer,
            num_warmup_steps=int(stage.warmup_ratio * total_steps) * acc.num_processes,
            num_training_steps=total_steps * acc.num_processes,
        )
        acc.gradient_accumulation_steps = stage.grad_accum
        prepared, optimizer, scheduler, loader = acc.prepare(model, optimizer, scheduler, loader)

        start_epoch = skip = 0
        if mid is not None:
            acc.load_state(str(mid / "accelerate"))
            ckpt.check_rng_restored(mid / "accelerate", acc.process_index)
            start_epoch, skip = self.state.epoch, self.state.batches_done
        else:
            self.state.kind, self.state.unit, self.state.unit_name = "mid", unit.index, unit.name
            self.state.optimizer_steps = 0
            _seed_everything(_unit_seed(self.seed, unit))
        base = self.state.base if mid is not None else self._last_unit_end()
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
                    precomputed = {
                        i: self.cache.maps(  # type: ignore[union-attr]
                            model.experts[i],
                            keys[i],
                            batch["images"][i],
                            batch["image_keys"],
                            acc.device,
                            rows=batch["input_rows"][i] if "input_rows" in batch else None,
                        )
                        for i in (cached if batch["images"] is not None else ())  # text-only batch
                    }
                    mark = self.timings.add("features_s", mark)  # cache reads / frozen experts
                    loss = batch_loss(prepared, batch, precomputed)
                    if not self._finite(loss, unit, epoch, batch):
                        optimizer.zero_grad()
                    else:
                        acc.backward(loss)
                        if acc.sync_gradients and stage.max_grad_norm is not None:
                            acc.clip_grad_norm_(trainable_params, stage.max_grad_norm)
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad()
                        running += float(loss.detach())
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
                    if self.state.global_step % self.options.log_every == 0:
                        acc.log(
                            {
                                f"train/loss/{unit.name}": last_loss,
                                "train/lr": scheduler.get_last_lr()[0],
                            },
                            step=self.state.global_step,
                        )
                    done = self.state.optimizer_steps >= total_steps
                    if not done and self._checkpoint_due(last_checkpoint):
                        self.state.train_time_s += time.perf_counter() - t_start
                        t_start = time.perf_counter()
                        mark = time.perf_counter()
                        self._save_checkpoint("mid", base)
                        mark = self.timings.add("checkpoint_s", mark)
                        last_checkpoint = time.monotonic()
                    event = StepEvent(
                        unit,
                        epoch,
                        self.state.batches_done,
                        self.state.optimizer_steps,
                        self.state.global_step,
                        last_loss,
                    )
                    for hook in self.hooks:
                        hook(event)
                    if done:
                        break
                mark = time.perf_counter()
        bar.close()
        self.state.train_time_s += time.perf_counter() - t_start
        if self.cache is not None and cached:
            logger.info(
                "feature cache after %s: %d hits, %d misses",
                unit.name,
                self.cache.hits,
                self.cache.misses,
            )
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
        self.state.unit_reports.append(dataclasses.asdict(report))
        self.state.epoch = self.state.batches_done = self.state.optimizer_steps = 0
        if self.cache is not None and cached:
            self.cache.flush()  # this unit's maps, for later units and runs
        if isinstance(dataset, LlavaDataset):
            dataset.cached_keys = {}  # the next unit's experts may differ
        self._save_checkpoint("unit_end", None, prepared if unit.expert is None else self.model)
        acc.free_memory()
        for p in model.parameters():
            p.grad = None

    def _checkpoint_due(self, last_checkpoint: float) -> bool:
        """Whether a mid-unit checkpoint is due after this optimiser step: every
        ``checkpoint_every`` steps, or ``checkpoint_interval_s`` after the last one. A checkpoint
        is collective, so when any process's clock has passed the interval, all write it."""
        every, interval = self.options.checkpoint_every, self.options.checkpoint_interval_s
        if every and self.state.optimizer_steps % every == 0:
            return True
        if not interval:
            return False
        due = time.monotonic() - last_checkpoint >= interval
        if self.accelerator.num_processes > 1:
            flag = torch.tensor([float(due)], device=self.accelerator.device)
            due = bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)
        return due

    def _last_unit_end(self) -> str | None:
        latest = ckpt.latest_checkpoint(self.ckpt_root)
        while latest is not None:
            st = ckpt.TrainerState.load(latest)
            return latest.name if st.kind == "unit_end" else st.base
        return None

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
