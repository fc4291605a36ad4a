"""Linear probes: a planted linear signal is recovered (and noise is not), pooling against a
brute-force loop, Wilson intervals against the formula by hand, the CLI on tiny experts."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from moe_vision.analysis import probe as P
from moe_vision.cli import main

LABELS = ["red", "green", "blue", "grey"]
RGB = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200), "grey": (120,) * 3}


def planted_data(n_train: int = 80, n_test: int = 60, seed: int = 0) -> dict[str, P.CategoryData]:
    """Images whose mean colour is the label (plus strong pixel noise)."""
    rng = np.random.default_rng(seed)

    def draw(n: int) -> tuple[list[Image.Image], list[str]]:
        labels = [LABELS[i % len(LABELS)] for i in range(n)]
        images = []
        for y in labels:
            px = np.array(RGB[y], dtype=float) + rng.normal(0, 60, (8, 8, 3))
            images.append(Image.fromarray(px.clip(0, 255).astype(np.uint8), "RGB"))
        return images, labels

    (a, b), (c, d) = draw(n_train), draw(n_test)
    return {"color": P.CategoryData(a, b, c, d)}


def pixel_encoder(images: list[Image.Image]) -> tuple[torch.Tensor, None]:
    """The pixels as a (B, 3, H, W) map: the label is a linear function of the mean."""
    arr = np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2), None


def noise_encoder(images: list[Image.Image]) -> tuple[torch.Tensor, None]:
    """Features independent of the image: a probe can only guess."""
    return torch.randn(len(images), 3, 4, 4), None


def test_probe_recovers_planted_signal_and_not_noise() -> None:
    data = planted_data()
    targets = [
        P.ProbeTarget("pixels", "random", pixel_encoder),
        P.ProbeTarget("noise", "random", noise_encoder),
    ]
    df = P.probe(targets, P.ProbeConfig(categories=["color"]), data=data)
    assert list(df.columns) == list(P.COLUMNS)
    signal, noise = df.iloc[0], df.iloc[1]
    assert signal.accuracy >= 0.95 and signal["accuracy/lo"] > 0.85
    assert noise["accuracy/lo"] < 0.25 < noise["accuracy/hi"]  # chance 1/4 inside its interval
    assert signal["accuracy/lo"] > noise["accuracy/hi"]
    assert signal.n_test == 60 and signal.n_train == 80 and signal.features == 3


def test_fit_probe_matches_sklearn_on_a_linear_rule() -> None:
    rng = np.random.default_rng(1)
    w = rng.normal(size=(5, 3))
    x = rng.normal(size=(400, 5))
    y = np.array(["a", "b", "c"])[(x @ w).argmax(1)]  # labels = argmax of a linear map
    pred = P.fit_probe(x[:300], y[:300], x[300:], c=10.0)
    assert (pred == y[300:]).mean() > 0.9


def test_pooling_matches_brute_force_loop() -> None:
    feats = torch.randn(2, 3, 5, 4)
    mask = torch.zeros(2, 5, 4, dtype=torch.bool)
    mask[0, :3, :2] = True
    mask[1] = True
    mean = P.pool_features(feats, mask, "mean")
    for b in range(2):
        cells = [feats[b, :, i, j] for i in range(5) for j in range(4) if mask[b, i, j]]
        torch.testing.assert_close(mean[b], torch.stack(cells).mean(0))
    flat = P.pool_features(feats, None, "flatten", (1, 2)).view(2, 3, 1, 2)
    torch.testing.assert_close(flat[..., 0, 0], feats[..., :, :2].mean((2, 3)))
    torch.testing.assert_close(flat[..., 0, 1], feats[..., :, 2:].mean((2, 3)))
    ragged = P.pool_features(feats, mask, "flatten", (1, 2)).view(2, 3, 1, 2)
    torch.testing.assert_close(ragged[0, :, 0, 0], feats[0, :, :3, :2].mean((1, 2)))
    assert torch.all(ragged[0, :, 0, 1] == 0)  # covers no valid cell
    with pytest.raises(P.ProbeError, match="mask must be"):
        P.pool_features(feats, mask[:, :4], "mean")


def test_wilson_interval_matches_hand_computation() -> None:
    target = P.ProbeTarget("t", "random", noise_encoder)
    labels = ["a"] * 40
    preds = ["a"] * 31 + ["b"] * 9
    row = P.score_row(target, "color", preds, labels, 10, 3, P.ProbeConfig())
    n, p, z = 40, 31 / 40, 1.959963984540054
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert row["accuracy"] == pytest.approx(p)
    assert row["accuracy/lo"] == pytest.approx(centre - half, abs=1e-9)
    assert row["accuracy/hi"] == pytest.approx(centre + half, abs=1e-9)


def test_few_shot_keeps_n_images_per_answer_and_the_test_split() -> None:
    data = planted_data(n_train=80)["color"]
    small = P.few_shot(data, shots=3, seed=0)
    assert sorted(small.train_labels) == sorted(LABELS * 3)
    kept = {id(im) for im in small.train_images}
    assert kept <= {id(im) for im in data.train_images}
    for im, y in zip(small.train_images, small.train_labels):  # images keep their labels
        assert data.train_labels[[id(x) for x in data.train_images].index(id(im))] == y
    assert small.test_images is data.test_images and small.test_labels is data.test_labels
    other = P.few_shot(data, shots=3, seed=1)
    assert {id(im) for im in other.train_images} != kept  # the seed draws other images
    assert len(P.few_shot(data, shots=500, seed=0).train_labels) == 80  # capped by what exists
    # a planted signal is still read from 8 shots per answer; noise is not
    few = {"color": P.few_shot(data, shots=8, seed=0)}
    config = P.ProbeConfig(C=1.0)
    df = P.probe([P.ProbeTarget("pixels", "random", pixel_encoder)], config, few)
    assert df.n_train.tolist() == [32] and df.accuracy.iloc[0] > 0.8


def test_bad_config_and_targets_raise() -> None:
    with pytest.raises(P.ProbeError, match="shots"):
        P.ProbeConfig(shots=0)
    with pytest.raises(P.ProbeError, match="pooling"):
        P.ProbeConfig(pooling="max")
    with pytest.raises(P.ProbeError, match="unknown categories"):
        P.ProbeConfig(categories=["colour"])
    with pytest.raises(P.ProbeError, match="no checkpoint"):
        P.expert_targets("clip-tiny")  # a tiny preset has no weights to probe
    with pytest.raises(P.ProbeError, match="no trained model"):
        P.run_target("/nonexistent/run")


def test_cli_probes_tiny_experts_and_a_fusion(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = [
        "--categories", "color,ocr",
        "--sizes", "align=0,instruct=48,val=0,test=24",
        "--benchmark-dir", str(tmp_path / "bench"),
    ]  # fmt: skip
    csv = tmp_path / "probe.csv"
    assert main(["probe", "clip-tiny", "--random-only", *common, "--csv", str(csv)]) == 0
    out = capsys.readouterr().out
    assert "clip-tiny" in out and "(chance)" in out
    df = pd.read_csv(csv)
    assert list(df.category) == ["color", "ocr"] and set(df.weights) == {"random"}
    assert (df.n_test == 4).all() and (df.n_train == 8).all()
    assert ((df["accuracy/lo"] <= df.accuracy) & (df.accuracy <= df["accuracy/hi"])).all()
    code = main(["probe", "clip-tiny", "convnext-tiny", "--fusion", "channel_concat", *common])
    assert code == 0
    assert "channel_concat(clip-tiny+convnext-tiny)" in capsys.readouterr().out
    shots = ["--shots", "1", "--csv", str(csv)]
    assert main(["probe", "clip-tiny", "--random-only", *common, *shots]) == 0
    full = P.load_data(
        P.ProbeConfig(
            categories=["color", "ocr"],
            benchmark_sizes={"align": 0, "instruct": 48, "val": 0, "test": 24},
            benchmark_dir=str(tmp_path / "bench"),
        )
    )
    answers = [len(set(full[c].train_labels)) for c in ("color", "ocr")]
    assert pd.read_csv(csv).n_train.tolist() == answers  # one image per answer
    assert main(["probe", "clip-tiny", *common]) == 2  # no weights: a clear error, not a crash
    assert "no checkpoint" in capsys.readouterr().err
