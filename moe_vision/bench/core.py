"""Benchmarks of the platform itself (``moe-vision bench``), written to ``results/bench.csv``.

Three measurements, each taken in one run so that its ratio compares like with like:

1. **Platform overhead**: the mixture's forward + backward (:class:`MoEVisionModel`) against
   the same computation written by hand on the same modules: each expert's wrapped library
   module called directly (transformers ``model(**inputs).last_hidden_state``, timm
   ``forward_features``), the fusion's ``forward``, the projector, and the LLM on
   hand-spliced ``inputs_embeds``. Ratio = mixture time / direct time (1.0 = no overhead).
   Where an expert's library output cannot be read as its map (other readout layer, ragged
   grid), the expert module itself stands in and the row says so.
2. **Feature cache**: a frozen-expert sweep (recipe with frozen experts) over several fusion
   strategies, run with and without the feature cache (:mod:`moe_vision.features.cache`); ratio =
   uncached wall time / cached wall time. With tiny experts the LLM dominates, so section 3
   adds, per configuration, the FLOP share of the experts' forward in a frozen-expert step
   and the speed-up bound it implies for the cache, ``1 / (1 - share)``.
3. **Training throughput**: samples/s of full training steps (forward, backward, AdamW), the
   achieved FLOP/s (FLOPs of one forward + backward counted with
   ``torch.utils.flop_counter.FlopCounterMode``) against this machine's measured fp32 matmul
   peak, and peak memory (CUDA: peak allocated; CPU: peak resident set size), for the default
   configuration and for one real-size configuration (e.g. CLIP ViT-L/336 + ConvNeXt-L,
   random init, batch 1).

The CSV is long-format: ``section, config, metric, value, unit, device, note``.

Where each part lives: the harness (section registry, :class:`BenchConfig`, rows, the CSV,
:func:`run_bench`) is :mod:`.harness`; clocks, peak memory and the matmul peak are
:mod:`.measure`; training batches from the built-in benchmark are :mod:`.batches`; sections 1
and 3 are :mod:`.overhead` and :mod:`.throughput`, section 2 is :mod:`.feature_cache`. This
module gathers them (importing it registers ``overhead`` then ``throughput``, first of all
sections), so ``from moe_vision.bench.core import ...`` keeps working for all of them.
"""

from __future__ import annotations

from moe_vision.bench.batches import (  # noqa: F401 - re-exported
    _to,
    benchmark_batch,
    instruct_batch,
)
from moe_vision.bench.harness import (  # noqa: F401 - re-exported
    _SECTIONS,
    CSV_COLUMNS,
    DEFAULT_MODEL,
    REAL_MODEL,
    BenchConfig,
    BenchSection,
    _config_name,
    bench_row,
    describe_device,
    list_sections,
    register_section,
    run_bench,
)
from moe_vision.bench.measure import (  # noqa: F401 - re-exported
    _median_time,
    _sync,
    measure_matmul_peak,
    peak_memory_mb,
    reset_peak_memory,
)
from moe_vision.bench.overhead import (  # noqa: F401 - re-exported
    _mixture_loss,
    bench_overhead,
    direct_forward,
    library_map,
)
from moe_vision.bench.throughput import (  # noqa: F401 - re-exported
    _rescale_to_peak,
    bench_throughput,
    bench_throughput_section,
    frozen_expert_flops_share,
    train_step_flops,
)
