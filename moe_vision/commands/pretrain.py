"""``moe-vision pretrain``: (re)generate mini-zoo experts with their family's own objective.

Each mini preset (``clip-mini``, ``siglip-mini``, ``convnext-mini``, ``eva02-mini``,
``pix2struct-mini``, ``sam-mini``, ``dinov2-mini``) has a recipe (:mod:`moe_vision.zoo.recipes`):
an objective (:mod:`moe_vision.zoo`, one module each) and a config. The command trains the
preset from random init on generated scenes (:mod:`moe_vision.zoo.data`), writes
``<out>/<name>.safetensors`` and the card ``<out>/<name>.json`` (objective, data, steps, wall
time, losses, probe scores against the random-init twin, output fingerprint)::

    moe-vision pretrain clip-mini                     # the shipped recipe, into experts/mini/
    moe-vision pretrain all                           # the whole mini zoo, in dependency order
    moe-vision pretrain sam-mini --steps 20 --out /tmp/minis --no-probe
    moe-vision pretrain --list                        # presets, objectives, default configs
    moe-vision pretrain clip-mini --probe-only        # re-probe shipped weights, update the card
    moe-vision pretrain all --probe-only --categories detail   # only after `detail` changed

The same seed, steps and thread count give the same weights. A killed or interrupted run keeps
its state in ``<out>/<name>.resume.pt`` (every minute of training) and the same command resumes
it, to the same weights; the file goes once the weights and card are written. EVA-02's objective
regresses the shipped ``clip-mini``'s features, so ``all`` pretrains CLIP first.

Adding a mini version of a new family: register its preset (``experts/families/mini.py``),
write its objective as an ``Objective`` subclass under ``@register_objective`` in
``moe_vision/zoo/<objective>.py``, and add its recipe to ``moe_vision/zoo/recipes.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

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

    from experts.families.mini import MINI_DIR
    from moe_vision.zoo import MINI_RECIPES, get_pretrain_recipe, pretrain, save_pretrained
    from moe_vision.zoo.core import write_card
    from moe_vision.zoo.resume import CHECKPOINT_EVERY_S, checkpoint_path

    if args.list:
        for name, recipe in MINI_RECIPES.items():
            cfg = recipe.config
            print(
                f"{name:16s} {recipe.objective:14s} steps={cfg.steps} batch={cfg.batch_size} "
                f"lr={cfg.lr} kinds={','.join(cfg.kinds)}"
            )
        return 0
    names = list(MINI_RECIPES) if args.names == ["all"] else args.names
    if not names:
        print(
            "moe-vision pretrain: name a mini preset (or 'all'; --list shows them)", file=sys.stderr
        )
        return 2
    if args.categories and not args.probe_only:
        print("moe-vision pretrain: --categories goes with --probe-only", file=sys.stderr)
        return 2
    check_at_least("--seed", args.seed, 0)
    check_positive("--lr", args.lr)
    check_at_least("--threads", args.threads, 1)
    check_folder("--out", args.out)  # before training: a file there would lose the weights
    for name in names:  # every name before the first is trained
        if name not in MINI_RECIPES:
            raise UsageError(f"no pretraining recipe for {name!r}; valid: {sorted(MINI_RECIPES)}")
    torch.set_num_threads(args.threads)
    out = args.out or MINI_DIR
    if args.probe_only:
        from moe_vision.analysis.probe import ProbeConfig
        from moe_vision.zoo.scores import refresh_card

        config = ProbeConfig(categories=args.categories)
        for name in names:
            print(f"{name}: updated {refresh_card(name, out, config)}")
        return 0
    for name in names:
        try:
            recipe = get_pretrain_recipe(name)
        except KeyError as err:
            print(f"moe-vision pretrain: {err.args[0]}", file=sys.stderr)
            return 2
        changes = {
            k: v
            for k, v in (
                ("steps", args.steps),
                ("seed", args.seed),
                ("batch_size", args.batch_size),
                ("lr", args.lr),
            )
            if v is not None
        }
        if changes.get("steps") is not None:
            changes["warmup"] = min(recipe.config.warmup, max(1, changes["steps"] // 10))
        config = dataclasses.replace(recipe.config, **changes)
        ckpt = checkpoint_path(out, name)
        args.interrupt_hint = (
            f"the same command resumes {name} from {ckpt} (written every "
            f"{CHECKPOINT_EVERY_S:.0f} s of training)"
        )
        result = pretrain(name, config, recipe.objective, progress=not args.quiet, resume_dir=out)
        weights, card_path = save_pretrained(result, out)
        if not args.no_probe:
            from moe_vision.zoo.scores import probe_scores

            write_card(result, out, probe_scores(name, weights))
        ckpt.unlink(missing_ok=True)  # the weights and card are written: nothing to resume
        print(
            f"{name}: {config.steps} steps in {result.wall_time_s:.0f} s, loss "
            f"{result.losses[0]:.4f} -> {result.losses[-1]:.4f}; wrote {weights} and {card_path}"
        )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pretrain",
        help="pretrain mini-zoo experts with their family's objective (writes weights + card)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("names", nargs="*", help="mini presets to pretrain, or 'all'")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (default: recipe)")
    p.add_argument("--seed", type=int, default=None, help="seed of torch and the scene stream")
    p.add_argument("--batch-size", type=int, default=None, help="scenes per step")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--out", default=None, help="output folder (default: experts/mini/, shipped)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--no-probe", action="store_true", help="skip the card's probe scores")
    p.add_argument(
        "--probe-only",
        action="store_true",
        help="no training: re-probe the weights in --out and rewrite their card's probe scores",
    )
    p.add_argument(
        "--categories",
        type=comma_list,
        default=None,
        help="with --probe-only: re-probe only these categories (comma-separated); the "
        "card keeps the others' scores",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--list", action="store_true", help="list the presets and their recipes")
    p.set_defaults(func=_run)
