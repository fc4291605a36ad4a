"""``moe-vision distill``: distil several teacher experts into one student (AM-RADIO + PHI-S).

The student is any expert of the zoo at its own resolution, random-init (default: CLIP-mini's
architecture), plus one adaptor head per teacher: an MLP on its summary token (CLS, or the map's
mean) and one on its map, resampled to the teacher's grid. Per teacher: cosine loss on the
summary, cosine + smooth-L1 on the map, after the teacher's balancing (``--balancing``: PHI-S,
per-channel standardisation, none). Teachers' maps come from the feature cache, computed once per
image at each teacher's own resolution. The loop, its schedule and resume are the mini zoo's
(``moe-vision pretrain``)::

    moe-vision distill                  # the shipped mini-student, into experts/mini/
    moe-vision distill --teachers clip-mini,pix2struct-mini,convnext-mini --student clip-mini \\
        --steps 200 --out /tmp/student --no-probe
    moe-vision distill --teachers clip-mini,sam-mini --student convnext-mini --name my-student \\
        --balancing standardize --out runs/my-student

Writes ``<out>/<name>.safetensors`` (student + adaptor heads) and ``<out>/<name>.json`` (the card:
teachers, balancing, steps, seed, wall time, fidelity per teacher on held-out scenes at the start
and the end, probe scores). ``experts.create_expert(name, checkpoint=<out>/<name>.safetensors)``
loads it, and ``arch={"adaptor": "<teacher>"}`` makes it return that teacher's head's map (the
teacher's grid and channels, in the teacher's feature space): a fusion then reads the student's
teacher-shaped maps in place of the teachers'. The shipped ``mini-student`` is also registered
as ``mini-student-as-clip`` / ``-as-pix2struct`` / ``-as-convnext``. In a fresh process, a
preset written under another name is registered from its card with
``moe_vision.distill.run.register_from_card(<out>/<name>.json)``.

A killed run keeps its state in ``<out>/<name>.resume.pt`` (every minute of training); the same
command resumes it to the same weights. Real size on a GPU node: ``recipes/distill_real.yaml``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

from moe_vision.commands import (
    UsageError,
    check_at_least,
    check_folder,
    check_positive,
    comma_list,
)

logger = logging.getLogger(__name__)


def _run(args: argparse.Namespace) -> int:
    import torch

    import experts
    from experts.families.mini import MINI_DIR
    from moe_vision.distill.balancing import BALANCING
    from moe_vision.distill.run import (
        DEFAULT_CONFIG,
        distill,
        distill_config,
        save_student,
        student_preset,
    )
    from moe_vision.zoo.resume import CHECKPOINT_EVERY_S, checkpoint_path

    check_at_least("--seed", args.seed, 0)
    check_positive("--lr", args.lr)
    check_at_least("--steps", args.steps, 1)
    check_at_least("--batch-size", args.batch_size, 2)
    check_at_least("--threads", args.threads, 1)
    check_at_least("--calibration-images", args.calibration_images, 2)
    check_at_least("--heldout", args.heldout, 1)
    check_folder("--out", args.out)
    if args.balancing not in BALANCING:
        raise UsageError(f"--balancing {args.balancing!r}: expected one of {', '.join(BALANCING)}")
    known = set(experts.list_experts())
    for name in [*args.teachers, args.student]:
        if name not in known:
            raise UsageError(f"unknown expert {name!r}; `moe-vision experts` lists them")
    if len(set(args.teachers)) != len(args.teachers):
        raise UsageError(f"--teachers {','.join(args.teachers)}: a teacher is named twice")
    try:
        name = student_preset(args.name, args.student, args.teachers)
    except ValueError as err:
        raise UsageError(str(err)) from None
    torch.set_num_threads(args.threads)
    out = args.out or MINI_DIR
    warmup = max(1, min(DEFAULT_CONFIG.warmup, args.steps // 10))
    base = dataclasses.replace(
        DEFAULT_CONFIG,
        steps=args.steps,
        warmup=warmup,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
    )
    options = {"calibration_images": args.calibration_images}
    if args.cache is not None:
        options["teacher_cache"] = args.cache
    config = distill_config(args.teachers, args.balancing, base, **options)
    ckpt = checkpoint_path(out, name)
    args.interrupt_hint = (
        f"the same command resumes {name} from {ckpt} (written every {CHECKPOINT_EVERY_S:.0f} s)"
    )
    run = distill(name, config, out, progress=not args.quiet, heldout=args.heldout)
    weights, card_path = save_student(run, out)
    if not args.no_probe:
        from moe_vision.zoo.scores import probe_scores

        save_student(run, out, probe_scores(name, weights))  # probe the written weights
    ckpt.unlink(missing_ok=True)
    r = run.result
    print(
        f"{name}: {r.config.steps} steps in {r.wall_time_s:.0f} s ({r.cpu_time_s:.0f} CPU-s), "
        f"loss {r.losses[0]:.4f} -> {r.losses[-1]:.4f}; wrote {weights} and {card_path}"
    )
    for teacher, fid in run.fidelity.items():
        start = run.fidelity_at_init[teacher]
        print(
            f"  {teacher}: fidelity (centred cosine, held-out) map "
            f"{start['spatial_centred']:.3f} -> {fid['spatial_centred']:.3f}, summary "
            f"{start['summary_centred']:.3f} -> {fid['summary_centred']:.3f}"
        )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from moe_vision.distill.run import (
        DEFAULT_CONFIG,
        DEFAULT_NAME,
        DEFAULT_STUDENT,
        DEFAULT_TEACHERS,
    )

    p = subparsers.add_parser(
        "distill",
        help="distil teacher experts into one student expert (writes weights + card)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--teachers",
        type=comma_list,
        default=list(DEFAULT_TEACHERS),
        help=f"teacher presets, comma-separated (default {','.join(DEFAULT_TEACHERS)})",
    )
    p.add_argument(
        "--student",
        default=DEFAULT_STUDENT,
        help=f"student architecture: any preset, trained from random init (default "
        f"{DEFAULT_STUDENT}'s architecture)",
    )
    p.add_argument("--name", default=DEFAULT_NAME, help=f"preset name (default {DEFAULT_NAME})")
    p.add_argument(
        "--balancing",
        default="phi-s",
        help="teacher balancing: phi-s (default), standardize or none",
    )
    p.add_argument("--steps", type=int, default=DEFAULT_CONFIG.steps, help="optimiser steps")
    p.add_argument("--batch-size", type=int, default=DEFAULT_CONFIG.batch_size)
    p.add_argument("--lr", type=float, default=DEFAULT_CONFIG.lr, help="peak learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed of torch and the scene stream")
    p.add_argument(
        "--calibration-images",
        type=int,
        default=256,
        help="scenes the balancing is estimated on (default 256)",
    )
    p.add_argument("--heldout", type=int, default=64, help="held-out scenes for fidelity")
    p.add_argument(
        "--cache",
        default=None,
        help="feature-cache folder of the teachers' maps (default ~/.cache/moe-vision/"
        "features; 'off': run the teachers every step)",
    )
    p.add_argument("--out", default=None, help="output folder (default experts/mini/, shipped)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--no-probe", action="store_true", help="skip the card's probe scores")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
