"""Bench section ``data``: a million-record JSONL through the indexed dataset and its workers.

For each record count ``N`` of :data:`DATA_BENCH` (100K and 1M in the reported run) a JSONL of
``N`` LLaVA records (single-image, text-only and two-image records over a few generated images)
is written, then a fresh Python process (so that memory is the data path's own, not the
benchmark's) builds the default model's preprocessors and tokenizer,
:class:`~moe_vision.data.llava.LlavaDataset` and a shuffled DataLoader with workers, and reports:

* ``index_s``: building the dataset (the byte-offset index);
* ``first_batch_s``: from building the dataset to the first batch out of the workers;
* ``records_per_s``: records per second through the workers after the first batch;
* ``peak_rss_mb``: peak resident memory of the main process (``ru_maxrss``); on this
  platform ``import torch`` alone takes about 0.7 GB and the expert libraries 0.3 GB more, so
* ``data_rss_mb``: what the data path adds: the largest resident set size sampled after
  indexing, after the first batch and after the timed batches, minus the resident set size
  just before the dataset was built (the index, the loader, the prefetched batches);
* ``worker_peak_rss_mb``: the largest peak of a worker process (forked: shares its parent's
  pages, which count in both).

Goal (issue 12): 1M records, first batch within 30 s and resident memory under 1 GiB.

**Time to the first optimiser step** (issue 27): ``moe-vision train`` with the ``llava`` recipe
(experts frozen in both stages, so the feature cache stores every image's maps before each
stage, :mod:`moe_vision.features.precompute`) on a JSONL of ``N`` records over ``M`` images
(default: the largest record count over 300 images), a fresh cache folder, run in a fresh
process through the command's own argument parser and
:func:`~moe_vision.experiment.run.run_experiment`. Reported from the moment the process is
started: ``first_step_s`` (the first stage's first optimiser step) and
``last_stage_first_step_s`` (the last stage's, after its own precompute, which finds every map
stored). Goal: 1M records under a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moe_vision.bench.harness import bench_row, register_section

if TYPE_CHECKING:
    from moe_vision.experiment.run_config import RunConfig

logger = logging.getLogger(__name__)


@dataclass
class DataBenchConfig:
    """Sizes of the ``data`` section.

    Attributes:
        records: record counts measured, one fresh process each.
        workers: DataLoader workers.
        batch_size: records per batch.
        throughput_batches: batches timed after the first.
        experts: experts whose preprocessing runs on every image.
        first_step_records: record counts of the time-to-first-step rows (``None``: the
            largest of ``records``).
        first_step_images: distinct images those records use.
    """

    records: list[int] = field(default_factory=lambda: [100_000, 1_000_000])
    workers: int = 2
    batch_size: int = 16
    throughput_batches: int = 40
    experts: list[str] = field(default_factory=lambda: ["clip-tiny", "convnext-tiny"])
    first_step_records: list[int] | None = None
    first_step_images: int = 300


DATA_BENCH = DataBenchConfig()
"""The reported run's sizes (``moe-vision bench --quick`` and tests shrink them)."""


def write_records(path: Path, n: int, images: list[str], seed: int = 0) -> None:
    """``n`` LLaVA records, one per line: 90% single-image, 5% text-only, 5% two images."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            u = rng.random()
            question = f"What is shown in picture {i}? Answer in a few words."
            if u < 0.05:
                image: Any = None
                human = question.replace("picture", "story")
            elif u < 0.10:
                image = [rng.choice(images), rng.choice(images)]
                human = f"<image>\n<image>\nCompare the two pictures of item {i}."
            else:
                image = rng.choice(images)
                human = f"<image>\n{question}" if u < 0.55 else f"{question}\n<image>"
            rec: dict[str, Any] = {
                "id": f"r{i}",
                "conversations": [
                    {"from": "human", "value": human},
                    {"from": "gpt", "value": f"a {rng.choice(['red', 'blue', 'green'])} shape"},
                ],
            }
            if image is not None:
                rec["image"] = image
            f.write(json.dumps(rec) + "\n")


def write_images(root: Path, count: int = 16, size: int = 96) -> list[str]:
    """``count`` small random PNGs under ``root``; their relative paths."""
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for k in range(count):
        name = f"img{k:03d}.png"
        pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / name)
        names.append(name)
    return names


def current_rss_mb() -> float:
    """Resident set size of this process now (Linux ``/proc/self/status``), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(data: Path, images: Path, cfg: DataBenchConfig) -> dict[str, float]:
    """The measurements of the module docstring, in this process (run it in a fresh one)."""
    import experts
    from moe_vision.data.llava import LlavaDataset
    from moe_vision.model.llm import build_tokenizer
    from moe_vision.training.samplers import EpochBatchSampler

    tokenizer = build_tokenizer()
    pre = [experts.create_expert(name).preprocessor for name in cfg.experts]
    base = current_rss_mb()
    t0 = time.perf_counter()
    ds = LlavaDataset(data, images, pre, tokenizer, num_visual_tokens=64, max_length=2048)
    t_index = time.perf_counter() - t0
    rss = [current_rss_mb()]
    loader = torch.utils.data.DataLoader(
        ds,
        batch_sampler=EpochBatchSampler(len(ds), cfg.batch_size, seed=0),
        collate_fn=ds.collate,
        num_workers=cfg.workers,
        prefetch_factor=2 if cfg.workers else None,
    )
    it = iter(loader)
    next(it)
    t_first = time.perf_counter() - t0
    rss.append(current_rss_mb())
    t1, seen = time.perf_counter(), 0
    for _ in range(cfg.throughput_batches):
        seen += len(next(it)["ids"])
    rate = seen / (time.perf_counter() - t1)
    rss.append(current_rss_mb())
    del it, loader  # joins the workers, so RUSAGE_CHILDREN covers them
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "records": float(len(ds)),
        "index_s": t_index,
        "first_batch_s": t_first,
        "records_per_s": rate,
        "peak_rss_mb": peak,
        "data_rss_mb": max(rss) - base,
        "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def first_step_config(data: Path, images: Path, test: Path, cache: Path) -> RunConfig:
    """The :class:`~moe_vision.experiment.run_config.RunConfig` of the time-to-first-step rows,
    as ``moe-vision train --recipe llava --data align=DATA --data instruct=DATA --data test=TEST
    --image-root IMAGES --cache-dir CACHE --override '*.max_steps=1'`` builds it (one step per
    stage)."""
    from moe_vision.experiment.run_config import RunConfig

    config = RunConfig().to_dict()
    config["recipe"] = "llava"
    if config.get("overrides") is None:  # start from the recipe's defaults, as --override does
        config["overrides"] = RunConfig.from_dict(config).effective_overrides()
    config["overrides"].setdefault("*", {})["max_steps"] = 1
    config["cache_dir"] = str(cache)
    splits = {"align": str(data), "instruct": str(data), "test": str(test)}
    config["data"]["splits"] = {**config["data"].get("splits", {}), **splits}
    config["data"]["image_root"] = str(images)
    return RunConfig.from_dict(config)


def time_to_first_step(n: int, n_images: int, work: Path) -> dict[str, float]:
    """Seconds from starting a ``moe-vision train`` process (``llava`` recipe, a fresh feature
    cache) on ``n`` records over ``n_images`` images to each stage's first optimiser step."""
    images = work / f"first-step-images-{n_images}"
    names = write_images(images, count=n_images)
    data, test = work / f"first-step-{n}.jsonl", work / "first-step-test.jsonl"
    write_records(data, n, names)
    write_records(test, 8, names, seed=1)
    out, cache = work / f"first-step-run-{n}", work / f"first-step-cache-{n}"
    child = "import sys; from moe_vision.bench.data import first_steps; first_steps(sys.argv[1:])"
    start = time.time()
    args = [sys.executable, "-c", child, *map(str, (data, images, test, out, cache))]
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench data (first step, {n} records) failed:\n{done.stderr[-3000:]}")
    stamps = json.loads(done.stdout.strip().splitlines()[-1])
    data.unlink()
    return {
        "first_step_s": stamps[0] - start,
        "last_stage_first_step_s": stamps[-1] - start,
    }


class _Reached(Exception):
    """Every stage took its first optimiser step: the measurement is over."""


def first_steps(argv: list[str]) -> None:
    """The child process of :func:`time_to_first_step`: the run of :func:`first_step_config`
    (``argv``: the records, images, test records, run folder and cache folder), stopped at the
    last stage's first optimiser step; prints the epoch time of each stage's first step as
    JSON."""
    from moe_vision.experiment.run import run_experiment

    data, images, test, out, cache = map(Path, argv)
    cfg = first_step_config(data, images, test, cache)
    stages = len(cfg.resolved_recipe().stages)
    stamps: dict[str, float] = {}

    def hook(event: Any) -> None:
        stamps.setdefault(event.unit.name, time.time())
        if len(stamps) == stages:
            raise _Reached

    try:
        run_experiment(cfg, out, resume=False, hooks=[hook])
    except _Reached:
        pass
    print(json.dumps(list(stamps.values())))


def first_step_rows(dcfg: DataBenchConfig, device: torch.device, work: Path) -> list[dict]:
    """The time-to-first-step rows of :func:`time_to_first_step`, per record count."""
    rows = []
    for n in dcfg.first_step_records or [max(dcfg.records)]:
        got = time_to_first_step(n, dcfg.first_step_images, work)
        config = f"time to first optimiser step, {n} records over {dcfg.first_step_images} images"
        note = (
            "moe-vision train --recipe llava (experts frozen; fresh feature cache) "
            "--override '*.max_steps=1', default workers; seconds from process start"
        )
        for metric in ("first_step_s", "last_stage_first_step_s"):
            rows.append(bench_row("data", config, metric, got[metric], "s", device, note))
    return rows


@register_section("data")
def bench_data(cfg: Any, device: torch.device, work: Path) -> list[dict]:
    """Section ``data``: one fresh process per record count of :data:`DATA_BENCH`, then the
    time to the first optimiser step (:func:`first_step_rows`)."""
    dcfg = getattr(cfg, "data", None) or DATA_BENCH
    names = write_images(work / "data-images")
    rows = []
    for n in dcfg.records:
        path = work / f"data-{n}.jsonl"
        t0 = time.perf_counter()
        write_records(path, n, names)
        logger.info("bench data: wrote %d records in %.1f s", n, time.perf_counter() - t0)
        child = "import sys; from moe_vision.bench.data import main; main(sys.argv[1:])"
        args = [sys.executable, "-c", child, str(path), str(work / "data-images")]
        args += ["--workers", str(dcfg.workers), "--batch-size", str(dcfg.batch_size)]
        args += ["--batches", str(dcfg.throughput_batches), "--experts", ",".join(dcfg.experts)]
        out = subprocess.run(args, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"bench data ({n} records) failed:\n{out.stderr[-3000:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        config = f"{n} records JSONL, {dcfg.workers} workers, batch {dcfg.batch_size}"
        note = f"{path.stat().st_size / 2**20:.0f} MB file; experts {'+'.join(dcfg.experts)}"
        units = {
            "index_s": "s",
            "first_batch_s": "s",
            "records_per_s": "records/s",
            "peak_rss_mb": "MB",
            "data_rss_mb": "MB",
            "worker_peak_rss_mb": "MB",
        }
        for metric, unit in units.items():
            rows.append(bench_row("data", config, metric, result[metric], unit, device, note))
        path.unlink()
    return rows + first_step_rows(dcfg, device, work)


def main(argv: list[str] | None = None) -> None:
    """The child process of :func:`bench_data`: one :func:`measure`, printed as JSON."""
    p = argparse.ArgumentParser(description="one measurement of the data bench section")
    p.add_argument("data", type=Path)
    p.add_argument("images", type=Path)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--experts", default="clip-tiny,convnext-tiny")
    a = p.parse_args(argv)
    cfg = DataBenchConfig(
        records=[],
        workers=a.workers,
        batch_size=a.batch_size,
        throughput_batches=a.batches,
        experts=a.experts.split(","),
    )
    print(json.dumps(measure(a.data, a.images, cfg)))
