"""``moe-vision attribute``: how much accuracy a trained run loses without each expert.

Evaluates the run intact and once per expert with that expert mean-ablated (its maps replaced
by their mean over the evaluation images; ``--mode zero`` for zeros), and prints per expert and
category the accuracy drop in points with its 95% paired bootstrap interval and the exact
McNemar p-value (see :mod:`moe_vision.analysis.attribution`)::

    moe-vision attribute --run runs/x
    moe-vision attribute --run runs/sweeps/default/cells/<id> --mode zero --limit 600

Writes ``<run>/attribution.json`` and ``<run>/attribution.csv``.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "attribute",
        help="accuracy drop per category with each expert ablated (expert utilisation)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", type=Path, required=True, help="trained run or sweep cell folder")
    p.add_argument("--mode", choices=("mean", "zero"), default="mean", help="ablation (mean)")
    p.add_argument("--limit", type=int, help="only the first N questions of the eval split")
    p.add_argument("--batch-size", type=int, help="questions per generate call")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap replicates (2000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (0)")
    p.add_argument("--device", default=None, help="device (default: cpu)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moe_vision.analysis.attribution import attribute, format_attribution

    result = attribute(
        args.run,
        args.mode,
        limit=args.limit,
        batch_size=args.batch_size,
        n_boot=args.n_boot,
        seed=args.seed,
        device=args.device,
    )
    print(f"{args.run}: accuracy drop with each expert {args.mode}-ablated (points, 95% CI)\n")
    print(format_attribution(result.table))
    print(f"\nwrote {args.run / 'attribution.json'} and {args.run / 'attribution.csv'}")
    return 0
