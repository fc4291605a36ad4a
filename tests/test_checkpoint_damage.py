"""A damaged newest checkpoint: resume falls back to the one before it and ends bitwise equal.

A LLaVA run (2 steps per stage, a checkpoint every step, 3 kept) is killed at global step 3,
right after ``ckpt-000002`` (a ``mid`` checkpoint of the fine-tuning stage, based on the
``unit_end`` checkpoint ``ckpt-000001``) was written. Its newest checkpoint is then damaged in
each way seen in practice; resume must skip it (logging why, naming the file), move it aside
to ``ckpt-000002.damaged-0``, write its own next checkpoints without colliding, and end with
bitwise the weights of an uninterrupted run. The RNG case is a hostile pickle: it is refused by
``weights_only=True`` loading and its payload never runs.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moe_vision.data.benchmark import BenchmarkSizes
from moe_vision.experiment.run import run_experiment
from moe_vision.experiment.run_config import DataConfig, RunConfig
from moe_vision.model.config import ModelConfig
from moe_vision.training import checkpoint as ckpt
from moe_vision.training.options import TrainOptions
from moe_vision.training.resume import load_weights
from moe_vision.training.units import StepEvent


class Killed(RuntimeError):
    pass


class Payload:
    """Unpickling this with full pickle runs code that writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def _config(root: Path) -> RunConfig:
    sizes = BenchmarkSizes(align=8, instruct=8, val=4, test=4)
    return RunConfig(
        model=ModelConfig(experts=["clip-tiny"]),
        recipe="llava",
        overrides={"*": {"batch_size": 2, "max_steps": 2, "lr": 5e-3}},
        data=DataConfig(benchmark_sizes=sizes.to_dict(), benchmark_dir=str(root / "bench")),
        train=TrainOptions(progress_bar=False, log_with=[], checkpoint_every=1, keep_checkpoints=3),
        cache_dir=str(root / "cache"),
    )


def _kill_at(step: int):
    def hook(event: StepEvent) -> None:
        if event.global_step == step:
            raise Killed(f"killed after global step {step}")

    return hook


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path, dict]:
    """(uninterrupted run, killed run template, the uninterrupted run's metrics)."""
    root = tmp_path_factory.mktemp("damage")
    cfg = _config(root)
    metrics = run_experiment(cfg, root / "ref", resume=False)
    with pytest.raises(Killed):
        run_experiment(cfg, root / "killed", resume=False, hooks=[_kill_at(3)])
    names = sorted(p.name for p in (root / "killed" / "checkpoints").iterdir())
    assert names == ["ckpt-000000", "ckpt-000001", "ckpt-000002"]
    state = ckpt.TrainerState.load(root / "killed" / "checkpoints" / "ckpt-000002")
    assert (state.kind, state.unit_name, state.base) == ("mid", "finetune", "ckpt-000001")
    return root / "ref", root / "killed", metrics


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _zero_64k(path: Path) -> None:
    """Overwrite 64 KiB in the middle of ``path`` with zeros (size and structure unchanged)."""
    data = bytearray(path.read_bytes())
    start = len(data) // 2
    data[start : start + 65536] = bytes(65536)
    path.write_bytes(bytes(data))


def _damage(kind: str, newest: Path, marker: Path) -> Path:
    """Damage ``newest`` in one way; the file the skip message must name."""
    acc = newest / "accelerate"
    if kind == "truncated weights":
        bad = acc / "model.safetensors"
        _truncate(bad)
    elif kind in ("missing optimizer", "missing scheduler"):
        bad = acc / f"{kind.split()[1]}.bin"
        bad.unlink()
    elif kind in ("zeroed weights", "zeroed optimizer"):
        bad = acc / ("model.safetensors" if "weights" in kind else "optimizer.bin")
        _zero_64k(bad)
    elif kind == "trainer_state out of range":
        bad = newest / "trainer_state.json"
        state = json.loads(bad.read_text())
        state.update(epoch=-3, batches_done=1e9)
        bad.write_text(json.dumps(state))
    elif kind == "empty trainer_state":
        bad = newest / "trainer_state.json"
        bad.write_text("")
    elif kind == "deleted trainer_state":
        bad = newest / "trainer_state.json"
        bad.unlink()
    else:  # "hostile RNG pickle"
        bad = newest / "accelerate" / "random_states_0.pkl"
        torch.save({"step": 0, "random_state": Payload(marker)}, bad)
    return bad


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "kind",
    [
        "truncated weights",
        "empty trainer_state",
        "deleted trainer_state",
        "hostile RNG pickle",
        # These passed validation before checksums (issue 27, item 13): the first two crashed
        # every resume, the others resumed with exit 0 and ended with other weights.
        "missing optimizer",
        "missing scheduler",
        "zeroed weights",
        "zeroed optimizer",
        "trainer_state out of range",
    ],
)
def test_resume_skips_a_damaged_newest_checkpoint(runs, tmp_path, caplog, kind) -> None:
    ref, template, ref_metrics = runs
    out = tmp_path / "run"
    shutil.copytree(template, out)
    marker = tmp_path / "payload-ran"
    bad = _damage(kind, out / "checkpoints" / "ckpt-000002", marker)

    caplog.set_level(logging.INFO)
    metrics = run_experiment(_config(template.parent), out, resume=True)

    skipped = [r.getMessage() for r in caplog.records if "skipping damaged" in r.getMessage()]
    assert len(skipped) == 1 and str(bad) in skipped[0], skipped
    assert any("resuming from" in m and "ckpt-000001" in m for m in caplog.messages)
    assert not marker.exists(), "the pickle's payload ran"
    assert (out / "checkpoints" / "ckpt-000002.damaged-0").is_dir()
    # The fine-tuning stage was redone from ckpt-000001 under new names (no collision).
    assert ckpt.TrainerState.load(out / "checkpoints" / "ckpt-000004").kind == "unit_end"
    # accelerate's lines naming files it never wrote do not reach the log.
    assert not any("pytorch_model.bin" in m or "sampler.bin" in m for m in caplog.messages)

    a = load_file(str(ref / "model" / "model.safetensors"))
    b = load_file(str(out / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert metrics["accuracy/overall"] == ref_metrics["accuracy/overall"]


def test_a_damaged_base_makes_its_mid_checkpoint_unusable(runs, tmp_path, caplog) -> None:
    _, template, _ = runs
    root = tmp_path / "checkpoints"
    shutil.copytree(template / "checkpoints", root)
    _truncate(root / "ckpt-000001" / "model.safetensors")
    (root / "ckpt-000000" / "accelerate" / "random_states_0.pkl").write_bytes(b"not a pickle")
    caplog.set_level(logging.WARNING)
    assert ckpt.find_resumable(root) is None  # nothing usable: training starts over
    assert sorted(p.name for p in root.iterdir()) == [
        "ckpt-000000.damaged-0",
        "ckpt-000001.damaged-0",
        "ckpt-000002.damaged-0",
    ]
    text = "\n".join(caplog.messages)
    assert "ckpt-000001/model.safetensors" in text and "random_states_0.pkl" in text
    assert ckpt.next_checkpoint_dir(root)[0].name == "ckpt-000003"


def test_every_checkpoint_has_a_manifest_of_its_files(runs) -> None:
    """manifest.json lists every other file of the checkpoint with its size and sha256."""
    import hashlib

    _, template, _ = runs
    for folder in sorted((template / "checkpoints").iterdir()):
        files = json.loads((folder / ckpt.MANIFEST_FILE).read_text())["files"]
        on_disk = sorted(
            p.relative_to(folder).as_posix()
            for p in folder.rglob("*")
            if p.is_file() and p.name != ckpt.MANIFEST_FILE
        )
        assert sorted(files) == on_disk and ckpt.STATE_FILE in files
        for rel, entry in files.items():
            data = (folder / rel).read_bytes()
            assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_a_stray_file_or_a_missing_manifest_is_damage(runs, tmp_path) -> None:
    _, template, _ = runs
    folder = tmp_path / "ckpt-000002"
    shutil.copytree(template / "checkpoints" / "ckpt-000002", folder)
    ckpt.validate(folder)
    (folder / "accelerate" / "extra.bin").write_bytes(b"x")
    with pytest.raises(ckpt.CheckpointError, match=r"extra.bin: not listed in manifest.json"):
        ckpt.validate(folder)
    (folder / "accelerate" / "extra.bin").unlink()
    (folder / ckpt.MANIFEST_FILE).unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"manifest.json: missing"):
        ckpt.validate(folder)


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"epoch": -3}, "epoch=-3"),
        ({"batches_done": 1e9}, "batches_done=1000000000.0"),
        ({"global_step": True}, "global_step=True"),
        ({"train_time_s": float("nan")}, "train_time_s=nan"),
        ({"base": "../../etc"}, "base='../../etc'"),
    ],
)
def test_trainer_state_numbers_are_range_checked(runs, tmp_path, change, expected) -> None:
    _, template, _ = runs
    folder = tmp_path / "ckpt-000002"
    shutil.copytree(template / "checkpoints" / "ckpt-000002", folder)
    state = json.loads((folder / ckpt.STATE_FILE).read_text())
    state.update(change)
    (folder / ckpt.STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(ckpt.CheckpointError, match=r"trainer_state.json: out of range: .*"):
        ckpt.TrainerState.load(folder)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.TrainerState.load(folder)
    assert expected in str(err.value)


def test_a_checkpoint_that_does_not_fit_the_recipe_is_refused(runs, tmp_path) -> None:
    """Checksums pass (the manifest rewritten), but the state names an epoch the unit does
    not have: the trainer's check refuses it and find_resumable falls back to its base."""
    from moe_vision.training.recipe_presets import get_recipe
    from moe_vision.training.resume import check_fits_units
    from moe_vision.training.units import expand_units

    _, template, _ = runs
    root = tmp_path / "checkpoints"
    shutil.copytree(template / "checkpoints", root)
    newest = root / "ckpt-000002"
    state = json.loads((newest / ckpt.STATE_FILE).read_text())
    state["epoch"] = 7
    (newest / ckpt.STATE_FILE).write_text(json.dumps(state))
    ckpt.write_manifest(newest)
    units = expand_units(get_recipe("llava"), 1)
    found = ckpt.find_resumable(root, 1, functools.partial(check_fits_units, units))
    assert found is not None and found[0].name == "ckpt-000001"
    assert (root / "ckpt-000002.damaged-0").is_dir()
    bad = ckpt.TrainerState.load(root / "ckpt-000002.damaged-0")
    with pytest.raises(ckpt.CheckpointError, match="epoch 7 out of range"):
        check_fits_units(units, bad, Path("trainer_state.json"))


def test_checkpoint_errors_name_the_file(runs, tmp_path) -> None:
    _, template, _ = runs
    folder = tmp_path / "ckpt-000001"
    shutil.copytree(template / "checkpoints" / "ckpt-000001", folder)
    (folder / "trainer_state.json").write_text("{")
    with pytest.raises(ckpt.CheckpointError, match="trainer_state.json: not readable as JSON"):
        ckpt.TrainerState.load(folder)
    _truncate(folder / "model.safetensors")
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ckpt.CheckpointError, match=r"ckpt-000001/model.safetensors: not a read"):
        load_weights(model, folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"model.safetensors: missing"):
        load_weights(model, folder)


def test_an_rng_state_that_did_not_load_is_an_error(runs) -> None:
    """accelerate's load_state swallows RNG errors; check_rng_restored does not."""
    _, template, _ = runs
    state_dir = template / "checkpoints" / "ckpt-000002" / "accelerate"
    saved = ckpt.load_pickled_state(state_dir / "random_states_0.pkl")
    before = torch.get_rng_state()
    try:
        torch.set_rng_state(saved["torch_manual_seed"])
        ckpt.check_rng_restored(state_dir, 0)
        torch.manual_seed(1234)
        with pytest.raises(ckpt.CheckpointError, match="random_states_0.pkl: the RNG state was"):
            ckpt.check_rng_restored(state_dir, 0)
    finally:
        torch.set_rng_state(before)


def test_accelerate_refuses_a_hostile_rng_pickle(tmp_path) -> None:
    """The installed accelerate reads RNG states as its load_state does: weights_only=True."""
    from accelerate.utils import load

    marker = tmp_path / "payload-ran"
    path = tmp_path / "random_states_0.pkl"
    torch.save({"step": 0, "random_state": Payload(marker)}, path)
    with pytest.raises(Exception, match="Weights only load failed"):
        load(path)  # accelerate's checkpointing passes no weights_only: its default is True
    assert not marker.exists()


def test_from_pretrained_unpickles_nothing(runs, monkeypatch) -> None:
    """A shared run folder's model/ loads without any pickle; checkpoints/ is never read."""
    import pickle

    from moe_vision.model.mllm import MoEVisionModel

    ref, _, _ = runs

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    model = MoEVisionModel.from_pretrained(ref / "model")
    saved = load_file(str(ref / "model" / "model.safetensors"))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
