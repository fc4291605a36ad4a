"""``moe-vision bench``: speed and memory measured as ratios within one run.

:mod:`.harness` holds the section registry, the config and the CSV rows, :mod:`.measure` the
timers and the matmul peak, :mod:`.batches` the shared inputs; every section is one module
(:mod:`.overhead`, :mod:`.throughput`, :mod:`.cells`, :mod:`.feature_cache`, :mod:`.gpu`, ...)
that registers itself when this package imports it. Sections run in the order imported here.
"""

# the first sections to run, in this order; the rest after them, as imported below
from moe_vision.bench import overhead as _overhead  # noqa: F401 - registers "overhead" (first)
from moe_vision.bench import throughput as _throughput  # noqa: F401 - "throughput"

# isort: split
from moe_vision.bench import cells as _cells  # noqa: F401 - registers "cells"
from moe_vision.bench import data as _data  # noqa: F401 - registers "data"
from moe_vision.bench import feature_cache as _feature_cache  # noqa: F401 - "feature_cache"
from moe_vision.bench import gpu as _gpu  # noqa: F401 - registers "gpu"
from moe_vision.bench import lora as _lora  # noqa: F401 - registers "lora"
from moe_vision.bench import tiling as _tiling  # noqa: F401 - registers "tiling"
from moe_vision.bench import token_budgets as _token_budgets  # noqa: F401 - "token_budgets"
from moe_vision.bench.harness import (
    BenchConfig,
    bench_row,
    list_sections,
    register_section,
    run_bench,
)

__all__ = ["BenchConfig", "bench_row", "list_sections", "register_section", "run_bench"]
