"""Activation (gradient) checkpointing across the LLM and the vision experts.

Each library has its own switch: transformers models ``gradient_checkpointing_enable`` (v4) or
``activation_checkpointing_enable`` (v5), timm and open_clip models ``set_grad_checkpointing``.
:func:`switch_checkpointing` walks a model's modules and flips the first switch it finds on each
branch; :meth:`moe_vision.model.mllm.MoEVisionModel.gradient_checkpointing_enable` is the entry
point.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn
from transformers import PreTrainedModel


def hf_checkpointing(module: PreTrainedModel, enable: bool) -> None:
    """Switch a transformers model's activation checkpointing (v5 name, else the v4 one)."""
    kwargs = {"use_reentrant": False}
    if hasattr(module, "activation_checkpointing_enable"):
        if enable:
            module.activation_checkpointing_enable(kwargs)
        else:
            module.activation_checkpointing_disable()
    elif enable:
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        module.gradient_checkpointing_disable()


def switch_checkpointing(roots: Iterable[tuple[str, nn.Module]], enable: bool) -> list[str]:
    """Turn activation checkpointing on (or off) in every module under ``roots`` (``(name,
    module)`` pairs, visited in order) whose library supports it; a module switched is not
    searched further. Returns the dotted names of the modules switched."""
    switched: list[str] = []

    def visit(module: nn.Module, name: str) -> None:
        if isinstance(module, PreTrainedModel) and module.supports_gradient_checkpointing:
            hf_checkpointing(module, enable)
            switched.append(name)
            return
        if callable(getattr(module, "set_grad_checkpointing", None)):
            module.set_grad_checkpointing(enable)
            switched.append(name)
            return
        for child_name, child in module.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name)

    for name, root in roots:
        visit(root, name)
    return switched


def llm_is_checkpointing(llm: nn.Module) -> bool:
    """True when a transformers LLM runs with activation checkpointing (v5 name, else v4)."""
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(llm), attr):
            return bool(getattr(llm, attr))
    return False
