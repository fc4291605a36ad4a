"""The GPU path: tests marked ``gpu``, skipped without CUDA (``pytest -m gpu`` on a GPU node).

* xformers' memory-efficient attention against PyTorch SDPA and a float64 reference (forward and
  backward, fully masked rows included), through :func:`fusion.attention.attention`;
* one bf16-autocast training step for every registered fusion strategy (finite loss, gradients
  on every trainable parameter that the loss reaches);
* FSDP through ``accelerate launch`` in one process: the real trainer, a tiny run to the end;
* gradient checkpointing gives the same loss and gradients as plain backward;
* the real-size forward of every real expert preset (random init, bf16) has the spec's shape.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import experts
import fusion
from fusion import FusionConfigError

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

REAL = [n for n in experts.list_experts() if not n.endswith(("-tiny", "-mini"))]
TINY_PAIRS = [
    ("clip-tiny", "convnext-tiny"),
    ("clip-tiny", "sam-tiny"),
    ("siglip-tiny", "convnext-tiny"),
    ("clip-tiny",),
]


def _reference(q, k, v, mask):  # noqa: ANN001, ANN202 - float64 softmax attention, rows of no key: 0
    scores = (q.double() @ k.double().transpose(-1, -2)) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, -1).nan_to_num(0.0)
    return weights @ v.double()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_xformers_matches_sdpa_and_a_reference_with_masked_rows(dtype) -> None:
    pytest.importorskip("xformers.ops")
    from fusion.attention import attention

    torch.manual_seed(0)
    b, h, nq, nk, d = 2, 4, 37, 53, 64
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=dtype) for n in (nq, nk, nk))
    mask = torch.rand(b, 1, nq, nk, device="cuda") > 0.4
    mask[0, :, 3] = False  # fully masked rows: zeros, not NaN
    mask[1, :, -1] = False
    out, grads = {}, {}
    for backend in ("xformers", "sdpa"):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        o = attention(*leaves, mask=mask, backend=backend)
        o.float().pow(2).sum().backward()
        out[backend], grads[backend] = o.detach(), [t.grad for t in leaves]
    ref = _reference(q, k, v, mask.expand(b, h, nq, nk))
    tol = {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(out["xformers"].double(), ref, **tol)
    torch.testing.assert_close(out["xformers"], out["sdpa"], **tol)
    assert out["xformers"][0, :, 3].abs().max() == 0 and out["xformers"][1, :, -1].abs().max() == 0
    for gx, gs in zip(grads["xformers"], grads["sdpa"]):
        assert torch.isfinite(gx).all()
        torch.testing.assert_close(gx, gs, **tol)


def _tiny_model(fusion_name: str):  # noqa: ANN202 - the first tiny pair the strategy accepts
    from moe_vision.model.mllm import MoEVisionModel

    for pair in TINY_PAIRS:
        try:
            torch.manual_seed(0)
            return MoEVisionModel.from_config({"experts": list(pair), "fusion": fusion_name})
        except FusionConfigError:
            continue
    pytest.skip(f"no tiny pair of {TINY_PAIRS} is accepted by {fusion_name}")


def _batch(model, tmp_path: Path, n: int = 2) -> dict:  # noqa: ANN001
    from moe_vision.bench.batches import benchmark_batch, to_device

    return to_device(benchmark_batch(model, n, tmp_path), torch.device("cuda"))


def _loss(model, batch) -> torch.Tensor:  # noqa: ANN001
    return model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        labels=batch["labels"],
        images=batch["images"],
    ).loss


@pytest.mark.parametrize("fusion_name", fusion.list_fusions())
def test_bf16_training_step_for_every_fusion(fusion_name: str, tmp_path: Path) -> None:
    model = _tiny_model(fusion_name).cuda().train()
    batch = _batch(model, tmp_path)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = _loss(model, batch)
    loss.backward()
    assert torch.isfinite(loss)
    fused = [p for p in model.fusion.parameters() if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fused)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projector.parameters())
    before = [p.detach().clone() for p in model.projector.parameters()]
    optimizer.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.projector.parameters()))


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tmp_path: Path) -> None:
    model = _tiny_model("channel_concat").cuda().train()
    batch = _batch(model, tmp_path)
    for module in model.modules():  # no dropout: both passes must compute the same thing
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    plain = _loss(model, batch)
    plain.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.gradient_checkpointing_enable()
    assert model.llm.is_gradient_checkpointing
    again = _loss(model, batch)
    again.backward()
    torch.testing.assert_close(again, plain)
    for name, grad in ref.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, msg=name)


def test_fsdp_through_accelerate_in_one_process(tmp_path: Path) -> None:
    config = {
        "model": {"experts": ["clip-tiny", "convnext-tiny"], "fusion": "channel_concat"},
        "recipe": "llava",
        "overrides": {"*": {"batch_size": 4, "max_steps": 2, "lr": 1e-3}},
        "data": {
            "benchmark_sizes": {"align": 8, "instruct": 8, "val": 0, "test": 6},
            "benchmark_dir": str(tmp_path / "bench"),
        },
        "train": {"progress_bar": False, "log_with": [], "mixed_precision": "bf16"},
        "cache_dir": str(tmp_path / "cache"),
    }
    (tmp_path / "run.json").write_text(json.dumps(config))
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
        "--use_fsdp", "--fsdp_use_orig_params", "true", "--mixed_precision", "bf16",
        "-m", "moe_vision.cli", "train", "--config", str(tmp_path / "run.json"),
        "--out", str(tmp_path / "run"),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0 <= metrics["accuracy/overall"] <= 1
    assert (tmp_path / "run" / "model").is_dir()


@pytest.mark.parametrize("name", REAL)
def test_real_preset_forward_at_real_size(name: str) -> None:
    from PIL import Image

    torch.manual_seed(0)
    expert = experts.create_expert(name, device="cuda").eval()
    spec = expert.spec
    image = Image.new("RGB", (640, 480), (120, 30, 200))
    inputs = {k: v.cuda() for k, v in expert.preprocess([image]).items()}
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        fmap = expert(inputs)
    assert fmap.features.shape == (1, spec.channels, *spec.grid), name
    assert torch.isfinite(fmap.features.float()).all(), name
