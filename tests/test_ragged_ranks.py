"""Ranks that receive different work cannot hang (issue 31.2).

Two CPU processes (gloo) train the mixture with DDP and with FSDP2 (``accelerate launch``):
rank 0's batches are text-only, rank 1's hold two images per row, cut by a tiled expert into
different numbers of tiles (1x1, 1x2 and 2x2 grids). DDP all-reduces one gradient bucket per
trainable tensor and FSDP2 all-gathers each unit's weights in its forward, so a rank whose
batch skips the experts (no image) would leave the other waiting on a collective for ever.
The model therefore runs its trainable experts, fusion and projector on one blank image when a
training batch has none (:meth:`~moe_vision.model.mllm.MoEVisionModel.forward`), adding zero
to the loss. The process group's timeout is 45 s and the launch's 200 s: a hang fails the test.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import datetime, json, sys
    from pathlib import Path
    import torch
    import torch.distributed as dist
    from PIL import Image
    from experts.base import collate_inputs
    from moe_vision.model.mllm import ModelConfig, MoEVisionModel
    from moe_vision.training.options import TrainOptions, make_accelerator

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=45))
    out = Path(sys.argv[1])
    torch.manual_seed(0)
    tiling = {"max_tiles": 4, "grids": [[1, 1], [1, 2], [2, 2]], "thumbnail": True}
    options = {"convnext-tiny": {"tiling": tiling}}
    model = MoEVisionModel.from_config(
        ModelConfig(experts=["clip-tiny", "convnext-tiny"], expert_options=options))
    for name, p in model.named_parameters():  # CLIP frozen; ConvNeXt, fusion, projector train
        p.requires_grad_(not name.startswith(("experts.0.", "llm.")))
    acc = make_accelerator(TrainOptions(log_with=[], progress_bar=False), out)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    prepared, opt = acc.prepare(model, opt)
    tok, rank = model.tokenizer, acc.process_index
    steps = []
    for step, sizes in enumerate([[(64, 64), (64, 128)], [(128, 128), (64, 128)]]):
        if rank == 0:  # text only
            ids = [tok("a question without an image, and its answer")["input_ids"]] * 2
            images = None
        else:  # two rows, one image each: different tile counts per image and per step
            ids = [tok("<image> what is it? a square")["input_ids"]] * 2
            pics = [Image.new("RGB", (w, h), (40 * i, 90, 160)) for i, (w, h) in enumerate(sizes)]
            images = [collate_inputs([p(img) for img in pics]) for p in model.preprocessors]
        input_ids = torch.tensor(ids)
        loss = prepared(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                        labels=input_ids.clone(), images=images).loss
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
        steps.append(float(loss))
    report = {"losses": steps, "type": str(acc.distributed_type)}
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_text_only_and_tiled_multi_image_ranks_train_without_hanging(tmp_path, kind: str) -> None:
    script = tmp_path / "ragged.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    mode = ["--multi_gpu"] if kind == "ddp" else ["--use_fsdp", "--fsdp_version", "2"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
           str(script), str(tmp_path)]  # fmt: skip
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=200)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{kind}: the two ranks hung (launch killed after {err.timeout} s)")
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    want = "DistributedType.MULTI_CPU" if kind == "ddp" else "DistributedType.FSDP"
    assert [r["type"] for r in reports] == [want, want]
    assert all(len(r["losses"]) == 2 for r in reports)
