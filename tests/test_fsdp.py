"""FSDP2 on two CPU processes (gloo) through ``accelerate launch --use_fsdp``, the real trainer.

accelerate 1.16 ignores ``--use_fsdp`` on CPU processes (the state stays ``MULTI_CPU`` and the
model is wrapped in DDP); :mod:`moe_vision.training.distributed` makes it real, so these tests
shard the tiny LLaVA mixture with torch's ``fully_shard`` (DTensor parameters):

* two processes at batch 2 with 2 micro-batches of accumulation train as one process at batch 2
  with 4 (the same micro-batches, :class:`~moe_vision.training.samplers.EpochBatchSampler`): the
  mean of the processes' step losses and the final weights agree within 1e-4 (fp32; the
  reduce-scatter sums in another order). Accumulation goes through ``accelerator.accumulate``,
  which under FSDP2 calls ``set_requires_gradient_sync(False)`` on the micro-batches that do
  not step; a run that stepped every micro-batch, or dropped one, ends elsewhere;
* the experts are FSDP units of their own, beside the root (LLM, fusion, projector): the frozen,
  cached experts are sharded but never gathered while the cache serves them;
* a run killed after a mid-unit (sharded) checkpoint and resumed ends where an uninterrupted
  FSDP run ends;
* a LoRA stage (adapters on the LLM) trains under FSDP2 as it does in one process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moe_vision.data.benchmark import BenchmarkSizes, generate_benchmark

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    import torch
    from accelerate.utils import set_seed
    from safetensors.torch import save_file
    from torch.distributed.fsdp import FSDPModule
    from moe_vision.data.benchmark import BenchmarkPaths
    from moe_vision.model.mllm import ModelConfig, MoEVisionModel
    from moe_vision.features.cache import FeatureCache
    from moe_vision.training.recipe_presets import get_recipe
    from moe_vision.experiment.run_config import DatasetCache, RunConfig
    from moe_vision.training.options import TrainOptions, make_accelerator
    from moe_vision.training.trainer import Trainer

    bench, out = BenchmarkPaths(Path(sys.argv[1])), Path(sys.argv[2])
    args = json.loads(sys.argv[3])
    datasets = DatasetCache(RunConfig(), {n: bench.split(n) for n in ("align", "instruct")},
                            bench.images)
    set_seed(0)
    model = MoEVisionModel.from_config(ModelConfig(experts=["clip-tiny", "convnext-tiny"]))
    overrides = {"*": {"batch_size": 2, "grad_accum": args["accum"], "lr": 1e-3}}
    if args.get("lora"):
        overrides["finetune"] = {"lora": [{"targets": ["llm.*"], "modules": ["q_proj", "v_proj"],
                                           "r": 4, "alpha": 8}]}
    recipe = get_recipe("llava").with_overrides(overrides)
    opts = TrainOptions(progress_bar=False, log_with=[], checkpoint_every=args.get("every", 0))
    acc = make_accelerator(opts, out / "logs")
    losses, units = [], set()

    def hook(e):
        losses.append([e.unit.name, e.optimizer_steps, e.loss])
        units.add(tuple(n for n, m in model.named_modules() if isinstance(m, FSDPModule)))
        if [e.unit.name, e.optimizer_steps] == args.get("kill_at"):
            os._exit(3)  # killed after the mid-unit checkpoint of this step

    trainer = Trainer(model, recipe, lambda d, m: datasets(d, m), out, acc, opts,
                      cache=FeatureCache(out / "f"), hooks=[hook])
    trainer.fit()
    weights = {n: p.detach().contiguous() for n, p in model.named_parameters()}
    if acc.is_main_process:
        save_file(weights, str(out / "final.safetensors"))
    report = {"type": str(acc.distributed_type), "losses": losses, "units": sorted(units),
              "plain": all(type(p) is torch.nn.Parameter for p in model.parameters())}
    (out / f"rank{acc.process_index}.json").write_text(json.dumps(report))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(
    script: Path, bench: Path, out: Path, args: dict, processes: int, ok: bool = True
) -> list[dict]:
    """Run ``script`` on ``processes`` CPU processes (FSDP2 when 2); the processes' reports."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    if processes > 1:
        port = str(_free_port())
        launch += ["--use_fsdp", "--fsdp_version", "2", "--num_processes", str(processes),
                   "--main_process_ip", "127.0.0.1", "--main_process_port", port]  # fmt: skip
    else:
        launch += ["--num_processes", "1"]
    cmd = [*launch, str(script), str(bench), str(out), json.dumps(args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    if not ok:
        assert proc.returncode != 0
        return []
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]


def _step_losses(reports: list[dict]) -> list[float]:
    """Per optimiser step, the mean over processes of their step losses."""
    steps = zip(*(r["losses"] for r in reports))
    return [sum(s[2] for s in step) / len(reports) for step in steps]


def _close(a: Path, b: Path, atol: float) -> float:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst <= atol, worst
    return worst


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("fsdp")
    bench = generate_benchmark(
        root / "bench", seed=0, sizes=BenchmarkSizes(align=16, instruct=16, val=0, test=0)
    )
    script = root / "fsdp_train.py"
    script.write_text(SCRIPT)
    return root, bench.root, script


@pytest.fixture(scope="module")
def fsdp_run(setup: tuple[Path, Path, Path]) -> tuple[Path, list[dict]]:
    """Uninterrupted FSDP2 run: 2 processes, batch 2, accumulation 2."""
    root, bench, script = setup
    reports = _launch(script, bench, root / "fsdp", {"accum": 2}, 2)
    return root / "fsdp", reports


@pytest.mark.timeout(600)
def test_fsdp2_on_two_cpu_processes_trains_as_one_process_with_accumulation(
    setup: tuple[Path, Path, Path], fsdp_run: tuple[Path, list[dict]]
) -> None:
    root, bench, script = setup
    out, reports = fsdp_run
    single = _launch(script, bench, root / "single", {"accum": 4}, 1)
    assert [r["type"] for r in reports] == ["DistributedType.FSDP"] * 2
    # root unit (LLM, fusion, projector) plus one unit per expert, in both stages
    assert reports[0]["units"] == [["", "experts.0", "experts.1"]]
    assert reports[0]["plain"]  # gathered back to ordinary parameters after each unit
    steps = [s[:2] for s in single[0]["losses"]]
    assert steps == [["pretrain", 1], ["pretrain", 2], ["finetune", 1], ["finetune", 2]]
    assert [s[:2] for s in reports[0]["losses"]] == steps
    assert _step_losses(reports) == pytest.approx(_step_losses(single), rel=1e-4)
    _close(out / "final.safetensors", root / "single" / "final.safetensors", atol=1e-4)


@pytest.mark.timeout(600)
def test_fsdp2_run_killed_after_a_sharded_checkpoint_resumes_to_the_same_weights(
    setup: tuple[Path, Path, Path], fsdp_run: tuple[Path, list[dict]]
) -> None:
    root, bench, script = setup
    out = root / "killed"
    args = {"accum": 2, "every": 1, "kill_at": ["finetune", 1]}
    _launch(script, bench, out, args, 2, ok=False)
    mids = [p for p in (out / "checkpoints").iterdir() if (p / "accelerate").is_dir()]
    assert mids, "no mid-unit checkpoint was written before the kill"
    # FSDP's sharded state: a pytorch_model_fsdp_0 folder (torch.distributed.checkpoint)
    saved = [p.name for m in mids for p in (m / "accelerate").iterdir()]
    assert any(name.startswith("pytorch_model_fsdp") for name in saved), saved
    resumed = _launch(script, bench, out, {"accum": 2, "every": 1}, 2)
    assert [s[:2] for s in resumed[0]["losses"]] == [["finetune", 2]]
    _close(out / "final.safetensors", fsdp_run[0] / "final.safetensors", atol=1e-6)


@pytest.mark.timeout(600)
def test_a_lora_stage_trains_under_fsdp2_as_in_one_process(setup: tuple[Path, Path, Path]) -> None:
    root, bench, script = setup
    fsdp = _launch(script, bench, root / "lora2", {"accum": 1, "lora": True}, 2)
    single = _launch(script, bench, root / "lora1", {"accum": 2, "lora": True}, 1)
    weights = load_file(str(root / "lora2" / "final.safetensors"))
    assert any("lora_A" in k for k in weights)
    assert _step_losses(fsdp) == pytest.approx(_step_losses(single), rel=1e-4)
    _close(root / "lora2" / "final.safetensors", root / "lora1" / "final.safetensors", atol=1e-4)
    assert torch.isfinite(torch.tensor(_step_losses(fsdp))).all()
