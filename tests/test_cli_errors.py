"""CLI errors for bad input: two lines on stderr and exit code 2; bugs keep their traceback.

Each case goes through ``moe_vision.cli.main`` as the ``moe-vision`` script does; the input
errors are raised where the bad input enters (config loader, expert registry, fusion build).
"""

from __future__ import annotations

import json

import pytest
import torch

from moe_vision import cli


def _bad_input(capsys, argv: list[str]) -> str:
    """Run ``argv``; assert the short form; return the error line."""
    assert cli.main(argv) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if " WARNING " not in line]  # third-party import noise
    assert len(err) == 2 and err[0].startswith("error: "), err
    assert "Traceback" not in "\n".join(err)
    return err[0]


def test_missing_run_config(capsys, tmp_path) -> None:
    line = _bad_input(capsys, ["train", "--config", str(tmp_path / "nope.yaml"), "--out", "x"])
    assert line == f"error: run config not found: {tmp_path / 'nope.yaml'}"


def test_unknown_config_key(capsys, tmp_path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("bogus_key: 1\n")
    line = _bad_input(capsys, ["train", "--config", str(config), "--out", str(tmp_path / "r")])
    assert "unknown keys ['bogus_key']" in line and "valid keys are" in line


def test_unknown_expert_and_impossible_fusion(capsys, tmp_path) -> None:
    line = _bad_input(capsys, ["train", "--experts", "nosuch", "--out", str(tmp_path / "a")])
    assert line.startswith("error: unknown expert 'nosuch'; valid experts are: ")
    argv = ["train", "--experts", "clip-tiny", "--fusion", "mr_adapter", "--out", str(tmp_path)]
    line = _bad_input(capsys, argv)
    assert "fusion 'mr_adapter' needs a high-resolution convolutional expert" in line


def test_switching_the_sweeps_executor_kind_names_the_option_that_does_not_fit(capsys) -> None:
    line = _bad_input(capsys, ["sweep", "--set", "executor.kind=inline"])  # keeps workers: 2
    assert line.startswith("error: executor 'inline' takes no option 'workers' (its options: ")
    assert "--set 'executor={kind: inline}'" in line


def test_a_second_sweep_into_a_busy_folder_is_told_to_wait(capsys, tmp_path) -> None:
    from moe_vision.sweeps.sweep import file_lock

    out = tmp_path / "sweep"
    with file_lock(out / ".sweep.lock"):  # another sweep runs there
        argv = ["sweep", "--out", str(out), "--set", "executor={kind: inline}"]
        line = _bad_input(capsys, [*argv, "--results-dir", ""])
    assert line == (
        f"error: another sweep is already running in {out} (it holds .sweep.lock); wait for it "
        "to finish, or give this one another --out"
    )
    assert not (out / "cells").exists()  # nothing ran


def test_verbose_shows_the_traceback(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="run config not found"):
        cli.main(["-v", "train", "--config", str(tmp_path / "nope.yaml"), "--out", "x"])


def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path) -> None:
    """Errors not raised by the project's input checks are not dressed up as bad input."""

    def deep_in_torch(args):
        return torch.zeros(2) + torch.zeros(3)  # RuntimeError inside torch

    def value_error_elsewhere(args):
        return int("not a number")  # a ValueError whose innermost frame is not ours

    cases = (
        (deep_in_torch, RuntimeError, "size of tensor"),
        (value_error_elsewhere, ValueError, "invalid literal"),
    )
    for fn, exc, match in cases:
        monkeypatch.setattr("moe_vision.commands.train.run", fn)
        with pytest.raises(exc, match=match):
            cli.main(["train", "--out", str(tmp_path)])


def test_a_bad_record_names_the_file_and_record(capsys, tmp_path) -> None:
    bad = tmp_path / "bad.json"
    conversation = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]
    record = {"id": "r1", "image": "missing.png", "conversations": conversation}
    bad.write_text(json.dumps([record]))
    config = tmp_path / "run.yaml"
    config.write_text("train: {progress_bar: false, log_with: []}\n")
    argv = ["train", "--config", str(config), "--recipe", "llava", "--experts", "clip-tiny"]
    for split in ("align", "instruct", "test"):
        argv += ["--data", f"{split}={bad}"]
    argv += ["--image-root", str(tmp_path), "--out", str(tmp_path / "run")]
    line = _bad_input(capsys, argv)
    assert str(bad) in line and "'r1'" in line and f"not found: {tmp_path / 'missing.png'}" in line
