"""``moe-vision bench``: speed and memory as ratios within one run (see :mod:`moe_vision.bench`);
writes ``results/bench.csv`` and prints it.

Sections, in run order: ``overhead`` (the platform against the same computation written by
hand), ``throughput`` (training samples/s and fraction of peak, tiny and real size), ``cells``
(where a default sweep cell's wall time goes; the step's fraction of peak), ``data`` (a
million-record JSONL through the indexed dataset), ``feature_cache`` (cached against uncached
frozen-expert sweeps, tiny and real size), ``gpu`` (an Eagle-like configuration on CUDA; a
skipped row without it), ``lora`` (optimiser memory of a real-size SFT stage, full weights
against LoRA), ``tiling`` (what tiling costs in tokens, FLOPs and time) and ``token_budgets``
(visual tokens and prefill FLOPs and latency per reducer and budget)::

    moe-vision bench --sections cells,feature_cache
    moe-vision bench --quick          # every section at tiny sizes: a smoke test
"""

from __future__ import annotations

import argparse

from moe_vision.commands import comma_list

#: The bench's sections in run order, named here so ``--help`` stays fast (no torch import);
#: a test checks them against :func:`moe_vision.bench.list_sections`.
SECTIONS = (
    "overhead", "throughput", "cells", "data", "feature_cache", "gpu", "lora", "tiling",
    "token_budgets",
)  # fmt: skip


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="benchmark overhead, throughput, cells, feature cache, data, tiling, LoRA, GPU, "
        "token budgets; "
        "writes results/bench.csv",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="results/bench.csv", help="CSV path (default: %(default)s)")
    p.add_argument(
        "--sections",
        type=comma_list,
        default=None,
        help=f"comma-separated subset of the sections ({', '.join(SECTIONS)}; default: all)",
    )
    p.add_argument("--device", help="cpu | cuda (default: cuda when available)")
    p.add_argument(
        "--no-real",
        action="store_true",
        help="skip the real-size configurations (throughput, feature cache)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes everywhere (a smoke test of the harness, not a measurement)",
    )
    p.set_defaults(func=run)


def quick_config():  # noqa: ANN201 - BenchConfig, imported lazily
    """Tiny sizes: every code path of the benchmark, in seconds."""
    from moe_vision.bench import BenchConfig
    from moe_vision.bench.data import DataBenchConfig

    cfg = BenchConfig(
        batch_size=2,
        repeats=2,
        warmup=1,
        cache_fusions=["channel_concat", "sequence_append"],
        cache_sizes={"align": 8, "instruct": 8, "val": 2, "test": 6},
        cache_run={
            "overrides": {"*": {"batch_size": 4, "epochs": 1, "max_steps": 1}},
            "train": {"progress_bar": False, "log_with": []},
        },
        real_model={"experts": ["siglip-tiny", "sam-tiny"], "fusion": "sequence_append"},
        real_steps=1,
        matmul_size=256,
        cache_real_model={"experts": ["siglip-tiny", "sam-tiny"]},
        cache_real_fusions=["channel_concat", "sequence_append"],
        cache_real_sizes={"align": 2, "instruct": 4, "val": 0, "test": 2},
        cache_real_run={
            "overrides": {"*": {"data": "instruct", "batch_size": 2, "epochs": 1, "max_steps": 1}},
            "data": {"eval_limit": 2},
            "train": {"progress_bar": False, "log_with": []},
        },
        cell_overrides={
            "data": {"benchmark_sizes": {"align": 8, "instruct": 8, "val": 0, "test": 6}},
            "run": {
                "overrides": {"*": {"batch_size": 4, "max_steps": 2}},
                "train": {"progress_bar": False, "log_with": []},
            },
            "executor": {"kind": "inline", "threads": 1},
        },
        cell_compile=False,  # compiling takes ~1 minute even for tiny shapes
    )
    cfg.data = DataBenchConfig(records=[2_000], throughput_batches=4)  # the "data" section's
    return cfg


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from moe_vision.bench import BenchConfig, run_bench

    cfg = quick_config() if args.quick else BenchConfig()
    if args.no_real:
        cfg.real_model = cfg.cache_real_model = None
    df = run_bench(cfg, args.out, sections=args.sections or None, device=args.device)
    with pd.option_context("display.max_colwidth", 60, "display.width", 200):
        print(df.drop(columns=["note"]).to_string(index=False))
    print(f"\nwritten: {args.out}")
    return 0
