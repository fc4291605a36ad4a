"""The feature-map interface every expert implements: :class:`Expert`.

An expert is an ``nn.Module`` with

* a :class:`~experts.spec.ExpertSpec` (``self.spec``),
* its **own preprocessing** (:meth:`Expert.preprocess`): raw images (PIL or uint8 tensors of
  any size and mode) to the tensors its forward takes, resized and normalised with the
  expert's own mean/std (Eagle feeds every expert one CLIP-normalised tensor; we don't),
* a **forward** that returns a :class:`~experts.spec.FeatureMap` ``(B, C, H, W)``, or, when
  ``layers`` is given, one map per requested intermediate layer,
* **staged execution** (:meth:`embed`, :meth:`run_stage`, :meth:`to_map`, :meth:`from_map`,
  :meth:`finish`) for ViTs (groups of blocks) and ConvNeXt (its stages). The LLaVA-HR
  mixture-of-resolution adapter drives these to inject a high-resolution map between groups.

Inputs are a dict of tensors (:data:`~experts.spec.ExpertInputs`) so that experts with several
input tensors (Pix2Struct's flattened patches + attention mask) share one signature; a batch is
the per-image dicts stacked along dim 0 (:func:`collate_inputs`).
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn

from experts import tiling
from experts.images import load_image
from experts.spec import ExpertInputs, ExpertSpec, FeatureMap

ImageLike = Image.Image | torch.Tensor | str


@dataclass
class StageState:
    """Hidden state between two stages of staged execution.

    Attributes:
        hidden: ViT: tokens ``(B, P + H*W, C)`` (``P`` prefix tokens such as CLS);
            ConvNet: map ``(B, C, H, W)``.
        grid: ``(H, W)`` of the spatial part.
        num_prefix: number of prefix tokens (0 for ConvNets).
        extras: library-specific values a stage needs (e.g. EVA's rotary embedding).
    """

    hidden: torch.Tensor
    grid: tuple[int, int]
    num_prefix: int = 0
    extras: dict | None = None


def collate_inputs(items: Sequence[ExpertInputs]) -> ExpertInputs:
    """Stack per-image input dicts (tensors without batch dim) into a batch along dim 0."""
    if not items:
        raise ValueError("collate_inputs needs at least one item")
    keys = set(items[0])
    for i, it in enumerate(items):
        if set(it) != keys:
            raise ValueError(
                f"collate_inputs: item {i} has keys {sorted(it)}, expected {sorted(keys)}"
            )
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


class Expert(nn.Module, ABC):
    """Base class of every expert; see the module docstring for the contract.

    Subclasses implement :meth:`preprocess_image`, :meth:`load_checkpoint`, :meth:`forward_map`
    (the full forward as a map) and, if ``spec.num_stages > 0``, the staged hooks.
    """

    spec: ExpertSpec

    def __init__(self, spec: ExpertSpec) -> None:
        super().__init__()
        self.spec = spec

    # ------------------------------------------------------------------ construction
    @classmethod
    def resolve_spec(cls, spec: ExpertSpec, **overrides: object) -> ExpertSpec:
        """Apply user overrides to a preset spec and re-derive what depends on them.

        The default recomputes ``grid`` from ``input_size // patch_size``; families whose grid
        follows other rules override this. Unknown fields raise with the valid ones listed.
        """
        fields = set(ExpertSpec.__dataclass_fields__)
        bad = sorted(set(overrides) - fields)
        if bad:
            raise TypeError(f"unknown expert spec fields {bad}; valid fields are {sorted(fields)}")
        arch = dict(spec.arch)
        arch.update(overrides.pop("arch", {}) or {})  # type: ignore[arg-type]
        spec = spec.replace(arch=arch, **overrides)
        if not spec.variable_resolution:
            h, w = (int(v) for v in spec.input_size)
            if h % spec.patch_size or w % spec.patch_size:
                raise ValueError(
                    f"expert {spec.name!r}: input_size {spec.input_size} must be a multiple of "
                    f"its patch size/stride {spec.patch_size}"
                )
            spec = spec.replace(
                input_size=(h, w), grid=(h // spec.patch_size, w // spec.patch_size)
            )
        return spec

    @abstractmethod
    def load_checkpoint(self, checkpoint: str) -> None:
        """Load weights from a hub id or a local folder/file in the library's own format.

        Raises ``FileNotFoundError`` naming the file looked for, or ``ValueError`` naming the
        mismatching keys/shapes when the checkpoint does not fit the architecture.
        """

    # ------------------------------------------------------------------ preprocessing
    @classmethod
    @abstractmethod
    def preprocess_image(cls, spec: ExpertSpec, image: Image.Image) -> ExpertInputs:
        """One RGB PIL image to the inputs of an expert with ``spec``, without batch dim.

        A classmethod of the spec alone, so that data-loader workers can preprocess without
        holding the expert's weights (see :attr:`preprocessor`).
        """

    @property
    def preprocessor(self) -> functools.partial[ExpertInputs]:
        """A picklable ``image -> inputs`` callable (for data-loader workers); tiled experts
        (``spec.tiling``) cut the image into tiles first (:mod:`experts.tiling`)."""
        if self.spec.tiling is not None:
            return tiling.tiled_preprocessor(type(self), self.spec)
        return functools.partial(type(self).preprocess_image, self.spec)

    def preprocess_one(self, image: ImageLike) -> ExpertInputs:
        """One image (any supported kind) to this expert's inputs, without batch dim."""
        return self.preprocessor(load_image(image))

    def preprocess(self, images: Sequence[ImageLike] | ImageLike) -> ExpertInputs:
        """Raw images (PIL, uint8 tensors ``(3|1|4, H, W)`` or ``(H, W)``, or file paths) to a
        batch of this expert's inputs. Every image is validated and converted to RGB first."""
        if isinstance(images, (Image.Image, str)) or (
            isinstance(images, torch.Tensor) and images.dim() <= 3
        ):
            images = [images]
        return collate_inputs([self.preprocess_one(im) for im in images])

    # ------------------------------------------------------------------ forward
    @abstractmethod
    def forward_map(self, inputs: ExpertInputs) -> FeatureMap:
        """The expert's output map ``(B, C, H, W)`` (its default feature layer)."""

    def forward_layers(self, inputs: ExpertInputs, layers: Sequence[int]) -> list[FeatureMap]:
        """Maps of the requested intermediate layers (indices into ``spec.layers``' space)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose intermediate layers")

    def forward(
        self, inputs: ExpertInputs, layers: Sequence[int] | None = None
    ) -> FeatureMap | list[FeatureMap]:
        """Run the expert. Returns one :class:`FeatureMap`, or a list when ``layers`` is given.

        Args:
            inputs: batched inputs from :meth:`preprocess`.
            layers: optional intermediate layer indices (see ``spec.layers``); negative
                indices count from the end.

        A tiled expert (``spec.tiling``) runs its tiles as one batch and returns the stitched
        map(s) (:func:`experts.tiling.tiled_forward`).
        """
        if self.spec.tiling is not None:
            if layers is not None:
                self._check_layers(layers)
                layers = [self._normalise_layer(i) for i in layers]
            return tiling.tiled_forward(self, inputs, layers)
        if layers is None:
            return self.forward_map(inputs)
        self._check_layers(layers)
        return self.forward_layers(inputs, [self._normalise_layer(i) for i in layers])

    def _check_layers(self, layers: Sequence[int]) -> None:
        bad = [i for i in layers if self._normalise_layer(i) not in self.spec.layers]
        if bad:
            raise ValueError(
                f"expert {self.spec.name!r}: layers {bad} cannot be read out; "
                f"readable layers are {list(self.spec.layers)}"
            )

    def _normalise_layer(self, i: int) -> int:
        n = len(self.spec.layers)
        return self.spec.layers[i] if i < 0 and n and -i <= n else i

    # ------------------------------------------------------------------ staged execution
    @property
    def num_stages(self) -> int:
        return self.spec.num_stages

    def embed(self, inputs: ExpertInputs) -> StageState:
        """Patch/stem embedding: the state before stage 0."""
        raise NotImplementedError(f"{type(self).__name__} does not support staged execution")

    def run_stage(self, state: StageState, index: int) -> StageState:
        """Run stage group ``index`` (0-based, ``< num_stages``)."""
        raise NotImplementedError(f"{type(self).__name__} does not support staged execution")

    def to_map(self, state: StageState) -> torch.Tensor:
        """The spatial part of ``state`` as ``(B, C, H, W)``."""
        if state.hidden.dim() == 4:
            return state.hidden
        b, _, c = state.hidden.shape
        h, w = state.grid
        return state.hidden[:, state.num_prefix :].transpose(1, 2).reshape(b, c, h, w)

    def from_map(self, state: StageState, fmap: torch.Tensor) -> StageState:
        """Write a ``(B, C, H, W)`` map back into ``state`` (prefix tokens kept)."""
        if state.hidden.dim() == 4:
            return StageState(fmap, state.grid, 0, state.extras)
        tokens = fmap.flatten(2).transpose(1, 2)
        hidden = torch.cat([state.hidden[:, : state.num_prefix], tokens], 1)
        return StageState(hidden, state.grid, state.num_prefix, state.extras)

    def finish(self, state: StageState) -> FeatureMap:
        """The map after the last stage; equals :meth:`forward_map` when no stage was altered."""
        return FeatureMap(self.to_map(state), self.spec.patch_size, self.spec.name)

    def run_staged(self, inputs: ExpertInputs) -> FeatureMap:
        """Embed, run every stage, finish: equals ``forward_map`` (tested for every expert)."""
        state = self.embed(inputs)
        for i in range(self.num_stages):
            state = self.run_stage(state, i)
        return self.finish(state)

    # ------------------------------------------------------------------ helpers
    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
