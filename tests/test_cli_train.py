"""``moe-vision train`` / ``moe-vision eval``: flags, YAML configs, resume, run folder."""

from __future__ import annotations

import json

import pytest
import yaml

from moe_vision.cli import build_parser, main
from moe_vision.data.benchmark import BenchmarkSizes
from moe_vision.experiment.run_config import DataConfig, RunConfig
from moe_vision.training.options import TrainOptions


@pytest.fixture
def config_file(tmp_path):
    sizes = BenchmarkSizes(align=8, instruct=8, val=4, test=6)
    cfg = RunConfig(
        overrides={"*": {"batch_size": 4, "max_steps": 1}},
        data=DataConfig(benchmark_sizes=sizes.to_dict(), benchmark_dir=str(tmp_path / "bench")),
        train=TrainOptions(progress_bar=False, log_with=[]),
        cache_dir=str(tmp_path / "cache"),
    )
    path = tmp_path / "run.yaml"
    cfg.to_yaml(path)
    return path


def test_ctrl_c_during_training_says_how_to_resume(tmp_path, config_file, capsys, monkeypatch):
    import moe_vision.experiment.run as run_module
    from moe_vision.cli import EXIT_INTERRUPTED

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "run_experiment", interrupted)
    out = tmp_path / "r"
    assert main(["train", "--config", str(config_file), "--out", str(out)]) == EXIT_INTERRUPTED
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"interrupted: `moe-vision train --out {out} --resume` continues from the run's last "
        "checkpoint"
    ]


def test_train_then_eval(tmp_path, config_file, capsys) -> None:
    out = tmp_path / "runs" / "x"
    argv = ["train", "--config", str(config_file), "--out", str(out)]
    argv += ["--experts", "clip-tiny", "--fusion", "sequence_append", "--recipe", "llava"]
    argv += ["--override", "finetune.lr=0.01", "--override", "*.batch_size=2"]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert json.loads(capsys.readouterr().out) == metrics  # the CLI prints the metrics row
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["model"]["experts"] == ["clip-tiny"]
    assert resolved["model"]["fusion"] == "sequence_append"
    stages = {s["name"]: s for s in resolved["recipe"]["stages"]}
    assert stages["finetune"]["lr"] == 0.01 and stages["pretrain"]["batch_size"] == 2
    assert stages["pretrain"]["max_steps"] == 1  # from the YAML config

    assert main(["train", "--config", str(config_file), "--out", str(out)]) == 2
    said = capsys.readouterr().err.splitlines()
    assert len(said) == 2 and said[0] == (
        f"error: {out} already holds a run; pass --resume to continue it or pick another --out"
    )
    assert main(["train", "--out", str(out), "--resume"]) == 0  # finished: metrics read back

    assert main(["eval", "--run", str(out)]) == 0
    scores = json.loads((out / "eval" / "test.json").read_text())["scores"]
    assert scores["accuracy/overall"] == pytest.approx(metrics["accuracy/overall"])
    assert set(k for k in scores if k.startswith("accuracy/")) == set(
        k for k in metrics if k.startswith("accuracy/")
    )
    for row in (metrics, scores):  # every accuracy carries its 95% interval and count
        acc = row["accuracy/overall"]
        assert row["accuracy/overall/lo"] <= acc <= row["accuracy/overall/hi"]
        assert row["accuracy/overall/hi"] - row["accuracy/overall/lo"] > 0
        assert row["n/overall"] == sum(
            row[k] for k in row if k.startswith("n/") and k != "n/overall"
        )


def test_bad_flags_are_named(tmp_path, capsys) -> None:
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--out", "x", "--override", "lr=1"])
    assert "STAGE.FIELD=VALUE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--out", "x", "--data", "align.json"])
    assert "SPLIT=PATH" in capsys.readouterr().err
    assert main(["eval", "--run", str(tmp_path)]) == 2
    assert "no trained model" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "r"), "--recipe", "nope"]) == 2
    assert "unknown recipe 'nope'" in capsys.readouterr().err  # one line, no traceback


def test_override_flags_start_from_the_recipes_defaults(tmp_path) -> None:
    from moe_vision.commands.train import build_config

    args = build_parser().parse_args(
        ["train", "--out", str(tmp_path / "r"), "--override", "sft.epochs=2"]
    )
    sft = {s.name: s for s in build_config(args).resolved_recipe().stages}["sft"]
    assert sft.epochs == 2 and sft.lr_scale == {"experts.*": 0.01} and sft.batch_size == 16
    args = build_parser().parse_args(
        ["train", "--out", str(tmp_path / "r"), "--recipe", "cambrian", "--override", "*.lr=0.5"]
    )
    assert {s.lr for s in build_config(args).resolved_recipe().stages} == {0.5}
