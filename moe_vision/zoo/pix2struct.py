"""Screenshot parsing for Pix2Struct (Lee et al., 2023): read the rendered text.

Pix2Struct is pretrained to parse a rendered page back into its source. Here the pages are
generated text scenes (:mod:`moe_vision.zoo.data`, kind ``text``: 1-5 characters of A-Z/0-9
at random sizes and places) and the source is the string itself. The model is transformers'
own ``Pix2StructForConditionalGeneration``: its encoder **is** the expert's
``Pix2StructVisionModel`` (the module is shared, so training the full model trains the expert),
and a small ``Pix2StructTextModel`` decodes the string character by character with the library's
loss (cross-entropy with its label smoothing). The decoder is dropped after pretraining; the
expert keeps the encoder, as the real zoo does with ``google/pix2struct-large``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import Pix2StructConfig, Pix2StructForConditionalGeneration

from experts import Expert
from moe_vision.zoo.core import Objective, PretrainConfig, register_objective
from moe_vision.zoo.data import CHARSET, MAX_TEXT, Scene

PAD, EOS = 0, 1
"""Decoder ids: 0 = padding and decoder start (Pix2Struct's convention), 1 = end of text."""


class CharTokenizer:
    """String of :data:`CHARSET` characters -> ids ``[c + 2 ..., EOS]``."""

    def __init__(self, charset: str = CHARSET, max_length: int = MAX_TEXT + 1) -> None:
        self.index = {c: i + 2 for i, c in enumerate(charset)}
        self.chars = charset
        self.vocab_size = len(charset) + 2
        self.max_length = max_length

    def labels(self, texts: Sequence[str]) -> torch.Tensor:
        """``(B, max_length)`` label ids, ``-100`` after the end of text (ignored by the loss).

        Raises:
            KeyError: a character outside the charset.
        """
        out = torch.full((len(texts), self.max_length), -100, dtype=torch.long)
        for i, text in enumerate(texts):
            bad = [c for c in text if c not in self.index]
            if bad or len(text) >= self.max_length:
                raise KeyError(
                    f"text {text!r}: characters {bad} outside the charset or longer than "
                    f"{self.max_length - 1}"
                )
            ids = [self.index[c] for c in text] + [EOS]
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """Ids back to the string (stops at EOS, skips PAD)."""
        out = []
        for i in ids:
            if i == EOS:
                break
            if i >= 2:
                out.append(self.chars[i - 2])
        return "".join(out)


@register_objective("pix2struct")
class Pix2StructParsing(Objective):
    """``Pix2StructForConditionalGeneration`` around the expert's encoder; see the module
    docstring. ``config.options``: ``decoder`` (``Pix2StructTextConfig`` overrides)."""

    description = (
        "screenshot parsing: read the rendered text (transformers "
        "Pix2StructForConditionalGeneration, encoder kept)"
    )

    def __init__(self, expert: Expert, config: PretrainConfig) -> None:
        super().__init__(expert, config)
        self.tokenizer = CharTokenizer()
        width = expert.spec.channels  # cross-attention reads the encoder at its own width
        decoder = dict(
            hidden_size=width, d_kv=width // 4, d_ff=2 * width, num_layers=2, num_heads=4
        )
        decoder.update(config.options.get("decoder", {}))
        model_config = Pix2StructConfig(
            text_config=dict(decoder, vocab_size=self.tokenizer.vocab_size),
            vision_config=expert.model.config.to_dict(),
        )
        self.model = Pix2StructForConditionalGeneration(model_config)
        self.model.encoder = expert.model  # one module: the decoder trains the expert's encoder

    def loss(self, scenes: Sequence[Scene], step: int) -> torch.Tensor:
        inputs = self.expert.preprocess([s.image for s in scenes])
        labels = self.tokenizer.labels([s.text for s in scenes])
        return self.model(**inputs, labels=labels).loss

    @torch.no_grad()
    def read(self, scenes: Sequence[Scene]) -> list[str]:
        """Greedy decoding of each scene's text (the objective's own accuracy check)."""
        inputs = self.expert.preprocess([s.image for s in scenes])
        ids = self.model.generate(**inputs, max_new_tokens=self.tokenizer.max_length)
        return [self.tokenizer.decode(row.tolist()) for row in ids]
