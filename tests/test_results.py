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


def _metrics(acc: float, tokens: int) -> dict:
    m = {f"accuracy/{c}": acc + 0.01 * k for k, c in enumerate(CATEGORIES)}
    m["accuracy/overall"] = float(np.mean(list(m.values())))
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
    """A sweep folder: 4 finished cells (2 seeds of one), 1 failed, 1 pending."""
    cells = [
        (_settings(0, ["x"], "a"), _metrics(0.5, 16), None),
        (_settings(1, ["x"], "b"), _metrics(0.6, 16), None),
        (_settings(2, ["x", "y"], "a"), _metrics(0.7, 32), None),
        (_settings(3, ["x", "y"], "b"), None, "RuntimeError: boom"),
        (_settings(4, ["x"], "a", seed=1), _metrics(0.3, 16), None),
        (_settings(5, ["x", "y"], "a", seed=1), None, None),  # pending
    ]
    for settings, metrics, error in cells:
        d = tmp_path / results.CELLS_DIR / settings["cell_id"]
        d.mkdir(parents=True)
        if metrics is not None:
            results.write_json(d / results.METRICS_FILE, metrics)
        if error is not None:
            results.write_json(d / results.ERROR_FILE, {"error": error, "traceback": "tb"})
    results.write_json(tmp_path / results.MANIFEST, {"cells": [c[0] for c in cells]})
    return tmp_path


def test_load_rows_from_cell_folders(sweep_dir: Path) -> None:
    df = results.load(sweep_dir)
    assert list(df["cell_id"]) == ["cell0", "cell1", "cell2", "cell3", "cell4"]  # spec order
    assert list(df.columns[:8]) == list(results.SETTINGS_COLUMNS)
    for col in ("status", "error", *results.METRIC_COLUMNS, "accuracy/color", "wall_time_s"):
        assert col in df.columns
    assert "extra_list" not in df.columns
    assert df.loc[3, "status"] == results.STATUS_FAILED
    assert df.loc[3, "error"] == "RuntimeError: boom"
    assert np.isnan(df.loc[3, "accuracy/overall"])
    assert (df.loc[df["status"] == "ok", "error"].isna()).all()
    assert df.loc[2, "experts"] == "x+y" and df.loc[2, "num_experts"] == 2
    assert json.loads(df.loc[1, "fusion_options"]) == {"dim": 32}
    assert df.loc[2, "accuracy/overall"] == pytest.approx(0.71)


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
    results.write_json(tmp_path / results.MANIFEST, {"cells": [{"cell_id": "c"}]})
    with pytest.raises(ValueError, match="metrics.json is not valid JSON"):
        results.load(tmp_path)


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    results.atomic_write(path, lambda p: p.write_text("old"))

    def broken(p: Path) -> None:
        p.write_text("partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        results.atomic_write(path, broken)
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
    assert "71.0" in text  # accuracies in percent


def test_plots_write_png(sweep_dir: Path, tmp_path: Path) -> None:
    df = results.load(sweep_dir)
    path = results.plot_sweep(df, tmp_path / "plots" / "sweep.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = results.plot_heatmap(df)
    texts = [t.get_text() for t in ax.texts]
    assert "n/a" in texts and "71.0" in texts
    ax = results.plot_accuracy_vs_tokens(df)
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {"a", "b"}
