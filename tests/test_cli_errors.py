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


# ------------------------------------------------------------------ options checked before work
def _no_work(monkeypatch) -> None:
    """Any training, pretraining or data check that starts fails the test."""

    def started(*args, **kwargs):
        raise AssertionError("work started before the options were checked")

    monkeypatch.setattr("moe_vision.experiment.run.run_experiment", started)
    monkeypatch.setattr("moe_vision.zoo.pretrain", started)
    monkeypatch.setattr("moe_vision.data.check.check_files", started)


def test_bad_train_options_are_refused_before_training(capsys, tmp_path, monkeypatch) -> None:
    _no_work(monkeypatch)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    out = str(tmp_path / "run")
    line = _bad_input(capsys, ["train", "--out", str(a_file)])
    assert line == f"error: --out {a_file}: is a file; expected a folder (existing or new)"
    line = _bad_input(capsys, ["train", "--out", str(a_file / "run")])
    assert f"lies under the file {a_file}" in line
    assert _bad_input(capsys, ["train", "--out", out, "--seed", "-1"]) == (
        "error: --seed -1: expected a number >= 0"
    )
    line = _bad_input(capsys, ["train", "--out", out, "--max-image-pixels", "0"])
    assert line == "error: --max-image-pixels 0: expected a number >= 1"
    binary = tmp_path / "run.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    line = _bad_input(capsys, ["train", "--config", str(binary), "--out", out])
    assert line.startswith(f"error: run config {binary}: not UTF-8 text")
    empty = tmp_path / "empty-llm"
    empty.mkdir()
    line = _bad_input(capsys, ["train", "--llm", str(empty), "--out", out])
    assert line.startswith(f"error: --llm {empty}: a folder without config.json")
    assert not (tmp_path / "run").exists()


def test_resume_on_a_folder_without_a_run_says_there_is_nothing_to_resume(
    capsys, tmp_path, monkeypatch
) -> None:
    _no_work(monkeypatch)
    for out in (tmp_path / "never-made", tmp_path):
        line = _bad_input(capsys, ["train", "--out", str(out), "--resume"])
        assert line == (
            f"error: --resume: nothing to resume in {out} (no config.yaml, no checkpoint); drop "
            "--resume to start a new run there"
        )


def test_a_second_train_on_the_same_folder_is_told_another_run_trains_there(
    capsys, tmp_path, monkeypatch
) -> None:
    """Before, the second run deleted the first's .tmp-ckpt as stale and the first died."""
    from moe_vision.sweeps.sweep import file_lock

    _no_work(monkeypatch)
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "config.yaml").write_text("seed: 0\n")
    with file_lock(out / ".run.lock"):  # the first `train` holds it while it trains
        for extra in ([], ["--resume"]):
            line = _bad_input(capsys, ["train", "--out", str(out), *extra])
            assert line == (
                f"error: another run is training in {out} (it holds .run.lock); wait for it to "
                "finish, or give this one another --out"
            )


def test_bad_eval_devices_are_refused(capsys, tmp_path) -> None:
    line = _bad_input(capsys, ["eval", "--run", str(tmp_path), "--device", "bogus"])
    assert line == "error: --device 'bogus': not a torch device; expected cpu, cuda, cuda:N or mps"
    if not torch.cuda.is_available():
        line = _bad_input(capsys, ["eval", "--run", str(tmp_path), "--device", "cuda"])
        assert line.startswith("error: --device cuda: this machine has no cuda device")


def test_bad_data_check_options_are_refused_before_the_check(capsys, tmp_path, monkeypatch):
    _no_work(monkeypatch)
    data = tmp_path / "d.json"
    data.write_text("[]")
    line = _bad_input(capsys, ["data", "check", str(data), "--workers", "-1"])
    assert line == "error: --workers -1: expected a number >= 0"
    line = _bad_input(capsys, ["data", "check", str(data), "--json", str(tmp_path)])
    assert line == f"error: --json {tmp_path}: is a folder; expected a file name to write"


def test_bad_pretrain_options_are_refused_before_training(capsys, tmp_path, monkeypatch):
    _no_work(monkeypatch)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    argv = ["pretrain", "clip-mini", "--steps", "1", "--out", str(tmp_path)]
    for lr, shown in (("-1", "-1.0"), ("nan", "nan")):
        line = _bad_input(capsys, [*argv, "--lr", lr])
        assert line == f"error: --lr {shown}: expected a finite number > 0"
    line = _bad_input(capsys, [*argv, "--threads", "0"])
    assert line == "error: --threads 0: expected a number >= 1"
    line = _bad_input(capsys, ["pretrain", "clip-mini", "--steps", "1", "--out", str(a_file)])
    assert line == f"error: --out {a_file}: is a file; expected a folder (existing or new)"


def test_a_sweep_setting_of_the_wrong_type_is_an_error(capsys) -> None:
    line = _bad_input(capsys, ["sweep", "--set", "run=5"])
    assert "run must be a mapping" in line
