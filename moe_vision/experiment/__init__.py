"""One run end to end: a run config (:mod:`.run_config`) trained by the trainer and evaluated on
the benchmark (:mod:`.run`), its metrics row (:mod:`.run_metrics`). Sits above
:mod:`moe_vision.training` and :mod:`moe_vision.evaluation`."""
