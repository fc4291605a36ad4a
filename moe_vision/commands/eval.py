"""``moe-vision eval``: evaluate a trained run's model, per category (VQA-style scoring).

By default on the evaluation split of the run's own config (the built-in benchmark's test
split); ``--data`` + ``--image-root`` evaluate any LLaVA-format file (records with
``"answers"`` lists are scored VQA-style)::

    moe-vision eval --run runs/x
    moe-vision eval --run runs/x --data val.json --image-root data/images --limit 200

Writes ``<run>/eval/<data file stem>.json`` (scores, the prompt format: chat template and
rendered prompt, and predictions) and prints the scores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from moe_vision.commands import UsageError, check_at_least, check_device


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a trained run (per-category accuracy, VQA-style scoring)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", type=Path, required=True, help="run folder written by `train`")
    p.add_argument(
        "--data",
        type=Path,
        help="LLaVA-format .json/.jsonl or mixture .yaml (default: the run's eval split)",
    )
    p.add_argument("--image-root", type=Path, help="image folder of --data")
    p.add_argument("--batch-size", type=int, default=32, help="questions per generate call")
    p.add_argument("--limit", type=int, help="evaluate only the first N questions")
    p.add_argument(
        "--skip-bad", action="store_true", help="skip, count and list bad records (else: stop)"
    )
    p.add_argument(
        "--allow-outside-root",
        action="store_true",
        help="accept absolute and '..' image paths that leave the image root",
    )
    p.add_argument("--max-image-pixels", type=int, help="pixel limit of image files")
    p.add_argument("--device", default=None, help="device (default: cuda if available, else cpu)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from moe_vision.data.mixture import is_mixture
    from moe_vision.evaluation.evaluate import evaluate
    from moe_vision.experiment.run_config import RunConfig, cache_root
    from moe_vision.model.mllm import MoEVisionModel

    check_device("--device", args.device)
    check_at_least("--batch-size", args.batch_size, 1)
    check_at_least("--limit", args.limit, 1)
    check_at_least("--max-image-pixels", args.max_image_pixels, 1)
    model_dir = args.run / "model"
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"{args.run} holds no trained model ({model_dir}); has training finished?")
    if args.image_root is not None and args.data is None:
        raise UsageError("--image-root needs --data")
    if args.data is not None and args.image_root is None and not is_mixture(args.data):
        raise UsageError("--data needs --image-root (a mixture .yaml may name its own roots)")
    if args.data is None:
        config = args.run / "config.yaml"
        if not config.is_file():
            raise UsageError(f"{config} not found: pass --data and --image-root")
        cfg = RunConfig.from_yaml(config)
        splits, image_root = cfg.data.resolve(cache_root(cfg))
        if cfg.data.eval_split not in splits:
            raise UsageError(f"eval split {cfg.data.eval_split!r} not in {sorted(splits)}")
        data = splits[cfg.data.eval_split]
        args.allow_outside_root = args.allow_outside_root or cfg.data.allow_outside_root
        if args.max_image_pixels is None:
            args.max_image_pixels = cfg.data.max_image_pixels
    else:
        data, image_root = args.data, args.image_root
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = MoEVisionModel.from_pretrained(model_dir, device=device).eval()
    result = evaluate(
        model,
        data,
        image_root,
        batch_size=args.batch_size,
        on_bad_record="skip" if args.skip_bad else "error",
        limit=args.limit,
        progress=True,
        allow_outside_root=args.allow_outside_root,
        max_image_pixels=args.max_image_pixels,
    )
    scores: dict[str, float] = dict(result.to_metrics())  # with 95% intervals and counts
    scores["skipped_records"] = len(result.skipped)
    for s in result.skipped:
        scores[f"skipped_records/{s.kind}"] = scores.get(f"skipped_records/{s.kind}", 0) + 1
    out = args.run / "eval" / f"{Path(data).stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(
        json.dumps(
            {
                "data": str(data),
                "scores": scores,
                "prompt_format": result.prompt_format,
                "skipped": [dataclasses.asdict(s) for s in result.skipped],
                "predictions": result.predictions,
            },
            indent=1,
        )
    )
    os.replace(tmp, out)
    print(json.dumps(scores, indent=1))
    print(f"wrote {out}", file=sys.stderr)  # stdout holds the JSON scores
    return 0
