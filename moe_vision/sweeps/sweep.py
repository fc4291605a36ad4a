"""Running sweeps: one run per cell, in folders that survive kills and restarts.

A sweep is a :class:`~moe_vision.sweeps.spec.SweepSpec` (the grid, as data: see
:mod:`moe_vision.sweeps.spec`; the default one is :mod:`moe_vision.sweeps.default`).
:func:`run_sweep` hands the cells that are not finished yet to an executor
(:mod:`moe_vision.sweeps.executors`); each runs the sweep's *entrypoint* (default
:func:`run_cell`, which calls :func:`moe_vision.experiment.run.run_experiment`). A cell that raises
is recorded with its error and traceback and the sweep goes on; a killed sweep, restarted, runs
only what is missing. The table is rebuilt from the cell folders after every cell
(:mod:`moe_vision.results`), so no row is ever lost or doubled.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from moe_vision import results
from moe_vision.io import read_json, write_json
from moe_vision.sweeps.default import default_sweep  # noqa: F401 - test_fingerprint imports it here
from moe_vision.sweeps.executors import Executor, create_executor
from moe_vision.sweeps.spec import DEFAULT_ENTRYPOINT, Entrypoint, SweepSpec, resolve_entrypoint

logger = logging.getLogger(__name__)


class SweepBusyError(RuntimeError):
    """Another process is running a sweep in the same folder (it holds the folder's lock)."""


# ---------------------------------------------------------------------------- running a cell
@dataclass
class CellJob:
    """What an executor ships to a worker: picklable, self-contained."""

    cell_id: str
    settings: dict[str, Any]
    config: dict[str, Any]
    cell_dir: str
    entrypoint: str | Entrypoint = DEFAULT_ENTRYPOINT
    attribute: bool = False


def run_cell(config: dict[str, Any], cell_dir: Path) -> dict[str, Any]:
    """The default entrypoint: build the :class:`~moe_vision.experiment.run.RunConfig` from
    ``config`` and train + evaluate with :func:`~moe_vision.experiment.run.run_experiment`
    (resuming a killed cell)."""
    from moe_vision.experiment.run import run_experiment
    from moe_vision.experiment.run_config import RunConfig

    metrics = dict(run_experiment(RunConfig.from_dict(config), cell_dir, resume=True))
    predictions = cell_dir / results.PREDICTIONS_FILE
    if predictions.exists():  # 95% intervals and question counts next to every accuracy
        metrics.update(results.interval_metrics(read_json(predictions)))
    return metrics


def resolve_run_config(config: dict[str, Any]) -> dict[str, Any]:
    """A cell's config as :func:`run_cell` will run it: every ``RunConfig`` default filled in
    and the recipe expanded with its overrides (so editing a recipe YAML changes the id)."""
    from moe_vision.experiment.run_config import RunConfig

    return RunConfig.from_dict(config).to_dict(resolve=True)


run_cell.resolve_config = resolve_run_config  # type: ignore[attr-defined]
# What a worker imports before its first cell: started with the sweep, not after its expansion.
run_cell.preload = ("moe_vision.experiment.run", "moe_vision.evaluation.evaluate")  # type: ignore[attr-defined]


def entrypoint_preload(entrypoint: str | Entrypoint) -> tuple[str, ...]:
    """The modules a worker imports before its first cell: the entrypoint's own module and its
    ``preload`` attribute (module names), so that start-up overlaps the sweep's expansion."""
    fn = resolve_entrypoint(entrypoint)
    return (fn.__module__, *getattr(fn, "preload", ()))


@contextlib.contextmanager
def file_lock(path: Path, blocking: bool = True) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (released by the OS if the holder dies).

    Raises ``BlockingIOError`` when ``blocking`` is False and another process holds it.
    """
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def distributed_rank() -> int:
    """This process's global rank when a cell runs as several tasks of one submitit job
    (``tasks_per_node`` > 1, one task per GPU); 0 otherwise.

    In that case it also exports the ``torch.distributed`` environment (``MASTER_ADDR``,
    ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) that accelerate reads, through
    ``submitit.helpers.TorchDistributedEnvironment``.
    """
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return 0
    import submitit

    env = submitit.JobEnvironment()
    if env.num_tasks <= 1:
        return 0
    dist = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return int(dist.rank)


def execute_cell(job: CellJob) -> dict[str, Any]:
    """Run one cell in ``job.cell_dir`` and record its outcome there; returns its row.

    Holds the cell's lock while it runs, so a cell is never run twice at once (a restarted
    sweep waits for a straggler from the killed one, then finds the cell done). An exception
    from the entrypoint is recorded in ``error.json`` (message + traceback) and returned as a
    ``status="failed"`` row; ``KeyboardInterrupt`` is not caught (the cell stays pending).
    """
    cell_dir = Path(job.cell_dir)
    cell_dir.mkdir(parents=True, exist_ok=True)
    if distributed_rank() != 0:
        # Other ranks of a multi-task job only take part in the run; rank 0 keeps the books.
        return dict(resolve_entrypoint(job.entrypoint)(copy.deepcopy(job.config), cell_dir))
    metrics_path, error_path = cell_dir / results.METRICS_FILE, cell_dir / results.ERROR_FILE
    with file_lock(cell_dir / ".lock"):
        if metrics_path.exists():
            logger.info("cell %s already finished", job.cell_id)
            if job.attribute and needs_attribution(cell_dir):
                attribute_cell(cell_dir)
            return {**read_json(metrics_path), "status": results.STATUS_OK}
        write_json(
            cell_dir / results.CELL_FILE,
            {**job.settings, "config": job.config, "started_at": _now()},
        )
        error_path.unlink(missing_ok=True)
        logger.info("cell %s: running", job.cell_id)
        start = time.perf_counter()
        try:
            fn = resolve_entrypoint(job.entrypoint)
            metrics = fn(copy.deepcopy(job.config), cell_dir)
            if not isinstance(metrics, Mapping):
                raise TypeError(
                    f"entrypoint {job.entrypoint!r} returned {type(metrics).__name__}, "
                    f"expected a mapping of metrics"
                )
        except Exception as e:  # noqa: BLE001 - a failed cell is a row, the sweep goes on
            record = {
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(),
                "wall_time_s": time.perf_counter() - start,
                "finished_at": _now(),
            }
            write_json(error_path, record)
            logger.error("cell %s failed: %s", job.cell_id, record["error"])
            return {"status": results.STATUS_FAILED, "error": record["error"]}
        row = {**dict(metrics), "wall_time_s": time.perf_counter() - start}
        write_json(metrics_path, row)
        logger.info("cell %s: done in %.1fs", job.cell_id, row["wall_time_s"])
        if job.attribute:
            attribute_cell(cell_dir)
        return {**row, "status": results.STATUS_OK}


def needs_attribution(cell_dir: Path, retry_failed: bool = True) -> bool:
    """True when the cell has no attribution yet (or a failed one, with ``retry_failed``)."""
    path = cell_dir / results.ATTRIBUTION_FILE
    return not path.exists() or (retry_failed and "error" in read_json(path))


def attribute_cell(cell_dir: Path) -> None:
    """Expert attribution of a finished cell (``attribute: true``). A failure is recorded in
    its ``attribution.json`` (shown as ``attribution_error`` in the row); the metrics stand."""
    from moe_vision.analysis.attribution import attribute

    try:
        attribute(cell_dir)
    except Exception as e:  # noqa: BLE001 - the trained cell is kept, its attribution failed
        error = f"{type(e).__name__}: {e}"
        write_json(
            cell_dir / results.ATTRIBUTION_FILE,
            {"error": error, "traceback": traceback.format_exc(), "finished_at": _now()},
        )
        logger.error("cell %s: attribution failed: %s", cell_dir.name, error)


def _record_crash(job: CellJob, error: BaseException) -> None:
    """A worker died without recording anything (killed, segfault, cluster timeout)."""
    cell_dir = Path(job.cell_dir)
    if (cell_dir / results.METRICS_FILE).exists() or (cell_dir / results.ERROR_FILE).exists():
        return
    message = f"{type(error).__name__}: {error}".strip()
    write_json(
        cell_dir / results.ERROR_FILE,
        {
            "error": f"worker crashed: {message}",
            "traceback": "".join(traceback.format_exception(error)),
            "finished_at": _now(),
        },
    )
    logger.error("cell %s: worker crashed: %s", job.cell_id, message)


# ---------------------------------------------------------------------------- the runner
def build_executor(spec: SweepSpec, sweep_dir: Path) -> Executor:
    """The executor named in ``spec.executor`` (submitit's folder defaults into the sweep)."""
    options = dict(spec.executor)
    kind = options.pop("kind")
    if kind == "submitit":
        options.setdefault("folder", str(sweep_dir / "submitit"))
        params = dict(options.get("parameters") or {})
        params.setdefault("timeout_min", 24 * 60)  # submitit's defaults are a few minutes
        options["parameters"] = params
    return create_executor(kind, **options)


def start_executor(
    spec: SweepSpec,
    out_dir: str | os.PathLike[str] | None = None,
    entrypoint: str | Entrypoint | None = None,
    executor: Executor | None = None,
) -> Executor:
    """``executor`` (default: the one of ``spec.executor``) with its workers already starting
    and importing ``entrypoint``'s modules, so that their start-up overlaps the caller's own and
    the grid's expansion; pass it to :func:`run_sweep`, which closes it."""
    if executor is None:
        sweep_dir = Path(out_dir) if out_dir is not None else spec.output_dir()
        executor = build_executor(spec, sweep_dir)
    chosen = entrypoint if entrypoint is not None else spec.entrypoint
    executor.start(spec.max_cells(), preload=entrypoint_preload(chosen))
    return executor


def run_sweep(
    spec: SweepSpec,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    executor: Executor | None = None,
    entrypoint: str | Entrypoint | None = None,
    retry_failed: bool = True,
    progress: bool = True,
    on_result: Callable[[CellJob, Mapping[str, Any]], None] | None = None,
) -> pd.DataFrame:
    """Run every cell of ``spec`` that has not finished yet; return the results table.

    Args:
        spec: the sweep.
        out_dir: the sweep folder (default ``spec.output_dir()``).
        executor: where cells run (default: built from ``spec.executor``); closed on return.
        entrypoint: overrides ``spec.entrypoint`` (a ``"module:function"`` string, or a
            callable; with the ``process``/``submitit`` executors it must be picklable).
        retry_failed: run failed cells again (default); False keeps their failed rows.
        progress: show a progress bar.
        on_result: called with each cell's job and row (``status``, metrics, ``error``) as the
            cell finishes (the CLI prints one line per cell with it, under the bar).

    Raises:
        SweepBusyError: another sweep is running in ``out_dir``.
    """
    from tqdm.auto import tqdm

    sweep_dir = Path(out_dir) if out_dir is not None else spec.output_dir()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    executor = executor or build_executor(spec, sweep_dir)
    lock_path = sweep_dir / ".sweep.lock"
    lock = file_lock(lock_path, blocking=False)
    try:
        lock.__enter__()
    except BlockingIOError as e:
        executor.close()
        raise SweepBusyError(
            f"another sweep is already running in {sweep_dir} (it holds {lock_path.name}); "
            "wait for it to finish, or give this one another --out"
        ) from e
    chosen = entrypoint if entrypoint is not None else spec.entrypoint
    try:
        start_executor(spec, sweep_dir, chosen, executor)
        cells = spec.expand()
        write_json(
            sweep_dir / results.MANIFEST,
            {"spec": spec.to_dict(), "cells": [c.settings() for c in cells], "written_at": _now()},
        )
        spec.to_yaml(sweep_dir / "sweep.yaml")
        jobs = []
        for cell in cells:
            cell_dir = sweep_dir / results.CELLS_DIR / cell.cell_id
            if (cell_dir / results.METRICS_FILE).exists() and not (
                spec.attribute and needs_attribution(cell_dir, retry_failed)
            ):
                continue
            if (cell_dir / results.ERROR_FILE).exists() and not retry_failed:
                continue
            jobs.append(
                CellJob(
                    cell.cell_id,
                    cell.settings(),
                    cell.config,
                    str(cell_dir),
                    chosen,
                    attribute=spec.attribute,
                )
            )
        logger.info(
            "sweep %s in %s: %d cells, %d to run", spec.name, sweep_dir, len(cells), len(jobs)
        )
        results.write_tables(sweep_dir)
        if not jobs:  # every cell finished before: stop the readied workers mid-import
            executor.close()
        outcomes = executor.map_unordered(execute_cell, jobs)
        for job, outcome in tqdm(
            outcomes, total=len(jobs), desc=f"sweep {spec.name}", disable=not progress
        ):
            if isinstance(outcome, BaseException):
                _record_crash(job, outcome)
                outcome = {"status": results.STATUS_FAILED, "error": f"worker crashed: {outcome}"}
            results.write_tables(sweep_dir)
            if on_result is not None:
                on_result(job, outcome)
        return results.write_tables(sweep_dir)
    finally:
        executor.close()
        lock.__exit__(None, None, None)
