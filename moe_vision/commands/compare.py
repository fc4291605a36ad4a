"""``moe-vision compare``: paired comparison of two runs on the same questions, or of a fresh
sweep with the committed reference.

Per category and overall: both accuracies, the difference A - B with its 95% interval, a
p-value with the name of its test and the same corrected over the table (Holm; ``--correction
bh`` for Benjamini-Hochberg)::

    moe-vision compare runs/a runs/b
    moe-vision compare runs/sweeps/default/cells/<id1> runs/sweeps/default/cells/<id2> --csv d.csv

A side is a run folder, a sweep cell folder or a ``predictions.json``; repeat ``--a`` / ``--b``
with several folders (the seeds of one setting): with seeds on both sides the interval and test
are seed-level (:mod:`moe_vision.results.seeds`), otherwise paired over questions (exact
McNemar).

**Reference check**: ``moe-vision compare --reference results/ FRESH`` reads a fresh run of a
sweep (its sweep folder, or a results folder that ``moe-vision sweep --results-dir`` wrote) and
says per setting whether it is consistent with the committed reference
(``results/default.csv``, ``_predictions.parquet``, ``_summary.csv``), whether the findings of
``results/default_findings.yaml`` still hold, and a verdict; exit 0 when consistent, 1 when
not (:mod:`moe_vision.results.reference`)::

    moe-vision sweep --results-dir /tmp/fresh && moe-vision compare --reference results/ /tmp/fresh
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
    p.add_argument(
        "--correction", choices=["holm", "bh"], default="holm", help="multiple tests (holm)"
    )
    p.add_argument(
        "--reference",
        type=Path,
        help="check the sweep RUN_A (sweep folder or results folder) against this reference",
    )
    p.add_argument("--name", default="default", help="the sweep's name in --reference (default)")
    p.add_argument("--csv", type=Path, help="also write the table as CSV (or .parquet)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moe_vision import results

    if not 0 < args.confidence < 1:
        raise UsageError(f"--confidence must be in (0, 1), got {args.confidence}")
    if args.reference is not None:
        return _check_reference(args)
    side_a = ([args.run_a] if args.run_a else []) + args.a
    side_b = ([args.run_b] if args.run_b else []) + args.b
    if not side_a or not side_b:
        raise UsageError("moe-vision compare: give two runs (RUN_A RUN_B, or --a/--b)")
    table = results.compare(
        side_a[0] if len(side_a) == 1 else side_a,
        side_b[0] if len(side_b) == 1 else side_b,
        confidence=args.confidence,
        n_boot=args.n_boot,
        seed=args.seed,
        correction=args.correction,
    )
    print(f"A: {', '.join(map(str, side_a))}\nB: {', '.join(map(str, side_b))}")
    print(f"difference = A - B in points, {100 * args.confidence:g}% interval of the named test\n")
    print(results.format_compare(table))
    if args.csv:
        print(f"\ntable: {results.save(table, args.csv)}")
    return 0


def _check_reference(args: argparse.Namespace) -> int:
    from moe_vision import results
    from moe_vision.results.reference import check_reference, format_check

    if args.run_a is None or args.run_b is not None or args.a or args.b:
        raise UsageError("moe-vision compare --reference REF FRESH: give exactly one fresh run")
    for path in (args.reference, args.run_a):
        if not path.is_dir():
            raise UsageError(f"{path} is not a folder (a sweep folder or a results folder)")
    check = check_reference(
        args.run_a, args.reference, args.name, alpha=1 - args.confidence, n_boot=args.n_boot
    )
    print(f"fresh: {args.run_a}\nreference: {args.reference} ({args.name})\n")
    print(format_check(check))
    if args.csv:
        print(f"\ntable: {results.save(check.rows, args.csv)}")
    return 0 if check.consistent else 1
