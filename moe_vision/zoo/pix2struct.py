"""Screenshot parsing for Pix2Struct (Lee et al., 2023): read the rendered text.

Pix2Struct is pretrained to parse a rendered page back into its source. Here the pages are
generated text scenes (:mod:`moe_vision.zoo.data`, kind ``text``: 1-5 characters of A-Z/0-9
at random sizes and places) and the source is the string itself. The model is transformers'
own ``Pix2StructForConditionalGeneration``: its encoder **is** the expert's
``Pix2StructVisionModel`` (the module is shared, so training the full model trains the expert),
and a small ``Pix2StructTextModel`` decodes the string character by character with the library's
loss (cross-entropy with its label smoothing). The decoder is dropped after pretraining; the
expert keeps the encoder, as the real zoo does with ``google/pix2struct-large``.

**Glyph term** (``options={"glyph_weight": w}``). Decoding the string is learnt slowly from
scratch: on this budget the decoder stays on a plateau near the character prior, and the
encoder's map, which is what a fusion reads, learns little about which character is where.
Character-level supervision of the visual features is the standard remedy in text recognition
(e.g. the character maps of CRAFT, Baek et al. 2019, and of Mask TextSpotter, Lyu et al. 2018):
each rendered character's box (:class:`moe_vision.zoo.data.Glyph`) is pooled from the encoder's
``(B, C, G, G)`` map with RoIAlign (torchvision) and classified among the characters by a
linear head on a LayerNorm; the mean cross-entropy is added to the parsing loss with weight
``w``. The head is dropped with the decoder. It is the character-level counterpart of the
region-text term of ConvNeXt-mini (:mod:`moe_vision.zoo.regions`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Pix2StructConfig, Pix2StructForConditionalGeneration

from experts import Expert
from moe_vision.zoo.core import Objective, PretrainConfig, register_objective
from moe_vision.zoo.data import CHARSET, MAX_TEXT, Scene
from moe_vision.zoo.regions import pool_boxes

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


def glyph_targets(
    scenes: Sequence[Scene], flattened_patches: torch.Tensor, tokenizer: CharTokenizer
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes of every rendered character in patch-grid cells, and its class.

    Pix2Struct resizes image ``b`` to ``rows x cols`` patches (the largest row and column ids of
    ``flattened_patches[b]``), so a pixel ``(x, y)`` lies at cell ``(x * cols / W, y * rows / H)``.

    Returns:
        ``(R, 5)`` float boxes ``(batch index, x0, y0, x1, y1)`` (``roi_align``'s format) and
        ``(R,)`` class ids in ``0 .. len(CHARSET) - 1``.
    """
    rows = flattened_patches[..., 0].amax(dim=1).tolist()
    cols = flattened_patches[..., 1].amax(dim=1).tolist()
    boxes: list[list[float]] = []
    classes: list[int] = []
    for b, scene in enumerate(scenes):
        sx, sy = cols[b] / scene.image.width, rows[b] / scene.image.height
        for g in scene.glyphs:
            boxes.append([b, g.x0 * sx, g.y0 * sy, g.x1 * sx, g.y1 * sy])
            classes.append(tokenizer.index[g.char] - 2)
    return torch.tensor(boxes).reshape(-1, 5), torch.tensor(classes, dtype=torch.long)


class GlyphLoss(nn.Module):
    """Cross-entropy of each character box pooled from a ``(B, C, G, G)`` map (module docstring).

    Args:
        channels: the map's channels ``C``.
        classes: the number of characters.
    """

    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.head = nn.Linear(channels, classes)

    def forward(
        self, fmap: torch.Tensor, boxes: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """Mean cross-entropy over the ``R`` boxes (``0`` when there are none).

        Args:
            fmap: ``(B, C, G, G)`` map; cell ``(i, j)`` spans ``[j, j+1) x [i, i+1)``.
            boxes: ``(R, 5)`` boxes in cell units (:func:`glyph_targets`).
            targets: ``(R,)`` class ids.
        """
        if boxes.numel() == 0:
            return fmap.sum() * 0.0
        pooled = pool_boxes(fmap, boxes, spatial_scale=1.0)
        return F.cross_entropy(self.head(self.norm(pooled)), targets.to(fmap.device))


@register_objective("pix2struct")
class Pix2StructParsing(Objective):
    """``Pix2StructForConditionalGeneration`` around the expert's encoder; see the module
    docstring. ``config.options``: ``decoder`` (``Pix2StructTextConfig`` overrides) and
    ``glyph_weight`` (the glyph term's weight, default 0)."""

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
        self.glyph_weight = float(config.options.get("glyph_weight", 0.0))
        self.glyphs = GlyphLoss(width, len(CHARSET)) if self.glyph_weight else None

    def loss(self, scenes: Sequence[Scene], step: int) -> torch.Tensor:
        inputs = self.expert.preprocess([s.image for s in scenes])
        labels = self.tokenizer.labels([s.text for s in scenes])
        encoded = self.model.encoder(**inputs)
        parsing = self.model(
            encoder_outputs=encoded,
            attention_mask=inputs["attention_mask"],
            labels=labels,
        ).loss
        if self.glyphs is None:
            return parsing
        fmap = self.expert.tokens_to_map(encoded.last_hidden_state, inputs)
        boxes, targets = glyph_targets(scenes, inputs["flattened_patches"], self.tokenizer)
        return parsing + self.glyph_weight * self.glyphs(fmap, boxes, targets)

    @torch.no_grad()
    def read(self, scenes: Sequence[Scene]) -> list[str]:
        """Greedy decoding of each scene's text (the objective's own accuracy check)."""
        inputs = self.expert.preprocess([s.image for s in scenes])
        ids = self.model.generate(**inputs, max_new_tokens=self.tokenizer.max_length)
        return [self.tokenizer.decode(row.tolist()) for row in ids]
