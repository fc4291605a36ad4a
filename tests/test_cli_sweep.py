"""``moe-vision sweep`` end to end: real cells (tiny sizes), the failed-cell row, the outputs,
the default sweep's definition and where it ships, and bad spec files."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from moe_vision import results
from moe_vision.cli import main
from moe_vision.sweeps.default import default_sweep
from moe_vision.sweeps.spec import SweepSpec

REPO = Path(__file__).resolve().parent.parent
TINY_RUN = {
    "overrides": {"*": {"batch_size": 4, "epochs": 1, "max_steps": 2}},
    "train": {"progress_bar": False, "log_with": []},
}
TINY_DATA = {"benchmark_sizes": {"align": 8, "instruct": 8, "val": 2, "test": 12}}


def test_default_sweep_definition() -> None:
    """Eagle's question on the mini zoo: the CLIP base alone and with each specialist, under
    two fusions or more, three seeds or more, every expert with its shipped weights, and each
    specialist's random-init twin beside it (same fusion, same seeds)."""
    import experts

    spec = default_sweep()
    cells = spec.expand()
    combos = {c.experts for c in cells}
    base = spec.experts.base
    assert base is not None and experts.get_spec(base).role == "alignment"
    assert (base,) in combos  # the baseline every specialist is compared with
    roles = {experts.get_spec(c[1]).role for c in combos if len(c) == 2}
    assert {"ocr", "high-resolution"} <= roles, roles
    assert len({c.fusion for c in cells}) >= 2 and len(spec.seeds) >= 3
    pretrained = [c for c in cells if c.control is None]
    for c in pretrained:
        options = c.config["model"]["expert_options"]
        assert all(e.endswith("-mini") and options[e] == {"pretrained": True} for e in c.experts)
    twins = [c for c in cells if c.control == "random_init"]
    for specialist in ("convnext-mini", "pix2struct-mini"):
        mine = [c for c in twins if c.experts == (base, specialist)]
        assert {c.seed for c in mine} == set(spec.seeds), specialist
        for c in mine:
            twin_options = c.config["model"]["expert_options"][specialist]
            assert twin_options == {"pretrained": False, "init_seed": 0}
            assert any(p.experts == c.experts and p.fusion == c.fusion for p in pretrained)
            assert f"{specialist} (random init)" in c.settings()["experts"]
    assert "splits" not in spec.data  # the built-in benchmark


def test_default_sweep_ships_as_package_data() -> None:
    """The default spec is one YAML inside the package (found by a non-editable install too:
    pyproject's package-data names it); sweeps/default.yaml is that file."""
    import tomllib

    from moe_vision.sweeps.default import default_sweep_file

    shipped = default_sweep_file()
    package = Path(__import__("moe_vision").__file__).parent
    assert shipped.is_file() and shipped.resolve().is_relative_to(package.resolve())
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = data["tool"]["setuptools"]["package-data"]["moe_vision"]
    relative = shipped.resolve().relative_to(package.resolve())
    assert any(relative.match(p) for p in patterns), patterns
    assert (REPO / "sweeps" / "default.yaml").resolve() == shipped.resolve()


def test_example_sweep_specs_expand() -> None:
    for path in sorted((REPO / "sweeps").glob("*.yaml")):
        assert SweepSpec.from_yaml(path).expand(), path


def test_dry_run_lists_cells(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sweep", "--dry-run", "--fusions", "channel_concat", "--seeds", "0,1"]) == 0
    ids = capsys.readouterr().out.split()
    narrowed = default_sweep().with_overrides({"fusions": ["channel_concat"], "seeds": [0, 1]})
    assert ids == [c.cell_id for c in narrowed.expand()]
    assert all("__channel_concat__" in i for i in ids) and any("random_init" in i for i in ids)


def test_controls_flag(capsys: pytest.CaptureFixture[str]) -> None:
    """--controls none drops the twins (3 settings x 4 seeds); naming them sets the list."""
    assert main(["sweep", "--dry-run", "--controls", "none"]) == 0
    ids = capsys.readouterr().out.split()
    assert len(ids) == 12 and not [i for i in ids if "random_init" in i]
    assert main(["sweep", "--dry-run", "--controls", "equal_tokens", "--seeds", "0"]) == 0
    ids = capsys.readouterr().out.split()
    assert len([i for i in ids if "equal_tokens" in i]) == 2 and len(ids) == 5


BAD_SPECS = {
    "run: 5\n": "run must be a mapping of RunConfig options, got 5",
    "executor: 5\n": "executor must be an executor kind or a mapping",
    "fusions: 5\n": "fusions must be a fusion name, or a list",
    "seeds: [a]\n": "seeds must hold int values, got ['a']",
    "controls: [twins]\n": "unknown controls ['twins']",
    "experts: [[clip-mini]\nfusions: x\n": "invalid YAML at line 2",
    "- just\n- a list\n": "expected a mapping of keys",
}


@pytest.mark.parametrize("text", list(BAD_SPECS))
def test_bad_spec_file_is_a_short_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    """A spec whose keys hold the wrong types, bad YAML or not a mapping: 'error: sweep spec
    <file>: <key> must be <what>, got <value>' in at most two lines, exit 2 (tracebacks before)."""
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["sweep", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(f"error: sweep spec {path}") and BAD_SPECS[text] in "\n".join(err)
    assert len(err) <= 3 and "Traceback" not in "\n".join(err)  # + the '-v' hint


def test_spec_that_is_no_text_file_is_a_short_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    binary = tmp_path / "bad.yaml"
    binary.write_bytes(b"name: \xff\xfe\x00sweep\n")
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    for path, expected in ((binary, "is not UTF-8 text"), (folder, "is a folder")):
        assert main(["sweep", str(path), "--dry-run"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[0] == f"error: sweep spec {path} {expected}" + (
            " (byte 6); expected a YAML file" if path == binary else "; expected a YAML file"
        )
        assert len(err) == 2


def test_sweep_cli_runs_real_cells(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = {
        "name": "cli",
        # channel_concat works; mr_adapter needs a ViT *and* a high-res convolutional map, so
        # building its model raises: that cell must become a failed row, the other finishes
        "experts": [["clip-tiny"]],
        "fusions": ["channel_concat", "mr_adapter"],
        "recipes": ["llava"],
        "data": TINY_DATA,
        "run": {**TINY_RUN, "cache_dir": str(tmp_path / "cache")},
    }
    path = tmp_path / "cli.yaml"
    path.write_text(yaml.safe_dump(spec))
    out, res = tmp_path / "sweep", tmp_path / "results"
    code = main(["sweep", str(path), "--out", str(out), "--results-dir", str(res)])
    printed = capsys.readouterr().out
    assert code == 1  # a failed cell makes the exit status non-zero
    df = pd.read_csv(res / "cli.csv")
    assert list(df.fusion) == ["channel_concat", "mr_adapter"]
    ok, failed = df.iloc[0], df.iloc[1]
    assert ok.status == "ok" and failed.status == "failed"
    assert "mr_adapter" in failed.error and "FAILED" in printed
    categories = [c for c in results.accuracy_columns(df) if c != "accuracy/overall"]
    assert len(categories) == 6
    assert 0.0 <= ok["accuracy/overall"] <= 1.0
    for col in [*categories, "accuracy/overall"]:  # every accuracy with its 95% interval
        assert ok[f"{col}/lo"] <= ok[col] <= ok[f"{col}/hi"]
    assert ok["n/overall"] == 12 and "best" in printed  # the seed summary is printed
    summary = pd.read_csv(res / "cli_summary.csv")
    assert list(summary["vs_best"]) == ["best"] and summary.loc[0, "n_seeds"] == 1
    answers = pd.read_parquet(res / "cli_predictions.parquet")
    assert len(answers) == 12 and set(answers["cell_id"]) == {ok.cell_id}
    assert ok.params_total > ok.params_trainable > 0 and ok.visual_tokens > 0
    assert ok.train_time_s > 0 and ok.peak_memory_mb > 0
    assert (res / "cli.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "cells" / ok.cell_id / "metrics.json").exists()
    assert (out / "cells" / ok.cell_id / "config.yaml").exists()  # run_experiment's run folder
    pd.testing.assert_frame_equal(results.load(out), df, check_dtype=False)
