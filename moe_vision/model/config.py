"""The model as data: :class:`ModelConfig`, everything needed to build a
:class:`~moe_vision.model.mllm.MoEVisionModel` (JSON/YAML friendly; ``ModelConfig(...)`` in
Python, ``model:`` in a run or sweep YAML)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fusion.reducers.budget import TokenBudget


@dataclass
class ModelConfig:
    """Everything needed to build a :class:`MoEVisionModel` (JSON/YAML friendly).

    Attributes:
        experts: expert preset names (``experts.list_experts()``), in fusion order.
        expert_options: per-expert ``create_expert`` keyword arguments, keyed by preset name
            (``input_size``, ``checkpoint``, ``pretrained``, ...).
        fusion: fusion strategy (``fusion.list_fusions()``).
        fusion_options: the strategy's config fields (``grid``, ``dim``, ...).
        projector: projector (``fusion.list_projectors()``).
        projector_options: the projector's extra keyword arguments.
        compressor: token compressor between fusion and projector
            (:func:`fusion.projectors.compressors.list_compressors`: ``"none"``,
            ``"pixel_shuffle"``, ``"avg_pool"``); the C-Abstractor is ``projector: cabstractor``.
        compressor_options: its options (``factor``).
        llm: tiny preset (``moe_vision.model.llm.list_llms()``), hub id or local folder.
        llm_options: config overrides for tiny LLM presets (``hidden_size``, ...).
        token_budget: visual tokens each run (expert) keeps and the reducer that chooses them
            (:mod:`fusion.reducers.budget`: ``{reducer: tome, fraction: 0.5}``, ``{reducer:
            visionzip, tokens: 64, allocation: equal}``, ``{reducer: in_order, experts:
            {<name>: {tokens: N}}}``); ``None`` (default): every token, as without the key.
        image_token: the image placeholder in prompts.
        max_length: longest sequence (text + visual tokens); ``None``: the LLM's own limit.
    """

    experts: list[str] = field(default_factory=lambda: ["clip-tiny"])
    expert_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    fusion: str = "channel_concat"
    fusion_options: dict[str, Any] = field(default_factory=dict)
    projector: str = "mlp2x_gelu"
    projector_options: dict[str, Any] = field(default_factory=dict)
    compressor: str = "none"
    compressor_options: dict[str, Any] = field(default_factory=dict)
    llm: str = "tiny-qwen2"
    llm_options: dict[str, Any] = field(default_factory=dict)
    token_budget: dict[str, Any] | None = None
    image_token: str = "<image>"
    max_length: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.experts, str):
            self.experts = [self.experts]
        self.experts = list(self.experts)
        if not self.experts:
            raise ValueError("ModelConfig.experts must name at least one expert")
        unknown = sorted(set(self.expert_options) - set(self.experts))
        if unknown:
            raise ValueError(
                f"ModelConfig.expert_options names experts {unknown} that are not in "
                f"experts={self.experts}"
            )
        if self.token_budget is not None:
            TokenBudget.from_config(self.token_budget)  # fail here, naming the key
        if self.max_length is not None and (
            not isinstance(self.max_length, int) or self.max_length < 1
        ):
            raise ValueError(
                f"ModelConfig.max_length must be a positive int or None, got {self.max_length!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of JSON types (tuples become lists). The compressor and token budget
        fields appear only when set, so configs (and sweep cell ids) without them are unchanged."""
        data = json.loads(json.dumps(dataclasses.asdict(self)))
        if data["compressor"] == "none" and not data["compressor_options"]:
            del data["compressor"], data["compressor_options"]
        if data["token_budget"] is None:
            del data["token_budget"]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise with the valid ones listed."""
        valid = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(data) - valid)
        if bad:
            raise ValueError(f"unknown ModelConfig keys {bad}; valid keys are {sorted(valid)}")
        return cls(**dict(data))
