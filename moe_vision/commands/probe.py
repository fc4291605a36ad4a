"""``moe-vision probe``: linear probes of frozen experts (or a fusion's output) per category.

Screens an expert in about a minute: its features on the built-in benchmark's images are pooled
and a logistic regression per category predicts the answer (train: instruct + val images, test:
the test split), with 95% Wilson intervals. Each expert is probed with its shipped weights and as
its random-init twin (same architecture), so the table shows what pretraining bought::

    moe-vision probe clip-mini pix2struct-mini           # weights vs random twin, all categories
    moe-vision probe convnext-mini --categories detail,count --pooling flatten
    moe-vision probe clip-tiny --random-only             # a preset without weights
    moe-vision probe clip-mini convnext-mini --fusion channel_concat   # an untrained fusion
    moe-vision probe --run runs/x                        # the trained fusion of a run folder
    moe-vision probe clip-mini --csv results/probe.csv

See :mod:`moe_vision.analysis.probe`.
"""

from __future__ import annotations

import argparse
import logging
import time

from moe_vision.commands import comma_list

logger = logging.getLogger(__name__)


def _grid(text: str) -> tuple[int, int]:
    try:
        gh, gw = (int(t) for t in text.lower().split("x"))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a grid like 2x2, got {text!r}") from e
    return gh, gw


def _sizes(text: str) -> dict[str, int]:
    out = {}
    for item in comma_list(text):
        key, sep, value = item.partition("=")
        if not sep or not value.isdigit():
            raise argparse.ArgumentTypeError(
                f"--sizes expects split=N pairs (e.g. instruct=1200,test=2400), got {item!r}"
            )
        out[key.strip()] = int(value)
    return out


def _run(args: argparse.Namespace) -> int:
    from moe_vision.analysis import probe as P

    if not args.experts and not args.run:
        raise P.ProbeError("nothing to probe: name expert presets and/or give --run RUN_DIR")
    if args.fusion and not args.experts:
        raise P.ProbeError("--fusion needs the experts it fuses (e.g. clip-mini convnext-mini)")
    config = P.ProbeConfig(
        pooling=args.pooling,
        flatten_grid=args.grid,
        categories=args.categories,
        benchmark_seed=args.benchmark_seed,
        benchmark_sizes=args.sizes,
        benchmark_dir=args.benchmark_dir,
        C=args.C,
        seed=args.seed,
        shots=args.shots,
        shots_seed=args.shots_seed,
    )
    start = time.perf_counter()
    targets = []
    if args.fusion:
        targets += [
            P.fusion_target(args.experts, args.fusion, pretrained=True, seed=args.seed),
            P.fusion_target(args.experts, args.fusion, pretrained=False, seed=args.seed),
        ]
    else:
        for name in args.experts:
            targets += P.expert_targets(
                name, pretrained=not args.random_only, twin=not args.no_twin, seed=args.seed
            )
    if args.run:
        targets += [P.run_target(r) for r in args.run]
    table = P.probe(targets, config)
    print(P.format_probe_table(table))
    print(
        f"({len(targets)} targets x {table.category.nunique()} categories, pooling "
        f"{config.pooling}, {time.perf_counter() - start:.0f} s)"
    )
    if args.csv:
        P.save_table(table, args.csv)
        print(f"wrote {args.csv}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "probe",
        help="linear probes of frozen experts or fusion outputs per benchmark category",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("experts", nargs="*", help="expert presets (experts.list_experts())")
    p.add_argument("--run", action="append", help="a trained run folder (repeatable)")
    p.add_argument("--fusion", help="probe this untrained fusion of the experts (both weights)")
    p.add_argument("--pooling", default="mean", choices=("mean", "flatten"))
    p.add_argument("--grid", type=_grid, default=(2, 2), help="flatten pooling grid (default 2x2)")
    p.add_argument(
        "--categories", type=comma_list, help="comma-separated categories (default: all)"
    )
    p.add_argument("--sizes", type=_sizes, help="benchmark sizes, e.g. instruct=1200,test=2400")
    p.add_argument("--benchmark-seed", type=int, default=0)
    p.add_argument("--benchmark-dir", help="benchmark folder (default: the runs' shared cache)")
    p.add_argument("--C", type=float, default=1.0, help="inverse L2 strength (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="seed of random-init twins and fusions")
    p.add_argument(
        "--shots",
        type=int,
        default=None,
        help="a few-shot probe: fit on N training images per answer (default: all of them)",
    )
    p.add_argument("--shots-seed", type=int, default=0, help="seed of the few-shot draw")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--random-only", action="store_true", help="only the random-init twin")
    w.add_argument("--no-twin", action="store_true", help="only the shipped weights")
    p.add_argument("--csv", help="also write the long table (one row per probe) to this file")
    p.set_defaults(func=_run)
