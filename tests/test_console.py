"""The console a person reads: library logging goes to each run's ``train.log``; the sweep prints a
header, one line per finished cell and the table; each distinct warning is said once per sweep;
``-v`` brings the library logging back to the console.

Cells run :func:`noisy_cell`, an injected entrypoint that logs the way a real run does (our INFO
lines, a transformers warning, a Python warning, the same warning in every cell) inside the real
per-run log (:func:`moe_vision.console.logs_to_run_folder`).
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import pytest

from moe_vision.console import RUN_LOG, logs_to_run_folder, new_warnings, run_log

ENTRY = "test_console:noisy_cell"
INTERRUPT_FUSIONS: set[str] = set()  # noisy_cell raises KeyboardInterrupt (Ctrl-C) for these


@logs_to_run_folder
def noisy_cell(config: dict, cell_dir: Path) -> dict:
    """Injected entrypoint: logs like a training run, returns an accuracy."""
    from transformers.utils import logging as hf_logging

    if config["model"]["fusion"] in INTERRUPT_FUSIONS:
        raise KeyboardInterrupt

    log = logging.getLogger("moe_vision.training.trainer")
    for step in range(20):
        log.info("step %d of %s", step, cell_dir.name)
    log.warning("the same warning in every cell")
    hf_logging.get_logger("transformers.modeling_utils").warning("transformers says %s", "hi")
    warnings.warn("a python warning", UserWarning, stacklevel=1)
    return {"accuracy/overall": 0.5 if config["model"]["fusion"] == "channel_concat" else 0.25}


@pytest.fixture
def console() -> io.StringIO:
    """A console handler on the root logger (what ``logging.basicConfig`` gives the CLI);
    the root's level and handlers are restored afterwards."""
    root = logging.getLogger()
    level, stream = root.level, io.StringIO()
    handler = logging.StreamHandler(stream)
    root.addHandler(handler)
    yield stream
    root.removeHandler(handler)
    root.setLevel(level)


def _sweep_args(tmp_path: Path, *extra: str) -> list[str]:
    """A two-cell sweep of :func:`noisy_cell` (its own spec: the default sweep may change)."""
    import yaml

    import experts

    a, b = experts.list_experts("*-tiny")[:2]
    spec = {
        "name": "console",
        "experts": {"combinations": [[a, b]]},
        "fusions": ["channel_concat", "sequence_append"],
        "recipes": ["llava"],
        "seeds": [0],
        "entrypoint": ENTRY,
        "executor": {"kind": "inline"},
    }
    path = tmp_path / "console.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = ["sweep", str(path), "--out", str(tmp_path / "sweep"), "--results-dir", ""]
    return [*extra, *out]


def test_run_log_takes_the_library_logging_and_keeps_the_console_level(tmp_path, console):
    logging.getLogger().setLevel(logging.WARNING)
    with run_log(tmp_path / "run" / RUN_LOG) as path:
        logging.getLogger("moe_vision.x").info("an info line")
        logging.getLogger("moe_vision.x").warning("a warning line")
        from transformers.utils import logging as hf_logging

        hf_logging.get_logger("transformers.x").warning("from transformers")
    text = path.read_text()
    assert "an info line" in text and "a warning line" in text and "from transformers" in text
    shown = console.getvalue()
    assert "a warning line" in shown and "an info line" not in shown
    assert logging.getLogger().level == logging.WARNING  # restored
    logging.getLogger("moe_vision.x").info("after the run")
    assert "after the run" not in path.read_text()  # the file handler is gone


def test_new_warnings_says_each_once(tmp_path) -> None:
    log = tmp_path / RUN_LOG
    log.write_text(
        "2026-11-30 06:00:00,000 INFO a: fine\n"
        "2026-11-30 06:00:01,000 WARNING a.b: careful\n"
        "2026-11-30 06:00:02,000 WARNING a.b: careful\n"
        "2026-11-30 06:00:03,000 ERROR c: broken\n"
    )
    seen: set[str] = set()
    assert new_warnings(log, seen) == ["a.b: careful", "c: broken"]
    assert new_warnings(log, seen) == []
    assert new_warnings(tmp_path / "missing.log", seen) == []


def test_sweep_console_is_short_and_the_run_logs_hold_the_rest(tmp_path, console, capsys):
    from moe_vision.cli import main

    assert main(_sweep_args(tmp_path)) == 0
    out = capsys.readouterr()
    lines = [ln for ln in (out.out + out.err + console.getvalue()).splitlines() if ln.strip()]
    cells = [ln for ln in lines if ln.startswith("[")]
    assert len(cells) == 2 and all(": ok, overall 0." in ln for ln in cells)
    assert any("channel_concat" in ln and "overall 0.500" in ln for ln in cells)
    said = [ln for ln in lines if "the same warning in every cell" in ln]
    assert len(said) == 1  # two cells, said once
    assert not [ln for ln in lines if "step 3 of" in ln]  # INFO stays in the run logs
    assert len(lines) < 25
    logs = sorted((tmp_path / "sweep").rglob(RUN_LOG))
    assert len(logs) == 2
    for log in logs:
        text = log.read_text()
        assert "INFO moe_vision.training.trainer: step 19 of" in text
        assert "transformers says hi" in text and "a python warning" in text


def test_ctrl_c_ends_a_sweep_in_one_line_and_the_same_command_runs_the_rest(
    tmp_path, console, capsys, monkeypatch
):
    import importlib

    from moe_vision.cli import EXIT_INTERRUPTED, main

    module = importlib.import_module(ENTRY.split(":")[0])  # the entrypoint's own module object
    monkeypatch.setattr(module, "INTERRUPT_FUSIONS", {"sequence_append"})  # the second cell
    assert main(_sweep_args(tmp_path)) == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "Traceback" not in err
    said = [ln for ln in err.splitlines() if ln.startswith("interrupted")]
    folder = tmp_path / "sweep"
    assert said == [
        f"interrupted: 1 of 2 cells finished, kept in {folder}; the same command runs the rest"
    ]
    monkeypatch.setattr(module, "INTERRUPT_FUSIONS", set())
    assert main(_sweep_args(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "2 cells (1 finished before)" in out
    assert [ln for ln in out.splitlines() if ln.startswith("[")] == [
        ln for ln in out.splitlines() if ln.startswith("[2/2]") and "sequence_append" in ln
    ]


def test_ctrl_c_with_verbose_keeps_the_traceback(tmp_path, console, monkeypatch):
    import importlib

    from moe_vision.cli import main

    module = importlib.import_module(ENTRY.split(":")[0])
    monkeypatch.setattr(module, "INTERRUPT_FUSIONS", {"channel_concat"})
    with pytest.raises(KeyboardInterrupt):
        main(_sweep_args(tmp_path, "-v"))


def test_verbose_sweep_shows_the_library_logging(tmp_path, console, capsys):
    from moe_vision.cli import main

    assert main(_sweep_args(tmp_path, "-v")) == 0
    assert "step 3 of" in console.getvalue()


def test_every_command_keeps_library_info_off_the_console_unless_verbose(tmp_path, console):
    """A command without a run folder (``probe``): its INFO lines are not on the console by
    default, and ``-v`` shows them."""
    from moe_vision.cli import main

    args = [
        "probe", "clip-tiny", "--random-only", "--categories", "color",
        "--sizes", "align=0,instruct=24,val=0,test=12",
        "--benchmark-dir", str(tmp_path / "bench"),
    ]  # fmt: skip
    assert main(args) == 0
    assert "probe clip-tiny (random) color:" not in console.getvalue()
    assert main(["-v", *args]) == 0
    assert "probe clip-tiny (random) color:" in console.getvalue()
