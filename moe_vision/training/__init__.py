"""Training: recipes as data (:mod:`.recipes`), the accelerate trainer (:mod:`.trainer`),
checkpoints (:mod:`.checkpoint`), the feature cache (:mod:`.cache`) and one run end to end
(:mod:`.run`)."""
