"""Results table: rows from cell folders, CSV/Parquet round trip, atomic writes, pivots, plots."""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest

from moe_vision import results
from moe_vision.io import atomic_write, read_json, write_json

matplotlib.use("Agg")

CATEGORIES = ("color", "count", "ocr")


def _settings(i: int, experts: list[str], fusion: str, seed: int = 0) -> dict:
    return {
        "cell_id": f"cell{i}",
        "name": f"{'+'.join(experts)}__{fusion}__llava__s{seed}",
        "experts": experts,
        "fusion": fusion,
        "fusion_options": {"dim": 32} if fusion == "b" else {},
        "recipe": "llava",
        "seed": seed,
    }


N_PER_CATEGORY = 40


def _predictions(acc: float, seed: int) -> list[dict]:
    """Per-question answers of one cell: category ``k`` right with probability ``acc + 0.1 k``."""
    rng = np.random.default_rng(seed)
    return [
        {"id": f"{c}-{j}", "category": c, "score": float(rng.random() < acc + 0.1 * k)}
        for k, c in enumerate(CATEGORIES)
        for j in range(N_PER_CATEGORY)
    ]


def _metrics(preds: list[dict], tokens: int) -> dict:
    m = {
        f"accuracy/{c}": float(np.mean([p["score"] for p in preds if p["category"] == c]))
        for c in CATEGORIES
    }
    m["accuracy/overall"] = float(np.mean([p["score"] for p in preds]))
    m.update(
        params_total=1000,
        params_trainable=100,
        visual_tokens=tokens,
        train_time_s=1.5,
        throughput_samples_s=10.0,
        peak_memory_mb=123.0,
        wall_time_s=2.0,
        extra_list=[1, 2],  # non-scalar values are not columns
    )
    return m


@pytest.fixture
def sweep_dir(tmp_path: Path) -> Path:
    """A sweep folder: 4 finished cells (2 seeds of one), 1 failed, 1 pending; the finished
    cells hold their per-question answers (``predictions.json``), as real cells do."""
    cells = [
        (_settings(0, ["x"], "a"), (0.4, 16), None),
        (_settings(1, ["x"], "b"), (0.5, 16), None),
        (_settings(2, ["x", "y"], "a"), (0.7, 32), None),
        (_settings(3, ["x", "y"], "b"), None, "RuntimeError: boom"),
        (_settings(4, ["x"], "a", seed=1), (0.2, 16), None),
        (_settings(5, ["x", "y"], "a", seed=1), None, None),  # pending
    ]
    for i, (settings, acc_tokens, error) in enumerate(cells):
        d = tmp_path / results.CELLS_DIR / settings["cell_id"]
        d.mkdir(parents=True)
        if acc_tokens is not None:
            preds = _predictions(acc_tokens[0], seed=i)
            write_json(d / results.PREDICTIONS_FILE, preds)
            write_json(d / results.METRICS_FILE, _metrics(preds, acc_tokens[1]))
        if error is not None:
            write_json(d / results.ERROR_FILE, {"error": error, "traceback": "tb"})
    write_json(tmp_path / results.MANIFEST, {"cells": [c[0] for c in cells]})
    return tmp_path


def test_load_rows_from_cell_folders(sweep_dir: Path) -> None:
    df = results.load(sweep_dir)
    assert list(df["cell_id"]) == ["cell0", "cell1", "cell2", "cell3", "cell4"]  # spec order
    assert list(df.columns[: len(results.SETTINGS_COLUMNS)]) == list(results.SETTINGS_COLUMNS)
    for col in ("status", "error", *results.METRIC_COLUMNS, "accuracy/color", "wall_time_s"):
        assert col in df.columns
    assert "extra_list" not in df.columns
    assert df.loc[3, "status"] == results.STATUS_FAILED
    assert df.loc[3, "error"] == "RuntimeError: boom"
    assert np.isnan(df.loc[3, "accuracy/overall"])
    assert (df.loc[df["status"] == "ok", "error"].isna()).all()
    assert df.loc[2, "experts"] == "x+y" and df.loc[2, "num_experts"] == 2
    assert json.loads(df.loc[1, "fusion_options"]) == {"dim": 32}
    preds = read_json(sweep_dir / "cells" / "cell2" / results.PREDICTIONS_FILE)
    assert df.loc[2, "accuracy/overall"] == pytest.approx(np.mean([p["score"] for p in preds]))


def test_rows_carry_wilson_intervals_from_predictions(sweep_dir: Path) -> None:
    df = results.load(sweep_dir)
    for i in (0, 2, 4):
        preds = read_json(sweep_dir / "cells" / f"cell{i}" / results.PREDICTIONS_FILE)
        for cat in (*CATEGORIES, "overall"):
            scores = [p["score"] for p in preds if cat == "overall" or p["category"] == cat]
            lo, hi = results.wilson_interval(int(sum(scores)), len(scores))
            assert df.loc[i, f"accuracy/{cat}/lo"] == pytest.approx(lo)
            assert df.loc[i, f"accuracy/{cat}/hi"] == pytest.approx(hi)
            assert df.loc[i, f"n/{cat}"] == len(scores)
            assert lo <= df.loc[i, f"accuracy/{cat}"] <= hi
    assert np.isnan(df.loc[3, "accuracy/overall/lo"])  # the failed cell has none
    # interval columns sit next to their accuracy, and are not accuracies themselves
    cols = list(df.columns)
    assert cols[cols.index("accuracy/color") + 1 : cols.index("accuracy/color") + 3] == [
        "accuracy/color/lo",
        "accuracy/color/hi",
    ]
    assert results.accuracy_columns(df) == [f"accuracy/{c}" for c in CATEGORIES] + [
        "accuracy/overall"
    ]


def test_csv_and_parquet_round_trip(sweep_dir: Path, tmp_path: Path) -> None:
    df = results.write_tables(sweep_dir)
    for name in (results.TABLE_CSV, results.TABLE_PARQUET):
        back = results.load(sweep_dir / name)
        pd.testing.assert_frame_equal(
            back.reset_index(drop=True), df, check_dtype=False, check_exact=False
        )
    with pytest.raises(ValueError, match=r"\.csv or \.parquet"):
        results.save(df, tmp_path / "table.xlsx")


def test_load_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="neither a sweep"):
        results.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        results.load(tmp_path / "missing.csv")
    with pytest.raises(FileNotFoundError, match="sweep.json"):
        results.collect_rows(tmp_path)
    bad = tmp_path / "cells" / "c"
    bad.mkdir(parents=True)
    (bad / results.METRICS_FILE).write_text("{not json")
    write_json(tmp_path / results.MANIFEST, {"cells": [{"cell_id": "c"}]})
    with pytest.raises(ValueError, match="metrics.json is not valid JSON"):
        results.load(tmp_path)


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    atomic_write(path, lambda p: p.write_text("old"))

    def broken(p: Path) -> None:
        p.write_text("partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["t.csv"]  # no temp file left behind


def test_pivot_means_over_seeds_and_ignores_failed(sweep_dir: Path) -> None:
    df = results.load(sweep_dir)
    table = results.pivot_accuracy(df)
    assert list(table.index) == ["x", "x+y"] and list(table.columns) == ["a", "b"]
    # brute-force reference: mean over the ok rows of each (experts, fusion)
    for experts in table.index:
        for fusion in table.columns:
            sel = df[(df.experts == experts) & (df.fusion == fusion) & (df.status == "ok")]
            expected = sel["accuracy/overall"].mean() if len(sel) else np.nan
            np.testing.assert_allclose(table.loc[experts, fusion], expected)
    assert np.isnan(table.loc["x+y", "b"])  # failed, not zero
    with pytest.raises(KeyError, match="nope"):
        results.pivot_accuracy(df, value="nope")


def test_format_table_lists_failures(sweep_dir: Path) -> None:
    text = results.format_table(results.load(sweep_dir))
    assert "overall" in text and "FAILED x+y__b__llava__s0: RuntimeError: boom" in text
    df = results.load(sweep_dir)
    row = df.loc[2]
    expected = (
        f"{100 * row['accuracy/overall']:.1f} "
        f"({100 * row['accuracy/overall/lo']:.0f}-{100 * row['accuracy/overall/hi']:.0f})"
    )
    assert expected in text  # accuracies in percent with their interval


def test_plots_write_png_with_error_bars(sweep_dir: Path, tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    df = results.load(sweep_dir)
    path = results.plot_sweep(df, tmp_path / "plots" / "sweep.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = results.plot_heatmap(df)
    texts = [t.get_text() for t in ax.texts]
    overall = results.pivot_accuracy(df).loc["x+y", "a"]
    assert "n/a" in texts and f"{100 * overall:.1f}" in texts
    ax = results.plot_overall(df)
    assert not ax.texts  # no point labels that could overlap; a legend instead
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {"a", "b", "x", "x+y"}
    settings = 3  # (x, a) averaged over 2 seeds, (x, b), (x+y, a)
    assert len(ax.containers) == settings  # one errorbar container per setting
    ax = results.plot_categories(df)
    assert [t.get_text() for t in ax.get_xticklabels()] == list(CATEGORIES)
    bars = ax.containers
    assert len(bars) == settings
    # the error bar of (x+y, a) on "color" spans its Wilson interval
    row = df.loc[2]
    segments = bars[2].lines[2][0].get_segments()
    assert segments[0][:, 1] == pytest.approx([row["accuracy/color/lo"], row["accuracy/color/hi"]])
    plt.close("all")


def test_plot_sweep_has_one_y_label(sweep_dir: Path, tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    captured = {}
    original = plt.close

    def keep(fig=None):
        captured["fig"] = fig
        return original(fig)

    plt.close = keep
    try:
        results.plot_sweep(results.load(sweep_dir), tmp_path / "s.png")
    finally:
        plt.close = original
    labels = [ax.get_ylabel() for ax in captured["fig"].axes]
    assert [label for label in labels if label] == ["accuracy (95% interval)"]


def test_summary_aggregates_seeds_and_marks_best(sweep_dir: Path) -> None:
    summary = results.summarize(sweep_dir, n_boot=500)
    assert list(zip(summary["experts"], summary["fusion"])) == [
        ("x", "a"),
        ("x", "b"),
        ("x+y", "a"),
    ]
    df = results.load(sweep_dir)
    seeds = df[(df.experts == "x") & (df.fusion == "a")]
    row = summary.iloc[0]
    assert row["n_seeds"] == 2 and row["seeds"] == "0,1"
    assert row["accuracy/overall"] == pytest.approx(seeds["accuracy/overall"].mean())
    assert row["accuracy/overall/std"] == pytest.approx(seeds["accuracy/overall"].std(ddof=1))
    assert row["accuracy/overall/lo"] < row["accuracy/overall"] < row["accuracy/overall/hi"]
    # two seeds: the seed-level interval over seeds and questions
    matrix = np.stack(
        [
            [p["score"] for p in read_json(sweep_dir / "cells" / c / "predictions.json")]
            for c in seeds["cell_id"]
        ]
    )
    est = results.seed_interval(matrix, n_boot=500)
    assert (row["accuracy/overall/lo"], row["accuracy/overall/hi"]) == pytest.approx(
        (est.lo, est.hi)
    )
    # against the baseline (the first setting): differences, p-values named by test and
    # Holm-corrected over the settings x categories shown
    assert list(summary["baseline"]) == [True, False, False]
    assert np.isnan(row["accuracy/overall/diff"])
    assert summary.loc[2, "accuracy/color/diff"] == pytest.approx(
        summary.loc[2, "accuracy/color"] - row["accuracy/color"]
    )
    family = summary[[f"{c}/p_hier" for c in results.accuracy_columns(summary)]].to_numpy()
    holm = summary[[f"{c}/p_hier_holm" for c in results.accuracy_columns(summary)]].to_numpy()
    assert holm.T.ravel() == pytest.approx(results.adjust_p(family.T.ravel()), nan_ok=True)
    assert "accuracy/overall/p_welch" in summary and "accuracy/ocr/seeds_for_10pt" in summary
    # one seed: the cell's Wilson interval
    single = summary.iloc[2]
    assert single["accuracy/ocr/lo"] == pytest.approx(df.loc[2, "accuracy/ocr/lo"])
    assert np.isnan(single["accuracy/ocr/std"])
    # the best setting (x+y, a) is clearly ahead of (x, a) on 120 shared questions
    assert list(summary["vs_best"]) == ["worse", summary.loc[1, "vs_best"], "best"]
    cmp = results.compare(
        [sweep_dir / "cells" / c for c in seeds["cell_id"]], sweep_dir / "cells" / "cell2"
    )
    overall = cmp.set_index("category").loc["overall"]
    assert summary.loc[0, "diff_vs_best"] == pytest.approx(overall["difference"])
    assert summary.loc[0, "p_vs_best"] == pytest.approx(overall["p_value"])
    text = results.format_summary(summary)
    assert "best" in text and "worse" in text and "Holm-corrected" in text


def test_attribution_long_reshapes_drop_columns() -> None:
    df = pd.DataFrame(
        [
            {
                "experts": "a+b",
                "fusion": "f",
                "seed": 0,
                "drop/a/color": 0.1,
                "drop/a/color/lo": 0.0,
                "drop/a/color/hi": 0.2,
                "drop/b/overall": 0.3,
                "drop/b/overall/lo": 0.1,
                "drop/b/overall/hi": 0.4,
                "drop/c/color": np.nan,  # another cell's expert
            }
        ]
    )
    long = results.attribution_long(df)
    assert long[["expert", "category", "drop", "lo", "hi"]].values.tolist() == [
        ["a", "color", 0.1, 0.0, 0.2],
        ["b", "overall", 0.3, 0.1, 0.4],
    ]
    assert list(long["experts"]) == ["a+b", "a+b"]
