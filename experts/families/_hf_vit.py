"""Shared machinery of the ViT experts (CLIP, SigLIP, DINOv2, EVA-02): readout, stages, loading.

Registers nothing. Two base classes:

* :class:`ViTExpert`: library-agnostic. A plain ViT is ``embed -> blocks -> (final norm)``;
  the expert's map is the **patch tokens** (prefix tokens such as CLS or registers dropped) of
  one block, reshaped to ``(B, C, H, W)`` with ``(H, W) = input_size // patch_size``. Which
  block, and whether the library's final norm is applied, are spec options, stored next to the
  library kwargs in ``spec.arch`` (see :data:`READOUT_KEYS`):

  - ``feature_layer`` (int): block index of the map; negative counts from the end. LLaVA
    (Liu et al., 2023, "Visual Instruction Tuning") reads CLIP's penultimate block (``-2``).
  - ``feature_norm`` (bool): apply the library model's final norm to the read-out block (the
    DINOv2 ``last_hidden_state`` convention).

  Blocks after ``feature_layer`` stay in the module (so checkpoints load strictly) but never
  run. Intermediate layers (:meth:`ViTExpert.forward_layers`) are raw block outputs, no norm.

  **Staged execution** (LLaVA-HR, Luo et al., 2024, "Feast Your Eyes: Mixture-of-Resolution
  Adaptation for Multimodal LLMs"): the model's blocks are split into ``spec.num_stages``
  consecutive groups of equal size (ViT-L: 4 groups of 6); when the count does not divide, the
  first ``depth % num_stages`` groups get one block more (``numpy.array_split``). A group only
  runs its blocks up to ``feature_layer``, so with CLIP-L's ``-2`` the last group runs 5.

* :class:`HFViTExpert`: a ``transformers`` vision model built from ``Config(**arch)`` and
  loaded with ``Model.from_pretrained`` (hub id or a ``save_pretrained`` folder), then checked
  key by key and shape by shape against the preset's architecture.

Inputs whose size is not a multiple of the patch size lose the trailing ``size % patch``
pixels in the patch convolution, as in the released models (SigLIP-384/14 gives 27x27).
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn

from experts.base import Expert, StageState
from experts.families._checkpoints import read_weight_file, state_dict_mismatches
from experts.images import resize_normalise
from experts.spec import ExpertInputs, ExpertSpec, FeatureMap

logger = logging.getLogger(__name__)

READOUT_KEYS: tuple[str, ...] = ("feature_layer", "feature_norm")
"""Keys of ``spec.arch`` that choose the readout; every other key goes to the library."""

DERIVED_FIELDS: tuple[str, ...] = ("patch_size", "channels", "layers", "layer_channels", "grid")
"""Spec fields derived from ``arch`` (and ``input_size``); they are not overridden directly."""


def library_kwargs(arch: Mapping[str, Any]) -> dict[str, Any]:
    """``arch`` without the readout options: the kwargs the library model is built from."""
    return {k: v for k, v in arch.items() if k not in READOUT_KEYS}


def stage_groups(depth: int, num_stages: int) -> list[range]:
    """Split ``depth`` blocks into ``num_stages`` consecutive groups (``numpy.array_split``).

    >>> [list(g) for g in stage_groups(5, 2)]
    [[0, 1, 2], [3, 4]]
    """
    if not 1 <= num_stages <= depth:
        raise ValueError(f"num_stages must be in [1, {depth}] for {depth} blocks, got {num_stages}")
    size, extra = divmod(depth, num_stages)
    groups, start = [], 0
    for i in range(num_stages):
        stop = start + size + (1 if i < extra else 0)
        groups.append(range(start, stop))
        start = stop
    return groups


def strip_expert_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An expert's ``state_dict()`` (every key under ``model.``) as the library model's."""
    if state and all(k.startswith("model.") for k in state):
        return {k[len("model.") :]: v for k, v in state.items()}
    return dict(state)


def looks_local(checkpoint: str) -> bool:
    """True when ``checkpoint`` names a local path rather than a hub id."""
    p = Path(checkpoint).expanduser()
    return p.exists() or p.is_absolute() or checkpoint.startswith((".", "~"))


class ViTExpert(Expert):
    """A ViT expert: tokens ``(B, P + H*W, C)`` through blocks, read out as ``(B, C, H, W)``.

    Subclasses name the arch keys of depth, width and patch size and implement the four hooks
    :meth:`_embed_tokens`, :meth:`_blocks`, :meth:`_run_block`, :meth:`_final_norm`.
    """

    depth_key: ClassVar[str]
    width_key: ClassVar[str]
    patch_key: ClassVar[str] = "patch_size"

    # ------------------------------------------------------------------ spec
    @classmethod
    def dims(cls, arch: Mapping[str, Any]) -> tuple[int, int, int]:
        """``(depth, width, patch_size)`` read from ``arch``."""
        missing = [k for k in (cls.depth_key, cls.width_key, cls.patch_key) if k not in arch]
        if missing:
            raise ValueError(f"{cls.__name__}: arch must set {missing}; got keys {sorted(arch)}")
        patch = arch[cls.patch_key]
        patch = patch[0] if isinstance(patch, (tuple, list)) else patch
        return int(arch[cls.depth_key]), int(arch[cls.width_key]), int(patch)

    @classmethod
    def make_spec(
        cls,
        *,
        name: str,
        family: str,
        library: str,
        role: str,
        checkpoint: str | None,
        input_size: tuple[int, int],
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        num_stages: int,
        arch: dict[str, Any],
    ) -> ExpertSpec:
        """A preset spec whose patch size, channels, grid and layers are derived from ``arch``."""
        depth, width, patch = cls.dims(arch)
        spec = ExpertSpec(
            name=name,
            family=family,
            library=library,
            role=role,
            architecture="vit",
            checkpoint=checkpoint,
            input_size=tuple(input_size),
            patch_size=patch,
            channels=width,
            grid=(input_size[0] // patch, input_size[1] // patch),
            mean=tuple(mean),
            std=tuple(std),
            layers=tuple(range(depth)),
            layer_channels=(width,) * depth,
            num_stages=num_stages,
            arch=dict(arch),
        )
        return cls.resolve_spec(spec)

    @classmethod
    def resolve_spec(cls, spec: ExpertSpec, **overrides: object) -> ExpertSpec:
        """Apply overrides; re-derive patch size, channels, layers and grid from ``arch``.

        ``input_size`` may be any size of at least one patch; the grid is
        ``input_size // patch_size``. Readout options are validated here.
        """
        fields = set(ExpertSpec.__dataclass_fields__)
        bad = sorted(set(overrides) - fields)
        if bad:
            raise TypeError(f"unknown expert spec fields {bad}; valid fields are {sorted(fields)}")
        derived = sorted(set(overrides) & set(DERIVED_FIELDS))
        if derived:
            raise ValueError(
                f"expert {spec.name!r}: {derived} are derived from arch and input_size; "
                f"change them through arch (e.g. arch={{'{cls.patch_key}': ...}}) or input_size"
            )
        arch = dict(spec.arch)
        arch.update(overrides.pop("arch", None) or {})  # type: ignore[arg-type]
        spec = spec.replace(arch=arch, **overrides)
        depth, width, patch = cls.dims(arch)
        h, w = (int(v) for v in spec.input_size)
        if h < patch or w < patch:
            raise ValueError(
                f"expert {spec.name!r}: input_size {(h, w)} is smaller than one patch ({patch})"
            )
        layer = arch.get("feature_layer", -1)
        if not isinstance(layer, int) or not -depth <= layer < depth:
            raise ValueError(
                f"expert {spec.name!r}: arch feature_layer must be a block index in "
                f"[{-depth}, {depth - 1}], got {layer!r}"
            )
        if not isinstance(arch.get("feature_norm", False), bool):
            raise ValueError(f"expert {spec.name!r}: arch feature_norm must be a bool")
        if not 1 <= spec.num_stages <= depth:
            raise ValueError(
                f"expert {spec.name!r}: num_stages must be in [1, {depth}] (groups of its "
                f"{depth} blocks), got {spec.num_stages}"
            )
        return spec.replace(
            input_size=(h, w),
            patch_size=patch,
            channels=width,
            grid=(h // patch, w // patch),
            layers=tuple(range(depth)),
            layer_channels=(width,) * depth,
        )

    @property
    def depth(self) -> int:
        return len(self.spec.layers)

    @property
    def feature_block(self) -> int:
        """Non-negative index of the block the output map is read from."""
        return int(self.spec.arch.get("feature_layer", -1)) % self.depth

    @property
    def feature_norm(self) -> bool:
        return bool(self.spec.arch.get("feature_norm", False))

    @property
    def stage_groups(self) -> list[range]:
        """Block indices of each stage (see the module docstring)."""
        return stage_groups(self.depth, self.spec.num_stages)

    # ------------------------------------------------------------------ library hooks
    @abstractmethod
    def _embed_tokens(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """``(B, 3, H, W)`` pixels to tokens ``(B, P + h*w, C)`` plus what blocks need."""

    @abstractmethod
    def _blocks(self) -> Sequence[nn.Module]:
        """The library model's transformer blocks, in order."""

    @abstractmethod
    def _run_block(self, index: int, hidden: torch.Tensor, extras: dict[str, Any]) -> torch.Tensor:
        """Block ``index`` on tokens ``(B, N, C)``, the way the library's forward calls it."""

    @abstractmethod
    def _final_norm(self) -> nn.Module:
        """The library model's final norm (used when ``feature_norm`` is set)."""

    # ------------------------------------------------------------------ loading
    def load_state(self, state: Mapping[str, torch.Tensor], source: str) -> None:
        """Check ``state`` key by key and shape by shape against the library model
        (``self.model``), then load it strictly. The expert's own ``state_dict()`` (keys under
        ``model.``) is accepted too."""
        state = strip_expert_prefix(state)
        problems = state_dict_mismatches(self.model.state_dict(), state)
        if problems:
            import transformers  # module names move between its releases: name the one here

            raise ValueError(
                f"expert {self.spec.name!r}: checkpoint {source} does not fit the expert's "
                f"architecture under transformers {transformers.__version__}: "
                + "; ".join(problems)
            )
        self.model.load_state_dict(state, strict=True)
        logger.info("expert %s: loaded %s", self.spec.name, source)

    # ------------------------------------------------------------------ preprocessing
    @classmethod
    def preprocess_image(cls, spec: ExpertSpec, image: Image.Image) -> ExpertInputs:
        """Squash-resize (bicubic, no crop: nothing of the image is lost) to
        ``spec.input_size`` and normalise with the expert's own mean/std.

        Returns ``{"pixel_values": (3, H, W)}``.
        """
        return {"pixel_values": resize_normalise(image, spec.input_size, spec.mean, spec.std)}

    # ------------------------------------------------------------------ forward
    def _pixels(self, inputs: ExpertInputs) -> tuple[torch.Tensor, tuple[int, int]]:
        if "pixel_values" not in inputs:
            raise ValueError(
                f"expert {self.spec.name!r} expects inputs {{'pixel_values': (B, 3, H, W)}}, "
                f"got keys {sorted(inputs)}"
            )
        x = inputs["pixel_values"]
        p = self.spec.patch_size
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] < p or x.shape[3] < p:
            raise ValueError(
                f"expert {self.spec.name!r}: pixel_values must be (B, 3, H, W) with H, W >= "
                f"{p}, got {tuple(x.shape)}"
            )
        return x, (x.shape[2] // p, x.shape[3] // p)

    def _as_map(self, hidden: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Tokens ``(B, P + H*W, C)`` to the patch map ``(B, C, H, W)``."""
        b, n, c = hidden.shape
        prefix = n - grid[0] * grid[1]
        return hidden[:, prefix:].transpose(1, 2).reshape(b, c, *grid)

    def forward_map(self, inputs: ExpertInputs) -> FeatureMap:
        """Patch tokens of block ``feature_layer`` (after the final norm if ``feature_norm``)
        as ``(B, C, H, W)`` with ``(H, W) = (h // patch, w // patch)`` of the input."""
        x, grid = self._pixels(inputs)
        hidden, extras = self._embed_tokens(x)
        for i in range(self.feature_block + 1):
            hidden = self._run_block(i, hidden, extras)
        if self.feature_norm:
            hidden = self._final_norm()(hidden)
        return FeatureMap(self._as_map(hidden, grid), self.spec.patch_size, self.spec.name)

    def forward_layers(self, inputs: ExpertInputs, layers: Sequence[int]) -> list[FeatureMap]:
        """Raw outputs of blocks ``layers`` (non-negative indices) as ``(B, C, H, W)`` maps."""
        x, grid = self._pixels(inputs)
        hidden, extras = self._embed_tokens(x)
        out: dict[int, torch.Tensor] = {}
        for i in range(max(layers) + 1):
            hidden = self._run_block(i, hidden, extras)
            if i in layers:
                out[i] = self._as_map(hidden, grid)
        return [
            FeatureMap(out[i], self.spec.patch_size, f"{self.spec.name}:block{i}") for i in layers
        ]

    # ------------------------------------------------------------------ staged execution
    def embed(self, inputs: ExpertInputs) -> StageState:
        """Patch + position embedding: tokens ``(B, P + H*W, C)`` before stage 0."""
        x, grid = self._pixels(inputs)
        hidden, extras = self._embed_tokens(x)
        return StageState(hidden, grid, hidden.shape[1] - grid[0] * grid[1], extras)

    def run_stage(self, state: StageState, index: int) -> StageState:
        """Blocks of group ``index`` (those up to ``feature_layer``)."""
        groups = self.stage_groups
        if not 0 <= index < len(groups):
            raise IndexError(f"expert {self.spec.name!r} has {len(groups)} stages, got {index}")
        hidden = state.hidden
        for i in groups[index]:
            if i > self.feature_block:
                break
            hidden = self._run_block(i, hidden, state.extras or {})
        return StageState(hidden, state.grid, state.num_prefix, state.extras)

    def finish(self, state: StageState) -> FeatureMap:
        """The output map from the last stage's state (final norm applied if ``feature_norm``)."""
        hidden = self._final_norm()(state.hidden) if self.feature_norm else state.hidden
        return FeatureMap(self._as_map(hidden, state.grid), self.spec.patch_size, self.spec.name)


class HFViTExpert(ViTExpert):
    """A ViT expert wrapping a ``transformers`` vision model (``self.model``).

    ``spec.arch`` minus the readout keys are the kwargs of :attr:`config_cls`; the model is
    ``model_cls(config_cls(**kwargs))``.
    """

    config_cls: ClassVar[type]
    model_cls: ClassVar[type]
    depth_key = "num_hidden_layers"
    width_key = "hidden_size"

    def __init__(self, spec: ExpertSpec) -> None:
        super().__init__(spec)
        self.model = self.model_cls(self.config_cls(**library_kwargs(spec.arch)))

    def load_checkpoint(self, checkpoint: str) -> None:
        """Load ``checkpoint`` with ``model_cls.from_pretrained``: a hub id (cache first, and
        offline when ``HF_HUB_OFFLINE=1``) or a folder written by ``save_pretrained``. A single
        ``.safetensors`` (or ``.bin``/``.pth``) file holding the library model's or the expert's
        ``state_dict()`` is read directly.

        Raises:
            FileNotFoundError: the folder/files are missing, or the hub id cannot be fetched.
            ValueError: the checkpoint is unreadable or does not fit the preset's architecture.
        """
        local = looks_local(checkpoint)
        if local:
            folder = Path(checkpoint).expanduser().absolute()
            if folder.is_file():
                self.load_state(read_weight_file(folder), str(folder))
                return
            if not folder.is_dir():
                raise FileNotFoundError(
                    f"expert {self.spec.name!r}: checkpoint {folder} not found; expected a "
                    f"folder written by {self.model_cls.__name__}.save_pretrained() "
                    f"(config.json + model.safetensors) or a .safetensors state dict"
                )
            if not (folder / "config.json").is_file():
                raise FileNotFoundError(
                    f"expert {self.spec.name!r}: {folder / 'config.json'} not found; expected a "
                    f"folder written by save_pretrained()"
                )
        try:
            loaded, info = self.model_cls.from_pretrained(checkpoint, output_loading_info=True)
        except Exception as err:
            if local:
                raise ValueError(
                    f"expert {self.spec.name!r}: cannot read checkpoint {checkpoint}: "
                    f"{type(err).__name__}: {err} (is a weights file truncated or corrupt?)"
                ) from err
            raise FileNotFoundError(
                f"expert {self.spec.name!r}: checkpoint {checkpoint!r} is not a local folder and "
                f"could not be loaded from the Hugging Face hub "
                f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): "
                f"{type(err).__name__}: {err}. Fetch it with `hf download {checkpoint}` on a "
                f"machine with access, or pass a local save_pretrained folder."
            ) from err
        missing = sorted(info.get("missing_keys") or [])
        mismatched = list(info.get("mismatched_keys") or [])
        if missing or mismatched:
            what = [f"{len(missing)} missing keys {missing[:5]}"] if missing else []
            what += [f"{len(mismatched)} mismatched keys {mismatched[:5]}"] if mismatched else []
            raise ValueError(
                f"expert {self.spec.name!r}: checkpoint {checkpoint} is incomplete: "
                + "; ".join(what)
            )
        self._check_config(loaded.config, checkpoint)
        self.load_state(loaded.state_dict(), str(checkpoint))

    def _check_config(self, config: Any, checkpoint: str) -> None:
        """The checkpoint's config must agree with every library kwarg of the preset's arch."""
        diffs = []
        for key, value in library_kwargs(self.spec.arch).items():
            theirs = getattr(config, key, None)
            if isinstance(theirs, (list, tuple)) or isinstance(value, (list, tuple)):
                same = list(theirs or []) == list(value)
            else:
                same = theirs == value
            if not same:
                diffs.append(f"{key}: checkpoint {theirs!r} vs preset {value!r}")
        if diffs:
            raise ValueError(
                f"expert {self.spec.name!r}: checkpoint {checkpoint} has another architecture: "
                + "; ".join(diffs)
                + ". Pick the matching preset or pass arch={...} overrides."
            )

    def _run_block(self, index: int, hidden: torch.Tensor, extras: dict[str, Any]) -> torch.Tensor:
        block = self._blocks()[index]
        if _takes_attention_mask(type(block)):  # CLIP, SigLIP; DINOv2 from transformers 5.2x
            return block(hidden, attention_mask=None)
        return block(hidden)  # DINOv2's layer up to transformers 5.1x takes the tokens alone


@functools.cache
def _takes_attention_mask(block_type: type[nn.Module]) -> bool:
    """Whether a transformers encoder layer's ``forward`` has an ``attention_mask`` argument
    (the signature moves between transformers releases)."""
    return "attention_mask" in inspect.signature(block_type.forward).parameters
