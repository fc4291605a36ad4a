"""Training: recipes as data (:mod:`.recipe_stages`, presets in :mod:`.recipe_presets`, applied
to a model by :mod:`.recipes`), the accelerate trainer (:mod:`.trainer`, with its options
:mod:`.options`, the loop's types :mod:`.units`, step helpers :mod:`.steps`, samplers
:mod:`.samplers`, resume :mod:`.resume` and the frozen experts' cached maps
:mod:`.frozen_experts`, :mod:`.precompute`), checkpoints (:mod:`.checkpoint`), the feature cache
(:mod:`.cache`, keys :mod:`.cache_keys`, shard files :mod:`.feature_shards`), LoRA
(:mod:`.lora`) and one run end to end (:mod:`.run`, configured by :mod:`.run_config`, its
metrics row in :mod:`.run_metrics`)."""
