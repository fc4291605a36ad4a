"""Self-distillation for DINOv2 (Oquab et al., 2023) with lightly's DINO and KoLeo losses.

The student (the expert's ``Dinov2Model`` + lightly's ``DINOProjectionHead``) sees two global
and four local crops of each scene (lightly's ``DINOTransform``); an exponential moving average
of it, the teacher, sees the two global crops; lightly's ``DINOLoss`` (centred, sharpened
teacher targets) matches their prototype distributions, and lightly's ``KoLeoLoss`` on the
student's CLS embeddings spreads them out (DINOv2's regulariser, weight 0.1). The CLS token is
the library's ``pooler_output``. iBOT's masked-patch loss, the third DINOv2 term, is left out at
this size: the global/local crops already force the patch tokens to agree across scales.

Augmentations: lightly's defaults, except that colour jitter keeps hue and saturation (a hue
shift would change the colour names the benchmark asks about) and there is no greyscale,
solarisation or blur at 32-64 px. The teacher's momentum follows lightly's cosine schedule from
0.99 to 1. Head and teacher are dropped afterwards; the expert keeps the student backbone.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from lightly.loss import DINOLoss, KoLeoLoss
from lightly.models.modules import DINOProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.transforms import DINOTransform
from lightly.utils.scheduler import cosine_schedule

from experts import Expert
from moe_vision.zoo.core import Objective, PretrainConfig, register_objective
from moe_vision.zoo.data import Scene

KOLEO_WEIGHT = 0.1
PROTOTYPES = 1024


@register_objective("dino")
class DinoSelfDistillation(Objective):
    """DINO + KoLeo self-distillation (lightly); see the module docstring.

    ``config.options``: ``local_views`` (default 4), ``local_size`` (default half the input).
    """

    description = (
        "self-distillation with an EMA teacher over global/local crops (lightly DINOLoss + "
        "KoLeoLoss, DINOTransform)"
    )

    def __init__(self, expert: Expert, config: PretrainConfig) -> None:
        super().__init__(expert, config)
        size = expert.spec.input_size[0]
        width = expert.spec.channels
        self.transform = DINOTransform(
            global_crop_size=size,
            global_crop_scale=(0.5, 1.0),
            local_crop_size=int(config.options.get("local_size", size // 2)),
            local_crop_scale=(0.15, 0.5),
            n_local_views=int(config.options.get("local_views", 4)),
            cj_prob=0.5,
            cj_strength=0.5,
            cj_hue=0.0,
            cj_sat=0.0,
            random_gray_scale=0.0,
            gaussian_blur=(0.0, 0.0, 0.0),
            solarization_prob=0.0,
            normalize={"mean": list(expert.spec.mean), "std": list(expert.spec.std)},
        )
        self.head = DINOProjectionHead(width, 4 * width, 64, PROTOTYPES, freeze_last_layer=1)
        self.teacher_backbone = copy.deepcopy(expert.model)
        self.teacher_head = DINOProjectionHead(width, 4 * width, 64, PROTOTYPES)
        self.teacher_head.load_state_dict(self.head.state_dict())
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)
        self.criterion = DINOLoss(
            output_dim=PROTOTYPES,
            warmup_teacher_temp=0.04,
            teacher_temp=0.06,
            warmup_teacher_temp_epochs=max(1, config.steps // 3),
        )
        self.koleo = KoLeoLoss()

    def views(self, scenes: Sequence[Scene]) -> list[torch.Tensor]:
        """Crops of every scene, grouped by view: ``[(B, 3, S, S)] * (2 + local_views)``."""
        per_image = [self.transform(s.image) for s in scenes]
        return [torch.stack([v[i] for v in per_image]) for i in range(len(per_image[0]))]

    def loss(self, scenes: Sequence[Scene], step: int) -> torch.Tensor:
        views = self.views(scenes)
        with torch.no_grad():
            teacher = [
                self.teacher_head(self.teacher_backbone(pixel_values=v).pooler_output)
                for v in views[:2]
            ]
        cls = [self.expert.model(pixel_values=v).pooler_output for v in views]
        student = [self.head(c) for c in cls]
        dino = self.criterion(teacher, student, epoch=step)
        koleo = sum(self.koleo(F.normalize(c, dim=-1)) for c in cls[:2]) / 2
        return dino + KOLEO_WEIGHT * koleo

    def after_step(self, step: int) -> None:
        m = cosine_schedule(step, self.config.steps, 0.99, 1.0)
        update_momentum(self.expert.model, self.teacher_backbone, m=m)
        update_momentum(self.head, self.teacher_head, m=m)
