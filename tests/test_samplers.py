"""The trainer's batch samplers: every record once per epoch, a pure function of (seed, epoch),
and length grouping that pads less than a random permutation."""

from __future__ import annotations

import numpy as np
import pytest

from moe_vision.training.samplers import (
    EpochBatchSampler,
    LengthGroupedBatchSampler,
    batch_sampler,
)


def _epoch(sampler: EpochBatchSampler, epoch: int) -> list[list[int]]:
    sampler.epoch = epoch
    return list(sampler)


def _padding(batches: list[list[int]], lengths: np.ndarray) -> int:
    """Padded positions of a whole epoch (each batch padded to its longest record)."""
    return int(sum(len(b) * lengths[b].max() - lengths[b].sum() for b in batches))


@pytest.mark.parametrize("grouped", [False, True])
def test_every_record_once_per_epoch_and_reproducible(grouped: bool) -> None:
    lengths = np.random.default_rng(0).integers(10, 500, size=1003)
    make = lambda: batch_sampler(len(lengths), 16, seed=3, lengths=lengths if grouped else None)  # noqa: E731
    sampler = make()
    first = _epoch(sampler, 0)
    assert sorted(i for b in first for i in b) == list(range(len(lengths)))
    assert len(first) == len(sampler) == 63 and max(len(b) for b in first) == 16
    assert _epoch(make(), 0) == first  # a resumed run sees the same batches
    assert _epoch(sampler, 1) != first  # a new order every epoch


def test_length_grouping_pads_far_less_and_puts_the_longest_first() -> None:
    lengths = np.random.default_rng(1).integers(10, 500, size=2000)
    plain = _epoch(EpochBatchSampler(len(lengths), 16, seed=0), 0)
    grouped = _epoch(LengthGroupedBatchSampler(lengths, 16, seed=0, mega=50), 0)
    assert _padding(grouped, lengths) < 0.1 * _padding(plain, lengths)
    assert int(np.argmax(lengths)) in grouped[0]  # out of memory shows at the first step
    with pytest.raises(ValueError, match="mega"):
        LengthGroupedBatchSampler(lengths, 16, seed=0, mega=0)


def test_a_run_trains_with_length_grouped_batches(tmp_path, monkeypatch) -> None:
    """``train.group_by_length`` reaches the trainer, which then batches by length."""
    from moe_vision.data.benchmark import BenchmarkSizes
    from moe_vision.experiment.run import run_experiment
    from moe_vision.experiment.run_config import DataConfig, RunConfig
    from moe_vision.model.config import ModelConfig
    from moe_vision.training import trainer
    from moe_vision.training.options import TrainOptions

    used: list[EpochBatchSampler] = []

    def spy(*args, **kwargs):
        used.append(batch_sampler(*args, **kwargs))
        return used[-1]

    monkeypatch.setattr(trainer, "batch_sampler", spy)
    sizes = BenchmarkSizes(align=8, instruct=8, val=0, test=6)
    cfg = RunConfig(
        model=ModelConfig(experts=["clip-tiny"]),
        recipe="llava",
        overrides={"*": {"batch_size": 4, "max_steps": 1}},
        data=DataConfig(benchmark_sizes=sizes.to_dict(), benchmark_dir=str(tmp_path / "b")),
        train=TrainOptions(progress_bar=False, log_with=[], group_by_length=True),
        cache_dir=str(tmp_path / "cache"),
    )
    metrics = run_experiment(cfg, tmp_path / "run", resume=False)
    assert metrics["eval_samples"] == 6
    assert used and all(isinstance(s, LengthGroupedBatchSampler) for s in used)
