"""Sweep spec expansion, stable cell ids, the resumable runner, failures, kill + restart.

The runner is exercised with :func:`fake_cell`, an injected entrypoint with the real
signature ``(config, cell_dir) -> metrics`` that records each call, so these tests check the
sweep machinery itself in seconds; ``tests/test_cli_sweep.py`` runs real cells.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import experts
from moe_vision import results
from moe_vision.io import read_json
from moe_vision.sweeps.cells import Cell, config_hash, weights_identity
from moe_vision.sweeps.executors import InlineExecutor, ProcessExecutor, SubmititExecutor
from moe_vision.sweeps.grid_axes import ExpertCombos
from moe_vision.sweeps.spec import SweepSpec
from moe_vision.sweeps.sweep import execute_cell, run_sweep

TESTS_DIR = Path(__file__).parent
ENTRY = "test_sweep:fake_cell"  # workers import this module: keep its imports light


@pytest.fixture(scope="module")
def names() -> tuple[str, str, str]:
    """Three registered expert names (the fake entrypoint never builds them)."""
    import experts

    found = list(dict.fromkeys(experts.list_experts("*-tiny") + experts.list_experts()))
    assert len(found) >= 3, f"need 3 registered experts, found {found}"
    return found[0], found[1], found[2]


def fake_cell(config: dict, cell_dir: Path) -> dict:
    """Injected entrypoint: logs the call, can block or fail, returns a deterministic row."""
    with open(config["log"], "a") as f:
        f.write(f"{cell_dir.name}\n")
    fusion = config["model"]["fusion"]
    if fusion == os.environ.get("FAKE_CELL_BLOCK"):
        time.sleep(600)
    if fusion == os.environ.get("FAKE_CELL_FAIL"):
        raise RuntimeError(f"injected failure for {fusion}")
    if fusion == os.environ.get("FAKE_CELL_DIE"):
        os._exit(3)
    n = len(config["model"]["experts"])
    acc = 0.2 * n + (0.1 if fusion == "channel_concat" else 0.0) + 0.01 * config["seed"]
    return {
        "accuracy/color": acc,
        "accuracy/ocr": acc / 2,
        "accuracy/overall": 0.75 * acc,
        "params_total": 1000 * n,
        "params_trainable": 10 * n,
        "visual_tokens": 16 * n,
        "train_time_s": 0.01,
        "throughput_samples_s": 1.0,
        "peak_memory_mb": 1.0,
    }


def _spec(tmp_path: Path, names: tuple[str, str, str]) -> SweepSpec:
    A, B, _ = names
    return SweepSpec.from_dict(
        {
            "name": "t",
            "experts": {"combinations": [[A], [A, B]]},
            "fusions": ["channel_concat", "sequence_append"],
            "recipes": ["llava"],
            "seeds": [0],
            "run": {"log": str(tmp_path / "calls.log")},
            "entrypoint": ENTRY,
        }
    )


def _calls(tmp_path: Path) -> list[str]:
    path = tmp_path / "calls.log"
    return path.read_text().split() if path.exists() else []


# ---------------------------------------------------------------------------- spec
def test_expert_combos_pool_k_base(names: tuple[str, str, str]) -> None:
    A, B, C = names
    combos = ExpertCombos(pool=[A, B, C], k=[2], base=A).expand()
    assert combos == [(A, B), (A, C)] if C != B else [(A, B)]
    combos = ExpertCombos(combinations=[[B], [A, B]], pool=[A, B], base=A).expand()
    assert combos == [(A, B), (A,)]  # base first; [A, B] deduplicated; sizes 1..2
    assert ExpertCombos(pool=[A, B], k=[1, 2]).expand() == [(A,), (B,), (A, B)]
    with pytest.raises(ValueError, match=r"experts.k=4 is impossible"):
        ExpertCombos(pool=[A, B], k=[4]).expand()
    with pytest.raises(ValueError, match="repeats an expert"):
        ExpertCombos(combinations=[[A, A]]).expand()
    with pytest.raises(ValueError, match="no expert combinations"):
        ExpertCombos().expand()


def test_spec_yaml_round_trip_and_expansion(tmp_path: Path, names: tuple[str, str, str]) -> None:
    A, B, C = names
    text = f"""
name: demo
experts: {{base: {A}, pool: [{B}], k: [1, 2]}}
fusions:
  - channel_concat
  - {{name: sequence_append, options: {{dim: 32}}, label: seq32}}
recipe: llava
seeds: [0, 1]
model: {{llm: tiny-qwen2, fusion_options: {{align: bilinear}}}}
executor: process
"""
    path = tmp_path / "s.yaml"
    path.write_text(text)
    spec = SweepSpec.from_yaml(path)
    assert spec.executor == {"kind": "process"} and spec.recipes == ["llava"]
    cells = spec.expand()
    assert len(cells) == 2 * 2 * 1 * 2
    assert [c.experts for c in cells[:4]] == [(A,)] * 4
    seq = [c for c in cells if c.fusion == "seq32"][0]
    assert seq.config["model"]["fusion"] == "sequence_append"
    assert seq.config["model"]["fusion_options"] == {"align": "bilinear", "dim": 32}
    assert seq.config["model"]["llm"] == "tiny-qwen2" and seq.recipe == "llava"
    # resolved through RunConfig: the recipe expanded, defaults filled in
    assert seq.config["recipe"]["name"] == "llava" and "stages" in seq.config["recipe"]
    assert seq.config["model"]["projector"] == "mlp2x_gelu" and "train" in seq.config
    assert seq.name == f"{A}__seq32__llava__s{seq.seed}"
    # round trip, stable ids
    again = SweepSpec.from_dict(yaml.safe_load(spec.to_yaml()))
    assert again == spec
    assert [c.cell_id for c in again.expand()] == [c.cell_id for c in cells]
    assert len({c.cell_id for c in cells}) == len(cells)


def test_cell_id_is_a_hash_of_the_resolved_config(names: tuple[str, str, str]) -> None:
    A, B, C = names
    cfg = {"model": {"experts": [A], "fusion": "channel_concat"}, "seed": 0}
    cell = Cell((A,), "channel_concat", {}, "llava", 0, cfg)
    assert cell.cell_id.startswith(f"{A}__channel_concat__llava__s0-")
    assert cell.cell_id.endswith(config_hash(cfg)[:10])
    # key order does not matter, a value does, a runtime location does not
    reordered = {"seed": 0, "model": {"fusion": "channel_concat", "experts": [A]}}
    assert config_hash(reordered) == config_hash(cfg)
    assert config_hash({**cfg, "seed": 1}) != config_hash(cfg)
    assert config_hash({**cfg, "cache_dir": "/elsewhere"}) == config_hash(cfg)
    quiet = {**cfg, "train": {"progress_bar": False, "lr": 1}}
    assert config_hash(quiet) == config_hash({**cfg, "train": {"lr": 1}})
    assert config_hash(quiet) != config_hash({**cfg, "train": {"lr": 2}})
    # an option added later leaves finished cells' ids alone at its default, not when set
    eager = {**cfg, "train": {"lr": 1, "compile_llm": False}}
    assert config_hash(eager) == config_hash({**cfg, "train": {"lr": 1}})
    assert config_hash({**cfg, "train": {"lr": 1, "compile_llm": True}}) != config_hash(eager)


def test_new_local_weights_are_a_new_cell(tmp_path: Path) -> None:
    """Same config, regenerated checkpoint: a different cell id (no stale finished cell)."""
    ckpt = tmp_path / "clip.safetensors"
    ckpt.write_bytes(b"weights one")
    options = {"clip-tiny": {"checkpoint": str(ckpt)}}
    cfg = {"model": {"experts": ["clip-tiny"], "expert_options": options}, "seed": 0}
    first = config_hash(cfg)
    assert config_hash(cfg) == first
    ckpt.write_bytes(b"weights two")
    assert config_hash(cfg) != first
    shipped = {"model": {"experts": ["clip-mini"], "expert_options": {}}, "seed": 0}
    with_weights = {"clip-mini": {"pretrained": True}}
    weighted = {"model": {**shipped["model"], "expert_options": with_weights}, "seed": 0}
    assert "clip-mini" in weights_identity(weighted)
    assert weights_identity(shipped) == {}  # random init: the config alone is the identity


def test_spec_bad_input_errors(tmp_path: Path, names: tuple[str, str, str]) -> None:
    A, B, C = names
    base = {"experts": [[A]], "fusions": ["channel_concat"]}
    with pytest.raises(ValueError, match=r"unknown keys \['fusoins'\]"):
        SweepSpec.from_dict({**base, "fusoins": []})
    with pytest.raises(KeyError, match="unknown experts.*valid experts are"):
        SweepSpec.from_dict({**base, "experts": [["no-such-expert"]]}).expand()
    with pytest.raises(KeyError, match="unknown fusions.*valid fusions are"):
        SweepSpec.from_dict({**base, "fusions": ["concat"]}).expand()
    with pytest.raises(KeyError, match="unknown recipe"):
        SweepSpec.from_dict({**base, "recipes": ["nope"]}).expand()
    with pytest.raises(ValueError, match="labels .* repeat"):
        SweepSpec.from_dict({**base, "fusions": ["channel_concat", "channel_concat"]}).expand()
    with pytest.raises(ValueError, match="model.experts is set per cell"):
        SweepSpec.from_dict({**base, "model": {"experts": [A]}})
    with pytest.raises(ValueError, match="has no 'name'"):
        SweepSpec.from_dict({**base, "fusions": [{"options": {}}]})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SweepSpec.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match=r"expert_options names unknown experts \['nope'\]"):
        SweepSpec.from_dict({**base, "model": {"expert_options": {"nope": {}}}}).expand()
    # options for a known expert the grid does not use: the default spec narrowed by --experts
    unused = {**base, "model": {"expert_options": {"sam-mini": {"pretrained": True}}}}
    assert SweepSpec.from_dict(unused).expand()
    spec = SweepSpec.from_dict(base).with_overrides({"model.llm": "tiny-llama", "seeds": [3]})
    assert spec.model == {"llm": "tiny-llama"} and spec.seeds == [3]


# ---------------------------------------------------------------------------- runner
def test_sweep_runs_records_failures_and_resumes(
    tmp_path: Path, names: tuple[str, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_CELL_FAIL", "sequence_append")
    spec = _spec(tmp_path, names)
    out = tmp_path / "sweep"
    df = run_sweep(spec, out, progress=False)
    assert len(df) == 4 and len(_calls(tmp_path)) == 4
    ok, failed = df[df.status == "ok"], df[df.status == "failed"]
    assert list(ok.fusion) == ["channel_concat"] * 2
    assert len(failed) == 2
    assert all(e == "RuntimeError: injected failure for sequence_append" for e in failed.error)
    err = read_json(out / "cells" / failed.cell_id.iloc[0] / results.ERROR_FILE)
    assert "Traceback" in err["traceback"] and "fake_cell" in err["traceback"]
    assert ok["accuracy/overall"].tolist() == pytest.approx([0.225, 0.375])
    assert (out / results.TABLE_CSV).exists() and (out / results.TABLE_PARQUET).exists()
    cfg = read_json(out / "cells" / ok.cell_id.iloc[0] / results.CELL_FILE)["config"]
    assert cfg == spec.expand()[0].config  # the cell folder holds its run config

    # resume without retrying: nothing runs again, the same rows
    again = run_sweep(spec, out, retry_failed=False, progress=False)
    assert len(_calls(tmp_path)) == 4
    assert list(again.cell_id) == list(df.cell_id)
    # the cause fixed: only the failed cells run again, and their rows turn ok
    monkeypatch.delenv("FAKE_CELL_FAIL")
    again = run_sweep(spec, out, progress=False)  # retry_failed=True
    assert len(_calls(tmp_path)) == 6
    assert sorted(_calls(tmp_path)[4:]) == sorted(failed.cell_id)
    assert list(again.cell_id) == list(df.cell_id) and (again.status == "ok").all()
    assert not (out / "cells" / failed.cell_id.iloc[0] / results.ERROR_FILE).exists()


def test_rows_exactly_once_after_kill_and_restart(
    tmp_path: Path, names: tuple[str, str, str]
) -> None:
    spec = _spec(tmp_path, names)
    out = tmp_path / "sweep"
    spec_path = tmp_path / "spec.yaml"
    spec.to_yaml(spec_path)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
        "FAKE_CELL_BLOCK": "sequence_append",  # the 2nd cell hangs until killed
    }
    code = (
        "import sys; from moe_vision.sweeps.sweep import SweepSpec, run_sweep; "
        "run_sweep(SweepSpec.from_yaml(sys.argv[1]), sys.argv[2], progress=False)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(spec_path), str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while len(_calls(tmp_path)) < 2:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the sweep did not reach its 2nd cell"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first, killed = _calls(tmp_path)
    partial = results.load(out)
    assert list(partial.cell_id) == [first]  # the killed cell has no row yet
    assert (out / "cells" / killed / results.CELL_FILE).exists()

    df = run_sweep(spec, out, progress=False)  # restart in this process (no blocking)
    calls = _calls(tmp_path)
    assert calls.count(first) == 1 and calls.count(killed) == 2
    assert len(df) == 4 and df.cell_id.is_unique and (df.status == "ok").all()
    assert sorted(df.cell_id) == sorted(c.cell_id for c in spec.expand())
    assert len(results.load(out / results.TABLE_CSV)) == 4


def test_sweep_lock_refuses_a_second_runner(tmp_path: Path, names: tuple[str, str, str]) -> None:
    from moe_vision.sweeps.sweep import file_lock

    out = tmp_path / "sweep"
    with file_lock(out / ".sweep.lock"):
        code = (
            "import sys; from moe_vision.sweeps.sweep import SweepSpec, run_sweep; "
            "run_sweep(SweepSpec.from_yaml(sys.argv[1]), sys.argv[2], progress=False)"
        )
        spec_path = tmp_path / "spec.yaml"
        _spec(tmp_path, names).to_yaml(spec_path)
        proc = subprocess.run(
            [sys.executable, "-c", code, str(spec_path), str(out)],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(TESTS_DIR)},
        )
    assert proc.returncode != 0 and "another sweep is already running" in proc.stderr
    assert _calls(tmp_path) == []


def test_process_executor_sweep_records_a_dead_worker(
    tmp_path: Path, names: tuple[str, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_CELL_DIE", "sequence_append")
    monkeypatch.setenv("PYTHONPATH", str(TESTS_DIR))
    spec = _spec(tmp_path, names)
    out = tmp_path / "sweep"
    df = run_sweep(spec, out, executor=ProcessExecutor(workers=2, threads=1), progress=False)
    assert len(df) == 4 and df.cell_id.is_unique
    assert (df[df.fusion == "channel_concat"].status == "ok").all()
    dead = df[df.fusion == "sequence_append"]
    assert (dead.status == "failed").all()
    assert all(e.startswith("worker crashed: BrokenProcessPool") for e in dead.error)


def test_submitit_local_sweep(
    tmp_path: Path, names: tuple[str, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    A, B, C = names
    monkeypatch.setenv("PYTHONPATH", str(TESTS_DIR))
    monkeypatch.setenv("FAKE_CELL_FAIL", "sequence_append")
    spec = _spec(tmp_path, names)
    spec.experts = ExpertCombos(combinations=[[A]])
    executor = SubmititExecutor(tmp_path / "jobs", cluster="local", poll_s=0.2)
    df = run_sweep(spec, tmp_path / "sweep", executor=executor, progress=False)
    assert list(df.status) == ["ok", "failed"]
    assert df.error.iloc[1] == "RuntimeError: injected failure for sequence_append"


def test_execute_cell_returns_finished_cell_without_running(
    tmp_path: Path, names: tuple[str, str, str]
) -> None:
    cell = _spec(tmp_path, names).expand()[0]
    from moe_vision.sweeps.sweep import CellJob

    job = CellJob(cell.cell_id, cell.settings(), cell.config, str(tmp_path / "c"), ENTRY)
    first = execute_cell(job)
    second = execute_cell(job)
    assert first == second and first["status"] == "ok"
    assert len(_calls(tmp_path)) == 1
    bad = CellJob(cell.cell_id, cell.settings(), cell.config, str(tmp_path / "d"), "nomodule")
    row = execute_cell(bad)
    assert row["status"] == "failed" and "module:function" in row["error"]


def test_inline_is_the_default_executor(tmp_path: Path, names: tuple[str, str, str]) -> None:
    spec = _spec(tmp_path, names)
    assert spec.executor == {"kind": "inline"}
    from moe_vision.sweeps.sweep import build_executor

    assert isinstance(build_executor(spec, tmp_path), InlineExecutor)
    sub = build_executor(spec.with_overrides({"executor": {"kind": "submitit"}}), tmp_path)
    assert sub.folder == tmp_path / "submitit" and sub.parameters["timeout_min"] >= 60


def test_submitit_multi_task_cell_keeps_books_on_rank_zero(
    tmp_path: Path, names: tuple[str, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cell run as 2 tasks of one job (one per GPU on a cluster): both ranks run the
    entrypoint with the torch.distributed environment exported; one row, written by rank 0."""
    A, B, C = names
    monkeypatch.setenv("PYTHONPATH", str(TESTS_DIR))
    spec = _spec(tmp_path, names)
    spec.experts = ExpertCombos(combinations=[[A]])
    spec.fusions = spec.fusions[:1]
    executor = SubmititExecutor(
        tmp_path / "jobs", cluster="local", parameters={"tasks_per_node": 2}, poll_s=0.2
    )
    df = run_sweep(spec, tmp_path / "sweep", executor=executor, progress=False)
    assert list(df.status) == ["ok"]
    assert _calls(tmp_path) == [df.cell_id.iloc[0]] * 2  # both ranks ran it


def test_exclude_leaves_cells_out_and_warns_of_entries_that_match_nothing(
    names: tuple[str, str, str], caplog: pytest.LogCaptureFixture
) -> None:
    A, B, C = names
    base = {
        "experts": {"base": A, "pool": [B, C], "k": [1, 2]},
        "fusions": ["channel_concat", "sequence_append"],
        "seeds": [0, 1],
    }
    assert len(SweepSpec.from_dict(base).expand()) == 12
    alone = {"experts": [A], "fusion": "sequence_append"}
    cells = SweepSpec.from_dict({**base, "exclude": [alone]}).expand()
    assert len(cells) == 10
    assert not [c for c in cells if c.experts == (A,) and c.fusion == "sequence_append"]
    assert len([c for c in cells if c.experts == (A,)]) == 2  # channel_concat, seeds 0 and 1
    one_seed = SweepSpec.from_dict({**base, "exclude": [{"seed": 1}]}).expand()
    assert {c.seed for c in one_seed} == {0} and len(one_seed) == 6
    with caplog.at_level(logging.WARNING, logger="moe_vision.sweeps.spec"):  # its logger
        typo = SweepSpec.from_dict({**base, "exclude": [{"fusion": "seq_append"}]}).expand()
    assert len(typo) == 12 and "match no cell" in caplog.text
    with pytest.raises(ValueError, match="unknown keys"):
        SweepSpec.from_dict({**base, "exclude": [{"fusions": "sequence_append"}]})
    spec = SweepSpec.from_dict({**base, "exclude": [alone]})
    assert SweepSpec.from_dict(spec.to_dict()).exclude == spec.exclude


class _RecordingExecutor(InlineExecutor):
    """Inline, recording what the runner asks of it and when the grid is expanded."""

    def __init__(self, events: list) -> None:
        super().__init__()
        self.events = events

    def start(self, workers: int, preload: tuple[str, ...] = ()) -> None:
        self.events.append(("start", workers, tuple(preload)))

    def close(self) -> None:
        self.events.append(("close",))


def test_workers_start_before_the_grid_expands_and_close_after(
    tmp_path: Path, names: tuple[str, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Worker start-up (imports) overlaps the runner's expansion; workers are released even
    when the spec fails to expand."""
    from moe_vision.sweeps.sweep import entrypoint_preload, run_cell

    events: list = []
    expand = SweepSpec.expand
    monkeypatch.setattr(
        SweepSpec, "expand", lambda self: events.append(("expand",)) or expand(self)
    )
    spec = _spec(tmp_path, names)
    assert spec.max_cells() == 4
    run_sweep(spec, tmp_path / "sweep", executor=_RecordingExecutor(events), progress=False)
    assert events == [("start", 4, ("test_sweep",)), ("expand",), ("close",)]
    assert len(_calls(tmp_path)) == 4
    events.clear()  # all finished: the readied workers are stopped before any item is run
    run_sweep(spec, tmp_path / "sweep", executor=_RecordingExecutor(events), progress=False)
    assert events == [("start", 4, ("test_sweep",)), ("expand",), ("close",), ("close",)]
    assert entrypoint_preload(run_cell) == ("moe_vision.sweeps.sweep", *run_cell.preload)
    events.clear()
    spec.fusions = spec.fusions[:1] + [type(spec.fusions[0])(name="no_such_fusion")]
    with pytest.raises(KeyError, match="no_such_fusion"):
        run_sweep(spec, tmp_path / "bad", executor=_RecordingExecutor(events), progress=False)
    assert events == [("start", 4, ("test_sweep",)), ("expand",), ("close",)]


# ---------------------------------------------------------------------------- controls
MINI = {"clip-mini": {"pretrained": True}, "convnext-mini": {"pretrained": True}}
MINI_OCR = {**MINI, "pix2struct-mini": {"pretrained": True}}


def _controlled(**extra: object) -> SweepSpec:
    return SweepSpec.from_dict(
        {
            "experts": {"base": "clip-mini", "pool": ["convnext-mini", "pix2struct-mini"]},
            "fusions": ["channel_concat", "sequence_append"],
            "controls": ["random_init", "equal_tokens"],
            "model": {"expert_options": MINI_OCR},
            "seeds": [0, 1],
            "entrypoint": ENTRY,
            **extra,
        }
    )


def test_controls_add_a_twin_and_an_equal_token_base_per_added_expert() -> None:
    """Every cell that adds an expert to the base gets its random-init twin (that expert at
    pretrained: false, the rest as in the cell) and the base repeated to the mixture's fused
    shape; each is its own setting (labels), with ``control`` in its settings."""
    spec = _controlled()
    cells = spec.expand()
    assert len(cells) <= spec.max_cells()
    by_name = {c.name: c for c in cells}
    twin = by_name["clip-mini+convnext-mini (random init)__channel_concat__llava__s1"]
    assert twin.control == "random_init" and twin.experts == ("clip-mini", "convnext-mini")
    assert twin.config["model"]["expert_options"] == {
        "clip-mini": {"pretrained": True},
        "convnext-mini": {"pretrained": False, "init_seed": 0},
    }
    assert twin.settings()["experts"] == ["clip-mini", "convnext-mini (random init)"]
    assert twin.settings()["control"] == "random_init"
    # CLIP-mini's 96 channels x3 = CLIP-mini + ConvNeXt-mini's 96 + 192 under channel_concat
    wide = by_name["clip-mini x3 (equal tokens: +convnext-mini)__channel_concat__llava__s0"]
    assert wide.config["model"]["experts"] == ["clip-mini"] * 3 and wide.fusion_options == {}
    # sequence_append: as many tokens (2 x 64), and the mixture's width (192) through dim
    seq = by_name["clip-mini x2 (equal tokens: +convnext-mini)__sequence_append__llava__s0"]
    assert seq.config["model"]["experts"] == ["clip-mini"] * 2 and seq.fusion_options == {
        "dim": 192
    }
    ocr = by_name["clip-mini x2 (equal tokens: +pix2struct-mini)__channel_concat__llava__s0"]
    assert ocr.config["model"]["experts"] == ["clip-mini"] * 2 and ocr.fusion_options == {}
    assert not [c for c in cells if c.experts == ("clip-mini",) and c.control]  # no controls
    # k unset: sizes 1..3, so the triple too, with one twin per added expert
    per_mixture = [
        c for c in cells if c.experts == ("clip-mini", "convnext-mini", "pix2struct-mini")
    ]
    triple_twins = {
        c.name.split("__")[0]
        for c in per_mixture
        if c.control == "random_init" and c.fusion == "channel_concat"
    }
    assert triple_twins == {
        "clip-mini+convnext-mini (random init)+pix2struct-mini",
        "clip-mini+convnext-mini+pix2struct-mini (random init)",
    }
    assert len({c.cell_id for c in cells}) == len(cells)


def test_exclude_names_a_control_and_a_left_out_cell_takes_its_controls() -> None:
    spec = _controlled(
        experts={"base": "clip-mini", "pool": ["convnext-mini", "pix2struct-mini"], "k": [2]},
        exclude=[
            {"experts": ["clip-mini", "convnext-mini"], "fusion": "sequence_append"},
            {"experts": ["clip-mini", "pix2struct-mini"], "control": "equal_tokens"},
        ],
    )
    cells = spec.expand()
    assert not [
        c for c in cells if c.experts[-1] == "convnext-mini" and c.fusion == "sequence_append"
    ]
    ocr = [c for c in cells if c.experts == ("clip-mini", "pix2struct-mini")]
    assert {c.control for c in ocr} == {None, "random_init"}
    assert not [c for c in cells if c.control == "equal_tokens" and "pix2struct" in c.name]
    assert len(cells) == 2 * (3 + 2 + 2)  # convnext cc: cell, twin, equal; ocr: cell, twin x2


def test_control_errors_name_the_key_and_what_was_expected() -> None:
    with pytest.raises(ValueError, match=r"unknown controls \['twin'\]\n  valid controls"):
        _controlled(controls=["twin"])
    with pytest.raises(ValueError, match="controls must be a list of control names"):
        _controlled(controls={"random_init": True})
    random = {**MINI_OCR, "convnext-mini": {}}
    with pytest.raises(ValueError, match="random_init needs 'convnext-mini' to load weights"):
        _controlled(model={"expert_options": random}).expand()
    with pytest.raises(ValueError, match="exclude entry"):
        _controlled(exclude=[{"controls": "random_init"}])


def test_random_init_twin_starts_where_its_cell_does() -> None:
    """Built under the same seed, the twin's model equals its cell's in every tensor but the
    twin expert's: same fusion, projector and LLM init, same untrained expert the pretrained
    one started from (the claim 'same architecture, same init, no pretraining')."""
    import torch
    from accelerate.utils import set_seed

    from moe_vision.model.mllm import MoEVisionModel

    spec = SweepSpec.from_dict(
        {
            "experts": {"base": "clip-mini", "pool": ["convnext-mini"], "k": [2]},
            "fusions": ["channel_concat"],
            "controls": ["random_init"],
            "model": {"expert_options": MINI},
            "entrypoint": ENTRY,
        }
    )
    cell, twin = spec.expand()
    states = []
    for c in (cell, twin):
        set_seed(0)
        states.append(MoEVisionModel.from_config(c.config["model"]).state_dict())
    differ = {k.split(".")[1] for k in states[0] if not torch.equal(states[0][k], states[1][k])}
    assert [k for k in states[0] if not k.startswith("experts.")]  # the rest is compared too
    assert differ == {"1"}  # experts.1, ConvNeXt-mini, and nothing else
    # the twin expert is the same in every seed, and is where the zoo's pretraining started
    set_seed(7)
    other_seed = MoEVisionModel.from_config(twin.config["model"]).state_dict()
    twin_keys = [k for k in states[1] if k.startswith("experts.1.")]
    assert all(torch.equal(states[1][k], other_seed[k]) for k in twin_keys)
    torch.manual_seed(0)  # what moe_vision.zoo.core.build_objective does before building
    start = experts.create_expert("convnext-mini").state_dict()
    assert all(torch.equal(states[1][f"experts.1.{k}"], v) for k, v in start.items())


def test_control_column_and_settings_in_the_table(tmp_path: Path) -> None:
    spec = SweepSpec.from_dict(
        {
            "experts": {"base": "clip-mini", "pool": ["convnext-mini"], "k": [2]},
            "fusions": ["channel_concat"],
            "controls": ["random_init", "equal_tokens"],
            "model": {"expert_options": MINI},
            "run": {"log": str(tmp_path / "calls.log")},
            "entrypoint": ENTRY,
        }
    )
    df = run_sweep(spec, tmp_path / "sweep", progress=False)
    assert list(df["control"]) == ["none", "random_init", "equal_tokens"]
    assert list(df["experts"]) == [
        "clip-mini+convnext-mini",
        "clip-mini+convnext-mini (random init)",
        "clip-mini x3 (equal tokens: +convnext-mini)",
    ]
    assert len(results.summarize(df)) == 3  # each control its own setting
