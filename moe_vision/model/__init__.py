"""The multimodal LLM: experts + fusion + projector + a causal LM (:mod:`.mllm`, configured by
:mod:`.config`), the LLM presets (:mod:`.llm`), and the pieces :mod:`.mllm` is built from: image
placeholders and splicing (:mod:`.image_tokens`), greedy answers (:mod:`.generation`), the
label-position loss (:mod:`.loss`), activation checkpointing
(:mod:`.activation_checkpointing`) and LoRA adapters (:mod:`.adapters`)."""

from moe_vision.model.config import ModelConfig
from moe_vision.model.mllm import MoEVisionModel

__all__ = ["ModelConfig", "MoEVisionModel"]
