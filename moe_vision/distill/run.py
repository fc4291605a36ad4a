"""Run a distillation through the zoo's loop and write the student preset (weights + card).

:func:`student_preset` registers (or finds) the distilled student preset: the student
architecture plus one adaptor head per teacher (:mod:`experts.families.distilled`).
:func:`distill` runs :func:`moe_vision.zoo.pretrain` with the ``"distill"`` objective (so the
schedule, the resume file ``<out>/<name>.resume.pt`` and its guarantees are the zoo's),
measures fidelity on held-out scenes, and :func:`save_student` writes
``<out>/<name>.safetensors`` (student + heads) and the card ``<out>/<name>.json`` (the zoo's
card plus teachers, balancing, fidelity per teacher). ``experts.create_expert(name,
checkpoint=<out>/<name>.safetensors)`` loads it; :func:`register_from_card` registers a preset
written under another name or architecture in a fresh process first.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import experts
from experts.families.distilled import (
    DistilledExpert,
    distilled_class,
    distilled_spec,
    teacher_shapes,
)
from moe_vision.distill.objective import MultiTeacherDistillation
from moe_vision.io import read_json, save_safetensors, write_json
from moe_vision.zoo.core import PretrainConfig, PretrainResult, card, pretrain

logger = logging.getLogger(__name__)

DEFAULT_TEACHERS = ("clip-mini", "pix2struct-mini", "convnext-mini")
DEFAULT_STUDENT = "clip-mini"
DEFAULT_NAME = "mini-student"
ARCH_KEYS = ("student", "student_options", "teachers", "hidden")
"""The fields of a distilled preset's ``arch`` that fix its weights' shapes (kept in the card)."""
DEFAULT_CONFIG = PretrainConfig(steps=600, batch_size=32, lr=1e-3, warmup=30)
"""The default distillation's loop settings (the teachers and balancing go in ``options``)."""


def student_preset(
    name: str,
    student: str,
    teachers: Sequence[str],
    hidden: int = 0,
    student_options: dict[str, Any] | None = None,
) -> str:
    """Register the distilled preset ``name`` (student, built with ``student_options``, plus
    heads for ``teachers``) unless one with the same architecture is registered; returns
    ``name``.

    Raises:
        ValueError: ``name`` is registered with another student or other teachers.
    """
    shapes = teacher_shapes(list(teachers))
    spec = distilled_spec(
        name, student, shapes, None, hidden=hidden, student_options=student_options
    )
    if name in experts.list_experts():
        have = experts.get_spec(name).arch
        if any(have.get(k) != spec.arch[k] for k in ARCH_KEYS):
            raise ValueError(
                f"expert preset {name!r} is registered with student {have.get('student')!r} and "
                f"teachers {sorted(have.get('teachers', {}))}; pick another name for student "
                f"{student!r} with teachers {sorted(teachers)}"
            )
        return name
    opts = dict(spec.arch["student_options"])
    if "input_size" in opts:
        opts["input_size"] = tuple(opts["input_size"])
    cls = distilled_class(type(experts.create_expert(student, device="meta", **opts)))
    experts.register_expert(cls, spec)
    return name


def register_from_card(card_path: str | os.PathLike[str]) -> str:
    """Register the preset a distillation card describes, for a fresh process; returns its
    name. Load it with ``create_expert(name, checkpoint=<the .safetensors next to the card>)``.

    Raises:
        ValueError: the file is not a distillation card (names the file and the missing field).
    """
    path = Path(card_path)
    c = read_json(path)
    try:
        arch, name = c["distill"]["arch"], c["name"]
    except KeyError as err:
        raise ValueError(f"{path}: not a distillation card (no {err.args[0]!r} field)") from None
    return student_preset(
        name,
        arch["student"],
        list(arch["teachers"]),
        int(arch.get("hidden", 0)),
        arch.get("student_options"),
    )


def distill_config(
    teachers: Sequence[str] = DEFAULT_TEACHERS,
    balancing: str = "phi-s",
    base: PretrainConfig = DEFAULT_CONFIG,
    **options: Any,
) -> PretrainConfig:
    """``base`` with the distillation's options (see :mod:`moe_vision.distill.objective`)."""
    return dataclasses.replace(
        base, options={"teachers": list(teachers), "balancing": balancing, **options}
    )


@dataclasses.dataclass
class DistillResult:
    """A finished distillation: the loop's result (``result.expert`` is the
    :class:`DistilledExpert`), the objective (for fidelity) and the fidelity per teacher at
    the start (random heads) and at the end."""

    result: PretrainResult
    fidelity: dict[str, dict[str, float]]
    fidelity_at_init: dict[str, dict[str, float]]
    setup: dict[str, Any]


def distill(
    name: str,
    config: PretrainConfig,
    out: str | os.PathLike[str] | None = None,
    progress: bool = True,
    checkpoint_every_s: float | None = None,
    heldout: int = 64,
) -> DistillResult:
    """Distil ``config.options["teachers"]`` into the registered student preset ``name``
    (:func:`student_preset`), resuming from ``<out>/<name>.resume.pt`` when there is one."""
    from moe_vision.zoo.core import build_objective

    probe_model = build_objective(name, config, "distill")  # same seed: the loop's init
    assert isinstance(probe_model, MultiTeacherDistillation)
    at_init = probe_model.fidelity(heldout)
    result = pretrain(
        name, config, "distill", progress, resume_dir=out, checkpoint_every_s=checkpoint_every_s
    )
    probe_model.expert.load_state_dict(result.expert.state_dict())
    return DistillResult(result, probe_model.fidelity(heldout), at_init, probe_model.describe())


def save_student(
    run: DistillResult, out_dir: str | os.PathLike[str], probe: dict[str, Any] | None = None
) -> tuple[Path, Path]:
    """Write ``<out_dir>/<name>.safetensors`` (student + adaptor heads, the expert's
    ``state_dict``) and ``<name>.json`` (the card). Returns both paths."""
    out = Path(out_dir)
    result = run.result
    expert = result.expert
    assert isinstance(expert, DistilledExpert)
    weights = out / f"{result.name}.safetensors"
    state = {k: v.detach().contiguous() for k, v in expert.state_dict().items()}
    meta = {"preset": result.name, "objective": result.objective}
    save_safetensors(state, weights, meta)
    c = card(result, probe)
    opts = result.config.options
    c["distill"] = {
        **run.setup,
        "student": expert.spec.arch["student"],
        "arch": {k: expert.spec.arch[k] for k in ARCH_KEYS},
        "fidelity": run.fidelity,
        "fidelity_at_init": run.fidelity_at_init,
        "fidelity_images": "held-out scenes (moe_vision.distill.objective.HELDOUT_STEP stream)",
        "teacher_cache": opts.get("teacher_cache"),
    }
    teachers = ",".join(opts["teachers"])
    c["command"] = (
        f"moe-vision distill --teachers {teachers} --student {expert.spec.arch['student']} "
        f"--balancing {opts.get('balancing', 'phi-s')} --steps {result.config.steps} "
        f"--seed {result.config.seed} --name {result.name}"
    )
    c["written"] = time.strftime("%Y-%m-%d")
    return weights, write_json(out / f"{result.name}.json", c)
