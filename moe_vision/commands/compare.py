"""``moe-vision compare``: paired comparison of two runs on the same questions.

Per category and overall: both accuracies, the difference A - B with its 95% paired bootstrap
interval over questions, the exact McNemar p-value and the discordant counts::

    moe-vision compare runs/a runs/b
    moe-vision compare runs/sweeps/default/cells/<id1> runs/sweeps/default/cells/<id2> --csv d.csv

A side is a run folder, a sweep cell folder or a ``predictions.json``; repeat ``--a`` / ``--b``
with several folders (seeds of one cell) to compare seed-averaged answers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moe_vision.commands import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compare",
        help="paired comparison of two runs (difference, interval, McNemar p) per category",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_a", type=Path, nargs="?", help="run/cell folder or predictions.json (A)")
    p.add_argument("run_b", type=Path, nargs="?", help="run/cell folder or predictions.json (B)")
    p.add_argument("--a", type=Path, action="append", default=[], help="more seeds of A")
    p.add_argument("--b", type=Path, action="append", default=[], help="more seeds of B")
    p.add_argument("--confidence", type=float, default=0.95, help="interval level (0.95)")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap replicates (2000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (0)")
    p.add_argument("--csv", type=Path, help="also write the table as CSV (or .parquet)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moe_vision import results

    side_a = ([args.run_a] if args.run_a else []) + args.a
    side_b = ([args.run_b] if args.run_b else []) + args.b
    if not side_a or not side_b:
        raise UsageError("moe-vision compare: give two runs (RUN_A RUN_B, or --a/--b)")
    if not 0 < args.confidence < 1:
        raise UsageError(f"--confidence must be in (0, 1), got {args.confidence}")
    table = results.compare(
        side_a[0] if len(side_a) == 1 else side_a,
        side_b[0] if len(side_b) == 1 else side_b,
        confidence=args.confidence,
        n_boot=args.n_boot,
        seed=args.seed,
    )
    print(f"A: {', '.join(map(str, side_a))}\nB: {', '.join(map(str, side_b))}")
    print(f"difference = A - B in points, {100 * args.confidence:g}% paired bootstrap interval\n")
    print(results.format_compare(table))
    if args.csv:
        print(f"\ntable: {results.save(table, args.csv)}")
    return 0
