"""The pieces of a training step that need no trainer state.

The loss of a batch (:func:`batch_loss`), a stage's AdamW optimiser with per-pattern learning
rates and its warm-up + decay schedule (:func:`make_optimizer`), freezing the trainable
parameters the loss never reaches before DDP wraps the model (:func:`freeze_unreached`),
activation checkpointing (:func:`enable_gradient_checkpointing`) and seeding
(:func:`seed_everything`). :class:`~moe_vision.training.trainer.Trainer` calls them.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any

import torch
from accelerate.utils import send_to_device
from torch import nn
from transformers import get_scheduler

from moe_vision.training.recipe_stages import Stage
from moe_vision.training.recipes import param_groups

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) through accelerate."""
    from accelerate.utils import set_seed

    set_seed(seed)


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


FUSED_ADAMW_DEVICES = ("cpu", "cuda")
"""Where the stages' AdamW runs torch's fused kernel (one kernel over all tensors instead of a
Python loop per tensor: a tiny CPU step took 47 ms instead of 56 at 2 threads, back to back)."""


def fused_adamw_supported(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW takes every tensor of ``params``: floating point, on a CPU or
    CUDA device (checked again by torch at the first step, where the parameters then are)."""
    return bool(params) and all(
        p.is_floating_point() and p.device.type in FUSED_ADAMW_DEVICES for p in params
    )


def make_optimizer(
    model: nn.Module, stage: Stage, num_batches: int, num_processes: int
) -> tuple[torch.optim.Optimizer, Any, int]:
    """AdamW over ``model``'s trainable parameters (per-pattern learning rates of ``stage``) and
    its learning-rate schedule; returns ``(optimizer, scheduler, total optimiser steps)``.

    ``num_batches`` is the batch sampler's length per epoch (all processes together); the
    scheduler is stepped once per process per optimiser step, as accelerate's
    ``AcceleratedScheduler`` does with ``split_batches=False``.
    """
    groups = param_groups(model, stage)
    optimizer = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "names"} for g in groups],
        lr=stage.lr,
        weight_decay=stage.weight_decay,
        fused=fused_adamw_supported([p for g in groups for p in g["params"]]),
    )
    batches_per_epoch = math.ceil(num_batches / num_processes)
    steps_per_epoch = math.ceil(batches_per_epoch / stage.grad_accum)
    total_steps = steps_per_epoch * stage.epochs
    if stage.max_steps is not None:
        total_steps = min(total_steps, stage.max_steps)
    # AcceleratedScheduler steps once per process per optimiser step (split_batches=False).
    scheduler = get_scheduler(
        stage.scheduler,
        optimizer,
        num_warmup_steps=int(stage.warmup_ratio * total_steps) * num_processes,
        num_training_steps=total_steps * num_processes,
    )
    return optimizer, scheduler, total_steps


def freeze_unreached(model: nn.Module, dataset: Any, device: torch.device, unit: str) -> list[str]:
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


def repeated_blocks(module: nn.Module) -> list[nn.Module]:
    """The longest ``nn.ModuleList`` under ``module`` whose entries are all of one class (an
    LLM's decoder layers); ``[]`` when there is none."""
    best: list[nn.Module] = []
    for child in module.modules():
        if isinstance(child, nn.ModuleList) and len(child) > max(1, len(best)):
            if len({type(block) for block in child}) == 1:
                best = list(child)
    return best


def compile_llm_blocks(model: nn.Module) -> int:
    """Compile the LLM's decoder blocks in place (``nn.Module.compile``, ``dynamic=True``: one
    graph for every batch length; regional compilation, so the blocks share it and a new model
    of the same class in this process reuses it). Parameter names do not change, so
    checkpoints are unaffected. Returns how many blocks are compiled (already compiled ones are
    left as they are)."""
    blocks = repeated_blocks(getattr(model, "llm", model))
    if not blocks:
        raise TypeError(f"{type(model).__name__}: no repeated LLM blocks to compile")
    for block in blocks:
        if getattr(block, "_compiled_call_impl", None) is None:
            block.compile(dynamic=True)
    return len(blocks)


def eager() -> contextlib.AbstractContextManager[Any]:
    """Run compiled modules eagerly inside the block (evaluation and generation would otherwise
    compile graphs of their own: no grad, a KV cache)."""
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    return set_stance("force_eager") if set_stance else contextlib.nullcontext()


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing through the model's own switch (LLM and capable experts)."""
    switch = getattr(model, "gradient_checkpointing_enable", None)
    if not callable(switch):
        raise TypeError(f"{type(model).__name__} has no gradient_checkpointing_enable()")
    switch()
