"""``moe-vision train``: train a mixture-of-experts model with a staged recipe, then evaluate.

Flags override the YAML config (``--config``, a :class:`moe_vision.experiment.run.RunConfig`), which
overrides the defaults (tiny experts, tiny LLM, the built-in benchmark, the Eagle recipe)::

    moe-vision train --config recipes/run_tiny.yaml --out runs/tiny   # tuned laptop run, ~2 min
    moe-vision train --experts clip-tiny,convnext-tiny --fusion channel_concat \\
        --recipe eagle --out runs/x
    moe-vision train --config recipes/run_tiny.yaml --out runs/y --override sft.epochs=2
    moe-vision train --out runs/x --resume          # continue a killed run where it stopped
    accelerate launch --num_processes 4 -m moe_vision.cli train --config run.yaml --out runs/z

With no ``overrides`` in the config, a recipe gets its tiny-run defaults
(:func:`~moe_vision.experiment.run_config.tiny_overrides`:
larger LRs for random-init models; for Eagle also short
LLM-frozen stages and 10 SFT epochs); ``--override`` changes fields on top of them.
``recipes/run_tiny.yaml`` is the tuned Eagle run at its benchmark sizes (colour 1.00, shape
0.445 on the test split).

The run folder holds ``config.yaml`` (resolved), ``checkpoints/``, ``model/``,
``predictions.json`` and ``metrics.json``. While ``train`` runs it holds an exclusive lock on
``<out>/.run.lock`` (released by the OS when the process ends, however it ends); a second
``train`` on the same ``--out`` stops with an error instead of touching the first's
checkpoints. ``--resume`` on a folder that holds no run (no ``config.yaml``, no checkpoint) is
an error; one killed before its first checkpoint starts again from its ``config.yaml``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

import yaml

from moe_vision.commands import UsageError, check_at_least, check_folder, comma_list

logger = logging.getLogger(__name__)

RUN_LOCK = ".run.lock"
"""Held (``flock``) in the run folder by the ``train`` process training there."""


def _override(text: str) -> tuple[str, str, Any]:
    key, sep, value = text.partition("=")
    stage, dot, name = key.strip().rpartition(".")
    if not sep or not dot or not stage or not name:
        raise argparse.ArgumentTypeError(
            f"--override expects STAGE.FIELD=VALUE (STAGE may be '*'), e.g. sft.epochs=2, "
            f"got {text!r}"
        )
    return stage, name, yaml.safe_load(value)


def _split(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(
            f"--data expects SPLIT=PATH (.json, .jsonl or mixture .yaml), got {text!r}"
        )
    return name.strip(), path.strip()


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The flags that build a :class:`~moe_vision.experiment.run.RunConfig` (shared by commands)."""
    p.add_argument("--config", type=Path, help="RunConfig YAML (flags override it)")
    m = p.add_argument_group("model")
    m.add_argument(
        "--experts", type=comma_list, metavar="A,B", help="expert presets, in fusion order"
    )
    m.add_argument("--fusion", help="fusion strategy (see `moe-vision experts` / fusion registry)")
    m.add_argument("--projector", help="projector (linear, mlp2x_gelu, ...)")
    m.add_argument("--llm", help="LLM preset, hub id or local folder")
    t = p.add_argument_group("training")
    t.add_argument("--recipe", help="recipe preset (eagle, cambrian, llava) or a recipe YAML path")
    t.add_argument(
        "--override",
        type=_override,
        action="append",
        default=[],
        metavar="STAGE.FIELD=VALUE",
        help="change a stage field, e.g. '*.epochs=2' or 'sft.lr=1e-4' (repeatable)",
    )
    t.add_argument("--seed", type=int, help="random seed")
    t.add_argument("--cache-dir", help="feature cache folder (shared across runs)")
    t.add_argument("--no-cache", action="store_true", help="do not use the feature cache")
    t.add_argument("--mixed-precision", choices=["auto", "no", "bf16", "fp16"])
    t.add_argument("--gradient-checkpointing", action="store_true")
    t.add_argument("--num-workers", type=int, help="data-loader workers")
    t.add_argument("--checkpoint-every", type=int, help="optimiser steps between checkpoints")
    t.add_argument(
        "--group-by-length",
        action="store_true",
        help="batches of records of similar length (less padding; LLaVA's group_by_length)",
    )
    t.add_argument(
        "--log-with", type=comma_list, metavar="T,...", help="trackers (tensorboard, wandb)"
    )
    d = p.add_argument_group("data (default: the built-in benchmark)")
    d.add_argument(
        "--data",
        type=_split,
        action="append",
        default=[],
        metavar="SPLIT=PATH",
        help="LLaVA-format .json/.jsonl or mixture .yaml of a split (align, instruct, test, "
        "...); repeatable",
    )
    d.add_argument("--image-root", help="folder the JSON files' image paths are relative to")
    d.add_argument("--eval-split", help="split evaluated after training (default: test)")
    d.add_argument("--benchmark-seed", type=int, help="seed of the built-in benchmark")
    d.add_argument(
        "--on-bad-record",
        choices=["error", "skip"],
        help="bad records stop the run (error, default) or are counted, listed and replaced "
        "(skip); training and evaluation alike",
    )
    d.add_argument(
        "--allow-outside-root",
        action="store_true",
        help="accept absolute and '..' image paths that leave the image root",
    )
    d.add_argument("--max-image-pixels", type=int, help="pixel limit of image files")


def build_config(args: argparse.Namespace) -> Any:
    """The :class:`~moe_vision.experiment.run.RunConfig` of ``args`` (YAML config, then flags)."""
    from moe_vision.experiment.run_config import RunConfig

    data = RunConfig.from_yaml(args.config).to_dict() if args.config else RunConfig().to_dict()
    model = data["model"]
    if args.experts:
        model["experts"] = args.experts
        model["expert_options"] = {
            k: v for k, v in model.get("expert_options", {}).items() if k in args.experts
        }
    for key in ("fusion", "projector", "llm"):
        if getattr(args, key):
            model[key] = getattr(args, key)
    if args.recipe:
        data["recipe"] = args.recipe
    if args.override and data.get("overrides") is None:  # start from the recipe's defaults
        data["overrides"] = RunConfig.from_dict(data).effective_overrides()
    for stage, name, value in args.override:
        data["overrides"].setdefault(stage, {})[name] = value
    if args.seed is not None:
        data["seed"] = args.seed
    if args.cache_dir:
        data["cache_dir"] = args.cache_dir
    train = data["train"]
    if args.no_cache:
        train["use_feature_cache"] = False
    if args.mixed_precision:
        train["mixed_precision"] = args.mixed_precision
    if args.gradient_checkpointing:
        train["gradient_checkpointing"] = True
    if args.num_workers is not None:
        train["num_workers"] = args.num_workers
    if args.checkpoint_every is not None:
        train["checkpoint_every"] = args.checkpoint_every
    if args.group_by_length:
        train["group_by_length"] = True
    if args.log_with:
        train["log_with"] = args.log_with
    d = data["data"]
    if args.data:
        d["splits"] = {**d.get("splits", {}), **dict(args.data)}
    if args.image_root:
        d["image_root"] = args.image_root
    if args.eval_split:
        d["eval_split"] = args.eval_split
    if args.benchmark_seed is not None:
        d["benchmark_seed"] = args.benchmark_seed
    if args.on_bad_record:
        d["on_bad_record"] = args.on_bad_record
    if args.allow_outside_root:
        d["allow_outside_root"] = True
    if args.max_image_pixels is not None:
        d["max_image_pixels"] = args.max_image_pixels
    return RunConfig.from_dict(data)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model with a staged recipe, then evaluate it",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, required=True, help="run folder")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its newest checkpoint",
    )
    add_run_arguments(p)
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the run's library logging on the console (also: moe-vision -v train)",
    )
    p.set_defaults(func=run)


def check_run_arguments(args: argparse.Namespace) -> None:
    """Refuse impossible values of :func:`add_run_arguments`' flags before any work
    (:class:`~moe_vision.commands.UsageError`, naming the flag)."""
    check_at_least("--seed", args.seed, 0)
    check_at_least("--benchmark-seed", args.benchmark_seed, 0)
    check_at_least("--num-workers", args.num_workers, 0)
    check_at_least("--checkpoint-every", args.checkpoint_every, 0)
    check_at_least("--max-image-pixels", args.max_image_pixels, 1)
    check_folder("--cache-dir", args.cache_dir)


def check_llm_folder(llm: str) -> None:
    """A local LLM folder must hold a transformers ``config.json`` (a name that is no folder is
    a preset or hub id, checked where the LLM is built)."""
    folder = Path(llm).expanduser()
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise UsageError(
            f"--llm {llm}: a folder without config.json; expected a transformers model folder "
            "(config.json, weights, tokenizer), a tiny preset or a hub id"
        )


def _nothing_to_resume(out: Path) -> bool:
    """Whether ``out`` holds no run at all: no ``config.yaml`` and no checkpoint."""
    return not (out / "config.yaml").is_file() and not any((out / "checkpoints").glob("ckpt-*"))


def run(args: argparse.Namespace) -> int:
    from moe_vision.console import RUN_LOG
    from moe_vision.experiment.run import run_experiment
    from moe_vision.sweeps.sweep import file_lock

    # the console was set by moe_vision.cli.main; INFO goes to <out>/train.log
    check_folder("--out", args.out)
    check_run_arguments(args)
    if args.resume and _nothing_to_resume(args.out):
        raise UsageError(
            f"--resume: nothing to resume in {args.out} (no config.yaml, no checkpoint); "
            "drop --resume to start a new run there"
        )
    if args.resume and args.config is None and (args.out / "config.yaml").is_file():
        args.config = args.out / "config.yaml"  # resume what was started, flags still win
    cfg = build_config(args)
    check_llm_folder(cfg.model.llm)
    with contextlib.ExitStack() as held:
        try:  # released by the OS if this process dies
            held.enter_context(file_lock(args.out / RUN_LOCK, blocking=False))
        except BlockingIOError:
            raise UsageError(
                f"another run is training in {args.out} (it holds {RUN_LOCK}); wait for it to "
                "finish, or give this one another --out"
            ) from None
        if not args.resume and (args.out / "checkpoints").is_dir():
            raise UsageError(
                f"{args.out} already holds a run; pass --resume to continue it or pick another "
                "--out"
            )
        args.interrupt_hint = (
            f"`moe-vision train --out {args.out} --resume` continues from the run's last checkpoint"
        )
        metrics = run_experiment(cfg, args.out, resume=args.resume)
    if metrics:
        print(json.dumps(metrics, indent=1))
    print(f"run folder: {args.out} (log: {args.out / RUN_LOG})", file=sys.stderr)  # stdout: JSON
    return 0
