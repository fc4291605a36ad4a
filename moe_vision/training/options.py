"""How to train (independent of what: that is the recipe): :class:`TrainOptions` and the
``accelerate`` set-up they give (:func:`make_accelerator`): mixed precision, trackers, project
folders, DDP options.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

from moe_vision.training import checkpoint as ckpt
from moe_vision.training.distributed import enable_cpu_fsdp, fsdp_requested

logger = logging.getLogger(__name__)

KNOWN_TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive")


@dataclass
class TrainOptions:
    """How to train (independent of what: that is the recipe).

    Attributes:
        mixed_precision: ``"auto"`` (bf16 on CUDA when supported, else fp32), ``"no"``,
            ``"bf16"`` or ``"fp16"``; a half-precision request without CUDA falls back to fp32
            with a warning.
        gradient_checkpointing: recompute activations in the LLM (and experts that support
            it) during backward.
        num_workers: DataLoader worker processes (each expert's preprocessing runs there).
        log_with: experiment trackers for ``accelerator.init_trackers``; names that are not
            installed are dropped with a warning, except when named explicitly in
            ``require_trackers``.
        log_every: optimiser steps between tracker logs.
        checkpoint_every: optimiser steps between mid-unit checkpoints (0: by time only).
        checkpoint_interval_s: seconds of training between mid-unit checkpoints (0: by steps
            only). A checkpoint (weights, optimiser, RNG) costs far more than a tiny model's
            step, so short cells write one only at unit ends; a long run loses at most this
            much work when killed. Either trigger writes one; both 0: only at unit ends.
        keep_checkpoints: newest checkpoints kept (plus the ``unit_end`` ones still needed).
        max_nonfinite: NaN/inf losses tolerated (skipped, counted) before raising.
        use_feature_cache: serve frozen experts from the feature cache.
        progress_bar: show a tqdm bar on the main process.
        group_by_length: batches of records of similar length
            (:class:`~moe_vision.training.samplers.LengthGroupedBatchSampler`): less padding on
            data whose conversations vary in length (LLaVA's ``group_by_modality_length``).
        compile_llm: compile the LLM's repeated decoder blocks in place
            (:func:`~moe_vision.training.steps.compile_llm_blocks`: regional ``torch.compile``,
            dynamic shapes) for the training steps; evaluation runs eagerly. Results differ
            from eager in the last bits. Measured on a 2-core CPU (README, "Cheap cells"): a
            tiny step ~1.2x faster, for ~35 s of compiling per process and stage kind from a
            cold inductor cache, so it pays from a few thousand steps per process (a sweep
            worker's cells share it), not for one short cell.
        find_unused_parameters: DDP's per-step detection of parameters without gradient.
            Off by default: in data-parallel runs the trainer instead freezes, once per stage,
            the trainable parameters the loss never reaches
            (:func:`moe_vision.training.steps.freeze_unreached`).
    """

    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False
    num_workers: int = 0
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"])
    log_every: int = 10
    checkpoint_every: int = 0
    checkpoint_interval_s: float = 600.0
    keep_checkpoints: int = 2
    max_nonfinite: int = 0
    use_feature_cache: bool = True
    progress_bar: bool = True
    find_unused_parameters: bool = False
    group_by_length: bool = False
    compile_llm: bool = False

    def __post_init__(self) -> None:
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(
                "mixed_precision must be 'auto', 'no', 'bf16' or 'fp16', "
                f"got {self.mixed_precision!r}"
            )
        if isinstance(self.log_with, str):
            self.log_with = [self.log_with]
        bad = [t for t in self.log_with if t not in KNOWN_TRACKERS]
        if bad:
            raise ValueError(f"unknown trackers {bad}; accelerate supports {list(KNOWN_TRACKERS)}")
        for key in (
            "num_workers",
            "log_every",
            "checkpoint_every",
            "keep_checkpoints",
            "max_nonfinite",
        ):
            v = getattr(self, key)
            if not isinstance(v, int) or v < (1 if key in ("log_every", "keep_checkpoints") else 0):
                raise ValueError(f"TrainOptions.{key} must be a non-negative integer, got {v!r}")
        interval = self.checkpoint_interval_s
        if not isinstance(interval, (int, float)) or interval < 0:
            raise ValueError(
                "TrainOptions.checkpoint_interval_s must be a non-negative number of seconds, "
                f"got {self.checkpoint_interval_s!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_mixed_precision(requested: str) -> str:
    """bf16 on CUDA (``"auto"``), fp32 (``"no"``) on CPU whatever was asked."""
    cuda = torch.cuda.is_available()
    if requested == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    if requested != "no" and not cuda:
        logger.warning("mixed_precision=%r needs CUDA; training in fp32 on CPU", requested)
        return "no"
    return requested


def available_trackers(names: Sequence[str]) -> list[str]:
    """The trackers of ``names`` whose packages are installed (others dropped, logged)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    ok = []
    for name in names:
        cls = LOGGER_TYPE_TO_CLASS.get(name)
        try:
            usable = cls is not None and cls.requires_logging_directory is not None
            from accelerate.utils import imports

            check = getattr(imports, f"is_{name}_available", None)
            usable = usable and (check is None or check())
        except Exception:  # noqa: BLE001 - a broken optional tracker must not stop training
            usable = False
        if usable:
            ok.append(name)
        else:
            logger.warning("tracker %r is not installed; not logging to it", name)
    return ok


class _TiedWeightsNote(logging.Filter):
    """Drops accelerate's "Removed shared tensor ... while saving" warning (said at every
    checkpoint). The tensors it removes are tied weights (an LLM's ``lm_head`` tied to its input
    embeddings); :func:`load_weights` re-ties them on loading and raises on any other missing
    key, so the warning tells the user nothing to act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


def make_accelerator(options: TrainOptions, project_dir: str | Path) -> Accelerator:
    """The run's :class:`~accelerate.Accelerator` (distributed setup from the environment)."""
    other = logging.getLogger("accelerate.utils.other")
    if not any(isinstance(f, _TiedWeightsNote) for f in other.filters):
        other.addFilter(_TiedWeightsNote())
    # Several processes without CUDA (torchrun / `accelerate launch --multi_gpu` on a CPU box):
    # data-parallel on CPU with gloo, which accelerate only picks when told `cpu=True`.
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    ckpt.quiet_accelerate_file_logs()
    accelerator = Accelerator(
        cpu=multi_cpu,
        mixed_precision=resolve_mixed_precision(options.mixed_precision),
        log_with=available_trackers(options.log_with) or None,
        project_config=ProjectConfiguration(
            project_dir=str(project_dir), logging_dir=str(project_dir)
        ),
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=options.find_unused_parameters)
        ],
    )
    if multi_cpu and fsdp_requested():  # accelerate would silently fall back to DDP on CPU
        enable_cpu_fsdp(accelerator)
    return accelerator


# ------------------------------------------------------------------------------ data order
