"""Two-process data-parallel training on CPU through ``accelerate launch`` (gloo).

``accelerate launch --multi_gpu --num_processes 2`` (torchrun underneath; ``--cpu`` alone starts
one process) with no CUDA device: :func:`moe_vision.train.make_accelerator` then sets up
CPU data parallelism with gloo.

The real launcher starts two processes running the real trainer (LLaVA recipe: projector with
cached frozen experts, then projector + LLM, a mid-unit checkpoint written collectively). Each
process reports the samples it consumed and a fingerprint of its final weights: the processes
must have seen disjoint halves of the data each epoch and ended with identical weights
(gradients all-reduced).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from moe_vision.benchmark import BenchmarkSizes, generate_benchmark

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    from accelerate.utils import set_seed
    from moe_vision.benchmark import BenchmarkPaths
    from moe_vision.cache import FeatureCache, weights_fingerprint
    from moe_vision.model import ModelConfig, MoEVisionModel
    from moe_vision.recipes import get_recipe
    from moe_vision.run import DatasetCache, RunConfig
    from moe_vision.train import Trainer, TrainOptions, make_accelerator

    bench, out = BenchmarkPaths(Path(sys.argv[1])), Path(sys.argv[2])

    class Recording(torch.utils.data.Dataset):
        def __init__(self, ds):
            self.ds, self.seen = ds, []
        def __len__(self):
            return len(self.ds)
        def __getitem__(self, i):
            self.seen.append(self.ds.samples[i].id)
            return self.ds[i]
        @property
        def collate(self):
            return self.ds.collate

    splits = {n: bench.split(n) for n in ("align", "instruct")}
    datasets = DatasetCache(RunConfig(), splits, bench.images)
    recorded = {}
    def factory(data, model):
        recorded.setdefault(data, Recording(datasets(data, model)))
        return recorded[data]

    set_seed(0)
    model = MoEVisionModel.from_config(ModelConfig(experts=["clip-tiny", "convnext-tiny"]))
    recipe = get_recipe("llava").with_overrides({"*": {"batch_size": 4, "lr": 1e-3}})
    opts = TrainOptions(progress_bar=False, log_with=[], checkpoint_every=2)
    acc = make_accelerator(opts, out / "logs")
    trainer = Trainer(model, recipe, factory, out, acc, opts, cache=FeatureCache(out / "f"))
    trainer.fit()
    report = {
        "rank": acc.process_index,
        "world": acc.num_processes,
        "seen": {k: v.seen for k, v in recorded.items()},
        "weights": weights_fingerprint(model),
        "samples_seen": trainer.state.samples_seen,
    }
    (out / f"rank{acc.process_index}.json").write_text(json.dumps(report))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(240)
def test_two_process_data_parallel_training_on_cpu(tmp_path) -> None:
    bench = generate_benchmark(
        tmp_path / "bench", seed=0, sizes=BenchmarkSizes(align=16, instruct=16, val=0, test=0)
    )
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
        str(script), str(bench.root), str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=220)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in reports] == [2, 2]
    assert reports[0]["weights"] == reports[1]["weights"]  # gradients were all-reduced
    for split in ("align", "instruct"):
        a, b = (r["seen"][split] for r in reports)
        assert len(a) == len(b) == 8  # 16 samples, 1 epoch, halves of 2 batches of 4
        assert not set(a) & set(b)
    assert reports[0]["samples_seen"] == 32
    assert (out / "checkpoints").is_dir()
