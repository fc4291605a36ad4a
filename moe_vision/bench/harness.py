"""The ``moe-vision bench`` harness: sections, sizes, rows and the CSV.

A bench section is a function ``fn(cfg, device, work_dir) -> rows`` registered under a name
(:func:`register_section`); :func:`run_bench` runs the chosen ones in registration order on one
device, in one scratch folder, and writes their rows (:func:`bench_row`) to the long-format CSV
(:data:`CSV_COLUMNS`) as they come: a section may return its rows or yield them one by one, and
each row is appended to the CSV (and flushed) the moment it exists, so a run killed by a time
limit keeps what it measured. At the end the whole table is written again atomically.
:class:`BenchConfig` holds every section's sizes: its defaults are the reported run, tests and
``--quick`` shrink them.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import logging
import os
import platform
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from experts.registry import Registry
from moe_vision import results

logger = logging.getLogger(__name__)

CSV_COLUMNS: tuple[str, ...] = ("section", "config", "metric", "value", "unit", "device", "note")
DEFAULT_MODEL: dict[str, Any] = {
    "experts": ["clip-tiny", "convnext-tiny"],
    "fusion": "channel_concat",
}
REAL_MODEL: dict[str, Any] = {
    "experts": ["clip-vit-l-336", "convnext-l-clip-320"],
    "fusion": "channel_concat",
    "llm_options": {"max_position_embeddings": 2048},
}


BenchSection = Callable[["BenchConfig", torch.device, Path], Iterable[dict]]
BENCH_SECTIONS: Registry[BenchSection] = Registry("bench section", ordered=True)
"""Section name -> ``fn(cfg, device, work_dir) -> rows``, in registration (and run) order."""


def register_section(name: str) -> Callable[[BenchSection], BenchSection]:
    """Register ``fn(cfg, device, work_dir) -> rows`` as the bench section ``name``.

    ``rows`` is a list or a generator of :func:`bench_row` dicts; a generator's rows reach the
    CSV one by one, as they are measured. A new section is one module under
    :mod:`moe_vision.bench` that registers itself (imported by the package). Sections run in
    registration order.
    """

    return BENCH_SECTIONS.register(name)


def list_sections() -> list[str]:
    """The registered section names, in the order they run."""
    return BENCH_SECTIONS.list()


@dataclass
class BenchConfig:
    """Sizes of the benchmarks (the defaults are the reported run; tests shrink them).

    Attributes:
        model: ModelConfig dict of the default configuration.
        batch_size: samples per step for the default configuration.
        repeats: timed repetitions (medians are reported); ``warmup`` untimed ones first.
        cache_fusions: fusion strategies of the frozen-expert sweep.
        cache_sizes: built-in benchmark sizes of that sweep.
        cache_run: RunConfig options of its cells (stage overrides, ...).
        cache_real_model / cache_real_fusions / cache_real_sizes / cache_real_run: the same
            sweep with real-size randomly initialised experts on a few dozen training images
            (``None``: skip); ``cache_real_sweep=False`` keeps only their per-image
            forward-vs-read timing.
        cell_overrides: sweep-spec fields replacing the default sweep's in the ``cells`` section
            (``None``: the default sweep's first cell as it is).
        cell_compile: also time the cell's training step with the LLM's blocks compiled
            (``train.compile_llm``): compile time and speed-up over eager.
        real_model: ModelConfig dict of the real-size configuration (``None``: skip it).
        real_batch_size: its batch size.
        real_steps: its timed steps.
        matmul_size: ``n`` of the ``n x n`` fp32 matmuls that measure the peak.
        seed: benchmark data and init seed.
    """

    model: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(DEFAULT_MODEL))
    batch_size: int = 8
    repeats: int = 10
    warmup: int = 2
    cache_fusions: list[str] = field(
        default_factory=lambda: ["channel_concat", "sequence_append", "mini_gemini"]
    )
    cache_sizes: dict[str, int] = field(
        default_factory=lambda: {"align": 192, "instruct": 192, "val": 12, "test": 48}
    )
    cache_run: dict[str, Any] = field(
        default_factory=lambda: {
            "overrides": {"*": {"batch_size": 16, "lr": 2e-3, "epochs": 1}},
            "train": {"progress_bar": False, "log_with": []},
        }
    )
    cache_real_model: dict[str, Any] | None = field(
        default_factory=lambda: {k: v for k, v in REAL_MODEL.items() if k != "fusion"}
    )
    cache_real_fusions: list[str] = field(
        default_factory=lambda: ["channel_concat", "sequence_append", "deformable"]
    )
    cache_real_sizes: dict[str, int] = field(
        default_factory=lambda: {"align": 2, "instruct": 24, "val": 0, "test": 2}
    )
    cache_real_run: dict[str, Any] = field(
        default_factory=lambda: {
            # both stages on the instruct split, 2 epochs: each image's maps serve 3 fusions x
            # 2 stages x 2 epochs = 12 uses; the evaluation (uncached) is cut to 1 question.
            # A real-size expert forward is ~0.5 TFLOP per image: keep this small on a CPU.
            "overrides": {"*": {"data": "instruct", "batch_size": 4, "lr": 1e-3, "epochs": 2}},
            "data": {"eval_limit": 1},
            "train": {"progress_bar": False, "log_with": []},
        }
    )
    cache_real_sweep: bool = True
    cell_overrides: dict[str, Any] | None = None
    cell_compile: bool = True
    real_model: dict[str, Any] | None = field(default_factory=lambda: copy.deepcopy(REAL_MODEL))
    real_batch_size: int = 1
    real_steps: int = 2
    matmul_size: int = 2048
    seed: int = 0


def describe_device(device: torch.device) -> str:
    """The machine in words, e.g. ``"CPU x86_64, 2 threads"`` or ``"cuda NVIDIA H100"``."""
    if device.type == "cuda":
        return f"cuda {torch.cuda.get_device_name(device)}"
    return f"CPU {platform.machine()}, {torch.get_num_threads()} threads"


def config_name(model_cfg: dict[str, Any], batch_size: int) -> str:
    fusion = model_cfg.get("fusion", "channel_concat")
    return f"{'+'.join(model_cfg['experts'])} {fusion} b{batch_size}"


def bench_row(
    section: str, config: str, metric: str, value: float, unit: str, device: torch.device, note: str
) -> dict[str, Any]:
    return {
        "section": section,
        "config": config,
        "metric": metric,
        "value": float(value),
        "unit": unit,
        "device": describe_device(device),
        "note": note,
    }


def run_bench(
    cfg: BenchConfig | None = None,
    out: str | os.PathLike[str] = "results/bench.csv",
    sections: Sequence[str] | None = None,
    device: str | torch.device | None = None,
    work_dir: str | os.PathLike[str] | None = None,
) -> pd.DataFrame:
    """Run the benchmark ``sections`` and write the long-format CSV to ``out``: each row as
    it is measured (appended and flushed), then the whole table atomically.

    Args:
        cfg: sizes (default: :class:`BenchConfig`, the reported run).
        out: CSV path.
        sections: any of :func:`list_sections` (default: all).
        device: default: CUDA when available, else CPU.
        work_dir: scratch folder (default: a temporary folder, removed afterwards).
    """
    cfg = cfg or BenchConfig()
    sections = list(sections) if sections is not None else list_sections()
    bad = sorted(set(sections) - set(BENCH_SECTIONS))
    if bad:
        raise ValueError(f"unknown bench sections {bad}; valid sections are {list_sections()}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows: list[dict] = []
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    streamed = Path(out).suffix == ".csv"  # a Parquet table is written at the end only
    with (
        tempfile.TemporaryDirectory(dir=work_dir) as tmp,
        open(out, "w", newline="") if streamed else contextlib.nullcontext() as stream,
    ):
        writer = csv.DictWriter(stream, fieldnames=list(CSV_COLUMNS)) if stream else None
        if writer:
            writer.writeheader()
            stream.flush()
        work = Path(tmp)
        for name, fn in BENCH_SECTIONS.items():
            if name in sections:
                logger.info("bench: %s", name)
                for row in fn(cfg, dev, work):
                    rows.append(row)
                    if writer:
                        writer.writerow({k: row.get(k) for k in CSV_COLUMNS})
                        stream.flush()
    df = pd.DataFrame(rows, columns=list(CSV_COLUMNS))
    results.save(df, out)  # the whole table again, atomically
    return df
