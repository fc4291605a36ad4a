"""``moe-vision bench``: speed and memory measured as ratios within one run.

:mod:`.core` holds the harness and the training sections (overhead, feature cache, throughput).
"""

from moe_vision.bench.core import SECTIONS, BenchConfig, run_bench

__all__ = ["SECTIONS", "BenchConfig", "run_bench"]
