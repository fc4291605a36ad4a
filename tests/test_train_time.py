"""Training time excludes mid-unit checkpoints: a run's ``train_time_s`` (and so its
``throughput_samples_s``) counts the loop, while the checkpoints' time goes to
``time/checkpoint_s``."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from moe_vision.data.benchmark import BenchmarkSizes
from moe_vision.experiment.run import run_experiment
from moe_vision.experiment.run_config import DataConfig, RunConfig
from moe_vision.model.config import ModelConfig
from moe_vision.training import trainer
from moe_vision.training.options import TrainOptions

PAUSE_S = 10.0  # far above four tiny steps even on a loaded machine (about 0.3 s idle)


def test_mid_checkpoint_time_is_not_training_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = trainer.save_checkpoint

    def slow_save(accelerator, root, state, kind, *args, **kwargs):
        if kind == "mid":
            time.sleep(PAUSE_S)  # a checkpoint that takes long (a slow disk)
        return real(accelerator, root, state, kind, *args, **kwargs)

    monkeypatch.setattr(trainer, "save_checkpoint", slow_save)
    sizes = BenchmarkSizes(align=8, instruct=8, val=4, test=4)
    cfg = RunConfig(
        model=ModelConfig(experts=["clip-tiny"]),
        recipe="llava",
        overrides={"*": {"batch_size": 2, "max_steps": 2, "lr": 5e-3}},
        data=DataConfig(benchmark_sizes=sizes.to_dict(), benchmark_dir=str(tmp_path / "bench")),
        train=TrainOptions(progress_bar=False, log_with=[], checkpoint_every=1),
        cache_dir=str(tmp_path / "cache"),
    )
    metrics = run_experiment(cfg, tmp_path / "run", resume=False)
    assert metrics["time/checkpoint_s"] >= 2 * PAUSE_S  # one mid checkpoint per stage
    assert metrics["train_time_s"] < PAUSE_S  # four tiny steps, without the pauses
