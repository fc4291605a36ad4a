"""Pix2Struct encoder experts: variable-resolution flattened patches, through transformers.

Pix2Struct (Lee et al., "Pix2Struct: Screenshot Parsing as Pretraining for Visual Language
Understanding", ICML 2023) is Eagle's OCR/document expert (Shi et al., 2024). Its encoder
sees an image at its own aspect ratio: the image is standardised per image, resized so that
``rows * cols <= max_patches`` patches of ``p x p`` fit, and fed as a padded sequence of
flattened patches ``(max_patches, 2 + 3*p*p)`` whose first two entries are the 1-based row and
column ids (0 = padding), with an attention mask.

**The map.** Token ``(row, col)`` is scattered to cell ``(row - 1, col - 1)`` of a fixed
``(G, G)`` grid, so that images of any aspect ratio stack in one batch; ``mask (B, G, G)``
is True on real patches. ``G = floor(sqrt(max_patches * A))`` with ``A =
arch["max_aspect_ratio"]``: every image whose aspect ratio is at most ``A`` gets exactly the
patch grid Pix2Struct's own processor gives it (its full budget); a more elongated image is
shrunk (aspect kept) until its rows and columns fit in ``G``. ``spec.grid = (G, G)`` and
``spec.input_size = (G*p, G*p)`` is the pixel extent of that grid.

**Preprocessing** is the math of ``transformers.Pix2StructImageProcessor`` (per-image
standardisation, bilinear antialiased resize, ``torch_extract_patches``), with the extra
``G`` bound above; without the bound its output equals the processor's (tested).
``spec.mean``/``spec.std`` are identity because the standardisation is per image.
The order of operations differs, not the result: the standardisation is affine and the resize
is linear with weights summing to one, so ``resize((x - m) / s) == (resize(x) - m) / s``. The
full-resolution image is therefore never turned into floats: ``m`` and ``s`` come exactly from
its uint8 histogram, and the separable resize runs its horizontal pass over strips of rows
(:func:`resize_uint8`), so a 10000x10000 page costs a few MB and about a second, not gigabytes.

**Staged execution**: groups of encoder layers (``spec.num_stages`` even groups); the state is
the token sequence ``(B, N, C)`` plus the scatter index, and ``to_map``/``from_map`` scatter to
and gather from the ``(G, G)`` grid (padding tokens keep their values).

Checkpoints: ``google/pix2struct-*`` (full ``Pix2StructForConditionalGeneration``: the encoder
is read from ``encoder.*``), folders written by ``save_pretrained`` of either model class, and
safetensors/``.bin`` files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as tvF
from PIL import Image
from transformers import Pix2StructVisionConfig, Pix2StructVisionModel
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.pix2struct.image_processing_pix2struct import torch_extract_patches

from experts.base import Expert, StageState
from experts.families._checkpoints import (
    FROM_SCRATCH_INIT,
    load_into,
    read_weight_file,
    resolve_weight_file,
)
from experts.registry import register_expert
from experts.spec import ExpertInputs, ExpertSpec, FeatureMap


def scatter_grid(max_patches: int, max_aspect_ratio: float) -> int:
    """Side ``G`` of the square scatter grid: rows, cols <= G for aspect ratios <= the bound."""
    return max(1, math.isqrt(int(max_patches * max_aspect_ratio)))


def histogram_mean_std(image: Image.Image) -> tuple[float, float]:
    """Mean and unbiased std (``torch.std``'s) over all pixels and channels of an 8-bit image,
    exactly, from PIL's per-band histograms (no copy of the pixels)."""
    counts = np.asarray(image.histogram(), dtype=np.float64).reshape(-1, 256).sum(0)
    values = np.arange(256, dtype=np.float64)
    n = counts.sum()
    mean = float((counts * values).sum() / n)
    var = float((counts * (values - mean) ** 2).sum() / max(n - 1.0, 1.0))
    return mean, math.sqrt(var)


def resize_uint8(
    image: Image.Image, height: int, width: int, strip_bytes: int = 1 << 24
) -> torch.Tensor:
    """RGB image -> ``(1, 3, height, width)`` float32, bilinear with antialiasing.

    The same separable resize as ``tvF.resize(float image, antialias=True)``: the horizontal
    pass runs on float strips of rows of at most ``strip_bytes``, the vertical pass on the
    narrow result, so the full image is never held as floats (nor copied as a whole).
    """
    w, h = image.size
    rows_per_strip = max(1, strip_bytes // (4 * 3 * w))
    mode = tvF.InterpolationMode.BILINEAR
    strips = []
    for r in range(0, h, rows_per_strip):
        strip = np.asarray(image.crop((0, r, w, min(h, r + rows_per_strip))), dtype=np.float32)
        x = torch.from_numpy(strip).permute(2, 0, 1)[None]  # (1, 3, strip rows, W)
        strips.append(tvF.resize(x, [x.shape[2], width], interpolation=mode, antialias=True))
    narrow = torch.cat(strips, dim=2)  # (1, 3, H, width)
    return tvF.resize(narrow, [height, width], interpolation=mode, antialias=True)


def patch_rows_cols(
    height: int, width: int, patch: int, max_patches: int, grid: int
) -> tuple[int, int]:
    """Rows and columns of patches for an image: Pix2Struct's rule, bounded by ``grid``."""
    scale = math.sqrt(max_patches * (patch / height) * (patch / width))
    rows_f, cols_f = scale * height / patch, scale * width / patch
    rows = max(min(int(rows_f), max_patches), 1)
    cols = max(min(int(cols_f), max_patches), 1)
    if rows > grid or cols > grid:  # too elongated for the grid: shrink, aspect ratio kept
        shrink = min(grid / rows_f, grid / cols_f)
        rows = max(min(int(rows_f * shrink + 1e-6), grid), 1)
        cols = max(min(int(cols_f * shrink + 1e-6), grid), 1)
        rows, cols = min(rows, max_patches), min(cols, max(max_patches // rows, 1))
    return rows, cols


class Pix2StructExpert(Expert):
    """Pix2Struct's encoder as an expert; see the module docstring.

    ``spec.arch``: ``Pix2StructVisionConfig`` fields under ``config``, and
    ``max_aspect_ratio`` (the bound ``A`` that sizes the scatter grid).
    """

    def __init__(self, spec: ExpertSpec) -> None:
        super().__init__(spec)
        config = Pix2StructVisionConfig(**spec.arch["config"])
        self.model = Pix2StructVisionModel(config)
        n = config.num_hidden_layers
        if not 1 <= spec.num_stages <= n:
            raise ValueError(f"expert {spec.name!r}: num_stages must be in 1..{n}")
        cuts = [round(i * n / spec.num_stages) for i in range(spec.num_stages + 1)]
        self.stages = list(zip(cuts[:-1], cuts[1:]))

    @classmethod
    def resolve_spec(cls, spec: ExpertSpec, **overrides: object) -> ExpertSpec:
        """Apply overrides, then derive the scatter grid from ``max_patches`` (module docstring)."""
        spec = super().resolve_spec(spec, **overrides)
        cfg = spec.arch["config"]
        p = spec.patch_size
        if cfg["patch_embed_hidden_size"] != 3 * p * p:
            raise ValueError(
                f"expert {spec.name!r}: patch_size {p} needs patch_embed_hidden_size {3 * p * p}, "
                f"the model has {cfg['patch_embed_hidden_size']}"
            )
        if spec.max_patches is None or spec.max_patches < 1:
            raise ValueError(
                f"expert {spec.name!r}: max_patches must be >= 1, got {spec.max_patches}"
            )
        aspect = float(spec.arch["max_aspect_ratio"])
        if aspect < 1.0:
            raise ValueError(
                f"expert {spec.name!r}: arch max_aspect_ratio must be >= 1 (longer side over "
                f"shorter side), got {aspect}"
            )
        g = scatter_grid(spec.max_patches, aspect)
        if g >= cfg["seq_len"]:
            raise ValueError(
                f"expert {spec.name!r}: a {g}x{g} patch grid needs row/column ids up to {g}, "
                f"the model embeds ids < seq_len={cfg['seq_len']}; lower max_patches"
            )
        return spec.replace(grid=(g, g), input_size=(g * p, g * p))

    # ------------------------------------------------------------------ preprocessing
    @classmethod
    def preprocess_image(cls, spec: ExpertSpec, image: Image.Image) -> ExpertInputs:
        """RGB image -> ``{"flattened_patches": (M, 2 + 3p^2), "attention_mask": (M,)}``."""
        p, m = spec.patch_size, int(spec.max_patches or 0)
        if image.mode != "RGB":
            raise ValueError(f"expert {spec.name!r}: expected an RGB image, got {image.mode}")
        w, h = image.size
        rows, cols = patch_rows_cols(h, w, p, m, spec.grid[0])
        x = resize_uint8(image, rows * p, cols * p)  # (1, 3, rows*p, cols*p)
        # per-image standardisation of the full image, as Pix2StructImageProcessor.normalize
        mean, std = histogram_mean_std(image)
        x = (x - mean) / max(std, 1.0 / math.sqrt(3 * h * w))
        patches = torch_extract_patches(x, p, p).reshape(rows * cols, 3 * p * p)
        ids = torch.stack(
            torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1
        ).reshape(rows * cols, 2)
        flat = torch.zeros(m, 2 + 3 * p * p)
        flat[: rows * cols, :2] = (ids + 1).float()
        flat[: rows * cols, 2:] = patches
        mask = torch.zeros(m)
        mask[: rows * cols] = 1.0
        return {"flattened_patches": flat, "attention_mask": mask}

    # ------------------------------------------------------------------ loading
    def load_checkpoint(self, checkpoint: str) -> None:
        path = resolve_weight_file(checkpoint)
        load_into(self.model, read_weight_file(path), str(path))

    # ------------------------------------------------------------------ grid scatter
    def _check_inputs(self, inputs: ExpertInputs) -> tuple[torch.Tensor, torch.Tensor]:
        spec = self.spec
        want = 2 + 3 * spec.patch_size**2
        if "flattened_patches" not in inputs or "attention_mask" not in inputs:
            raise KeyError(
                f"expert {spec.name!r} expects inputs 'flattened_patches' (B, N, {want}) and "
                f"'attention_mask' (B, N), got keys {sorted(inputs)}; use expert.preprocess"
            )
        flat, mask = inputs["flattened_patches"], inputs["attention_mask"]
        if flat.dim() != 3 or flat.shape[-1] != want or mask.shape != flat.shape[:2]:
            raise ValueError(
                f"expert {spec.name!r}: expected flattened_patches (B, N, {want}) and "
                f"attention_mask (B, N), got {tuple(flat.shape)} and {tuple(mask.shape)}"
            )
        return flat, mask

    def _scatter_index(self, flat: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Flat cell index ``(B, N)`` of each token in the ``(G, G)`` grid (``G*G`` = padding)."""
        g = self.spec.grid[0]
        rows, cols = flat[..., 0].long(), flat[..., 1].long()
        valid = (mask > 0) & (rows > 0) & (cols > 0)
        too_big = valid & ((rows > g) | (cols > g))
        if flat.device.type != "meta" and bool(too_big.any()):  # meta: shape checks only
            raise ValueError(
                f"expert {self.spec.name!r}: patch rows/cols up to "
                f"({int(rows[valid].max())}, {int(cols[valid].max())}) do not fit its "
                f"{g}x{g} grid; "
                "build inputs with expert.preprocess (max_patches "
                f"{self.spec.max_patches}, max_aspect_ratio {self.spec.arch['max_aspect_ratio']})"
            )
        index = torch.where(valid, (rows - 1) * g + (cols - 1), torch.full_like(rows, g * g))
        return {"index": index, "valid": valid}

    def tokens_to_map(self, tokens: torch.Tensor, inputs: ExpertInputs) -> torch.Tensor:
        """Encoder tokens ``(B, N, C)`` of ``inputs`` (e.g. the library model's own output)
        scattered to the expert's ``(B, C, G, G)`` grid, as :meth:`finish` does."""
        flat, mask = self._check_inputs(inputs)
        return self._scatter(tokens, self._scatter_index(flat, mask))

    def _scatter(self, tokens: torch.Tensor, extras: dict) -> torch.Tensor:
        """``(B, N, C)`` tokens -> ``(B, C, G, G)`` map (zeros where no patch)."""
        b, _, c = tokens.shape
        g = self.spec.grid[0]
        out = tokens.new_zeros(b, g * g + 1, c)
        out = out.scatter(1, extras["index"][..., None].expand(-1, -1, c), tokens)
        return out[:, : g * g].transpose(1, 2).reshape(b, c, g, g)

    def _grid_mask(self, extras: dict) -> torch.Tensor:
        """``(B, G, G)`` bool: True on cells that hold a real patch."""
        g = self.spec.grid[0]
        b = extras["index"].shape[0]
        m = torch.zeros(b, g * g + 1, dtype=torch.bool, device=extras["index"].device)
        m = m.scatter(1, extras["index"], extras["valid"])
        return m[:, : g * g].reshape(b, g, g)

    # ------------------------------------------------------------------ staged execution
    def embed(self, inputs: ExpertInputs) -> StageState:
        """Patch + row/column embeddings: tokens ``(B, N, C)``; extras hold the scatter index."""
        flat, mask = self._check_inputs(inputs)
        # cast to the weights' dtype: row/col ids <= G stay exact (bf16 holds integers to 256)
        hidden = self.model.embeddings(flat.to(self.model.embeddings.patch_projection.weight.dtype))
        extras = self._scatter_index(flat, mask)
        extras["attention"] = create_bidirectional_mask(
            config=self.model.config,
            inputs_embeds=hidden,
            attention_mask=mask,
            # the no-padding shortcut reads values, which meta tensors (shape checks) lack
            allow_is_bidirectional_skip=hidden.device.type != "meta",
        )
        return StageState(hidden, self.spec.grid, 0, extras)

    def run_stage(self, state: StageState, index: int) -> StageState:
        """Encoder layers of stage ``index`` on ``(B, N, C)`` tokens."""
        if not 0 <= index < self.num_stages:
            raise IndexError(f"expert {self.spec.name!r} has stages 0..{self.num_stages - 1}")
        start, end = self.stages[index]
        hidden = state.hidden
        for layer in self.model.encoder.layer[start:end]:
            hidden = layer(hidden, state.extras["attention"])[0]
        return StageState(hidden, state.grid, 0, state.extras)

    def to_map(self, state: StageState) -> torch.Tensor:
        """Tokens ``(B, N, C)`` scattered to ``(B, C, G, G)``."""
        return self._scatter(state.hidden, state.extras)

    def from_map(self, state: StageState, fmap: torch.Tensor) -> StageState:
        """Read tokens back from a ``(B, C, G, G)`` map; padding tokens keep their values."""
        b, c = fmap.shape[:2]
        cells = fmap.flatten(2).transpose(1, 2)  # (B, G*G, C)
        index = state.extras["index"].clamp_max(cells.shape[1] - 1)
        gathered = cells.gather(1, index[..., None].expand(-1, -1, c))
        hidden = torch.where(state.extras["valid"][..., None], gathered, state.hidden)
        return StageState(hidden, state.grid, 0, state.extras)

    def finish(self, state: StageState) -> FeatureMap:
        """Final layer norm, then the scatter: ``(B, C, G, G)`` with its validity mask."""
        tokens = self.model.layernorm(state.hidden)
        return FeatureMap(
            self._scatter(tokens, state.extras),
            self.spec.patch_size,
            self.spec.name,
            self._grid_mask(state.extras),
        )

    # ------------------------------------------------------------------ forward
    def forward_map(self, inputs: ExpertInputs) -> FeatureMap:
        """Flattened patches -> ``(B, C, G, G)`` map with ``mask (B, G, G)``."""
        return self.run_staged(inputs)

    def forward_layers(self, inputs: ExpertInputs, layers: Sequence[int]) -> list[FeatureMap]:
        """Encoder layer outputs (before the final norm) as ``(B, C, G, G)`` masked maps."""
        if not layers:
            return []
        state = self.embed(inputs)
        mask = self._grid_mask(state.extras)
        wanted, outs = set(layers), {}
        hidden = state.hidden
        for i, layer in enumerate(self.model.encoder.layer[: max(layers) + 1]):
            hidden = layer(hidden, state.extras["attention"])[0]
            if i in wanted:
                outs[i] = self._scatter(hidden, state.extras)
        p = self.spec.patch_size
        return [FeatureMap(outs[i], p, f"{self.spec.name}:layer{i}", mask) for i in layers]


def pix2struct_spec(
    name: str,
    checkpoint: str | None,
    max_patches: int,
    num_stages: int,
    max_aspect_ratio: float = 2.0,
    patch_size: int = 16,
    **config: object,
) -> ExpertSpec:
    """A Pix2Struct preset from ``Pix2StructVisionConfig`` fields; the grid derives from them."""
    cfg = Pix2StructVisionConfig(patch_embed_hidden_size=3 * patch_size**2, **config)
    spec = ExpertSpec(
        name=name,
        family="pix2struct",
        library="transformers",
        role="ocr",
        architecture="vit",
        checkpoint=checkpoint,
        input_size=(0, 0),  # derived in resolve_spec
        patch_size=patch_size,
        channels=int(cfg.hidden_size),
        grid=(0, 0),
        mean=(0.0, 0.0, 0.0),  # per-image standardisation instead
        std=(1.0, 1.0, 1.0),
        layers=tuple(range(cfg.num_hidden_layers)),
        layer_channels=(int(cfg.hidden_size),) * cfg.num_hidden_layers,
        num_stages=num_stages,
        variable_resolution=True,
        max_patches=max_patches,
        arch={
            "max_aspect_ratio": max_aspect_ratio,
            "config": {"patch_embed_hidden_size": 3 * patch_size**2, **config},
        },
    )
    return Pix2StructExpert.resolve_spec(spec)


register_expert(
    Pix2StructExpert,
    pix2struct_spec(  # google/pix2struct-large's vision_config
        "pix2struct-large",
        "google/pix2struct-large",
        max_patches=2048,
        num_stages=3,
        hidden_size=1536,
        num_hidden_layers=18,
        num_attention_heads=24,
        d_ff=3968,
        d_kv=64,
        seq_len=4096,
        dense_act_fn="gelu_new",
        layer_norm_eps=1e-6,
    ),
)
register_expert(
    Pix2StructExpert,
    pix2struct_spec(
        "pix2struct-tiny",
        None,
        max_patches=64,
        num_stages=2,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        d_ff=64,
        d_kv=16,
        seq_len=128,
        dense_act_fn="gelu_new",
        layer_norm_eps=1e-6,
        initializer_range=FROM_SCRATCH_INIT,
    ),
)
