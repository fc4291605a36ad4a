"""Multi-teacher feature distillation as an objective of the zoo's pretraining loop.

AM-RADIO (Ranzinger et al., 2024, arXiv 2312.06709) with PHI-S balancing (arXiv 2410.01680):
the student (:class:`experts.families.distilled.DistilledExpert`: any zoo expert plus one
adaptor head per teacher) sees each scene at its own resolution; every teacher's map comes from
the feature cache (:mod:`moe_vision.distill.teachers`). Per teacher ``t`` with weight ``w_t``::

    loss_t = summary_weight * (1 - cos(summary head, teacher summary))
           + cos_weight * mean_cells(1 - cos(spatial head, teacher map))
           + l1_weight * mean_cells(smooth_l1(spatial head, teacher map))

in the teacher's balanced space (:mod:`moe_vision.distill.balancing`, estimated once on
``calibration_images`` scenes of a stream no training step draws). The teacher's summary is the
mean of its map (the cache holds maps only). Registered as objective ``"distill"``, so
:func:`moe_vision.zoo.pretrain` runs it with the zoo's schedule, resume and cards.

``config.options``: ``teachers`` (list of presets, required), ``balancing`` (``"phi-s"``,
``"standardize"``, ``"none"``; default ``"phi-s"``), ``teacher_weights`` (``{name: w}``, default
1; 0 drops that teacher's loss), ``summary_weight`` / ``cos_weight`` / ``l1_weight`` (1, 1, 1),
``calibration_images`` (256), ``teacher_pretrained`` (True), ``teacher_cache`` (folder, ``None``
for the default, ``"off"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from experts import Expert, FeatureMap
from experts.families.distilled import DistilledExpert, masked_mean, summary_and_map
from moe_vision.distill.balancing import Balancer, fit_balancer
from moe_vision.distill.losses import spatial_losses, summary_loss
from moe_vision.distill.teachers import Teachers
from moe_vision.zoo.core import Objective, PretrainConfig, register_objective
from moe_vision.zoo.data import Scene, make_scenes

CALIBRATION_STEP = 10**7
"""Step offset of the scenes the balancing is estimated on (no training run reaches it)."""
HELDOUT_STEP = 2 * 10**7
"""Step offset of the held-out scenes fidelity is measured on."""
FLUSH_EVERY = 25
"""Steps between two writes of the teachers' new maps into the cache folder."""


def scene_batches(seed: int, offset: int, n: int, kinds: Sequence[str], batch: int = 32):
    """``n`` scenes of the stream at ``offset``, in batches (a generator of lists)."""
    for i, start in enumerate(range(0, n, batch)):
        yield make_scenes(seed, offset + i, min(batch, n - start), kinds)


def _channels_last(fmap: FeatureMap) -> torch.Tensor:
    return fmap.features.permute(0, 2, 3, 1)  # (B, H, W, C)


def _apply(balancer: Balancer, fmap: FeatureMap) -> torch.Tensor:
    """Balanced map ``(B, C, H, W)``."""
    return balancer(_channels_last(fmap)).permute(0, 3, 1, 2)


@register_objective("distill")
class MultiTeacherDistillation(Objective):
    """See the module docstring. ``self.expert`` is a :class:`DistilledExpert`."""

    description = (
        "multi-teacher feature distillation (AM-RADIO): per teacher an adaptor head (MLP on the "
        "summary token, MLP on the map resampled to the teacher's grid), cosine on the summary, "
        "cosine + smooth-L1 on the map, teachers balanced (PHI-S, standardize or none)"
    )

    def __init__(self, expert: Expert, config: PretrainConfig) -> None:
        super().__init__(expert, config)
        if not isinstance(expert, DistilledExpert):
            raise TypeError(
                f"objective 'distill' trains a distilled student preset (experts.families."
                f"distilled), got {type(expert).__name__} {expert.spec.name!r}"
            )
        o = config.options
        names = list(o.get("teachers") or [])
        heads = sorted(expert.adaptors)
        if sorted(names) != heads:
            raise ValueError(
                f"distill: options teachers {sorted(names)} must be the student preset "
                f"{expert.spec.name!r}'s adaptor heads {heads}"
            )
        self.names = names
        self.balancing = str(o.get("balancing", "phi-s"))
        self.weights = {n: float((o.get("teacher_weights") or {}).get(n, 1.0)) for n in names}
        self.summary_weight = float(o.get("summary_weight", 1.0))
        self.cos_weight = float(o.get("cos_weight", 1.0))
        self.l1_weight = float(o.get("l1_weight", 1.0))
        teachers = Teachers(names, bool(o.get("teacher_pretrained", True)), o.get("teacher_cache"))
        self.teachers = [teachers]  # a list: not a submodule, so neither trained nor saved
        self.centres: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # (summary, map)
        self._calibrate(int(o.get("calibration_images", 256)))

    def balancer(self, teacher: str, part: str) -> Balancer:
        """The balancing of ``teacher``'s ``part`` (``"summary"`` or ``"spatial"``), from the
        objective's buffers (a resumed run reads the very transform it was trained with)."""
        mean = getattr(self, f"balance__{teacher}__{part}__mean")
        return Balancer(self.balancing, mean, getattr(self, f"balance__{teacher}__{part}__weight"))

    @property
    def adaptors(self) -> nn.ModuleDict:
        return self.expert.adaptors

    @torch.no_grad()
    def _calibrate(self, n: int) -> None:
        """Fit every teacher's balancing on ``n`` calibration scenes and write the inverses
        into its adaptor head."""
        summaries: dict[str, list[torch.Tensor]] = {t: [] for t in self.names}
        cells: dict[str, list[torch.Tensor]] = {t: [] for t in self.names}
        for scenes in scene_batches(self.config.seed, CALIBRATION_STEP, n, self.config.kinds):
            for t, fmap in self.teachers[0].maps([s.image for s in scenes]).items():
                summaries[t].append(masked_mean(fmap))
                cells[t].append(_channels_last(fmap)[fmap.valid()])  # (N_valid, C)
        for t in self.names:
            s = fit_balancer(torch.cat(summaries[t]), self.balancing)
            m = fit_balancer(torch.cat(cells[t]), self.balancing)
            self.centres[t] = (torch.cat(summaries[t]).mean(0), torch.cat(cells[t]).mean(0))
            head = self.adaptors[t]
            for part, b in (("summary", s), ("spatial", m)):
                self.register_buffer(f"balance__{t}__{part}__mean", b.mean)
                self.register_buffer(f"balance__{t}__{part}__weight", b.weight)
                inverse, offset = b.inverse()
                getattr(head, f"{part}_inverse").copy_(inverse)
                getattr(head, f"{part}_offset").copy_(offset)
        self.teachers[0].flush()

    def teacher_losses(self, scenes: Sequence[Scene]) -> dict[str, torch.Tensor]:
        """``{teacher: weighted loss}`` of the teachers with a non-zero weight."""
        images = [s.image for s in scenes]
        targets = self.teachers[0].maps(images)
        summary, fmap = summary_and_map(self.expert.student, self.expert.student.preprocess(images))
        out = {}
        for t in self.names:
            if self.weights[t] == 0:
                continue  # no loss: its head gets no gradient (nor weight decay)
            s_bal, m_bal = self.balancer(t, "summary"), self.balancer(t, "spatial")
            pred_s, pred_m = self.adaptors[t].normalised(summary, fmap)
            target = targets[t]
            ls = summary_loss(pred_s, s_bal(masked_mean(target)))
            lc, ll = spatial_losses(pred_m.features, _apply(m_bal, target), target.mask)
            out[t] = self.weights[t] * (
                self.summary_weight * ls + self.cos_weight * lc + self.l1_weight * ll
            )
        return out

    def loss(self, scenes: Sequence[Scene], step: int) -> torch.Tensor:
        losses = self.teacher_losses(scenes)
        if (step + 1) % FLUSH_EVERY == 0 or step + 1 == self.config.steps:
            self.teachers[0].flush()
        if not losses:
            raise ValueError("distill: every teacher weight is 0; nothing to learn")
        return torch.stack(list(losses.values())).sum()

    @torch.no_grad()
    def fidelity(self, n: int = 64) -> dict[str, dict[str, float]]:
        """Per teacher, mean cosine of the adaptor's outputs (in the teacher's own space) with
        the teacher's on ``n`` held-out scenes: ``spatial`` (per valid cell), ``summary``, and
        ``*_centred`` (both centred on the teacher's calibration mean: the part a constant
        offset cannot explain; raw cosines of these maps start near 0.7 from the mean alone)."""
        was = self.expert.training
        self.expert.eval()
        sums: dict[str, dict[str, float]] = {t: {} for t in self.names}
        count = 0
        for scenes in scene_batches(self.config.seed, HELDOUT_STEP, n, self.config.kinds):
            images = [s.image for s in scenes]
            targets = self.teachers[0].maps(images)
            summary, fmap = summary_and_map(
                self.expert.student, self.expert.student.preprocess(images)
            )
            for t in self.names:
                pred_s, pred_m = self.adaptors[t](summary, fmap)
                target, (cs, c) = targets[t], self.centres[t]
                ts = masked_mean(target)
                mask = target.valid()
                tf, pf = _channels_last(target), _channels_last(pred_m)
                vals = {
                    "spatial": torch.cosine_similarity(pf, tf, dim=-1)[mask].mean(),
                    "spatial_centred": torch.cosine_similarity(pf - c, tf - c, dim=-1)[mask].mean(),
                    "summary": torch.cosine_similarity(pred_s, ts, dim=-1).mean(),
                    "summary_centred": torch.cosine_similarity(pred_s - cs, ts - cs, dim=-1).mean(),
                }
                for k, v in vals.items():
                    sums[t][k] = sums[t].get(k, 0.0) + float(v) * len(images)
            count += len(images)
        self.expert.train(was)
        self.teachers[0].flush()
        return {t: {k: round(v / count, 4) for k, v in d.items()} for t, d in sums.items()}

    def describe(self) -> dict[str, Any]:
        """What the card records of the distillation's setup."""
        return {
            "teachers": self.names,
            "balancing": self.balancing,
            "teacher_weights": self.weights,
            "loss_weights": {
                "summary": self.summary_weight,
                "cos": self.cos_weight,
                "smooth_l1": self.l1_weight,
            },
            "teacher_summary": "mean of the teacher's map (the feature cache holds maps)",
        }
