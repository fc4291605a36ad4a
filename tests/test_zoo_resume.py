"""A killed pretraining run resumes to the same weights and losses, for every objective; a
checkpoint of another run or a damaged one is set aside; the CLI leaves no checkpoint behind."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from test_zoo_objectives import CASES

from moe_vision.zoo import PretrainConfig, core, pretrain
from moe_vision.zoo.resume import checkpoint_path

REAL_MAKE_SCENES = core.make_scenes
STEPS = 6
DIES_AT = 4  # the step whose scenes are never made


class Killed(Exception):
    """Stands for the kill (or Ctrl-C) that ends the first run."""


def _config(objective: str, steps: int = STEPS) -> tuple[str, PretrainConfig]:
    preset, kinds, options = CASES[objective]
    return preset, PretrainConfig(
        steps=steps, batch_size=2, warmup=2, lr=1e-3, kinds=kinds, options=options
    )


def _scenes_recorder(monkeypatch: pytest.MonkeyPatch, dies_at: int | None = None) -> list[int]:
    """Record the steps whose scenes are made; the run is killed at step ``dies_at``."""
    made: list[int] = []

    def scenes(seed: int, step: int, *args, **kwargs):
        if step == dies_at:
            raise Killed(step)
        made.append(step)
        return REAL_MAKE_SCENES(seed, step, *args, **kwargs)

    monkeypatch.setattr(core, "make_scenes", scenes)
    return made


@pytest.mark.parametrize("objective", sorted(CASES))
def test_a_killed_run_resumes_to_the_same_weights(
    objective: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    preset, config = _config(objective)
    whole = pretrain(preset, config, objective, progress=False)
    tmp_path = tmp_path / "out"  # not made yet: the weights' folder, made by the first save

    _scenes_recorder(monkeypatch, dies_at=DIES_AT)
    with pytest.raises(Killed):
        pretrain(preset, config, objective, False, resume_dir=tmp_path, checkpoint_every_s=0)
    assert checkpoint_path(tmp_path, preset).is_file()
    made = _scenes_recorder(monkeypatch)
    resumed = pretrain(preset, config, objective, False, resume_dir=tmp_path, checkpoint_every_s=0)

    assert made == list(range(DIES_AT, STEPS))  # only the steps the killed run had not done
    assert resumed.losses == whole.losses
    theirs = resumed.expert.state_dict()
    for key, value in whole.expert.state_dict().items():
        assert torch.equal(value, theirs[key]), key


def test_a_checkpoint_of_another_run_or_a_damaged_one_is_set_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    preset, config = _config("clip")
    _scenes_recorder(monkeypatch, dies_at=DIES_AT)
    with pytest.raises(Killed):
        pretrain(preset, config, "clip", False, resume_dir=tmp_path, checkpoint_every_s=0)
    ckpt = checkpoint_path(tmp_path, preset)
    other = dataclasses.replace(config, lr=2e-3)
    made = _scenes_recorder(monkeypatch)
    pretrain(preset, other, "clip", False, resume_dir=tmp_path, checkpoint_every_s=0)
    assert made == list(range(STEPS))  # started from step 0
    assert ckpt.with_name(ckpt.name + ".old").is_file()

    ckpt.write_bytes(b"not a checkpoint")
    made.clear()
    pretrain(preset, config, "clip", False, resume_dir=tmp_path, checkpoint_every_s=0)
    assert made == list(range(STEPS))


def test_the_cli_removes_the_checkpoint_once_the_weights_are_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moe_vision.cli import main
    from moe_vision.zoo import resume

    monkeypatch.setattr(resume, "CHECKPOINT_EVERY_S", 0.0)  # a checkpoint after every step

    argv = ["pretrain", "clip-mini", "--steps", "3", "--batch-size", "2", "--out", str(tmp_path)]
    assert main([*argv, "--no-probe", "--quiet"]) == 0
    assert (tmp_path / "clip-mini.safetensors").is_file()
    assert not list(tmp_path.glob("*.resume.pt*"))


def test_saved_weights_are_the_same_bytes_every_time(tmp_path: Path) -> None:
    """safetensors orders metadata keys at random per call; the shipped file must not vary
    (issue 27: identical runs wrote different bytes, so a hash check gave false alarms)."""
    preset, config = _config("clip", steps=1)
    result = pretrain(preset, config, "clip", progress=False)
    blobs = {core.save_pretrained(result, tmp_path / str(i))[0].read_bytes() for i in range(8)}
    assert len(blobs) == 1
    from safetensors.torch import load_file

    loaded = load_file(str(tmp_path / "0" / f"{preset}.safetensors"))
    state = core.library_module(result.expert).state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
