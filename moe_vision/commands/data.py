"""``moe-vision data check FILES...``: the validation training would do, over whole datasets.

Every record of every file (``.json``, ``.jsonl`` or mixture ``.yaml``) goes through the same
:class:`~moe_vision.data.validation.RecordValidator` as training and evaluation (images fully
decoded, paths inside the image root, placeholders against images, length with the model's
visual tokens), in DataLoader worker processes::

    moe-vision data check train.jsonl --image-root data/images
    moe-vision data check mixture.yaml --config run.yaml --workers 8 --json report.json

The tokenizer, visual token count and length limit come from the model of ``--run`` (a trained
run folder) or of ``--config`` (a run config; default: the default run's model). Prints a table
of problems (count and first examples), writes it as JSON with ``--json``, and exits 1 when
any record would be dropped or two records share an id (text-only and multi-image records are
counted, not dropped), 2
when a file is refused as a whole (the other files are still checked and reported).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from moe_vision.commands import check_at_least, check_output_file


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "data",
        help="check datasets (LLaVA JSON/JSONL, mixtures) the way training reads them",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    c = sub.add_parser("check", help="validate every record; report problems; exit 1 if any")
    c.add_argument("files", nargs="+", type=Path, help=".json, .jsonl or mixture .yaml files")
    c.add_argument("--image-root", type=Path, help="image folder (a mixture may name its own)")
    c.add_argument("--run", type=Path, help="take the model from this trained run folder")
    c.add_argument("--config", type=Path, help="take the model from this run config YAML")
    c.add_argument("--workers", type=int, default=2, help="worker processes (default: 2)")
    c.add_argument("--examples", type=int, default=3, help="examples kept per problem")
    c.add_argument("--json", type=Path, help="also write the report as JSON here")
    c.add_argument("--seed", type=int, default=0, help="seed of mixtures' random sampling")
    c.add_argument("--allow-outside-root", action="store_true")
    c.add_argument("--max-image-pixels", type=int, help="pixel limit of image files")
    c.set_defaults(func=run_check)


def _validator(args: argparse.Namespace) -> Any:
    from moe_vision.data.validation import RecordValidator
    from moe_vision.experiment.run_config import RunConfig
    from moe_vision.model.mllm import MoEVisionModel

    if args.run is not None:
        model = MoEVisionModel.from_pretrained(args.run / "model")
    else:
        cfg = RunConfig.from_yaml(args.config) if args.config else RunConfig()
        model = MoEVisionModel.from_config(cfg.model)
    return RecordValidator(
        model.tokenizer,
        model.config.image_token,
        model.max_length,
        model.num_visual_tokens,
        max_image_pixels=args.max_image_pixels,
        allow_outside_root=args.allow_outside_root,
    )


def run_check(args: argparse.Namespace) -> int:
    from moe_vision.data.check import check_files, format_report
    from moe_vision.io import atomic_write

    check_at_least("--workers", args.workers, 0)  # before the check runs, not after
    check_at_least("--examples", args.examples, 0)
    check_at_least("--max-image-pixels", args.max_image_pixels, 1)
    check_output_file("--json", args.json)
    report = check_files(
        args.files,
        args.image_root,
        _validator(args),
        workers=args.workers,
        examples=args.examples,
        seed=args.seed,
    )
    print(format_report(report))
    if args.json is not None:
        text = json.dumps(report, indent=1)
        atomic_write(args.json, text)
        print(f"wrote {args.json}")
    if report["refused_files"]:
        return 2
    return 1 if report["dropped"] or report["duplicate_ids"]["count"] else 0
