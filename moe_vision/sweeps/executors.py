"""Executors: where a sweep's cells run — in this process, in local processes, or on a cluster.

An :class:`Executor` takes a picklable function and a list of picklable items and yields
``(item, outcome)`` as each one completes, ``outcome`` being the function's return value or
the exception that stopped it (a worker process that died, a cluster job that was killed or
timed out). The sweep runner (:mod:`moe_vision.sweeps.sweep`) turns exceptions into failed rows.

* ``inline``: one after the other in this process (debugging, notebooks).
* ``process``: ``workers`` ``spawn``-ed processes, each running items one after another
  (one single-process ``concurrent.futures.ProcessPoolExecutor`` per worker, so a crash — even
  a segfault or the OOM killer — is attributed to exactly that item, the others go on, and the
  dead worker is replaced). Process start-up and imports (seconds: torch, transformers, timm
  and open_clip on a laptop CPU) are paid once per worker, not once per cell, and
  :meth:`Executor.start` begins them before the first item exists (the sweep runner calls it
  before expanding its grid, so the two overlap); ``reuse=False`` starts a fresh process for
  every item.
  Workers die with the sweep: each leads its own process group and runs a watchdog thread
  that kills the group (the worker and anything it started) as soon as its parent is gone,
  even after ``kill -9`` of the sweep (:func:`_watch_parent`).
* ``submitit``: one job per item through ``submitit.AutoExecutor``: SLURM on a cluster, or
  ``cluster="local"`` for submitit's local executor (subprocesses, same code path). SLURM
  parameters come from the sweep spec (``timeout_min``, ``gpus_per_node``,
  ``slurm_partition``, ``slurm_array_parallelism``...; see submitit's documentation).

Executors are a registry (:func:`register_executor` / :func:`create_executor`), so adding one
is one class.
"""

from __future__ import annotations

import concurrent.futures as cf
import inspect
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, TypeVar

from experts.registry import Registry

logger = logging.getLogger(__name__)

T = TypeVar("T")
Outcome = Any  # the function's return value, or the BaseException that stopped it

EXECUTORS: Registry[type[Executor]] = Registry("executor")


def register_executor(name: str) -> Callable[[type[Executor]], type[Executor]]:
    """Class decorator: register an :class:`Executor` subclass under ``name``."""

    def deco(cls: type[Executor]) -> type[Executor]:
        EXECUTORS.register(name, cls)
        cls.name = name
        return cls

    return deco


def list_executors() -> list[str]:
    """Registered executor names, sorted."""
    return EXECUTORS.list()


def create_executor(name: str, **options: Any) -> Executor:
    """Build executor ``name`` with its options; an unknown name or option is a ``KeyError`` /
    ``ValueError`` naming it and what the executor takes."""
    cls = EXECUTORS.get(name)
    valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"executor {name!r} takes no option {', '.join(map(repr, unknown))} (its options: "
            f"{', '.join(valid) or 'none'}); to switch kinds with --set, give the whole executor, "
            f"e.g. --set 'executor={{kind: {name}}}'"
        )
    return cls(**options)


class Executor(ABC):
    """Runs ``fn(item)`` for every item and yields ``(item, outcome)`` as they complete."""

    name: str = "executor"

    @abstractmethod
    def map_unordered(
        self, fn: Callable[[T], Any], items: Sequence[T]
    ) -> Iterator[tuple[T, Outcome]]:
        """Yield ``(item, fn(item))``, or ``(item, exception)``, in completion order."""

    def start(self, workers: int, preload: Sequence[str] = ()) -> None:  # noqa: B027
        """Get up to ``workers`` workers ready now, importing the ``preload`` modules, so their
        start-up overlaps whatever the caller does before :meth:`map_unordered` (a no-op for
        executors without long-lived workers)."""

    def close(self) -> None:  # noqa: B027
        """Release workers that :meth:`start` readied and :meth:`map_unordered` did not use."""


@register_executor("inline")
class InlineExecutor(Executor):
    """Runs every item in this process, one after the other.

    Args:
        threads: torch intra-op threads while the items run (default: leave as is).
    """

    def __init__(self, threads: int | None = None) -> None:
        self.threads = int(threads) if threads else None

    def map_unordered(
        self, fn: Callable[[T], Any], items: Sequence[T]
    ) -> Iterator[tuple[T, Outcome]]:
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        for item in items:
            try:
                outcome = fn(item)
            except Exception as e:  # noqa: BLE001 - reported to the caller as the outcome
                outcome = e
            yield item, outcome


WATCHDOG_INTERVAL_S = 0.5


def _watch_parent(parent_pid: int, interval_s: float = WATCHDOG_INTERVAL_S) -> None:
    """Kill this worker's process group once ``parent_pid`` is no longer its parent.

    A process whose parent dies is re-parented (to init or a subreaper), so ``os.getppid()``
    changes; this works on Linux and macOS whatever killed the parent. The worker leads its own
    process group (set in :func:`_init_worker`), so the group is the worker and what it started.
    """

    def loop() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval_s)
        if hasattr(os, "killpg") and os.getpgid(0) == os.getpid():
            os.killpg(os.getpid(), signal.SIGKILL)
        os._exit(1)

    threading.Thread(target=loop, name="parent-watchdog", daemon=True).start()


def _retire(pool: cf.ProcessPoolExecutor) -> None:
    """Let a worker with no item left exit without waiting for it: an interpreter holding torch
    takes ~2 s to tear down, which then overlaps the caller's own work (the sweep's tables)."""
    pool.shutdown(wait=False, cancel_futures=True)


def _kill(pool: cf.ProcessPoolExecutor) -> None:
    """Stop a worker now, mid-item if need be, with the processes its item started (a worker
    leads its own process group). An item cut short leaves its folder unfinished, which the next
    run of the sweep redoes or resumes. Without this, Ctrl-C would wait for the running cells, and
    the interpreter's exit for the pool's threads."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    manager = getattr(pool, "_executor_manager_thread", None)  # shutdown() forgets it
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the worker and what it started
        except (AttributeError, ProcessLookupError, PermissionError):
            process.kill()  # not yet its own group leader (or no process groups here)
    # The pool's thread sees the dead worker, reaps it and frees its queues; waiting for it
    # before joining keeps two threads from reaping one process (is_alive() could then lie).
    if manager is not None:
        manager.join(timeout=10)
    for process in processes:
        process.join()


def _preload(modules: tuple[str, ...]) -> None:
    """Import ``modules`` in a fresh worker; a failure is left for the first item to raise."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - the item that needs the module reports it
            logger.debug("preloading %s failed: %s", name, e)


def _init_worker(threads: int, log_level: int, parent_pid: int | None = None) -> None:
    """Worker initialiser: die with the parent, share the machine's cores among the concurrent
    workers and log like the parent.

    Sets the thread environment before torch is imported (torch reads it at start-up), so a
    worker whose function never needs torch does not pay for importing it.
    """
    if parent_pid is not None:
        if hasattr(os, "setpgrp"):
            os.setpgrp()
        _watch_parent(parent_pid)
    logging.basicConfig(
        level=log_level, format="%(asctime)s %(levelname)s %(name)s [worker]: %(message)s"
    )
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    from tqdm import tqdm

    # tqdm's default lock is a named semaphore, which a worker killed mid-item (Ctrl-C) leaks
    # ("resource_tracker: ... leaked semaphore objects"); a worker's bars need no other process.
    tqdm.set_lock(threading.RLock())
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


@register_executor("process")
class ProcessExecutor(Executor):
    """``workers`` ``spawn``-ed Python processes running the items (module docstring).

    Args:
        workers: items run concurrently (default: 1).
        threads: torch intra-op threads per worker (default: cores // workers, at least 1).
        reuse: a worker runs the next item when one finishes (default); ``False``: a fresh
            process per item.
    """

    def __init__(self, workers: int = 1, threads: int | None = None, reuse: bool = True) -> None:
        if int(workers) < 1:
            raise ValueError(f"process executor: workers must be >= 1, got {workers}")
        self.workers = int(workers)
        self.threads = int(threads) if threads else max(1, (os.cpu_count() or 1) // self.workers)
        self.reuse = bool(reuse)
        self._ready: list[cf.ProcessPoolExecutor] = []

    def _new_worker(self) -> cf.ProcessPoolExecutor:
        return cf.ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(self.threads, logging.getLogger().getEffectiveLevel(), os.getpid()),
        )

    def start(self, workers: int, preload: Sequence[str] = ()) -> None:
        """Spawn ``min(workers, self.workers)`` workers now, at most one per core that this
        process leaves free (more would slow this process's own imports: on 2 cores, one); each
        imports ``preload`` first (torch, transformers and the zoo: about 9 s on a laptop CPU,
        then paid while the sweep expands its grid instead of after). The others start with
        their first item, as without :meth:`start`."""
        spare_cores = max(1, (os.cpu_count() or 1) - 1)
        while len(self._ready) < min(int(workers), self.workers, spare_cores):
            pool = self._new_worker()
            pool.submit(_preload, tuple(preload))  # starts the process; the cell queues behind
            self._ready.append(pool)

    def close(self) -> None:
        """Stop the readied workers now, mid-import if need be: none has run an item yet, and
        waiting for their imports would hold up a sweep that failed to expand (a typo)."""
        while self._ready:
            _kill(self._ready.pop())

    def map_unordered(
        self, fn: Callable[[T], Any], items: Sequence[T]
    ) -> Iterator[tuple[T, Outcome]]:
        queue = list(items)
        running: dict[cf.Future[Any], tuple[T, cf.ProcessPoolExecutor]] = {}
        idle, self._ready = self._ready, []  # workers readied by start() go first
        try:
            while queue or running:
                while queue and len(running) < self.workers:
                    pool = idle.pop() if idle else self._new_worker()
                    item = queue.pop(0)
                    running[pool.submit(fn, item)] = (item, pool)
                done, _ = cf.wait(list(running), return_when=cf.FIRST_COMPLETED)
                for future in done:
                    item, pool = running.pop(future)
                    try:
                        outcome = future.result()
                    except Exception as e:  # noqa: BLE001 - a worker that died, or fn raised
                        outcome = e
                    if self.reuse and not isinstance(outcome, BrokenProcessPool):
                        idle.append(pool)
                    else:
                        pool.shutdown(wait=True)
                    yield item, outcome
        finally:  # the caller stopped early (Ctrl-C, an error): its running items go now
            for _, pool in running.values():
                _kill(pool)
            for pool in idle:
                _retire(pool)


@register_executor("submitit")
class SubmititExecutor(Executor):
    """One job per item through ``submitit.AutoExecutor`` (SLURM, or submitit's local executor).

    Args:
        folder: where submitit keeps its job scripts, pickles and logs.
        cluster: ``None`` (auto-detect: SLURM when available), ``"slurm"``, ``"local"``
            (subprocesses on this machine) or ``"debug"`` (in this process).
        parameters: ``AutoExecutor.update_parameters`` keywords, e.g. ``{"timeout_min": 120,
            "gpus_per_node": 1, "slurm_partition": "learnlab", "slurm_array_parallelism": 8}``;
            parameters prefixed with another cluster's name are ignored on this one.
        poll_s: seconds between job status checks.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str] = "submitit",
        cluster: str | None = None,
        parameters: dict[str, Any] | None = None,
        poll_s: float = 1.0,
    ) -> None:
        self.folder = Path(folder)
        self.cluster = cluster
        self.parameters = dict(parameters or {})
        self.poll_s = float(poll_s)

    def _executor(self) -> Any:
        try:
            import submitit
        except ImportError as e:
            raise ImportError(
                "the submitit executor needs submitit: pip install 'moe-vision[cluster]'"
            ) from e
        executor = submitit.AutoExecutor(folder=self.folder, cluster=self.cluster)
        params = {"name": "moe-vision-sweep", **self.parameters}
        executor.update_parameters(**params)
        return executor

    def map_unordered(
        self, fn: Callable[[T], Any], items: Sequence[T]
    ) -> Iterator[tuple[T, Outcome]]:
        if not items:
            return
        executor = self._executor()
        with executor.batch():
            jobs = [executor.submit(fn, item) for item in items]
        pending = dict(zip(jobs, items))
        for job in jobs:
            logger.info("submitted job %s (%s)", job.job_id, executor.cluster)
        try:
            while pending:
                finished = [job for job in pending if job.done()]
                for job in finished:
                    item = pending.pop(job)
                    try:
                        outcome = job.result()
                    except Exception as e:  # noqa: BLE001 - killed, timed out, or fn raised
                        outcome = e
                    yield item, outcome
                if pending and not finished:
                    time.sleep(self.poll_s)
        finally:
            # An interrupted sweep leaves cluster jobs running on purpose: they finish their
            # cells, and a restarted sweep finds those cells done (or waits on their lock).
            if pending:
                logger.warning("%d submitted jobs are still running", len(pending))
