"""Image placeholders in a prompt, and the visual tokens spliced in their place.

A prompt row holds one ``<image>`` token per image (any number, 0 for a text-only row). Before the
LLM runs, every placeholder is replaced by the ``N`` visual tokens of its image::

    input_ids (B, T), k_r placeholders in row r --embed--> (B, T, D)
        --image m of the batch at the m-th placeholder, in row order--> (B, L, D),
        L = max_r (T + k_r (N - 1))

Shorter rows are padded with zero embeddings, attention mask 0 and label ``-100`` (on the right,
or on the left for generation); visual positions get label ``-100``. Used by
:class:`~moe_vision.model.mllm.MoEVisionModel` (``forward``, ``generate``, ``splice``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from experts import ExpertInputs, FeatureMap
from moe_vision.data.records import IGNORE_INDEX


def image_positions(input_ids: torch.Tensor, image_token_id: int, image_token: str) -> torch.Tensor:
    """Index ``(B,)`` of the single ``<image>`` token in each row of ``input_ids (B, T)``."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
    is_image = input_ids == image_token_id
    counts = is_image.sum(1)
    bad = [(r, int(c)) for r, c in enumerate(counts.tolist()) if c != 1]
    if bad:
        raise ValueError(
            f"every row needs exactly one {image_token!r} token "
            f"(id {image_token_id}); (row, count) pairs that do not: {bad[:8]}"
        )
    return is_image.int().argmax(1)


def image_counts(input_ids: torch.Tensor, image_token_id: int) -> list[int]:
    """``<image>`` tokens in each row of ``input_ids (B, T)`` (0 for text-only rows)."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
    return (input_ids == image_token_id).sum(1).tolist()


def images_given(
    images: Sequence[ExpertInputs] | None, precomputed: Mapping[int, FeatureMap] | None
) -> int | None:
    """Images in a batch of expert inputs or cached maps (``None``: nothing given)."""
    for inputs in images or []:
        for value in inputs.values():
            return int(value.shape[0])
    for fmap in (precomputed or {}).values():
        return int(fmap.features.shape[0])
    return None


def check_one_image_per_placeholder(counts: list[int], given: int | None, image_token: str) -> None:
    """Fail unless ``given`` images (``None``: not known) match the ``counts`` placeholders."""
    m = sum(counts)
    if given is not None and given != m:
        raise ValueError(
            f"the batch holds {m} {image_token!r} tokens, (row, count) pairs "
            f"{list(enumerate(counts))[:8]}, but {given} images; every image needs exactly "
            "one placeholder"
        )


def _check_visual(visual: torch.Tensor | None, m: int, d: int, image_token: str) -> None:
    """Fail unless ``visual`` is ``(M=m, N, D=d)`` (or ``None`` with no placeholder)."""
    if (visual is None and m) or (
        visual is not None and (visual.dim() != 3 or visual.shape[0] != m)
    ):
        got = None if visual is None else tuple(visual.shape)
        raise ValueError(
            f"visual tokens must be (M={m}, N, D), one image per {image_token!r} "
            f"token of the batch; got {got}"
        )
    if visual is not None and visual.shape[-1] != d:
        raise ValueError(f"visual tokens have width {visual.shape[-1]}, the LLM takes {d}")


def _target_columns(
    is_image: torch.Tensor, n: int | torch.Tensor, max_length: int, pad_left: bool
) -> tuple[torch.Tensor, int]:
    """Where each token of ``is_image (B, T)``'s rows lands once every placeholder is ``n``
    tokens long (or, with ``n (M,)``, image ``m``'s placeholder ``n[m]`` tokens long): columns
    ``(B, T)`` (a placeholder's: its first visual token) and ``L``."""
    t = is_image.shape[1]
    if isinstance(n, torch.Tensor):  # ragged: images of the batch in row order
        extra = torch.zeros(is_image.shape, dtype=torch.long, device=is_image.device)
        extra[is_image] = n.long() - 1
        before = extra.cumsum(1) - extra  # (B, T) extra positions before t
        target = torch.arange(t, device=is_image.device)[None] + before
        row_len = t + extra.sum(1)
        n = int(n.max()) if n.numel() else 1  # for the message below
    else:
        before = is_image.long().cumsum(1) - is_image.long()  # (B, T) placeholders before t
        target = torch.arange(t, device=is_image.device)[None] + (n - 1) * before  # (B, T)
        row_len = t + (n - 1) * is_image.sum(1)  # (B,)
    length = int(row_len.max())
    if length > max_length:
        raise ValueError(
            f"sequence too long: {t} text tokens with each image placeholder expanded to "
            f"{n} visual tokens give {length} positions; the LLM allows {max_length}"
        )
    if pad_left:
        target = target + (length - row_len)[:, None]
    return target, length


def splice_visual_tokens(
    input_ids: torch.Tensor,
    visual: torch.Tensor | None,
    embed: nn.Module,
    image_token_id: int,
    image_token: str,
    max_length: int,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    pad_left: bool = False,
    visual_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Replace every ``<image>`` token by the visual tokens of its image.

    Row ``r`` may hold any number ``k_r`` of placeholders (0: text-only); image ``m`` of
    ``visual`` goes to the ``m``-th placeholder counted in row order over the batch. Rows
    become ``T + k_r (N - 1)`` long and are padded to the longest, ``L``, on the right (on
    the left with ``pad_left``, for generation) with zero embeddings, mask 0 and label
    ``-100``; with one image in every row nothing is padded and ``L = T - 1 + N``.

    Args:
        input_ids: ``(B, T)``.
        visual: ``(M, N, D)`` visual tokens, ``M`` = placeholders in the batch (``None``
            when there are none).
        embed: the LLM's input embeddings (token ids to ``(..., D)``).
        image_token_id, image_token: the placeholder's id and text.
        max_length: longest sequence ``L`` the LLM accepts.
        attention_mask: ``(B, T)`` (``None``: all ones).
        labels: ``(B, T)`` or ``None``.
        pad_left: pad shorter rows on the left.
        visual_mask: ``(M, N)`` bool, the valid visual tokens (a token budget's output:
            :mod:`fusion.reducers.budget`); image ``m`` then takes only its valid tokens, in
            order, so masked slots never take a position (ragged rows). ``None``: all ``N``.

    Returns:
        ``inputs_embeds (B, L, D)``, ``attention_mask (B, L)``, ``labels (B, L)`` with
        ``-100`` on visual positions (or ``None``).
    """
    b, t = input_ids.shape
    is_image = input_ids == image_token_id  # (B, T)
    m = int(is_image.sum())
    text = embed(input_ids)  # (B, T, D)
    d = text.shape[-1]
    n = 1 if visual is None else visual.shape[1]
    _check_visual(visual, m, d, image_token)
    ragged = visual is not None and visual_mask is not None
    if ragged and tuple(visual_mask.shape) != tuple(visual.shape[:2]):
        raise ValueError(
            f"visual_mask must be (M, N) = {tuple(visual.shape[:2])}, "
            f"got {tuple(visual_mask.shape)}"
        )
    lengths = visual_mask.sum(1) if ragged else None  # (M,) positions each image takes
    target, length = _target_columns(
        is_image, n if lengths is None else lengths, max_length, pad_left
    )
    rows = torch.arange(b, device=input_ids.device)[:, None].expand(b, t)  # (B, T)
    keep = ~is_image
    r_txt, c_txt = rows[keep], target[keep]
    embeds = text.new_zeros(b, length, d).index_put((r_txt, c_txt), text[keep])
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    mask = attention_mask.new_zeros(b, length).index_put((r_txt, c_txt), attention_mask[keep])
    out_labels = None
    if labels is not None:
        out_labels = labels.new_full((b, length), IGNORE_INDEX)
        out_labels = out_labels.index_put((r_txt, c_txt), labels[keep])
    if m and lengths is not None:
        img, slot = visual_mask.bool().nonzero(as_tuple=True)  # valid tokens, image order
        rank = (visual_mask.long().cumsum(1) - 1)[img, slot]  # place among its image's valid
        r_vis, c_vis = rows[is_image][img], target[is_image][img] + rank
        embeds = embeds.index_put((r_vis, c_vis), visual[img, slot].to(text.dtype))
        mask = mask.index_put((r_vis, c_vis), torch.ones_like(c_vis, dtype=mask.dtype))
    elif m:
        offs = torch.arange(n, device=input_ids.device)  # (N,)
        r_vis = rows[is_image][:, None].expand(m, n)  # (M, N), images in row order
        c_vis = target[is_image][:, None] + offs  # (M, N)
        embeds = embeds.index_put((r_vis, c_vis), visual.to(text.dtype))
        mask = mask.index_put((r_vis, c_vis), torch.ones_like(c_vis, dtype=mask.dtype))
    return embeds, mask, out_labels
