"""Multi-teacher distillation: one student expert that keeps what a mixture of experts adds.

AM-RADIO's recipe (arXiv 2312.06709) with PHI-S teacher balancing (arXiv 2410.01680), run by the
mini zoo's pretraining loop as the objective ``"distill"`` (:mod:`.objective`), teachers' maps
from the feature cache (:mod:`.teachers`), students and adaptor heads in
:mod:`experts.families.distilled`. ``moe-vision distill`` drives :mod:`.run`.

Importing the package registers the objective.
"""

from moe_vision.distill import objective  # noqa: F401  (registers the "distill" objective)
