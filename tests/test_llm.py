"""LLM presets: offline tokenizer (deterministic, lossless, one-token placeholder), chat
template, presets, local-folder loading and adding ``<image>`` to a foreign tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from moe_vision.data.benchmark_tasks import WORDS, corpus
from moe_vision.model import llm as llm_module
from moe_vision.model.llm import build_tokenizer, create_llm, ensure_image_token, list_llms


def test_tokenizer_is_deterministic_and_lossless() -> None:
    first = build_tokenizer()
    llm_module._trained_tokenizer_json.cache_clear()
    second = build_tokenizer()
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    for text in corpus()[:200] + list(WORDS) + ["Ünïcødé ✓ text", "x" * 50, "  two  spaces"]:
        ids = first(text, add_special_tokens=False)["input_ids"]
        assert first.decode(ids) == text
    # Benchmark words are whole tokens, so answers are short sequences.
    assert len(first("purple", add_special_tokens=False)["input_ids"]) == 1


def test_placeholder_and_specials_are_single_tokens() -> None:
    tok = build_tokenizer()
    ids = tok("<image>\nWhat color?", add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<image>") and ids.count(ids[0]) == 1
    assert len({tok.pad_token_id, tok.eos_token_id, ids[0]}) == 3
    assert tok.eos_token == "<|im_end|>"


def test_chat_template_is_chatml_and_prefix_stable() -> None:
    tok = build_tokenizer()
    messages = [
        {"role": "user", "content": "<image>\nQ?"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "Again?"},
    ]
    full = tok.apply_chat_template(messages, tokenize=False)
    assert full == (
        "<|im_start|>user\n<image>\nQ?<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
        "<|im_start|>user\nAgain?<|im_end|>"
    )
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\n<image>\nQ?<|im_end|>\n<|im_start|>assistant\n"
    assert full.startswith(prompt)


@pytest.mark.parametrize(
    ("name", "cls"), [("tiny-qwen2", Qwen2ForCausalLM), ("tiny-llama", LlamaForCausalLM)]
)
def test_presets_build_real_architectures(name: str, cls: type) -> None:
    model, tok = create_llm(name)
    assert isinstance(model, cls)
    assert model.get_input_embeddings().num_embeddings == len(tok)
    assert model.config.pad_token_id == tok.pad_token_id
    ids = torch.tensor([tok("<image>\nhello", add_special_tokens=False)["input_ids"]])
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(out.loss)
    assert name in list_llms()


def test_preset_overrides_and_errors() -> None:
    model, _ = create_llm("tiny-qwen2", hidden_size=64, num_attention_heads=2)
    assert model.config.hidden_size == 64
    with pytest.raises(TypeError, match="unknown Qwen2Config options"):
        create_llm("tiny-qwen2", hidden_sise=64)
    with pytest.raises(OSError, match="cannot load the LLM 'no-such-org/no-such-llm'"):
        create_llm("no-such-org/no-such-llm")
    with pytest.raises(TypeError, match="tiny presets"):
        create_llm("some/hub-model", hidden_size=8)


def test_local_folder_loads_through_auto_classes(tmp_path: Path) -> None:
    model, tok = create_llm("tiny-llama")
    model.save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")
    loaded, loaded_tok = create_llm(str(tmp_path / "llm"))
    assert loaded_tok.get_vocab() == tok.get_vocab()
    ids = torch.tensor([[1, 5, 9, 4]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_image_token_is_added_to_a_foreign_tokenizer(tmp_path: Path) -> None:
    vocab = {c: i for i, c in enumerate("abcdefgh<>im ")}
    vocab["[UNK]"] = len(vocab)
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    config = Qwen2Config(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = Qwen2ForCausalLM(config)
    ensure_image_token(model, tok)
    image_ids = tok("<image>", add_special_tokens=False)["input_ids"]
    assert len(image_ids) == 1 and tok.pad_token is not None
    assert model.get_input_embeddings().num_embeddings == len(tok) == len(vocab) + 2
    assert tok.chat_template is not None
