"""``moe-vision bench``: speed and memory measured as ratios within one run.

:mod:`.core` holds the harness and the training sections (overhead, feature cache, throughput).
"""

from moe_vision.bench import data as _data  # noqa: F401 - registers "data"
from moe_vision.bench import lora as _lora  # noqa: F401 - registers "lora" (after core's)
from moe_vision.bench import tiling as _tiling  # noqa: F401 - registers "tiling"
from moe_vision.bench.core import BenchConfig, bench_row, list_sections, register_section, run_bench

__all__ = ["BenchConfig", "bench_row", "list_sections", "register_section", "run_bench"]
