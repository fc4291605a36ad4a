"""The training loss of the multimodal LLM, computed from the logits of the positions that
predict a label only (visual and prompt positions never go through the LM head)."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from moe_vision.data.records import IGNORE_INDEX


def keeps_logits(llm: nn.Module) -> bool:
    """Whether the LLM's forward takes ``logits_to_keep`` (transformers' causal LMs do); asked
    once per LLM class, not at every step."""
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    return _takes_logits_to_keep(type(base))


@functools.cache
def _takes_logits_to_keep(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def loss_at_labels(
    llm: nn.Module,
    embeds: torch.Tensor,
    mask: torch.Tensor | None,
    labels: torch.Tensor,
    **llm_kwargs: Any,
) -> CausalLMOutputWithPast:
    """The causal-LM loss from the logits of the positions that predict a label only.

    Position ``t`` predicts token ``t + 1``; the kept positions are those where any row has a
    label at ``t + 1`` (``K`` of ``L``). The loss is the mean cross-entropy over label tokens,
    as transformers' own causal-LM loss, in fp32.

    Args:
        embeds: ``(B, L, D)``; mask: ``(B, L)``; labels: ``(B, L)`` (``-100`` where not trained).

    Returns:
        The LLM's output with ``logits (B, K, V)`` and ``loss``.
    """
    target = labels[:, 1:]
    keep = (target != IGNORE_INDEX).any(0).nonzero().squeeze(1)  # (K,)
    out = llm(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=keep, **llm_kwargs)
    kept = out.logits.float()  # (B, K, V)
    out.loss = nn.functional.cross_entropy(
        kept.flatten(0, 1), target[:, keep].flatten(), ignore_index=IGNORE_INDEX
    )
    return out
