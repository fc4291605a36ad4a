"""The multimodal LLM: vision experts + fusion + projector + a Hugging Face causal LM.

LLaVA-style assembly (Liu et al., *Visual Instruction Tuning*, 2023) with a mixture of vision
experts in front (Eagle, Shi et al., arXiv 2408.15998; Cambrian-1, Tong et al., arXiv
2406.16860)::

    image --expert_i.preprocess--> inputs_i --expert_i--> FeatureMap_i (B, C_i, H_i, W_i)
          --fusion--> (B, N, D) --projector--> visual tokens (B, N', D_llm)
          --[token budget: a reducer per run]--> (B, K, D_llm) + validity mask (B, K)

    prompt tokens (B, T) with one <image> id per row
          --embed--> (B, T, D_llm) --splice visual tokens at <image>--> (B, T - 1 + N', D_llm)
          --LLM (inputs_embeds)--> logits

Labels are ``-100`` on the visual positions (the data already masks the prompt). Every part
is built from :class:`ModelConfig` through the registries (``experts.create_expert``,
``fusion.create_fusion``, ``fusion.create_projector``, :func:`moe_vision.model.llm.create_llm`);
nothing here depends on which experts or LLM are used. Parameter names start with
``experts.<i>.``, ``fusion.``, ``projector.`` and ``llm.`` (what training recipes match).

``save_pretrained`` writes ``config.json`` (the :class:`ModelConfig`), ``model.safetensors``
(every weight), ``llm/config.json`` (the LLM's architecture) and the tokenizer files, so that
``from_pretrained`` rebuilds the model offline and exactly.

Helpers live beside it: placeholder counting and splicing in :mod:`.image_tokens`, greedy
generation in :mod:`.generation`, activation checkpointing in :mod:`.activation_checkpointing`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import CausalLMOutputWithPast

from experts import ExpertInputs, FeatureMap, create_expert, get_spec, load_image
from experts.tiling import map_views
from fusion import Fusion, create_fusion, create_projector
from fusion.projectors.compressors import create_compressor
from fusion.reducers.budget import BudgetReducer, TokenBudget
from moe_vision.model import image_tokens, visual_budget
from moe_vision.model.activation_checkpointing import llm_is_checkpointing, switch_checkpointing
from moe_vision.model.config import ModelConfig
from moe_vision.model.generation import ImageLike, greedy_answers
from moe_vision.model.llm import create_llm, llm_from_saved, max_positions
from moe_vision.model.loss import keeps_logits, loss_at_labels  # noqa: F401 - re-exported

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
LLM_CONFIG_DIR = "llm"


def _without_weights(options: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: v
        for k, v in options.items()
        if k not in ("pretrained", "checkpoint", "device", "init_seed")
    }


class MoEVisionModel(nn.Module):
    """Experts + fusion + projector + causal LM (see the module docstring).

    Args:
        config: what to build.
        llm, tokenizer: an already built LLM and tokenizer to use (shared between models, or
            rebuilt by :meth:`from_pretrained`); ``None`` builds ``config.llm``.
        load_checkpoints: load the expert checkpoints named in ``config.expert_options``
            (False when the weights come from a saved model instead).

    Attributes:
        config: the :class:`ModelConfig`.
        experts: ``nn.ModuleList`` of :class:`experts.Expert`.
        fusion: the :class:`fusion.Fusion` strategy.
        projector: fused width to the LLM's width.
        llm: the ``PreTrainedModel`` causal LM.
        tokenizer: its tokenizer (``<image>`` is one special token).
        num_visual_tokens: tokens one image becomes in the LLM's sequence (with a token budget:
            at most; slots a reducer leaves empty take no position).
        budget: the :class:`~fusion.reducers.budget.BudgetReducer` of ``config.token_budget``
            (``None`` without one, or when it keeps every token: today's path, bit for bit).
        max_length: longest sequence (text + visual tokens) the model accepts.
        image_token_id: id of the placeholder.
    """

    def __init__(
        self,
        config: ModelConfig,
        llm: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        load_checkpoints: bool = True,
    ) -> None:
        super().__init__()
        self.config = config
        self.experts = nn.ModuleList(
            self._build_expert(name, load_checkpoints) for name in config.experts
        )
        specs = [e.spec for e in self.experts]
        self.fusion = create_fusion(config.fusion, specs, **dict(config.fusion_options))
        if llm is None or tokenizer is None:
            llm, tokenizer = create_llm(config.llm, config.image_token, **config.llm_options)
        self.llm = llm
        self.tokenizer = tokenizer
        hidden = int(self.llm.get_input_embeddings().embedding_dim)
        self.compressor = create_compressor(  # no parameters; "none" is the identity
            config.compressor,
            int(self.fusion.out_dim),
            int(self.fusion.num_tokens),
            self.fusion.token_grids,
            **dict(config.compressor_options),
        )
        self.projector = create_projector(
            config.projector,
            int(self.compressor.out_dim),
            hidden,
            grid=self.compressor.out_grid,
            **dict(config.projector_options),
        )
        self.num_visual_tokens = int(self.projector.num_tokens(self.compressor.num_tokens))
        self.budget = self._build_budget()
        if self.budget is not None:
            self.num_visual_tokens = self.budget.num_tokens
        token_id = tokenizer.convert_tokens_to_ids(config.image_token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {config.image_token!r} token")
        self.image_token_id = int(token_id)
        self.max_length = self._resolve_max_length(config.max_length)
        logger.info(
            "built %s: experts %s, fusion %s, projector %s, LLM %s, %d visual tokens",
            type(self).__name__,
            config.experts,
            config.fusion,
            config.projector,
            config.llm,
            self.num_visual_tokens,
        )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: ModelConfig | Mapping[str, Any]) -> MoEVisionModel:
        """Build from a :class:`ModelConfig` (or its dict); loads the checkpoints it names."""
        if not isinstance(config, ModelConfig):
            config = ModelConfig.from_dict(config)
        return cls(config)

    def _build_expert(self, name: str, load_checkpoints: bool) -> nn.Module:
        options = dict(self.config.expert_options.get(name, {}))
        if load_checkpoints:
            return create_expert(name, **options)
        # Weights come from the saved safetensors; keep the spec's checkpoint field as it was
        # at training time so that feature-cache keys do not change.
        expert = create_expert(name, **_without_weights(options))
        ckpt = options.get("checkpoint")
        if ckpt is None and options.get("pretrained"):
            ckpt = get_spec(name, **_without_weights(options)).checkpoint
        expert.spec = expert.spec.replace(checkpoint=ckpt)
        return expert

    def _resolve_max_length(self, requested: int | None) -> int:
        limit = max_positions(self.llm)
        if requested is None:
            if limit is None:
                raise ValueError(
                    f"LLM {self.config.llm!r} does not state its maximum length; set "
                    "ModelConfig.max_length"
                )
            return limit
        if limit is not None and requested > limit:
            raise ValueError(
                f"ModelConfig.max_length={requested} exceeds what the LLM {self.config.llm!r} "
                f"allows ({limit} positions)"
            )
        return int(requested)

    def _build_budget(self) -> BudgetReducer | None:
        if self.config.token_budget is None:
            return None
        budget = BudgetReducer(
            TokenBudget.from_config(self.config.token_budget), *visual_budget.visual_runs(self)
        )
        logger.info(
            "token budget: runs %s keep %s of %s tokens", budget.names, budget.kept, budget.sizes
        )
        return budget if budget.active else None

    @property
    def preprocessors(self) -> list:
        """One picklable ``PIL.Image -> ExpertInputs`` per expert (for data-loader workers)."""
        return [e.preprocessor for e in self.experts]

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    # ------------------------------------------------------------------ forward
    def encode_images(
        self,
        images: Sequence[ExpertInputs] | None,
        precomputed: Mapping[int, FeatureMap] | None = None,
    ) -> torch.Tensor:
        """Visual tokens ``(B, N', D_llm)`` (with a token budget, every slot must be valid:
        :meth:`encode_visual` gives the mask of a budget's empty slots).

        Args:
            images: one batched input dict per expert (``collate`` output ``images``); may be
                ``None`` when ``precomputed`` holds every expert's map.
            precomputed: expert index -> its :class:`FeatureMap` ``(B, C, H, W)`` (from the
                feature cache); those experts are not run.
        """
        if self.budget is not None:
            tokens, mask = self.encode_visual(images, precomputed)
            if not bool(mask.all()):
                raise ValueError(
                    "encode_images: the token budget left empty slots (padding); use "
                    "encode_visual, which returns their mask, or embed_inputs"
                )
            return tokens
        images, precomputed = self._checked_inputs(images, precomputed)
        fused = self.fusion.run(list(self.experts), list(images), precomputed)  # (B, N, D)
        tokens = self.projector(self.compressor(fused))  # (B, N', D_llm)
        return tokens.to(self.llm.get_input_embeddings().weight.dtype)

    def _checked_inputs(
        self, images: Sequence[ExpertInputs] | None, precomputed: Mapping[int, FeatureMap] | None
    ) -> tuple[list[ExpertInputs], dict[int, FeatureMap]]:
        precomputed = dict(precomputed or {})
        missing = {i for i in range(len(self.experts)) if i not in precomputed}
        missing = sorted(missing | self.fusion.staged_experts())
        if images is None:
            if missing:
                names = [self.config.experts[i] for i in missing]
                raise ValueError(
                    f"encode_images: no images given and no precomputed maps for experts "
                    f"{missing} ({names})"
                )
            images = [{} for _ in self.experts]
        elif len(images) != len(self.experts):
            raise ValueError(
                f"encode_images: got inputs for {len(images)} experts, the model has "
                f"{len(self.experts)} ({self.config.experts})"
            )
        return list(images), precomputed

    def encode_visual(
        self,
        images: Sequence[ExpertInputs] | None,
        precomputed: Mapping[int, FeatureMap] | None = None,
        query: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Visual tokens ``(B, K, D_llm)`` after the token budget, and their validity mask
        ``(B, K)`` (``None`` without a budget: :meth:`encode_images`' tokens, all valid).

        The runs' masks come from the maps where a run is one map on its own grid (a tiled
        expert's canvas, a ragged Pix2Struct map under ``per_expert_grid``), carried through
        the compressor (a token is valid when any of its cells is); padding is never kept.
        ``query (B, D_llm)``: the prompt's mean embedding (:func:`.visual_budget.prompt_query`), for
        reducers that need it.
        """
        if self.budget is None:
            return self.encode_images(images, precomputed), None
        images, precomputed = self._checked_inputs(images, precomputed)
        masks = None
        if type(self.fusion).run is Fusion.run:  # map-level: the maps' masks are at hand
            maps = [
                view
                for i in range(len(self.experts))
                for view in map_views(
                    self.fusion.expert_specs[i],
                    self.fusion.expert_map(i, list(self.experts), images, precomputed),
                )
            ]
            fused = self.fusion(maps)  # (B, N, D)
            masks = visual_budget.run_masks(self, maps)
        else:
            fused = self.fusion.run(list(self.experts), images, precomputed)
        tokens = self.projector(self.compressor(fused))  # (B, N', D_llm)
        tokens, mask = self.budget(tokens, masks, query)  # (B, K, D_llm), (B, K)
        return tokens.to(self.llm.get_input_embeddings().weight.dtype), mask

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        images: Sequence[ExpertInputs] | None = None,
        precomputed: Mapping[int, FeatureMap] | None = None,
        pad_left: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Encode the images (token budget included) and splice them into the prompts:
        ``inputs_embeds (B, L, D)``, ``attention_mask (B, L)``, ``labels`` (see :meth:`splice`)."""
        counts = self.image_counts(input_ids)
        visual, visual_mask = None, None
        if sum(counts):
            query = None
            if self.budget is not None and any(
                getattr(r, "needs_query", False) for r in self.budget.reducers
            ):
                query = visual_budget.prompt_query(self, input_ids, attention_mask, labels)
            visual, visual_mask = self.encode_visual(images, precomputed, query)
        return self.splice(input_ids, visual, attention_mask, labels, pad_left, visual_mask)

    def image_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Index ``(B,)`` of the single ``<image>`` token in each row of ``input_ids (B, T)``."""
        return image_tokens.image_positions(input_ids, self.image_token_id, self.config.image_token)

    def image_counts(self, input_ids: torch.Tensor) -> list[int]:
        """``<image>`` tokens in each row of ``input_ids (B, T)`` (0 for text-only rows)."""
        return image_tokens.image_counts(input_ids, self.image_token_id)

    def splice(
        self,
        input_ids: torch.Tensor,
        visual: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pad_left: bool = False,
        visual_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Replace every ``<image>`` token by the visual tokens of its image
        (:func:`~moe_vision.model.image_tokens.splice_visual_tokens`, which details padding).

        Args:
            input_ids: ``(B, T)``.
            visual: ``(M, N, D)`` visual tokens, ``M`` = placeholders in the batch, in row
                order (``None`` when there are none).
            attention_mask: ``(B, T)`` (``None``: all ones).
            labels: ``(B, T)`` or ``None``.
            pad_left: pad shorter rows on the left (generation; default: on the right).
            visual_mask: ``(M, N)`` valid visual tokens (a token budget's): only those take
                positions; ``None``: all.

        Returns:
            ``inputs_embeds (B, L, D)``, ``attention_mask (B, L)``, ``labels (B, L)`` with
            ``-100`` on visual positions (or ``None``); ``L = T - 1 + N`` with one image per row.
        """
        return image_tokens.splice_visual_tokens(
            input_ids,
            visual,
            self.llm.get_input_embeddings(),
            self.image_token_id,
            self.config.image_token,
            self.max_length,
            attention_mask,
            labels,
            pad_left,
            visual_mask,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        images: Sequence[ExpertInputs] | None = None,
        precomputed: Mapping[int, FeatureMap] | None = None,
        logits: str = "all",
        **llm_kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Language-model output for a batch with any number of images per row.

        Args:
            input_ids: ``(B, T)``; ``M`` image tokens in all (one per image, 0 in text-only rows).
            attention_mask: ``(B, T)``.
            labels: ``(B, T)`` (``-100`` where not trained) or ``None``.
            images: one batched input dict per expert with ``M`` rows, the batch's images in
                row order (``collate`` output ``images``); ``None`` when ``M = 0``.
            precomputed: expert index -> cached :class:`FeatureMap` ``(M, C, H, W)``.
            logits: ``"all"``, or ``"labels"`` (training): with ``labels``, only the positions
                that predict a label token go through the LM head (``logits (B, K, V)``); the
                loss is the same mean cross-entropy, without the head and softmax over every
                visual and prompt position (:func:`loss_at_labels`).
            **llm_kwargs: passed to the LLM's forward.

        Returns:
            ``CausalLMOutputWithPast`` with ``logits (B, L, V)`` (``L = T - 1 + N`` for one image
            per row) and ``loss`` when ``labels`` is given.
        """
        if logits not in ("all", "labels"):
            raise ValueError(f"logits must be 'all' or 'labels', got {logits!r}")
        counts = self.image_counts(input_ids)  # fail on a bad prompt before the experts run
        given = image_tokens.images_given(images, precomputed)
        image_tokens.check_one_image_per_placeholder(counts, given, self.config.image_token)
        embeds, mask, labels = self.embed_inputs(
            input_ids, attention_mask, labels, images, precomputed
        )
        if not sum(counts) and self.training and torch.is_grad_enabled():
            embeds = embeds + self.idle_visual_anchor()  # every rank runs the same collectives
        if labels is not None and logits == "labels" and keeps_logits(self.llm):
            return loss_at_labels(self.llm, embeds, mask, labels, **llm_kwargs)
        return self.llm(inputs_embeds=embeds, attention_mask=mask, labels=labels, **llm_kwargs)

    # ------------------------------------------------------------------ generation
    def prompt_ids(self, prompt: str, num_images: int = 1) -> list[int]:
        """Token ids of a single-turn user ``prompt`` (with ``num_images`` placeholders)
        rendered with the chat template."""
        count = prompt.count(self.config.image_token)
        if count != num_images:
            raise ValueError(
                f"a prompt with {num_images} image{'s' if num_images != 1 else ''} needs "
                f"{num_images} {self.config.image_token!r} placeholders, found {count} in "
                f"{prompt!r}"
            )
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @torch.no_grad()
    def generate(
        self,
        images: Sequence[ImageLike | Sequence[ImageLike] | None],
        prompts: Sequence[str],
        max_new_tokens: int = 16,
        precomputed: Mapping[int, FeatureMap] | None = None,
        **generate_kwargs: Any,
    ) -> list[str]:
        """Greedy answers to a batch of prompts (left padding).

        Args:
            images: per prompt, one PIL image or image path, a list of them (one per
                placeholder, in order), or ``None`` for a text-only prompt.
            prompts: user turns, each with one image placeholder per image.
            max_new_tokens: generation budget per answer.
            precomputed: expert index -> its map ``(M, C, H, W)`` of the ``M`` images in
                prompt order (the feature cache); those experts are not run and, when every
                expert is given, no image is loaded.
            **generate_kwargs: passed to the LLM's ``generate``.
        """
        # load_image is looked up here, at call time: tests patch moe_vision.model.mllm.load_image
        return greedy_answers(
            self, images, prompts, max_new_tokens, precomputed, load_image, **generate_kwargs
        )

    def idle_visual_anchor(self) -> torch.Tensor:
        """A zero ``()`` computed from every expert, the fusion and the projector: the visual
        tokens of one blank image, times 0.

        A training batch without images adds it to its embeddings, so that every process runs
        the same modules whatever its batch holds: DDP then all-reduces a (zero) gradient for
        every trainable tensor and FSDP gathers the same units on every process, instead of one
        process waiting for ever on a collective the other skipped (``tests/test_ragged_ranks.py``;
        LLaVA's dummy-image idea). Tile counts may differ between processes: a tiled expert
        runs all its tiles as one batch.
        """
        from accelerate.utils import send_to_device
        from PIL import Image

        from experts.base import collate_inputs

        blank = Image.new("RGB", (64, 64))
        images = [
            send_to_device(collate_inputs([p(blank)]), self.device) for p in self.preprocessors
        ]
        return 0.0 * self.encode_images(images).sum()

    def tie_weights(self) -> None:
        """Tie the LLM's output head to its input embeddings again where its config ties them
        (accelerate's FSDP2 preparation calls it after moving the model to ``meta``, which
        unties shared parameters: the head would then train as a separate tensor)."""
        self.llm.tie_weights()

    # ------------------------------------------------------------------ memory
    def gradient_checkpointing_enable(self) -> list[str]:
        """Turn on activation checkpointing in the LLM and in every expert whose library
        supports it (transformers ``gradient_checkpointing_enable``, timm/open_clip
        ``set_grad_checkpointing``). Returns the names of the modules switched on."""
        return self._set_checkpointing(True)

    def gradient_checkpointing_disable(self) -> list[str]:
        """Undo :meth:`gradient_checkpointing_enable`."""
        return self._set_checkpointing(False)

    def _set_checkpointing(self, enable: bool) -> list[str]:
        roots = [("llm", self.llm)] + [(f"experts.{i}", e) for i, e in enumerate(self.experts)]
        switched = switch_checkpointing(roots, enable)
        logger.info("gradient checkpointing %s in %s", "on" if enable else "off", switched)
        return switched

    @property
    def is_gradient_checkpointing(self) -> bool:
        """True when the LLM runs with activation checkpointing."""
        return llm_is_checkpointing(self.llm)

    # ------------------------------------------------------------------ save / load
    def save_pretrained(
        self, save_directory: str | os.PathLike[str], merge_lora: bool = False
    ) -> Path:
        """Write ``config.json``, ``model.safetensors``, ``llm/config.json`` and the tokenizer.

        A model with LoRA adapters (:mod:`moe_vision.model.adapters`) writes its base weights
        under the plain names plus ``adapters.safetensors`` / ``adapters.json`` beside them, or,
        with ``merge_lora=True``, the merged weights alone (a plain model); either loads back.
        """
        from moe_vision.model import adapters

        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        if adapters.lora_layers(self):
            adapters.save_weights(self, out, WEIGHTS_NAME, merge=merge_lora)
        else:
            adapters.remove_adapter_files(out)
            fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{WEIGHTS_NAME}.", suffix=".tmp")
            os.close(fd)
            try:
                safetensors.torch.save_model(self, tmp, metadata={"format": "pt"})
                os.replace(tmp, out / WEIGHTS_NAME)
            finally:
                Path(tmp).unlink(missing_ok=True)
        self.llm.config.save_pretrained(out / LLM_CONFIG_DIR)
        self.tokenizer.save_pretrained(out)
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{CONFIG_NAME}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(self.config.to_dict(), f, indent=2)
        os.replace(tmp, out / CONFIG_NAME)
        return out

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike[str], device: str | torch.device | None = None
    ) -> MoEVisionModel:
        """Rebuild a model written by :meth:`save_pretrained` (offline; exact weights; LoRA
        adapters saved beside the base are added back)."""
        root = Path(directory)
        for needed in (CONFIG_NAME, WEIGHTS_NAME, f"{LLM_CONFIG_DIR}/config.json"):
            if not (root / needed).is_file():
                raise FileNotFoundError(
                    f"{root / needed} not found: is {root} a folder written by "
                    "MoEVisionModel.save_pretrained?"
                )
        config = ModelConfig.from_dict(json.loads((root / CONFIG_NAME).read_text("utf-8")))
        llm, tokenizer = llm_from_saved(root / LLM_CONFIG_DIR, root)
        model = cls(config, llm=llm, tokenizer=tokenizer, load_checkpoints=False)
        missing, unexpected = safetensors.torch.load_model(
            model, root / WEIGHTS_NAME, strict=False, device=str(device or "cpu")
        )
        if missing or unexpected:
            raise ValueError(
                f"{root / WEIGHTS_NAME} does not fit the model of {root / CONFIG_NAME}: missing "
                f"{sorted(missing)[:10]}, unexpected {sorted(unexpected)[:10]}"
            )
        from moe_vision.model import adapters

        if adapters.has_saved_adapters(root):
            adapters.load_adapters(model, root, device=str(device or "cpu"))
        if device is not None:
            model.to(device)
        return model

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
