"""The feature cache: expert maps keyed by image content and expert weights (:mod:`.cache`, keys
:mod:`.cache_keys`, shard files :mod:`.shards`), filled ahead of training (:mod:`.precompute`)
and served to evaluation (:mod:`.cached_maps`). Sits below :mod:`moe_vision.training` and
:mod:`moe_vision.evaluation`."""
