"""A run killed mid-stage and resumed ends exactly where an uninterrupted run ends.

The Eagle recipe (per-expert pre-alignment, then joint, then SFT; 4 steps each, a checkpoint
every 2 steps); the run is killed (an exception from a step hook: nothing is written
after the last checkpoint, as with SIGKILL) once inside a per-expert unit, one step after its
last checkpoint (so that step is lost and redone), and once inside SFT right after a checkpoint;
each time it is resumed from disk and compared with the uninterrupted run: the same loss at
every step, redone ones included (same data order and position, RNG, optimiser and scheduler
state), and bitwise the same final weights.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from moe_vision.data.benchmark import BenchmarkSizes
from moe_vision.experiment.run import run_experiment
from moe_vision.experiment.run_config import DataConfig, RunConfig
from moe_vision.model.config import ModelConfig
from moe_vision.training.checkpoint import TrainerState, latest_checkpoint
from moe_vision.training.options import TrainOptions
from moe_vision.training.units import StepEvent


class Killed(RuntimeError):
    pass


def _config(tmp_path) -> RunConfig:
    sizes = BenchmarkSizes(align=16, instruct=16, val=4, test=8)
    return RunConfig(
        model=ModelConfig(experts=["clip-tiny"]),
        recipe="eagle",
        overrides={"*": {"batch_size": 2, "max_steps": 4, "lr": 5e-3}},
        data=DataConfig(benchmark_sizes=sizes.to_dict(), benchmark_dir=str(tmp_path / "bench")),
        train=TrainOptions(progress_bar=False, log_with=[], checkpoint_every=2, keep_checkpoints=1),
        cache_dir=str(tmp_path / "cache"),
    )


def _kill_at(step: int, log: list[tuple[str, int, float]]):
    def hook(event: StepEvent) -> None:
        log.append((event.unit.name, event.optimizer_steps, event.loss))
        if event.global_step == step:
            raise Killed(f"killed after global step {step}")

    return hook


@pytest.mark.timeout(300)
def test_killed_run_resumes_to_identical_weights(tmp_path) -> None:
    cfg = _config(tmp_path)
    ref_log: list = []
    ref = run_experiment(cfg, tmp_path / "ref", resume=False, hooks=[_kill_at(-1, ref_log)])
    units = ["prealign[0]", "joint", "sft"]
    assert [(u, s) for u, s, _ in ref_log] == [(u, s) for u in units for s in (1, 2, 3, 4)]

    log: list = []
    out = tmp_path / "killed"
    with pytest.raises(Killed):  # pre-alignment step 3: its last checkpoint is step 2
        run_experiment(cfg, out, resume=False, hooks=[_kill_at(3, log)])
    state = TrainerState.load(latest_checkpoint(out / "checkpoints"))
    assert (state.kind, state.unit_name, state.optimizer_steps) == ("mid", "prealign[0]", 2)
    assert not (out / "metrics.json").exists()
    with pytest.raises(Killed):  # sft, step 2, right after its checkpoint
        run_experiment(cfg, out, resume=True, hooks=[_kill_at(10, log)])
    state = TrainerState.load(latest_checkpoint(out / "checkpoints"))
    assert (state.kind, state.unit_name, state.optimizer_steps) == ("mid", "sft", 2)
    metrics = run_experiment(cfg, out, resume=True, hooks=[_kill_at(-1, log)])

    reference = {(u, s): loss for u, s, loss in ref_log}
    assert [(u, s) for u, s, _ in log].count(("prealign[0]", 3)) == 2  # lost, then redone
    assert {(u, s) for u, s, _ in log} == set(reference)
    for unit, step, loss in log:
        assert loss == reference[(unit, step)], (unit, step)

    a = load_file(str(tmp_path / "ref" / "model" / "model.safetensors"))
    b = load_file(str(out / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert metrics["accuracy/overall"] == ref["accuracy/overall"]


def test_a_finished_run_is_not_trained_again(tmp_path, monkeypatch) -> None:
    cfg = _config(tmp_path)
    cfg.recipe = "llava"
    cfg.overrides = {"*": {"batch_size": 4, "max_steps": 1}}
    first = run_experiment(cfg, tmp_path / "run", resume=False)

    def boom(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr("moe_vision.training.trainer.Trainer.fit", boom)
    assert run_experiment(cfg, tmp_path / "run", resume=True) == first
    other = _config(tmp_path)
    other.seed = 1
    with pytest.raises(ValueError, match="different config"):
        run_experiment(other, tmp_path / "run", resume=True)
