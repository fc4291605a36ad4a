"""Probe scores for a mini preset's card: its weights against its random-init twin.

The linear probe of :mod:`moe_vision.analysis.probe` (frozen expert, mean-pooled map, logistic
regression per benchmark category, 95% Wilson intervals) run on two targets: the expert as just
pretrained and the same architecture at random init. The card stores both, so a reader sees
what pretraining bought in each category.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from moe_vision.analysis.probe import ProbeConfig, config_dict, expert_targets, probe

logger = logging.getLogger(__name__)


def probe_scores(
    name: str, checkpoint: str | Path, config: ProbeConfig | None = None, twin_seed: int = 0
) -> dict[str, Any]:
    """Probe accuracy per category of preset ``name`` loaded from ``checkpoint`` (through the
    family's own ``load_checkpoint``) and of its random-init twin (seeded with ``twin_seed``).

    Returns:
        ``{"pretrained": {category: {"accuracy", "lo", "hi"}}, "random": {...}, "config": ...}``.
    """
    config = config or ProbeConfig()
    targets = expert_targets(name, seed=twin_seed, checkpoint=str(checkpoint))
    table = probe(targets, config)
    out: dict[str, Any] = {"pretrained": {}, "random": {}}
    for row in table.to_dict("records"):
        out[row["weights"]][row["category"]] = {
            "accuracy": round(float(row["accuracy"]), 4),
            "lo": round(float(row["accuracy/lo"]), 4),
            "hi": round(float(row["accuracy/hi"]), 4),
            "n_test": int(row["n_test"]),
        }
    out["config"] = config_dict(config)
    out["twin_seed"] = twin_seed
    return out


def refresh_card(name: str, out_dir: str | Path, config: ProbeConfig | None = None) -> Path:
    """Re-probe the weights ``<out_dir>/<name>.safetensors`` and rewrite the ``probe`` field of
    their card ``<out_dir>/<name>.json`` (atomically; every other field kept). With
    ``config.categories`` set, only those categories' scores are replaced (after a benchmark
    category changes, the others need not be re-probed).

    Raises:
        FileNotFoundError: the weights or the card are missing (names the file).
    """
    from moe_vision.io import read_json, write_json

    out = Path(out_dir)
    weights, card_path = out / f"{name}.safetensors", out / f"{name}.json"
    for path in (weights, card_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found; write it first with `moe-vision pretrain {name}`"
            )
    card = read_json(card_path)
    fresh = probe_scores(name, weights, config)
    if config is not None and config.categories and "probe" in card:
        for weights_kind in ("pretrained", "random"):
            card["probe"][weights_kind] |= fresh[weights_kind]
    else:
        card["probe"] = fresh
    logger.info("re-probed %s and updated %s", name, card_path)
    return write_json(card_path, card)
