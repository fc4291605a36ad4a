"""Two-process data-parallel training on CPU through ``accelerate launch`` (gloo).

``accelerate launch --multi_gpu --num_processes 2`` (torchrun underneath; ``--cpu`` alone starts
one process) with no CUDA device: :func:`moe_vision.training.options.make_accelerator` then sets up
CPU data parallelism with gloo.

The real launcher starts two processes running the real trainer, with two recipes:

* LLaVA: projector with cached frozen experts, then projector + LLM, a mid-unit checkpoint
  written collectively;
* Eagle: per-expert pre-alignment, joint and SFT stages that train the experts. CLIP is read at
  its penultimate block, so its last block never reaches the loss; without the trainer's
  unreached-parameter probe DDP fails at the second step ("Expected to have finished reduction
  in the prior iteration ...").

Each process reports the samples it consumed and a fingerprint of its final weights: the
processes must have seen disjoint halves of the data each epoch and ended with identical weights
(gradients all-reduced). In data-parallel runs each stage first reads its first two samples on
every process (the probe), then its half of the data.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from moe_vision.data.benchmark import BenchmarkSizes, generate_benchmark

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    from accelerate.utils import set_seed
    from moe_vision.data.benchmark import BenchmarkPaths
    from moe_vision.features.cache import FeatureCache
    from moe_vision.features.cache_keys import weights_fingerprint
    from moe_vision.model.mllm import ModelConfig, MoEVisionModel
    from moe_vision.training.recipe_presets import get_recipe
    from moe_vision.experiment.run import single_expert_model
    from moe_vision.experiment.run_config import DatasetCache, RunConfig
    from moe_vision.training.options import TrainOptions, make_accelerator
    from moe_vision.training.trainer import Trainer

    bench, out = BenchmarkPaths(Path(sys.argv[1])), Path(sys.argv[2])

    class Recording(torch.utils.data.Dataset):
        def __init__(self, ds, seen):
            self.ds, self.seen = ds, seen
        def __len__(self):
            return len(self.ds)
        def __getitem__(self, i):
            item = self.ds[i]  # records are read (and validated) on access
            self.seen.append(item["id"])
            return item
        @property
        def collate(self):
            return self.ds.collate

    splits = {n: bench.split(n) for n in ("align", "instruct")}
    datasets = DatasetCache(RunConfig(), splits, bench.images)
    seen, recorded = {}, {}
    def factory(data, model):  # per (split, experts): per-expert units preprocess differently
        key = (data, tuple(e.spec.name for e in model.experts))
        if key not in recorded:
            recorded[key] = Recording(datasets(data, model), seen.setdefault(data, []))
        return recorded[key]

    set_seed(0)
    model = MoEVisionModel.from_config(ModelConfig(experts=["clip-tiny", "convnext-tiny"]))
    clip_last = model.experts[0].model.encoder.layers[-1]  # after CLIP's readout block
    before = [p.detach().clone() for p in clip_last.parameters()]
    recipe = get_recipe(sys.argv[3]).with_overrides({"*": {"batch_size": 4, "lr": 1e-3}})
    opts = TrainOptions(progress_bar=False, log_with=[], checkpoint_every=2)
    acc = make_accelerator(opts, out / "logs")
    trainer = Trainer(
        model, recipe, factory, out, acc, opts,
        unit_model=single_expert_model, cache=FeatureCache(out / "f"),
    )
    trainer.fit()
    unchanged = all(torch.equal(a, p) for a, p in zip(before, clip_last.parameters()))
    report = {
        "rank": acc.process_index,
        "world": acc.num_processes,
        "seen": seen,
        "weights": weights_fingerprint(model),
        "samples_seen": trainer.state.samples_seen,
        "clip_last_block_unchanged": unchanged,
    }
    (out / f"rank{acc.process_index}.json").write_text(json.dumps(report))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# recipe -> (stage data of each unit in order, samples seen in total by both processes)
RECIPES = {
    "llava": (["align", "instruct"], 32),
    "eagle": (["align", "align", "align", "instruct"], 64),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_two_process_data_parallel_training_on_cpu(tmp_path, recipe: str) -> None:
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
        str(script), str(bench.root), str(out), recipe,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in reports] == [2, 2]
    assert reports[0]["weights"] == reports[1]["weights"]  # gradients were all-reduced
    units, total = RECIPES[recipe]
    first_two = [r["id"] for r in json.loads(bench.split("align").read_text())[:2]]
    for split in ("align", "instruct"):
        reads = [r["seen"][split] for r in reports]
        n_units = units.count(split)
        for rank_reads in reads:  # per unit: the probe's two reads, then this process's half
            assert len(rank_reads) == n_units * (2 + 8)
        for u in range(n_units):
            a, b = (r[u * 10 : (u + 1) * 10] for r in reads)
            if split == "align":
                assert a[:2] == b[:2] == first_two
            assert len(a[2:]) == len(b[2:]) == 8  # 16 samples, 1 epoch, halves of 2 batches
            assert not set(a[2:]) & set(b[2:])
    assert reports[0]["samples_seen"] == total
    assert (out / "checkpoints").is_dir()
    # CLIP's last block never reaches the loss: frozen by the probe, untouched by training.
    assert reports[0]["clip_last_block_unchanged"]
