"""Expert attribution: how much accuracy a trained mixture loses without each of its experts.

:func:`attribute` evaluates a trained run again, first intact, then once per expert with that
expert **mean-ablated**: every map it produces is replaced by its mean map over the evaluation
images (recorded during the intact pass), so the fusion still receives a map of the shape,
scale and typical content it was trained on, but no information about *this* image. The drop
per category (intact minus ablated accuracy, paired on the same questions: bootstrap interval
and exact McNemar p-value, :func:`moe_vision.results.compare`) is the expert's **utilisation**;
``relative_drop = drop / intact accuracy`` is the conditional utilisation rate of "Investigating
Redundancy in MLLMs with Multiple Vision Encoders" (ICLR 2026).

A ragged expert (Pix2Struct's variable grid, a dynamically tiled expert's canvas) also tells
the LLM an image's aspect ratio or tile grid through its validity mask, and a tiled expert may
carry a thumbnail map. Ablation removes all of it: the mean is taken per cell over the images
valid there, the mask becomes a fixed **reference mask** (the cells valid in at least half of
the evaluation images), and the thumbnail is recorded and replaced the same way, so an ablated
expert gives every image the same map, mask and thumbnail. ``mode="zero"`` gives zeros with no
mask.

Why the mean map and not zeros or dropped tokens: zeros are far outside the distribution the
fusion and projector saw (a LayerNorm-free channel concatenation turns them into a constant
shift the LLM never met), which mixes "the expert's information is missing" with "the input is
broken"; dropping an expert's tokens (sequence append) changes the sequence length and
positions the LLM was trained with. Mean ablation treats every strategy alike: map-level
strategies (channel concat, sequence append, deformable, SVA, graph, Mini-Gemini) see a
constant map, and in LLaVA-HR's adapter an ablated high-res expert injects a constant (its gate
still open) while an ablated ViT removes the residual stream the injections flow through.
``mode="zero"`` is available for comparison.

Masking never changes the model's normal path: :func:`ablate_expert` and :func:`record_means`
are context managers that add a forward hook to the expert module (covering ``expert(x)`` and
``expert(x, layers=...)``) and shadow its ``finish`` (covering staged execution), and remove
both on exit.

Writes ``<run>/attribution.json`` (mode, flat ``drop/<expert>/<category>`` metrics with ``/lo``
and ``/hi``, and the table) and ``<run>/attribution.csv``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from experts.spec import FeatureMap
from moe_vision import results
from moe_vision.io import write_json
from moe_vision.results import stats

logger = logging.getLogger(__name__)

MODES: tuple[str, ...] = ("mean", "zero")
ATTRIBUTION_CSV = "attribution.csv"
ATTRIBUTION_COLUMNS: tuple[str, ...] = (
    "expert",
    "category",
    "n",
    "accuracy_intact",
    "accuracy_ablated",
    "drop",
    "lo",
    "hi",
    "p_value",
    "relative_drop",
    "significant",
)
"""Columns of the attribution table; ``drop = accuracy_intact - accuracy_ablated``."""

Key = tuple[Any, ...]
"""Which call produced a map: ``("forward", layers or None, i)`` or ``("finish", 0)``."""


# ---------------------------------------------------------------------------- hooks
def _as_maps(output: Any) -> list[FeatureMap]:
    return list(output) if isinstance(output, (list, tuple)) else [output]


def _layers(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, ...] | None:
    layers = args[1] if len(args) > 1 else kwargs.get("layers")
    return None if layers is None else tuple(int(i) for i in layers)


@contextlib.contextmanager
def _intercept(expert: nn.Module, transform: Any) -> Iterator[None]:
    """Route every map ``expert`` returns through ``transform(key, fmap) -> fmap``."""

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        layers = _layers(args, kwargs)
        maps = [transform(("forward", layers, i), m) for i, m in enumerate(_as_maps(output))]
        return maps if isinstance(output, (list, tuple)) else maps[0]

    original_finish = expert.finish

    def finish(state: Any) -> FeatureMap:
        return transform(("finish", 0), original_finish(state))

    handle = expert.register_forward_hook(hook, with_kwargs=True)
    expert.finish = finish  # instance attribute shadows the method
    try:
        yield
    finally:
        handle.remove()
        del expert.finish


THUMBNAIL: tuple[str] = ("thumbnail",)
"""Appended to a call's key for the thumbnail a tiled expert's map carries."""


@dataclass
class MeanMaps:
    """Running sums of one expert's maps per call key (a tiled expert's thumbnail under
    ``key + ("thumbnail",)``): :meth:`mean` ``(C, H, W)`` and :meth:`reference_mask`."""

    expert: str
    sums: dict[Key, torch.Tensor] = field(default_factory=dict)
    valid: dict[Key, torch.Tensor] = field(default_factory=dict)
    counts: dict[Key, int] = field(default_factory=dict)
    masked: dict[Key, bool] = field(default_factory=dict)

    def add(self, key: Key, fmap: FeatureMap) -> FeatureMap:
        feats = fmap.features.detach().to(torch.float64)  # (B, C, H, W)
        valid = fmap.valid().to(feats.device, torch.float64)  # (B, H, W)
        x = (feats * valid[:, None]).sum(0)  # (C, H, W), valid cells only
        if key in self.sums and self.sums[key].shape != x.shape:
            raise ValueError(
                f"attribution: expert {self.expert!r} returned maps of shape {tuple(x.shape)} "
                f"and {tuple(self.sums[key].shape)} for the same call; a mean map needs one "
                f"grid (use mode='zero')"
            )
        self.sums[key] = self.sums.get(key, 0) + x
        self.valid[key] = self.valid.get(key, 0) + valid.sum(0)  # (H, W)
        self.counts[key] = self.counts.get(key, 0) + fmap.features.shape[0]
        self.masked[key] = self.masked.get(key, False) or fmap.mask is not None
        if fmap.thumbnail is not None:
            self.add(key + THUMBNAIL, fmap.thumbnail)
        return fmap

    def _check(self, key: Key) -> None:
        if key not in self.sums:
            raise KeyError(
                f"attribution: no mean map of expert {self.expert!r} for call {key}; "
                f"recorded: {sorted(self.sums, key=str)}"
            )

    def mean(self, key: Key) -> torch.Tensor:
        """``(C, H, W)``: per cell, the mean over the images whose map is valid there (0 where
        none is)."""
        self._check(key)
        return self.sums[key] / self.valid[key].clamp(min=1)

    def reference_mask(self, key: Key) -> torch.Tensor | None:
        """``(H, W)`` bool: the cells valid in at least half of the recorded images (a fixed
        grid for a ragged expert), or ``None`` when every recorded map was unmasked."""
        self._check(key)
        if not self.masked[key]:
            return None
        return 2 * self.valid[key] >= self.counts[key]


@contextlib.contextmanager
def record_means(model: nn.Module) -> Iterator[list[MeanMaps]]:
    """Record every expert's mean maps while ``model`` runs (one :class:`MeanMaps` each)."""
    means = [MeanMaps(name) for name in model.config.experts]
    with contextlib.ExitStack() as stack:
        for expert, acc in zip(model.experts, means):
            stack.enter_context(_intercept(expert, acc.add))
        yield means


def _ablated(key: Key, fmap: FeatureMap, mode: str, means: MeanMaps | None) -> FeatureMap:
    """``fmap`` (and its thumbnail) with features and mask that are the same for every image."""
    x = fmap.features
    b = x.shape[0]
    if mode == "zero":
        new, mask = torch.zeros_like(x), None
    else:
        assert means is not None
        new = means.mean(key).to(x.dtype).to(x.device).expand_as(x).contiguous()
        ref = means.reference_mask(key)
        mask = None if ref is None else ref.to(x.device).expand(b, *ref.shape).contiguous()
    thumb = fmap.thumbnail
    if thumb is not None:
        thumb = _ablated(key + THUMBNAIL, thumb, mode, means)
    return dataclasses.replace(fmap, features=new, mask=mask, thumbnail=thumb)


@contextlib.contextmanager
def ablate_expert(
    model: nn.Module, index: int, mode: str = "mean", means: MeanMaps | None = None
) -> Iterator[None]:
    """Within the block, expert ``index``'s maps (a tiled expert's thumbnail too) are replaced
    by ``means``' mean maps on its reference mask (``mode="mean"``) or by zeros with no mask
    (``"zero"``): every image then gives the same map and mask (module docstring)."""
    if mode not in MODES:
        raise ValueError(f"attribution mode must be one of {MODES}, got {mode!r}")
    if not 0 <= index < len(model.experts):
        raise IndexError(f"expert index {index} out of range for {model.config.experts}")
    if mode == "mean" and means is None:
        raise ValueError("mode='mean' needs the expert's MeanMaps (see record_means)")

    def replace(key: Key, fmap: FeatureMap) -> FeatureMap:
        return _ablated(key, fmap, mode, means)

    with _intercept(model.experts[index], replace):
        yield


# ---------------------------------------------------------------------------- the analysis
@dataclass
class AttributionResult:
    """Attribution of one run.

    Attributes:
        table: one row per expert x category (``overall`` last), :data:`ATTRIBUTION_COLUMNS`.
        intact: predictions of the intact model.
        ablated: expert name -> predictions with that expert ablated.
        mode: ``"mean"`` or ``"zero"``.
    """

    table: pd.DataFrame
    intact: list[dict[str, Any]]
    ablated: dict[str, list[dict[str, Any]]]
    mode: str

    def to_metrics(self) -> dict[str, float]:
        """Flat columns for a results row: ``drop/<expert>/<category>`` with ``/lo``, ``/hi``."""
        out: dict[str, float] = {}
        for row in self.table.itertuples():
            key = f"drop/{row.expert}/{row.category}"
            out[key], out[f"{key}/lo"], out[f"{key}/hi"] = row.drop, row.lo, row.hi
        return out


def attribution_table(
    intact: list[dict[str, Any]],
    ablated: dict[str, list[dict[str, Any]]],
    confidence: float = stats.CONFIDENCE,
    n_boot: int = stats.N_BOOT,
    seed: int = 0,
) -> pd.DataFrame:
    """The drop table from intact and per-expert ablated predictions (paired per question)."""
    frames = []
    for expert, preds in ablated.items():
        cmp = results.compare(intact, preds, confidence=confidence, n_boot=n_boot, seed=seed)
        frames.append(
            pd.DataFrame(
                {
                    "expert": expert,
                    "category": cmp["category"],
                    "n": cmp["n"],
                    "accuracy_intact": cmp["accuracy_a"],
                    "accuracy_ablated": cmp["accuracy_b"],
                    "drop": cmp["difference"],
                    "lo": cmp["lo"],
                    "hi": cmp["hi"],
                    "p_value": cmp["p_value"],
                    "relative_drop": cmp["difference"]
                    / cmp["accuracy_a"].where(cmp["accuracy_a"] > 0),
                    "significant": cmp["significant"],
                }
            )
        )
    return pd.concat(frames, ignore_index=True)[list(ATTRIBUTION_COLUMNS)]


def load_run(
    run_dir: str | os.PathLike[str], device: str | None = None
) -> tuple[Any, Any, Path, Path]:
    """``(model, run config, eval JSON, image root)`` of a trained run folder."""
    from moe_vision.experiment.run_config import RunConfig, cache_root
    from moe_vision.model.mllm import MoEVisionModel

    run = Path(run_dir)
    for needed in (run / "config.yaml", run / "model" / "config.json"):
        if not needed.is_file():
            raise FileNotFoundError(
                f"{needed} not found: {run} is not a finished run folder (written by "
                f"`moe-vision train` or a sweep cell)"
            )
    cfg = RunConfig.from_yaml(run / "config.yaml")
    splits, image_root = cfg.data.resolve(cache_root(cfg))
    if cfg.data.eval_split not in splits:
        raise KeyError(f"{run}: eval split {cfg.data.eval_split!r} not in {sorted(splits)}")
    model = MoEVisionModel.from_pretrained(run / "model", device=device).eval()
    return model, cfg, splits[cfg.data.eval_split], image_root


def attribute(
    run_dir: str | os.PathLike[str],
    mode: str = "mean",
    *,
    limit: int | None = None,
    batch_size: int | None = None,
    confidence: float = stats.CONFIDENCE,
    n_boot: int = stats.N_BOOT,
    seed: int = 0,
    device: str | None = None,
    write: bool = True,
) -> AttributionResult:
    """Evaluate the run in ``run_dir`` intact and with each expert ablated (module docstring).

    Args:
        run_dir: a finished run or sweep cell folder (``config.yaml``, ``model/``).
        mode: ``"mean"`` (default) or ``"zero"``.
        limit: only the first ``limit`` questions of the evaluation split (default: all, as
            the run's own evaluation; ``data.eval_limit`` of the run applies too).
        batch_size: questions per ``generate`` call (default: the run's ``eval_batch_size``).
        confidence, n_boot, seed: of the paired bootstrap.
        device: where to run (default CPU).
        write: write ``attribution.json`` / ``attribution.csv`` into ``run_dir``.
    """
    from moe_vision.evaluation.evaluate import evaluate

    if mode not in MODES:
        raise ValueError(f"attribution mode must be one of {MODES}, got {mode!r}")
    model, cfg, data, image_root = load_run(run_dir, device)
    limit = limit if limit is not None else cfg.data.eval_limit

    def run_eval() -> list[dict[str, Any]]:
        return evaluate(
            model, data, image_root, batch_size=batch_size or cfg.eval_batch_size, limit=limit
        ).predictions

    with record_means(model) as means:
        intact = run_eval()
    ablated = {}
    for i, name in enumerate(model.config.experts):
        with ablate_expert(model, i, mode, means[i]):
            ablated[name] = run_eval()
        logger.info("attribution: %s ablated (%s)", name, mode)
    table = attribution_table(intact, ablated, confidence, n_boot, seed)
    result = AttributionResult(table, intact, ablated, mode)
    if write:
        run = Path(run_dir)
        write_json(
            run / results.ATTRIBUTION_FILE,
            {"mode": mode, "metrics": result.to_metrics(), "table": table.to_dict("records")},
        )
        results.save(table, run / ATTRIBUTION_CSV)
    return result


def format_attribution(table: pd.DataFrame) -> str:
    """Terminal rendering: accuracies and drops in points, one row per expert x category."""
    view = table.copy()
    for col in ("accuracy_intact", "accuracy_ablated", "drop", "lo", "hi"):
        view[col] = (100 * view[col]).round(1)
    view["relative_drop"] = view["relative_drop"].round(2)
    view["p_value"] = view["p_value"].map(lambda p: f"{p:.3g}")
    return view.to_string(index=False)
