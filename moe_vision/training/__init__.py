"""Training: recipes as data (:mod:`.recipe_stages`, presets in :mod:`.recipe_presets`, applied
to a model by :mod:`.recipes`, which also adds each stage's LoRA adapters), the accelerate trainer
(:mod:`.trainer`, with its options :mod:`.options`, the loop's types :mod:`.units`, step helpers
:mod:`.steps`, samplers :mod:`.samplers`, resume :mod:`.resume` and the frozen experts' cached
maps :mod:`.frozen_experts`) and checkpoints (:mod:`.checkpoint`). The feature cache is in
:mod:`moe_vision.features`, LoRA injection in :mod:`moe_vision.model.adapters`, one run end to
end in :mod:`moe_vision.experiment`."""
