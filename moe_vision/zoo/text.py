"""The text side of the contrastive minis: a word tokenizer over the captions' closed
vocabulary and open_clip's own ``TextTransformer`` as the text tower.

The captions of :mod:`moe_vision.zoo.data` use a closed vocabulary (:func:`vocabulary`), so a
word-level tokenizer is exact: no unknown words, no sub-word merges. Ids: 0 = padding,
1 = start of text, 2..V+1 = words, V+2 = end of text (the highest id, so open_clip's
``pool_type="argmax"`` pools at the end-of-text token, as CLIP does).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from open_clip.transformer import TextTransformer
from torch import nn

from moe_vision.zoo.data import vocabulary

PAD, SOT = 0, 1


class WordTokenizer:
    """Caption -> ``(context_length,)`` ids; see the module docstring for the id layout."""

    def __init__(self, words: Sequence[str] | None = None, context_length: int = 16) -> None:
        self.words = list(words if words is not None else vocabulary())
        self.index = {w: i + 2 for i, w in enumerate(self.words)}
        self.eot = len(self.words) + 2
        self.vocab_size = self.eot + 1
        self.context_length = context_length

    def encode(self, caption: str) -> list[int]:
        """Ids of one caption, ``[SOT, words..., EOT]``.

        Raises:
            KeyError: a word outside the vocabulary.
            ValueError: the caption does not fit the context length.
        """
        words = caption.split()
        unknown = [w for w in words if w not in self.index]
        if unknown:
            raise KeyError(f"caption {caption!r}: words {unknown} are not in the vocabulary")
        ids = [SOT, *(self.index[w] for w in words), self.eot]
        if len(ids) > self.context_length:
            raise ValueError(
                f"caption {caption!r} has {len(ids)} tokens, the context length is "
                f"{self.context_length}"
            )
        return ids

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        """``(B, context_length)`` long tensor, padded with 0."""
        out = torch.full((len(captions), self.context_length), PAD, dtype=torch.long)
        for i, caption in enumerate(captions):
            ids = self.encode(caption)
            out[i, : len(ids)] = torch.tensor(ids)
        return out


def text_tower(
    tokenizer: WordTokenizer, embed_dim: int, width: int = 64, layers: int = 2, heads: int = 4
) -> nn.Module:
    """open_clip's causal ``TextTransformer``, pooled at the end-of-text token (``argmax``)."""
    return TextTransformer(
        context_length=tokenizer.context_length,
        vocab_size=tokenizer.vocab_size,
        width=width,
        heads=heads,
        layers=layers,
        output_dim=embed_dim,
        pad_id=PAD,
        pool_type="argmax",
    )
