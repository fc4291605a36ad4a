"""Text-guided selection: keep the ``k`` visual tokens most similar to the prompt.

The rule of text-relevance pruning (SparseVLM, Zhang et al., arXiv 2410.04417, rates visual
tokens by the text tokens' attention to them; here without attention, as a parameter-free
baseline): score each token by its cosine similarity to the mean embedding of the prompt's text
tokens (``query``, the LLM's input embeddings averaged over the prompt, answer excluded) and
keep the ``k`` best, in image order::

    tokens (B, N, C), query (B, C) --cos--> scores (B, N) --top k, padding never--> (B, k, C)

The tokens must live in the query's space: the model applies budgets after the projector, in
the LLM's width. Gradients reach the kept tokens (the choice itself is discrete).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fusion.reducers.base import Reduced, TokenReducer, register_reducer, select


@register_reducer("text_guided")
class TextGuided(TokenReducer):
    """Top-``k`` tokens by cosine similarity to ``query`` (see the module docstring)."""

    needs_query = True

    def reduce(self, x: torch.Tensor, mask: torch.Tensor, query: torch.Tensor | None) -> Reduced:
        assert query is not None  # checked in forward
        scores = F.cosine_similarity(x.detach(), query.detach()[:, None], dim=-1)  # (B, N)
        return select(x, mask, scores, self.k)
