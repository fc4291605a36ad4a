"""Executors: inline, spawned processes (a crash stays with its item), submitit local."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moe_vision.sweeps.executors import (
    InlineExecutor,
    ProcessExecutor,
    SubmititExecutor,
    create_executor,
    list_executors,
)


def square_or_fail(x: int) -> tuple[int, int]:
    """Module-level (picklable): raises on 3, kills its own process on 4."""
    if x == 3:
        raise ValueError("three is bad")
    if x == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    return x * x, os.getpid()


def loaded(module: str) -> bool:
    """Module-level (picklable): whether ``module`` is imported in this process."""
    return module in sys.modules


def test_started_workers_import_the_preload_before_the_first_item(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    executor = ProcessExecutor(workers=2, threads=1)
    executor.start(1, preload=("tabnanny",))  # one cell to run: one worker readied, not two
    assert len(executor._ready) == 1
    assert dict(executor.map_unordered(loaded, ["tabnanny"])) == {"tabnanny": True}
    assert executor._ready == []  # map_unordered took the readied worker and shut it down
    fresh = ProcessExecutor(workers=1, threads=1)  # not started: a bare worker
    assert dict(fresh.map_unordered(loaded, ["tabnanny"])) == {"tabnanny": False}
    monkeypatch.setattr(os, "cpu_count", lambda: 2)  # one core left by the caller: one worker
    two_cores = ProcessExecutor(workers=2, threads=1)
    two_cores.start(5)
    assert len(two_cores._ready) == 1
    two_cores.close()
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    unused = ProcessExecutor(workers=2, threads=1)
    unused.start(5, preload=("no_such_module_here",))  # a failing preload is not fatal
    assert len(unused._ready) == 2
    processes = [proc for pool in unused._ready for proc in pool._processes.values()]
    unused.close()  # e.g. the grid failed to expand: the workers go at once, not after imports
    assert unused._ready == [] and len(processes) == 2
    assert not any(proc.is_alive() for proc in processes)


def tqdm_lock_module(_: object) -> str:
    """Module-level (picklable): where the type of this process's tqdm write lock comes from."""
    from tqdm.auto import tqdm

    return type(tqdm.get_lock()).__module__


def test_workers_write_progress_bars_under_a_thread_lock() -> None:
    """tqdm's default lock is a named semaphore: a worker killed mid-cell would leak it."""
    outcome = dict(ProcessExecutor(workers=1, threads=1).map_unordered(tqdm_lock_module, [0]))
    assert outcome[0] == "_thread"  # threading.RLock; tqdm's own would be "tqdm.std"


def test_registry() -> None:
    assert {"inline", "process", "submitit"} <= set(list_executors())
    assert isinstance(create_executor("process", workers=2), ProcessExecutor)
    with pytest.raises(KeyError, match="valid executors"):
        create_executor("kubernetes")
    with pytest.raises(ValueError, match=r"executor 'inline' takes no option 'workers' \(its opt"):
        create_executor("inline", workers=3, threads=1)  # inline takes only threads
    with pytest.raises(ValueError, match="workers must be >= 1"):
        ProcessExecutor(workers=0)


def test_inline_runs_in_process_and_reports_exceptions() -> None:
    out = dict(InlineExecutor().map_unordered(square_or_fail, [1, 2, 3]))
    assert out[1] == (1, os.getpid()) and out[2] == (4, os.getpid())
    assert isinstance(out[3], ValueError)


@pytest.mark.parametrize("reuse", [True, False])
def test_process_executor_isolates_a_crashing_item(reuse: bool) -> None:
    from concurrent.futures.process import BrokenProcessPool

    items = [1, 2, 3, 4, 5, 6, 7]
    executor = ProcessExecutor(workers=2, threads=1, reuse=reuse)
    out = dict(executor.map_unordered(square_or_fail, items))
    assert sorted(out) == items  # every item reported exactly once
    good = (1, 2, 5, 6, 7)
    for x in good:
        value, pid = out[x]
        assert value == x * x and pid != os.getpid()
    pids = {out[x][1] for x in good}
    if reuse:  # two workers, plus the one that replaced the killed worker
        assert len(pids) <= 3
    else:
        assert len(pids) == len(good)  # a fresh process per item
    assert isinstance(out[3], ValueError) and "three is bad" in str(out[3])
    assert isinstance(out[4], BrokenProcessPool)  # the killed worker, and only that item


def test_submitit_local_executor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the jobs unpickle this module's function: make the tests folder importable there
    tests_dir = str(Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")]))
    executor = SubmititExecutor(
        folder=tmp_path / "jobs",
        cluster="local",
        parameters={"timeout_min": 5, "slurm_partition": "ignored-on-local"},
        poll_s=0.2,
    )
    out = dict(executor.map_unordered(square_or_fail, [2, 3]))
    assert out[2][0] == 4 and out[2][1] != os.getpid()
    assert isinstance(out[3], Exception) and "three is bad" in str(out[3])
    assert any((tmp_path / "jobs").iterdir())  # submitit's job files and logs


# A cell runs for CELL_S; the test waits for the events (workers started, sweep exited, workers
# gone) with deadlines far longer than they take on an idle machine (under a second each), and
# far shorter than CELL_S, so a loaded machine is slow but a sweep that waits for its cells fails.
CELL_S = 900
WORKER_SCRIPT = """
import os, signal, subprocess, sys, time
from pathlib import Path

from moe_vision.sweeps.executors import ProcessExecutor

# Ctrl-C raises KeyboardInterrupt, as in a terminal, also when the suite runs as a background
# job (bash starts those with SIGINT ignored, and a child inherits that: it would never stop).
signal.signal(signal.SIGINT, signal.default_int_handler)


def cell(folder):
    # a running cell that started a process of its own (a DataLoader worker, a compiler...)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(CELL_S)"])
    Path(folder, f"{os.getpid()}.{child.pid}").write_text("")
    time.sleep(CELL_S)


if __name__ == "__main__":
    for _ in ProcessExecutor(workers=2, threads=1).map_unordered(cell, [sys.argv[1]] * 2):
        pass
""".replace("CELL_S", str(CELL_S))


def _alive(pid: int) -> bool:
    """Running (a zombie left for an init that does not reap counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.timeout(600)
@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_workers_die_with_a_killed_sweep(tmp_path: Path, stop: signal.Signals) -> None:
    """SIGKILL: no cleanup runs in the sweep process, the workers' watchdogs end them. SIGINT
    (Ctrl-C): the sweep stops its running cells at once and exits, instead of waiting for them."""
    script = tmp_path / "sweep.py"
    script.write_text(WORKER_SCRIPT)
    pids = tmp_path / "pids"
    pids.mkdir()
    main = subprocess.Popen([sys.executable, str(script), str(pids)], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while len(list(pids.iterdir())) < 2:
            assert main.poll() is None, "the sweep process exited early"
            assert time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.2)
        started = [int(p) for f in pids.iterdir() for p in f.name.split(".")]
        assert all(_alive(p) for p in started)
        main.send_signal(stop)
        main.wait(timeout=180)  # returns when it exits; its cells would run for 15 minutes
    finally:
        main.kill()
        main.wait()
    deadline = time.monotonic() + 120  # the workers' watchdogs poll their parent
    while any(_alive(p) for p in started) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in started if _alive(p)], "orphaned sweep workers"
