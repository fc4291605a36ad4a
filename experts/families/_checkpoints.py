"""Checkpoint intake shared by the expert families: find, read and check a state dict.

A checkpoint is one of

* a local **file** in a library's format: ``*.safetensors`` (preferred; read with
  ``safetensors``), or ``*.bin`` / ``*.pt`` / ``*.pth`` (read with
  ``torch.load(weights_only=True)``, so no pickled code runs);
* a local **folder** as a library writes it (``save_pretrained`` in transformers,
  ``timm.models.save_for_hf`` in timm): ``model.safetensors``, a sharded
  ``model.safetensors.index.json``, or ``pytorch_model.bin``;
* a **hub id** ``org/name`` (or timm's ``hf-hub:org/name``): resolved through
  ``huggingface_hub`` (what transformers and timm use underneath), which respects
  ``HF_HUB_OFFLINE`` and the local cache and fails fast offline.

:func:`load_into` then finds the expert's module inside the checkpoint (a full ``SamModel``
holds the image encoder under ``vision_encoder.``; a full Pix2Struct model holds its encoder
under ``encoder.``), and checks keys and shapes *before* loading, so a checkpoint that does not
fit names the file and the mismatching keys instead of failing deep inside torch.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

WEIGHT_FILES: tuple[str, ...] = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.bin",
)
"""File names looked for in a checkpoint folder or hub repository, in order of preference."""

FROM_SCRATCH_INIT = 0.02
"""``initializer_range`` of the transformers-built presets without a checkpoint that are trained
from scratch or used at random init (the SAM and Pix2Struct minis and tinies). Their configs
default to 1e-10, a value meant for models that are always loaded from a checkpoint: every
linear weight starts at ~1e-10, the encoder's output is nearly constant, and training from it
crawls. 0.02 is the truncated-normal std of ViT, SAM and Pix2Struct's own pretraining."""

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".ckpt")
_SHOW = 5  # how many offending keys an error message lists


def read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """Read one weight file (``.safetensors``, ``.bin``, ``.pt``, ``.pth``, or a shard index).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is truncated, corrupt or not a weight file (names the file).
    """
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        if path.name.endswith(".index.json"):
            index = json.loads(path.read_text())
            shards = sorted(set(index["weight_map"].values()))
            out: dict[str, torch.Tensor] = {}
            for shard in shards:
                out.update(read_weight_file(path.parent / shard))
            return out
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # safetensors/torch raise many types for a bad file
        raise ValueError(
            f"cannot read checkpoint {path}: {type(err).__name__}: {err} "
            "(is the file truncated or corrupt?)"
        ) from err
    for key in ("state_dict", "model", "module"):  # common training-checkpoint wrappers
        if isinstance(sd, Mapping) and key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"checkpoint {path} does not hold a state dict of tensors")
    return dict(sd)


def _looks_like_hub_id(checkpoint: str) -> bool:
    parts = checkpoint.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not checkpoint.startswith((".", "~"))
        and Path(parts[1]).suffix not in _WEIGHT_SUFFIXES
    )


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    offline_miss: Exception | None = None
    for name in WEIGHT_FILES:
        try:
            return Path(hf_hub_download(repo_id, name))
        except LocalEntryNotFoundError as err:  # (a subclass of EntryNotFoundError)
            if offline:  # another file name may be in the cache: keep looking, locally
                offline_miss = err
                continue
            raise FileNotFoundError(
                f"checkpoint {repo_id!r}: the Hugging Face hub cannot be reached and {name} is "
                f"not in the local cache ({err}); download it on a machine with hub access "
                f"(`hf download {repo_id}`) or pass a local folder/file"
            ) from err
        except EntryNotFoundError:
            continue
        except Exception as err:  # repository not found, gated, network errors
            raise FileNotFoundError(
                f"checkpoint {repo_id!r} could not be fetched from the Hugging Face hub: "
                f"{type(err).__name__}: {err}"
            ) from err
    if offline_miss is not None:
        raise FileNotFoundError(
            f"checkpoint {repo_id!r}: none of {list(WEIGHT_FILES)} is in the local Hugging "
            f"Face cache and HF_HUB_OFFLINE=1; download it on a machine with hub access "
            f"(`hf download {repo_id}`) or pass a local folder/file"
        ) from offline_miss
    raise FileNotFoundError(
        f"hub repository {repo_id!r} has none of the weight files {list(WEIGHT_FILES)}"
    )


def resolve_weight_file(checkpoint: str | os.PathLike) -> Path:
    """The weight file a checkpoint names (file, folder, or hub id; see the module docstring)."""
    if isinstance(checkpoint, str) and checkpoint.startswith("hf-hub:"):  # timm's spelling
        return _from_hub(checkpoint[len("hf-hub:") :])
    path = Path(checkpoint).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(
            f"checkpoint folder {path} holds none of {list(WEIGHT_FILES)}; write one with the "
            "library's save_pretrained / safetensors.torch.save_file"
        )
    if isinstance(checkpoint, str) and _looks_like_hub_id(checkpoint):
        return _from_hub(checkpoint)
    raise FileNotFoundError(
        f"checkpoint not found: {path.resolve()} (expected a weight file, a folder written by "
        "the library's save_pretrained / save_for_hf, or a hub id 'org/name'; fetch hub weights "
        "with `hf download org/name --local-dir DIR`)"
    )


def find_prefix(model_keys: list[str], checkpoint_keys: list[str]) -> str:
    """The prefix under which ``model_keys`` sit in ``checkpoint_keys`` (``""`` if at the top).

    The candidate prefix that explains the most model keys wins, e.g. ``"vision_encoder."`` for
    a SAM image encoder inside a full ``SamModel`` checkpoint.
    """
    ckpt = set(checkpoint_keys)
    candidates = {""}
    for key in model_keys[:8]:
        for ck in checkpoint_keys:
            if ck.endswith("." + key):
                candidates.add(ck[: -len(key)])
    return max(candidates, key=lambda p: (sum(p + k in ckpt for k in model_keys), -len(p)))


def _summarise(keys: list[str]) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def state_dict_mismatches(
    expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]
) -> list[str]:
    """What keeps ``found`` from loading into a module whose ``state_dict()`` is ``expected``:
    one message each for shape mismatches, missing keys and unexpected keys (a few of each
    named); empty when it fits."""
    shapes = [
        f"{k}: checkpoint {tuple(found[k].shape)} vs expert {tuple(v.shape)}"
        for k, v in expected.items()
        if k in found and tuple(found[k].shape) != tuple(v.shape)
    ]
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    problems = []
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches: {_summarise(shapes)}")
    if missing:
        problems.append(f"{len(missing)} missing keys: {_summarise(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_summarise(unexpected)}")
    return problems


def load_into(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str,
    ignore: Callable[[str], bool] | None = None,
) -> None:
    """Load ``state_dict`` into ``module`` after checking keys and shapes.

    Args:
        module: the library module the expert wraps.
        state_dict: weights read from ``source``; may hold more than the module (a full model
            around the image encoder): the module's keys are looked for under a common prefix
            (:func:`find_prefix`) and keys outside it are ignored.
        source: the file the weights came from, for error messages.
        ignore: checkpoint keys (after removing the prefix) that may be present without a
            place in the module, e.g. a classifier head the expert does not build.

    Raises:
        ValueError: missing keys, unexpected keys or shape mismatches, each listed.
    """
    target = module.state_dict()
    prefix = find_prefix(list(target), list(state_dict))
    sd = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    outside = len(state_dict) - len(sd)
    if outside:
        log.info(
            "%s: ignoring %d keys outside %r (other parts of the model)", source, outside, prefix
        )
    dropped = [k for k in sd if k not in target and ignore is not None and ignore(k)]
    for k in dropped:
        sd.pop(k)
    if dropped:
        log.info("%s: ignoring %d keys of parts the expert does not build", source, len(dropped))
    problems = state_dict_mismatches(target, sd)
    if problems:
        where = f" (under prefix {prefix!r})" if prefix else ""
        raise ValueError(
            f"checkpoint {source}{where} does not fit {type(module).__name__}: "
            + "; ".join(problems)
        )
    module.load_state_dict(sd, strict=True)
    log.info("loaded %d tensors from %s", len(sd), source)
