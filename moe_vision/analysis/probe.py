"""Linear probes: the cheapest screen of a frozen expert, or of a fusion's output, per category.

The linear-evaluation protocol of representation learning (CLIP, Radford et al., 2021, section
3.2; DINOv2, Oquab et al., 2023, section 7): freeze the encoder, pool its features, and fit a
logistic regression per task. Here a task is a category of the built-in benchmark
(:mod:`moe_vision.data.benchmark`): the probe learns ``answer = f(pooled features)`` from the
benchmark's instruction (and validation) images and is scored on its test split, with a 95%
Wilson interval per category (:func:`moe_vision.results.stats.wilson_interval`). A researcher
screens an expert in about a minute instead of training a multimodal LLM::

    image --expert (frozen)--> map (B, C, H, W) [+ validity mask (B, H, W)]
          --pool--> "mean": (B, C), the masked mean over valid cells
                    "flatten": (B, C * gh * gw), masked average pooling to (gh, gw), flattened
          --StandardScaler + LogisticRegression (scikit-learn, multinomial, L-BFGS)--> answer

What can be probed (:class:`ProbeTarget`): one expert (shipped weights or its random-init twin,
:func:`expert_targets`), an untrained fusion of several experts (its tokens ``(B, N, D)`` seen
as a map on ``fusion.out_grid``), or the experts + fusion of a trained run folder
(:func:`run_target`). :func:`probe` returns the table as a pandas DataFrame (one row per target
and category); :func:`save_table` writes it through :mod:`moe_vision.results`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from moe_vision import results
from moe_vision.data.benchmark_tasks import CATEGORIES, CHANCE

logger = logging.getLogger(__name__)

POOLINGS: tuple[str, ...] = ("mean", "flatten")
COLUMNS: tuple[str, ...] = (
    "target",
    "weights",
    "pooling",
    "category",
    "accuracy",
    "accuracy/lo",
    "accuracy/hi",
    "chance",
    "n_train",
    "n_test",
    "features",
)
"""Columns of the probe table, in order."""

Encoder = Callable[[list[Image.Image]], tuple[torch.Tensor, torch.Tensor | None]]
"""``images -> (features (B, C, H, W), mask (B, H, W) bool or None)``."""


class ProbeError(ValueError):
    """A probe that cannot run: says what was wrong and what was expected."""


@dataclass
class ProbeConfig:
    """How features are pooled and probes are fitted, and on which data.

    Attributes:
        pooling: ``"mean"`` or ``"flatten"`` (see the module docstring).
        flatten_grid: the ``(gh, gw)`` grid ``"flatten"`` pools to before flattening.
        categories: benchmark categories to probe (``None``: all).
        train_splits: splits the probe is fitted on.
        test_split: split it is scored on.
        benchmark_seed: seed of the built-in benchmark.
        benchmark_sizes: records per split (``BenchmarkSizes`` fields; ``None``: defaults).
        benchmark_dir: where the benchmark lives (``None``: the runs' shared cache folder).
        C: inverse L2 regularisation strength of the logistic regression.
        max_iter: L-BFGS iterations.
        batch_size: images per expert forward.
        seed: seeds random-init experts and fusions.
        confidence: interval confidence level.
        shots: fit on this many training images per answer, drawn at random (a few-shot linear
            probe, as in CLIP's Figure 6: it measures how little data the features need, where
            the full probe only says whether the answer is linearly readable at all); ``None``:
            every training image. The interval covers the test questions, not the draw:
            vary ``shots_seed`` to see the draw's spread.
        shots_seed: seed of the few-shot draw.
    """

    pooling: str = "mean"
    flatten_grid: tuple[int, int] = (2, 2)
    categories: list[str] | None = None
    train_splits: tuple[str, ...] = ("instruct", "val")
    test_split: str = "test"
    benchmark_seed: int = 0
    benchmark_sizes: dict[str, int] | None = None
    benchmark_dir: str | None = None
    C: float = 1.0
    max_iter: int = 2000
    batch_size: int = 64
    seed: int = 0
    confidence: float = 0.95
    shots: int | None = None
    shots_seed: int = 0

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ProbeError(f"pooling={self.pooling!r}; expected one of {POOLINGS}")
        grid = tuple(int(g) for g in self.flatten_grid)
        if len(grid) != 2 or min(grid) < 1:
            raise ProbeError(f"flatten_grid={self.flatten_grid}; expected two positive ints")
        self.flatten_grid = grid  # type: ignore[assignment]
        bad = sorted(set(self.categories or ()) - set(CATEGORIES))
        if bad:
            raise ProbeError(f"unknown categories {bad}; expected some of {list(CATEGORIES)}")
        if self.shots is not None and self.shots < 1:
            raise ProbeError(f"shots={self.shots}; expected a positive number of images per answer")
        if self.C <= 0 or self.max_iter < 1 or self.batch_size < 1:
            raise ProbeError(
                f"C={self.C}, max_iter={self.max_iter}, batch_size={self.batch_size}; "
                "expected C > 0, max_iter >= 1, batch_size >= 1"
            )


@dataclass
class ProbeTarget:
    """Something whose features are probed.

    Attributes:
        label: its name in the table (e.g. ``"clip-mini"``, ``"channel_concat(clip-mini+...)"``).
        weights: ``"pretrained"``, ``"random"`` (init twin) or ``"run"`` (a trained run).
        encode: ``images -> (features (B, C, H, W), mask (B, H, W) or None)``, no gradients.
    """

    label: str
    weights: str
    encode: Encoder = field(repr=False)


# ---------------------------------------------------------------------------- targets
def _expert_encoder(expert: torch.nn.Module) -> Encoder:
    expert.eval().requires_grad_(False)

    def encode(images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor | None]:
        fmap = expert(expert.preprocess(images))
        return fmap.features.float(), fmap.mask

    return encode


def _fusion_encoder(experts: Sequence[torch.nn.Module], fuse: torch.nn.Module) -> Encoder:
    """Fused tokens ``(B, N, D)`` as a map ``(B, D, Gh, Gw)`` (``(B, D, 1, N)`` without a grid)."""
    for module in (*experts, fuse):
        module.eval().requires_grad_(False)

    def encode(images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokens = fuse.run(experts, [e.preprocess(images) for e in experts])  # (B, N, D)
        b, n, d = tokens.shape
        grid = fuse.out_grid
        gh, gw = grid if grid is not None and grid[0] * grid[1] == n else (1, n)
        return tokens.float().transpose(1, 2).reshape(b, d, gh, gw), None

    return encode


def expert_targets(
    name: str, *, pretrained: bool = True, twin: bool = True, seed: int = 0, **options: Any
) -> list[ProbeTarget]:
    """Probe targets of expert preset ``name``: its shipped weights and/or its random-init twin.

    Args:
        name: a preset (``experts.list_experts()``).
        pretrained: include the preset's own checkpoint (``create_expert(name, pretrained=True)``).
        twin: include the same architecture at random init (seeded with ``seed``).
        **options: further ``create_expert`` arguments (``input_size``, ``checkpoint``...).

    Raises:
        ProbeError: neither was asked for, or the preset has no checkpoint to load.
    """
    import experts

    if not (pretrained or twin):
        raise ProbeError(f"expert {name!r}: nothing to probe (pretrained=False and twin=False)")
    spec = experts.get_spec(name)
    out = []
    if pretrained:
        if spec.checkpoint is None and options.get("checkpoint") is None:
            raise ProbeError(
                f"expert {name!r} has no checkpoint (random init only); probe its random init "
                "with pretrained=False (--random-only), or give checkpoint="
            )
        expert = experts.create_expert(name, pretrained=True, **options)
        out.append(ProbeTarget(name, "pretrained", _expert_encoder(expert)))
    if twin:
        torch.manual_seed(seed)
        random_options = {k: v for k, v in options.items() if k != "checkpoint"}
        expert = experts.create_expert(name, **random_options)
        out.append(ProbeTarget(name, "random", _expert_encoder(expert)))
    return out


def fusion_target(
    names: Sequence[str],
    fusion_name: str,
    *,
    pretrained: bool = True,
    seed: int = 0,
    fusion_options: dict[str, Any] | None = None,
) -> ProbeTarget:
    """An untrained fusion (seeded init) of experts ``names`` (shipped weights when
    ``pretrained`` and the preset has them, else random init)."""
    import experts
    import fusion

    torch.manual_seed(seed)
    has_weights = [experts.get_spec(n).checkpoint is not None for n in names]
    zoo = [
        experts.create_expert(n, pretrained=pretrained and w) for n, w in zip(names, has_weights)
    ]
    fuse = fusion.create_fusion(fusion_name, [e.spec for e in zoo], **(fusion_options or {}))
    label = f"{fusion_name}({'+'.join(names)})"
    return ProbeTarget(label, "pretrained" if pretrained else "random", _fusion_encoder(zoo, fuse))


def run_target(run_dir: str | os.PathLike[str]) -> ProbeTarget:
    """The experts + fusion of a trained run folder (``<run>/model``), as trained.

    Raises:
        ProbeError: the folder holds no saved model.
    """
    from moe_vision.model.mllm import MoEVisionModel

    run = Path(run_dir)
    folder = run / "model" if (run / "model").is_dir() else run
    if not (folder / "config.json").is_file():
        raise ProbeError(
            f"{run}: no trained model found (looked for {folder / 'config.json'}); expected a "
            "run folder written by `moe-vision train` or a sweep cell"
        )
    model = MoEVisionModel.from_pretrained(folder)
    label = f"{model.config.fusion}({'+'.join(model.config.experts)})@{run.name}"
    return ProbeTarget(label, "run", _fusion_encoder(list(model.experts), model.fusion))


# ---------------------------------------------------------------------------- features
def pool_features(
    features: torch.Tensor,
    mask: torch.Tensor | None,
    pooling: str = "mean",
    grid: tuple[int, int] = (2, 2),
) -> torch.Tensor:
    """Pool a map ``(B, C, H, W)`` (``mask (B, H, W)`` bool, True = valid) to ``(B, F)``.

    ``"mean"``: ``F = C``, the mean over valid cells. ``"flatten"``: ``F = C * gh * gw``: each of
    ``grid``'s cells is the mean of the valid map cells it covers (adaptive average pooling of
    ``features * mask`` divided by that of ``mask``; 0 where a cell covers no valid cell).
    """
    if features.dim() != 4:
        raise ProbeError(f"features must be (B, C, H, W), got shape {tuple(features.shape)}")
    b, _, h, w = features.shape
    if mask is None:
        m = features.new_ones(b, 1, h, w)
    else:
        if tuple(mask.shape) != (b, h, w):
            raise ProbeError(f"mask must be (B, H, W) = {(b, h, w)}, got {tuple(mask.shape)}")
        m = mask[:, None].to(features.dtype)
    if pooling == "mean":
        return (features * m).sum((2, 3)) / m.sum((2, 3)).clamp_min(1.0)
    if pooling == "flatten":
        num = F.adaptive_avg_pool2d(features * m, grid)
        den = F.adaptive_avg_pool2d(m, grid)
        return (num / den.clamp_min(1e-6)).flatten(1)
    raise ProbeError(f"pooling={pooling!r}; expected one of {POOLINGS}")


@torch.no_grad()
def extract(target: ProbeTarget, images: Sequence[Image.Image], config: ProbeConfig) -> np.ndarray:
    """Pooled features ``(len(images), F)`` of ``target``, in batches of ``config.batch_size``."""
    chunks = []
    for start in range(0, len(images), config.batch_size):
        feats, mask = target.encode(list(images[start : start + config.batch_size]))
        chunks.append(pool_features(feats, mask, config.pooling, config.flatten_grid))
    return torch.cat(chunks).numpy().astype(np.float64)


# ---------------------------------------------------------------------------- data
@dataclass
class CategoryData:
    """One category's probe data: images and answer labels of the train and test splits."""

    train_images: list[Image.Image]
    train_labels: list[str]
    test_images: list[Image.Image]
    test_labels: list[str]


def few_shot(data: CategoryData, shots: int, seed: int) -> CategoryData:
    """``data`` with at most ``shots`` training images per answer, drawn without replacement
    by ``np.random.default_rng(seed)`` (training order kept); the test split unchanged."""
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for label in sorted(set(data.train_labels)):
        rows = [i for i, y in enumerate(data.train_labels) if y == label]
        keep += rng.choice(rows, size=min(shots, len(rows)), replace=False).tolist()
    keep.sort()
    return CategoryData(
        [data.train_images[i] for i in keep],
        [data.train_labels[i] for i in keep],
        data.test_images,
        data.test_labels,
    )


def _answer(record: dict[str, Any], path: Path) -> str:
    for turn in record.get("conversations", []):
        if turn.get("from") == "gpt":
            return str(turn["value"]).strip()
    raise ProbeError(f"{path}: record {record.get('id')!r} has no answer ('gpt' turn)")


def load_data(config: ProbeConfig) -> dict[str, CategoryData]:
    """The built-in benchmark's images and answers per category (generated once and cached)."""
    from moe_vision.experiment.run_config import DataConfig
    from moe_vision.features.cache import default_cache_dir

    data = DataConfig(
        benchmark_seed=config.benchmark_seed,
        benchmark_sizes=config.benchmark_sizes,
        benchmark_dir=config.benchmark_dir,
    )
    splits, image_root = data.resolve(default_cache_dir().parent)
    wanted = list(config.categories or CATEGORIES)
    out = {c: CategoryData([], [], [], []) for c in wanted}
    for split in (*config.train_splits, config.test_split):
        if split not in splits:
            raise ProbeError(f"unknown split {split!r}; the benchmark has {sorted(splits)}")
        path = Path(splits[split])
        for record in json.loads(path.read_text(encoding="utf-8")):
            cat = record.get("category")
            if cat not in out:
                continue
            image = Image.open(image_root / record["image"]).convert("RGB")
            test = split == config.test_split
            (out[cat].test_images if test else out[cat].train_images).append(image)
            (out[cat].test_labels if test else out[cat].train_labels).append(_answer(record, path))
    if config.shots is not None:
        out = {cat: few_shot(d, config.shots, config.shots_seed) for cat, d in out.items()}
    for cat, d in out.items():
        if len(set(d.train_labels)) < 2 or not d.test_labels:
            raise ProbeError(
                f"category {cat!r}: {len(d.train_labels)} training and {len(d.test_labels)} test "
                f"records; need two answers or more to train on and one test record at least "
                f"(benchmark sizes {config.benchmark_sizes})"
            )
    return out


# ---------------------------------------------------------------------------- fitting
def fit_probe(
    x_train: np.ndarray,
    y_train: Sequence[str],
    x_test: np.ndarray,
    c: float = 1.0,
    max_iter: int = 2000,
) -> np.ndarray:
    """Predicted labels of ``x_test (n, F)`` from a logistic regression fitted on ``x_train``.

    scikit-learn's ``LogisticRegression`` (L2, L-BFGS; multinomial for more than two classes)
    after a ``StandardScaler`` fitted on the training features.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))
    model.fit(x_train, list(y_train))
    return model.predict(x_test)


def score_row(
    target: ProbeTarget,
    category: str,
    predictions: Sequence[str],
    labels: Sequence[str],
    n_train: int,
    n_features: int,
    config: ProbeConfig,
) -> dict[str, Any]:
    """One table row: accuracy of ``predictions`` against ``labels`` with its Wilson interval."""
    from moe_vision.results.stats import wilson_interval

    correct = int(sum(p == y for p, y in zip(predictions, labels)))
    lo, hi = wilson_interval(correct, len(labels), config.confidence)
    return {
        "target": target.label,
        "weights": target.weights,
        "pooling": config.pooling,
        "category": category,
        "accuracy": correct / len(labels),
        "accuracy/lo": lo,
        "accuracy/hi": hi,
        "chance": CHANCE[category],
        "n_train": n_train,
        "n_test": len(labels),
        "features": n_features,
    }


def probe(
    targets: Sequence[ProbeTarget],
    config: ProbeConfig | None = None,
    data: dict[str, CategoryData] | None = None,
) -> pd.DataFrame:
    """Fit and score a linear probe per target and category; the table as a DataFrame.

    Args:
        targets: what to probe (:func:`expert_targets`, :func:`fusion_target`, :func:`run_target`).
        config: pooling, data and fitting options (default :class:`ProbeConfig`).
        data: the per-category images (default: :func:`load_data` of ``config``).

    Returns:
        One row per target and category, columns :data:`COLUMNS`.
    """
    config = config or ProbeConfig()
    data = data if data is not None else load_data(config)
    rows = []
    for target in targets:
        for category, d in data.items():
            x_train = extract(target, d.train_images, config)
            x_test = extract(target, d.test_images, config)
            pred = fit_probe(x_train, d.train_labels, x_test, config.C, config.max_iter)
            row = score_row(
                target, category, pred, d.test_labels, len(d.train_labels), x_train.shape[1], config
            )
            logger.info(
                "probe %s (%s) %s: %.3f [%.3f, %.3f]",
                target.label,
                target.weights,
                category,
                row["accuracy"],
                row["accuracy/lo"],
                row["accuracy/hi"],
            )
            rows.append(row)
    return pd.DataFrame(rows, columns=list(COLUMNS))


def format_probe_table(df: pd.DataFrame) -> str:
    """Targets as rows, categories as columns: ``accuracy [lo, hi]``; chance in the last row."""
    if df.empty:
        return "(no probes)"
    cell = df.apply(
        lambda r: f"{r['accuracy']:.2f} [{r['accuracy/lo']:.2f}, {r['accuracy/hi']:.2f}]", axis=1
    )
    wide = (
        df.assign(cell=cell)
        .pivot_table(
            index=["target", "weights"],
            columns="category",
            values="cell",
            aggfunc="first",
            sort=False,
        )
        .reset_index()
    )
    cats = [c for c in CATEGORIES if c in wide.columns]
    chance = {"target": "(chance)", "weights": "", **{c: f"{CHANCE[c]:.2f}" for c in cats}}
    wide = pd.concat([wide[["target", "weights", *cats]], pd.DataFrame([chance])])
    return wide.to_string(index=False)


def save_table(df: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write the probe table atomically (CSV or Parquet by suffix)."""
    return results.save(df, path)


def config_dict(config: ProbeConfig) -> dict[str, Any]:
    """The config as plain JSON types (for logs and run records)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


__all__ = [
    "COLUMNS",
    "POOLINGS",
    "CategoryData",
    "ProbeConfig",
    "ProbeError",
    "ProbeTarget",
    "expert_targets",
    "extract",
    "fit_probe",
    "format_probe_table",
    "fusion_target",
    "load_data",
    "pool_features",
    "probe",
    "run_target",
    "save_table",
]
