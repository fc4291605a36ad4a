"""The multimodal LLM: experts + fusion + projector + a causal LM (:mod:`.mllm`), and the LLM
presets (:mod:`.llm`)."""

from moe_vision.model.mllm import ModelConfig, MoEVisionModel

__all__ = ["ModelConfig", "MoEVisionModel"]
