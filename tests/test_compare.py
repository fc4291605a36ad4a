"""results.compare: paired comparison of two runs per category, against hand-computed
references (differences, exact McNemar sums, a resampling loop); errors; the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from moe_vision import results
from moe_vision.cli import main
from moe_vision.io import write_json
from moe_vision.results import seeds, stats


def _preds(correct: dict[str, list[int]]) -> list[dict]:
    return [
        {"id": f"{cat}-{i}", "category": cat, "score": float(c), "correct": bool(c)}
        for cat, values in correct.items()
        for i, c in enumerate(values)
    ]


RNG = np.random.default_rng(0)
A = {"color": list(RNG.random(60) < 0.8), "ocr": list(RNG.random(60) < 0.3)}
B = {"color": list(RNG.random(60) < 0.5), "ocr": list(RNG.random(60) < 0.3)}


def _exact(k: int, n: int) -> float:
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2**n)


def test_compare_matches_hand_computation() -> None:
    table = results.compare(_preds(A), _preds(B), n_boot=1000, seed=3)
    assert list(table["category"]) == ["color", "ocr", "overall"]
    columns = list(results.COMPARE_COLUMNS)
    cut = columns.index("test") + 1
    assert list(table.columns) == [*columns[:cut], "p_holm", *columns[cut:]]
    assert set(table["test"]) == {stats.TEST_MCNEMAR}  # one seed a side: the exact test
    assert table["p_holm"].to_numpy() == pytest.approx(stats.adjust_p(table["p_value"], "holm"))
    for cat in ("color", "ocr"):
        a, b = np.array(A[cat], dtype=float), np.array(B[cat], dtype=float)
        row = table.set_index("category").loc[cat]
        assert row["n"] == 60
        assert row["accuracy_a"] == pytest.approx(a.mean())
        assert row["difference"] == pytest.approx(a.mean() - b.mean())
        a_only, b_only = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
        assert (row["a_only"], row["b_only"]) == (a_only, b_only)
        assert row["p_value"] == pytest.approx(_exact(b_only, a_only + b_only))
        # interval: resampling loop over question pairs with the same generator
        idx = np.random.default_rng(3).integers(0, 60, size=(1000, 60))
        reps = [a[i].mean() - b[i].mean() for i in idx]
        assert (row["lo"], row["hi"]) == pytest.approx(tuple(np.quantile(reps, [0.025, 0.975])))
        assert row["significant"] == (row["lo"] > 0 or row["hi"] < 0)
    color = table.set_index("category").loc["color"]
    assert color["significant"] and color["p_value"] < 0.05  # 80% vs 50% on 60 questions


def test_identical_runs_do_not_differ() -> None:
    table = results.compare(_preds(A), _preds(A))
    assert (table["difference"] == 0).all() and (table["p_value"] == 1.0).all()
    assert not table["significant"].any()


def test_sides_from_folders_and_seed_lists(tmp_path: Path) -> None:
    for name, data in (("a", A), ("b", B), ("a2", B)):
        write_json(tmp_path / name / results.PREDICTIONS_FILE, _preds(data))
    from_dirs = results.compare(tmp_path / "a", tmp_path / "b" / results.PREDICTIONS_FILE)
    pd.testing.assert_frame_equal(from_dirs, results.compare(_preds(A), _preds(B)))
    seeds = results.compare([tmp_path / "a", tmp_path / "a2"], tmp_path / "b")
    color = seeds.set_index("category").loc["color"]
    mean_a = (np.array(A["color"], float) + np.array(B["color"], float)) / 2
    assert color["accuracy_a"] == pytest.approx(mean_a.mean())


def _seed_cells(root: Path, name: str, acc: dict[str, float], rng) -> list[Path]:
    """Three seed cells (``cell.json`` names the seed) of one setting: 0/1 answers to 80
    questions per category, 8 reference answers per category."""
    dirs = []
    for s in range(3):
        preds = [
            {
                "id": f"{cat}-{i}",
                "category": cat,
                "answers": [f"{cat}{i % 8}"],
                "score": float(rng.random() < p + 0.1 * (s - 1)),
            }
            for cat, p in acc.items()
            for i in range(80)
        ]
        cell = root / f"{name}-s{s}"
        write_json(cell / results.PREDICTIONS_FILE, preds)
        write_json(cell / results.CELL_FILE, {"seed": s})
        dirs.append(cell)
    return dirs


def test_seeds_on_both_sides_give_seed_level_tests(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    a = _seed_cells(tmp_path, "a", {"color": 0.8, "ocr": 0.3}, rng)
    b = _seed_cells(tmp_path, "b", {"color": 0.5, "ocr": 0.3}, rng)
    table = results.compare(a, b[::-1], n_boot=500, correction="bh").set_index("category")
    assert set(table["test"]) == {seeds.TEST_HIERARCHICAL} and "p_bh" in table.columns
    frames = [results.load_scores(d).query("category == 'color'") for d in (*a, *b)]
    mat = np.stack([f["score"].to_numpy() for f in frames])  # (6, 80)
    ref = seeds.seed_difference(
        mat[:3], mat[3:], frames[0]["answer"].to_numpy(object), [0, 1, 2], [0, 1, 2], n_boot=500
    )
    color = table.loc["color"]
    assert ref.paired and (color["lo"], color["hi"], color["p_value"]) == pytest.approx(
        (ref.lo, ref.hi, ref.p_value)
    )
    welch = seeds.welch_seeds(mat[:3].mean(1), mat[3:].mean(1))
    assert color["p_welch_seeds"] == pytest.approx(welch)
    # the question-level test on seed-averaged answers is exact (no Monte Carlo floor of
    # 1 / 2001) and says so: before, a sign-flip permutation p was labelled McNemar
    assert color["questions_test"] == stats.TEST_SIGN_FLIP_EXACT
    assert color["p_questions"] < 1 / 2001
    text = results.format_compare(table.reset_index())
    assert seeds.TEST_HIERARCHICAL in text and "Benjamini-Hochberg" in text


def test_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="predictions.json"):
        results.compare(tmp_path, _preds(A))
    fewer = _preds(A)[:-3]
    with pytest.raises(ValueError, match="different questions .*3 only in A"):
        results.compare(_preds(A), fewer)
    moved = _preds(A)
    moved[0]["category"] = "ocr"
    with pytest.raises(ValueError, match="different categories"):
        results.compare(_preds(A), moved)
    with pytest.raises(ValueError, match="lacks \\['score'\\]"):
        results.compare([{"id": "1", "category": "c"}], _preds(A))
    twice = _preds(A) + _preds(A)[:1]
    with pytest.raises(ValueError, match="appear twice"):
        results.compare(twice, _preds(A))


def test_cli_prints_and_writes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_json(tmp_path / "a" / results.PREDICTIONS_FILE, _preds(A))
    write_json(tmp_path / "b" / results.PREDICTIONS_FILE, _preds(B))
    out = tmp_path / "diff.csv"
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--csv", str(out)]) == 0
    text = capsys.readouterr().out
    assert "color" in text and "overall" in text and "p_value" in text
    written = pd.read_csv(out)
    assert list(written["category"]) == ["color", "ocr", "overall"]
    assert main(["compare", str(tmp_path / "a")]) == 2
    assert "error: moe-vision compare: give two runs" in capsys.readouterr().err


REFERENCE = Path(__file__).resolve().parents[1] / "results"


def _copy_reference(dest: Path, flip_first_setting: bool) -> str:
    """A copy of the committed reference (table and answers); with ``flip_first_setting``
    every answer of the first setting's cells is flipped. Returns that setting's label."""
    dest.mkdir()
    table = pd.read_csv(REFERENCE / "default.csv")
    first = table.iloc[0]
    preds = pd.read_parquet(REFERENCE / "default_predictions.parquet")
    if flip_first_setting:
        same = (table["experts"] == first["experts"]) & (table["fusion"] == first["fusion"])
        flip = preds["cell_id"].isin(table.loc[same, "cell_id"])
        preds.loc[flip, "score"] = 1.0 - preds.loc[flip, "score"]
    preds.to_parquet(dest / "default_predictions.parquet")
    table.to_csv(dest / "default.csv", index=False)
    return f"{first['experts']}, {first['fusion']}:"


def test_reference_check_self_consistent_and_flipped_setting_inconsistent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _copy_reference(tmp_path / "same", flip_first_setting=False)
    args = ["compare", "--reference", str(REFERENCE), "--n-boot", "300"]
    assert main([*args, str(tmp_path / "same")]) == 0
    text = capsys.readouterr().out
    assert "verdict: CONSISTENT" in text and "INCONSISTENT" not in text
    label = _copy_reference(tmp_path / "flipped", flip_first_setting=True)
    assert main([*args, str(tmp_path / "flipped")]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert [x for x in lines if x.startswith(label)][0].startswith(f"{label} INCONSISTENT")
    assert sum("INCONSISTENT" in x for x in lines) == 1  # only that setting
    assert lines[-1].startswith("verdict: NOT CONSISTENT")


def _synthetic_sweep(root: Path, gain: float) -> None:
    """Two settings x 3 seeds, 60 questions in each of two categories; the second setting
    answers ``ocr`` right with probability 0.2 + ``gain`` (the first: 0.2)."""
    rng = np.random.default_rng(1)
    cells, preds = [], []
    for experts, acc in (("base", 0.2), ("base+ocr", 0.2 + gain)):
        for seed in range(3):
            cid = f"{experts}-s{seed}"
            cell = {"cell_id": cid, "experts": experts, "fusion": "f", "fusion_options": "{}"}
            cells.append({**cell, "recipe": "r", "seed": seed, "status": "ok"})
            for cat, p in (("ocr", acc), ("color", 0.7)):
                for i in range(60):
                    score = float(rng.random() < p)
                    preds.append({"cell_id": cid, "id": f"{cat}-{i}", "category": cat,
                                  "answer": f"{cat}{i % 6}", "score": score})  # fmt: skip
    table = pd.DataFrame(cells)
    frame = pd.DataFrame(preds)
    for cat in ("ocr", "color", "overall"):
        sel = frame if cat == "overall" else frame[frame["category"] == cat]
        table[f"accuracy/{cat}"] = table["cell_id"].map(sel.groupby("cell_id")["score"].mean())
    root.mkdir()
    table.to_csv(root / "default.csv", index=False)
    frame.to_parquet(root / "default_predictions.parquet")


def test_reference_findings_are_data_and_checked_on_both_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _synthetic_sweep(tmp_path / "ref", gain=0.7)
    (tmp_path / "ref" / "default_findings.yaml").write_text(
        "baseline: {experts: base}\n"
        "findings:\n"
        "  - {name: ocr gain, setting: {experts: base+ocr}, category: ocr, direction: higher}\n"
    )
    _synthetic_sweep(tmp_path / "fresh_same", gain=0.7)
    _synthetic_sweep(tmp_path / "fresh_lost", gain=0.0)
    args = ["compare", "--reference", str(tmp_path / "ref"), "--n-boot", "300"]
    assert main([*args, str(tmp_path / "fresh_same")]) == 0
    assert "finding 'ocr gain': holds" in capsys.readouterr().out
    assert main([*args, str(tmp_path / "fresh_lost")]) == 1
    out = capsys.readouterr().out
    assert "finding 'ocr gain': NO LONGER HOLDS" in out
    findings = tmp_path / "ref" / "default_findings.yaml"
    findings.write_text("baseline: {experts: base}\nfindings: [x]\n")
    assert main([*args, str(tmp_path / "fresh_same")]) == 2
    assert "default_findings.yaml: finding 0 needs name, setting" in capsys.readouterr().err


def test_a_finding_may_name_its_own_baseline_and_be_corrected_over_the_findings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A twin control is a finding against its own baseline; ``family: findings`` corrects over
    the findings listed, and the note gives the uncorrected and both corrected p-values."""
    _synthetic_sweep(tmp_path / "ref", gain=0.7)
    (tmp_path / "ref" / "default_findings.yaml").write_text(
        "family: findings\n"
        "baseline: {experts: base}\n"
        "findings:\n"
        "  - {name: ocr gain, setting: {experts: base+ocr}, category: ocr, direction: higher}\n"
        "  - {name: base loses to it, setting: {experts: base}, baseline: {experts: base+ocr},\n"
        "     category: ocr, direction: lower}\n"
    )
    _synthetic_sweep(tmp_path / "fresh", gain=0.7)
    args = ["compare", "--reference", str(tmp_path / "ref"), "--n-boot", "300"]
    assert main([*args, str(tmp_path / "fresh")]) == 0
    out = capsys.readouterr().out
    assert "finding 'ocr gain': holds" in out and "finding 'base loses to it': holds" in out
    assert "holm over the findings" in out and "over the table" in out
    (tmp_path / "ref" / "default_findings.yaml").write_text(
        "family: everything\nbaseline: {experts: base}\nfindings: []\n"
    )
    assert main([*args, str(tmp_path / "fresh")]) == 2
    assert "family must be one of" in capsys.readouterr().err
