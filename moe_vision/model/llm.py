"""Language models: a registry of tiny offline presets plus any Hugging Face causal LM.

``create_llm(name)`` returns ``(model, tokenizer)``:

* **tiny presets** (``tiny-qwen2``, the default, and ``tiny-llama``): the real transformers
  architectures (``Qwen2ForCausalLM``, ``LlamaForCausalLM``) at a few layers and a small width,
  randomly initialised, with a byte-level BPE tokenizer trained *offline* by the ``tokenizers``
  library on the built-in benchmark's text (:func:`moe_vision.data.benchmark.corpus`). Training is
  deterministic, and byte-level BPE covers any text (unknown words fall back to bytes).
* **anything else** is a hub id or a local folder, loaded with
  ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained`` (respecting ``HF_HUB_OFFLINE``).

Every tokenizer returned has the image placeholder ``<image>`` as a special token (added, and
the embeddings resized, where the checkpoint lacks it), a pad token, and a chat template.
The tiny presets use a ChatML-style template (``<|im_start|>role\\ncontent<|im_end|>``) whose
turn separator newline belongs to the *next* turn, so an assistant turn is exactly
``answer<|im_end|>``.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from experts.registry import Registry

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
BOS, PAD, IM_START, IM_END = "<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS, PAD, IM_START, IM_END, IMAGE_TOKEN)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{% if messages %}{{ '\\n' }}{% endif %}<|im_start|>assistant\n"
    "{% endif %}"
)
"""ChatML-style template of the tiny presets (the turn separator starts the next turn)."""


@dataclass(frozen=True)
class TinyLLMPreset:
    """A tiny causal LM: a transformers config class and its arguments (vocab size is added)."""

    config_class: type[PretrainedConfig]
    arch: dict[str, Any] = field(default_factory=dict)
    tokenizer_vocab: int = 600


_TINY_ARCH = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}

LLMS: Registry[TinyLLMPreset] = Registry("LLM preset")
"""Tiny preset name -> its :class:`TinyLLMPreset` (any other name is a hub id or local folder)."""
LLMS.register("tiny-qwen2", TinyLLMPreset(Qwen2Config, dict(_TINY_ARCH)))
LLMS.register("tiny-llama", TinyLLMPreset(LlamaConfig, dict(_TINY_ARCH)))


def list_llms() -> list[str]:
    """Registered tiny presets (any other name is a hub id or local folder)."""
    return LLMS.list()


@functools.cache
def _trained_tokenizer_json(vocab_size: int) -> str:
    from moe_vision.data.benchmark_tasks import corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    return tok.to_str()


def build_tokenizer(vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """The offline byte-level BPE tokenizer of the tiny presets (deterministic)."""
    tok = Tokenizer.from_str(_trained_tokenizer_json(vocab_size))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=IM_END,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IMAGE_TOKEN],
        padding_side="right",
        model_max_length=_TINY_ARCH["max_position_embeddings"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _build_tiny(preset: TinyLLMPreset, overrides: dict[str, Any]):
    tokenizer = build_tokenizer(preset.tokenizer_vocab)
    arch = {**preset.arch, **overrides}
    cfg_fields = preset.config_class().to_dict()
    bad = sorted(k for k in overrides if k not in cfg_fields)
    if bad:
        raise TypeError(
            f"unknown {preset.config_class.__name__} options {bad}; "
            "see the transformers config class for valid ones"
        )
    # a larger embedding than the tokenizer is valid (real LLMs pad their vocabularies): the
    # GPU bench sets a real model's vocabulary so that its LM head costs what it costs
    vocab_size = int(arch.pop("vocab_size", len(tokenizer)))
    if vocab_size < len(tokenizer):
        raise ValueError(
            f"vocab_size {vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens"
        )
    config = preset.config_class(
        vocab_size=vocab_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **arch,
    )
    model = AutoModelForCausalLM.from_config(config)
    tokenizer.model_max_length = int(config.max_position_embeddings)
    return model, tokenizer


def ensure_image_token(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, image_token: str = IMAGE_TOKEN
) -> None:
    """Add ``image_token`` (and a pad token) to ``tokenizer`` if missing; resize embeddings."""
    added = 0
    if image_token not in tokenizer.get_vocab():
        added += tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
    if tokenizer.pad_token is None:
        added += tokenizer.add_special_tokens({"pad_token": PAD})
    if added or len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
        logger.info("added %d special tokens to the tokenizer; resized embeddings", added)
    if tokenizer.chat_template is None:
        logger.warning("tokenizer has no chat template; using the ChatML-style default")
        tokenizer.chat_template = CHAT_TEMPLATE


def create_llm(
    name: str = "tiny-qwen2", image_token: str = IMAGE_TOKEN, **config_overrides: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Build or load a causal LM and its tokenizer.

    Args:
        name: a tiny preset from :func:`list_llms`, or a hub id / local folder.
        image_token: the image placeholder to make a special token.
        **config_overrides: tiny presets only: config fields to change (``hidden_size``, ...).

    Returns:
        ``(model, tokenizer)``; the tokenizer holds ``image_token`` as one special token.
    """
    if name in LLMS:
        model, tokenizer = _build_tiny(LLMS.get(name), config_overrides)
    else:
        if config_overrides:
            raise TypeError(
                f"config overrides {sorted(config_overrides)} apply to tiny presets "
                f"({list_llms()}) only, not to the pretrained LLM {name!r}"
            )
        model, tokenizer = _load_pretrained(name)
    ensure_image_token(model, tokenizer, image_token)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _load_pretrained(name: str):
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name)
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise OSError(
            f"cannot load the LLM {name!r}: not a tiny preset ({list_llms()}), "
            f"a local folder, nor a hub id in the local cache"
            f"{' (HF_HUB_OFFLINE=1)' if offline else ''}: {err}"
        ) from err
    return model, tokenizer


def llm_from_saved(config_dir: str | os.PathLike[str], tokenizer_dir: str | os.PathLike[str]):
    """Rebuild a saved LLM's architecture (random weights) and tokenizer, offline.

    Used by :meth:`moe_vision.model.mllm.MoEVisionModel.from_pretrained`, which then loads the
    weights from its own safetensors file.
    """
    config = AutoConfig.from_pretrained(config_dir)
    model = AutoModelForCausalLM.from_config(config)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return model, tokenizer


def max_positions(model: PreTrainedModel) -> int | None:
    """The longest sequence ``model`` allows (``max_position_embeddings`` or ``n_positions``)."""
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
