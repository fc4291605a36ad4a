"""``moe-vision sweep``: run an expert-combination x fusion sweep and print its table.

With no arguments it runs the default sweep (``moe_vision/sweeps/configs/default.yaml``, also
``sweeps/default.yaml``: the pretrained mini zoo's CLIP-mini alone, + ConvNeXt-mini and its
random-init twin, + Pix2Struct-mini under two fusions and its twin, 3 seeds, 18 cells on the
built-in benchmark; about 9 minutes on a 2-core laptop CPU) and writes ``results/default.csv``,
``results/default_summary.csv`` and ``results/default.png``. A YAML spec (see ``sweeps/*.yaml``
and :mod:`moe_vision.sweeps.sweep`) and flags override the default; flags win over the YAML::

    moe-vision sweep sweeps/eagle_experts.yaml --executor process --workers 2
    moe-vision sweep --base clip-tiny --pool convnext-tiny,sam-tiny --k 2 \\
        --fusions channel_concat,sequence_append --seeds 0,1
    moe-vision sweep --set model.llm=tiny-llama --set 'run.overrides.*.max_steps=20' \\
        --set run.train.compile_llm=true
    moe-vision sweep --controls random_init,equal_tokens   # + each control cell (none: no controls)

The console shows one progress bar, one line per finished cell (name, status, overall
accuracy, wall time), each distinct warning once, and the per-setting table (mean over seeds
with 95% intervals; the per-cell table too for sweeps of up to 8 cells, or with ``-v``). Each
cell's library logging is in ``<sweep>/cells/<cell>/train.log``; ``-v`` shows it on the console
as well.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from moe_vision.commands import UsageError, comma_list

logger = logging.getLogger(__name__)

CELL_TABLE_ROWS = 8
"""Sweeps of at most this many cells print their per-cell table as well as the per-setting
summary; longer ones print the summary (the per-cell table is in the CSV; ``-v`` prints it)."""


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in comma_list(text)]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def _assignment(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(
            f"--set expects KEY=VALUE (e.g. model.llm=tiny-llama), got {text!r}"
        )
    return key.strip(), yaml.safe_load(value)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sweep",
        help="run an expert-combination x fusion sweep (no arguments: the default sweep)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("spec", nargs="?", help="sweep spec YAML (default: the built-in default sweep)")
    p.add_argument("--out", help="sweep folder (default: runs/sweeps/<name>)")
    p.add_argument(
        "--results-dir",
        default="results",
        help="where <name>.csv and <name>.png are written (default: results/; '' to skip)",
    )
    p.add_argument("--name", help="sweep name")
    g = p.add_argument_group("grid (override the spec)")
    g.add_argument(
        "--experts",
        type=comma_list,
        action="append",
        metavar="A,B",
        help="an explicit expert combination (repeat the flag for several)",
    )
    g.add_argument(
        "--pool", type=comma_list, metavar="A,B,C", help="experts to draw k-subsets from"
    )
    g.add_argument("--k", type=_ints, metavar="K,...", help="experts per combination (with --pool)")
    g.add_argument("--base", help="expert included (first) in every combination")
    g.add_argument("--fusions", type=comma_list, metavar="F,...", help="fusion strategies")
    g.add_argument(
        "--recipes", type=comma_list, metavar="R,...", help="recipe presets or YAML paths"
    )
    g.add_argument("--seeds", type=_ints, metavar="S,...", help="random seeds")
    g.add_argument(
        "--controls",
        type=comma_list,
        metavar="C,...",
        help="control cells beside every mixture: random_init (each added expert's random-init "
        "twin), equal_tokens (the base repeated to the mixture's tokens); 'none' for none",
    )
    g.add_argument(
        "--set",
        type=_assignment,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted spec override, value parsed as YAML (e.g. model.llm=tiny-llama)",
    )
    e = p.add_argument_group("execution")
    e.add_argument("--executor", help="inline | process | submitit")
    e.add_argument("--workers", type=int, help="concurrent cells (process executor)")
    e.add_argument("--threads", type=int, help="torch threads per cell (inline/process)")
    e.add_argument("--cluster", help="submitit cluster: slurm | local | debug (default: auto)")
    e.add_argument(
        "--no-retry-failed",
        action="store_true",
        help="keep failed cells' rows instead of running them again",
    )
    e.add_argument("--dry-run", action="store_true", help="list the cells and exit")
    e.add_argument(
        "--attribute",
        action="store_true",
        help="also run expert attribution per cell (drop/<expert>/<category> columns)",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the cells' library logging on the console (also: moe-vision -v sweep)",
    )
    p.set_defaults(func=run)


def build_spec(args: argparse.Namespace) -> Any:
    """The sweep spec from the YAML (or the default) with the flags applied."""
    from moe_vision.sweeps.default import default_sweep
    from moe_vision.sweeps.spec import SweepSpec

    spec = SweepSpec.from_yaml(args.spec) if args.spec else default_sweep()
    overrides: dict[str, Any] = dict(args.set)
    if args.name:
        overrides["name"] = args.name
    if args.experts or args.pool or args.k or args.base:
        combos = {
            "combinations": args.experts or [],
            "pool": args.pool or [],
            "k": args.k or [],
            "base": args.base,
        }
        if not (combos["combinations"] or combos["pool"]):
            raise UsageError("moe-vision sweep: --k/--base need --pool or --experts")
        overrides["experts"] = combos
    if args.fusions:
        overrides["fusions"] = args.fusions
    if args.recipes:
        overrides["recipes"] = args.recipes
    if args.seeds:
        overrides["seeds"] = args.seeds
    if args.controls is not None:
        overrides["controls"] = [c for c in args.controls if c != "none"]
    if args.executor or args.workers or args.cluster or args.threads:
        executor = dict(spec.executor)
        if args.executor and args.executor != executor.get("kind"):
            executor = {"kind": args.executor}
        if args.workers:
            executor["workers"] = args.workers
        if args.threads:
            executor["threads"] = args.threads
        if args.cluster:
            executor["cluster"] = args.cluster
        overrides["executor"] = executor
    if args.out:
        overrides["output"] = args.out
    if args.attribute:
        overrides["attribute"] = True
    return spec.with_overrides(overrides) if overrides else spec


def cell_line(job: Any, row: Mapping[str, Any], done: int, total: int) -> str:
    """``[k/n] <cell name>: ok, overall 0.230, 41.2 s`` (or ``failed: <error>``)."""
    from moe_vision import results

    name = job.settings.get("name", job.cell_id)
    wall = row.get("wall_time_s")
    took = f", {wall:.1f} s" if isinstance(wall, (int, float)) else ""
    if row.get("status") == results.STATUS_OK:
        acc = row.get("accuracy/overall")
        acc_text = f"overall {acc:.3f}" if isinstance(acc, (int, float)) else "no accuracy"
        return f"[{done}/{total}] {name}: ok, {acc_text}{took}"
    error = str(row.get("error", "unknown error")).splitlines()[0][:160]
    return f"[{done}/{total}] {name}: FAILED{took}: {error} (see {job.cell_dir}/error.json)"


class CellReporter:
    """The per-cell console line plus the cell's warnings not said yet in this sweep; ``done``
    counts the cells finished so far (before this sweep, and by it)."""

    def __init__(self, total: int, finished: int) -> None:
        self.total = total
        self.done = finished
        self._seen: set[str] = set()

    def __call__(self, job: Any, row: Mapping[str, Any]) -> None:
        from tqdm.auto import tqdm

        from moe_vision.console import RUN_LOG, new_warnings

        self.done += 1
        tqdm.write(cell_line(job, row, self.done, self.total))
        for text in new_warnings(Path(job.cell_dir) / RUN_LOG, self._seen):
            tqdm.write(f"  warning (first seen in this cell; see its {RUN_LOG}): {text}")


def run(args: argparse.Namespace) -> int:
    from moe_vision.console import configure_console

    verbose = bool(getattr(args, "verbose", False))
    configure_console(verbose, quiet_level=logging.ERROR)  # warnings: once, from the run logs
    from moe_vision import results
    from moe_vision.sweeps.sweep import run_sweep, start_executor

    spec = build_spec(args)
    if args.dry_run:
        for cell in spec.expand():
            print(cell.cell_id)
        return 0
    executor = start_executor(spec)  # workers import torch and the zoo while the grid expands
    try:
        cells = spec.expand()
    except BaseException:
        executor.close()
        raise
    folder = spec.output_dir()
    finished = sum(
        (folder / results.CELLS_DIR / c.cell_id / results.METRICS_FILE).is_file() for c in cells
    )
    print(f"sweep {spec.name}: {len(cells)} cells ({finished} finished before), folder {folder}")
    report = CellReporter(len(cells), finished)
    args.interrupt_hint = lambda: (
        f"{report.done} of {len(cells)} cells finished, kept in {folder}; "
        "the same command runs the rest"
    )
    df = run_sweep(spec, executor=executor, retry_failed=not args.no_retry_failed, on_result=report)
    if len(df) <= CELL_TABLE_ROWS or verbose:  # a long sweep: its cells were one line each above
        print(results.format_table(df))
    sweep_dir = spec.output_dir()
    summary = results.summarize(df, sweep_dir)
    print(
        "\nper setting: mean over seeds (95% seed-level interval over seeds and questions), seed "
        "std of overall, and vs the best setting (seed-level test)"
    )
    print(results.format_summary(summary))
    print(f"\nsweep folder: {sweep_dir} ({len(df)} rows)")
    if args.results_dir:
        out = Path(args.results_dir)
        csv = results.save(df, out / f"{spec.name}.csv")
        print(f"table: {csv} (one row per cell)")
        if not summary.empty:
            print(f"summary: {results.save(summary, out / f'{spec.name}_summary.csv')}")
        answers = results.collect_predictions(sweep_dir)
        if not answers.empty:
            print(f"answers: {results.save(answers, out / f'{spec.name}_predictions.parquet')}")
        if not summary.empty:
            png = results.plot_sweep(summary, out / f"{spec.name}.png")
            print(f"plot:  {png}")
    failed = int((df["status"] == results.STATUS_FAILED).sum()) if not df.empty else 0
    return 1 if failed else 0
