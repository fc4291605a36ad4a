"""Low-rank adapters on the model: LoRA (Hu et al., 2021, arXiv 2106.09685) and QLoRA
(Dettmers et al., 2023, arXiv 2305.14314) on the LLM and the experts, through ``peft``.

A :class:`LoraConfig` names modules by two lists: ``targets``, fnmatch patterns over module names
(``"llm.*"``, ``"experts.0.*"``, matched by :func:`name_matches`), and ``modules``, name suffixes
inside them (``q_proj``, ``mlp.fc1``: peft's ``target_modules``). Every selected module must be
an ``nn.Linear``, an ungrouped ``nn.Conv2d`` or an ``nn.Embedding`` (transformers and timm
experts are made of them; open_clip's fused ``nn.MultiheadAttention`` is not adaptable and is
refused by name). A bad entry raises :class:`AdapterError`.

* :func:`add_adapters` wraps each selected module in peft's LoRA layer
  (``peft.inject_adapter_in_model``): ``B`` starts at zero, so the model computes exactly what it
  did; ``A`` is drawn from a given seed, so a resumed run builds the same adapters. A module that
  already has an adapter keeps it (its ``r`` and ``alpha`` must agree). Which stage adds which
  adapters and what trains is the training's business
  (:func:`moe_vision.training.recipes.add_stage_adapters`, ``stage_trainability``).
* Parameter names: an adapted module ``m`` holds ``m.base_layer.weight`` and
  ``m.lora_A.default.weight`` / ``m.lora_B.default.weight`` (peft's layout); checkpoints store
  the model as it is, and the trainer adds the adapters again (same seeds) before a resume
  loads them. :func:`adapter_fingerprint` is part of the feature-cache key.
* ``save_pretrained`` (:func:`save_weights`) writes the base under the plain model's names plus
  ``adapters.safetensors`` / ``adapters.json`` beside it, or, with ``merge=True``, the merged
  weights ``W + alpha / r * B @ A`` alone; :func:`load_adapters` reads the first form back.
* QLoRA (``quantize: nf4``): the adapted ``nn.Linear`` modules' base weights are stored in 4 bits
  by bitsandbytes (``Linear4bit``, bf16 compute) before the adapters are added. It needs CUDA and
  bitsandbytes and refuses otherwise (:class:`QLoraUnavailableError`). Saved models hold the
  dequantised base, so they load anywhere.

peft is imported only when a model has or gets adapters, so runs without LoRA never pay for it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import importlib.util
import json
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

logger = logging.getLogger(__name__)

ADAPTER_NAME = "default"
ADAPTERS_CONFIG = "adapters.json"
ADAPTERS_WEIGHTS = "adapters.safetensors"
ADAPTERS_FORMAT = "moe-vision-lora/1"
_LORA_KEY = re.compile(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)\.")


class AdapterError(ValueError):
    """A LoRA entry or module selection that cannot be used: says which and what was expected."""


LORA_QUANTIZE = ("nf4", "fp4")


@dataclass
class LoraConfig:
    """Low-rank adapters (LoRA, Hu et al., 2021) for a stage, applied with ``peft``.

    The modules that get adapters are those under a ``targets`` pattern (fnmatch over module
    names, like ``train``: ``"llm.*"``, ``"experts.0.*"``) whose name ends with one of
    ``modules`` (peft's ``target_modules``: ``q_proj``, ``mlp.fc1``); they must be
    ``nn.Linear``, ``nn.Conv2d`` (not grouped) or ``nn.Embedding``. In the stage, their adapters
    train and their base weights stay frozen; see :func:`add_adapters`.

    Attributes:
        targets: module-name patterns (which parts of the model).
        modules: module-name suffixes inside them.
        r: adapter rank.
        alpha: scaling numerator (the update is ``alpha / r * B @ A``).
        dropout: dropout on the adapter's input.
        quantize: QLoRA (Dettmers et al., 2023): ``"nf4"`` or ``"fp4"`` stores the adapted
            modules' base weights in 4 bits through bitsandbytes (CUDA only); ``None``: as is.
    """

    targets: list[str]
    modules: list[str]
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    quantize: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, where: str = "lora") -> None:
        """Raise :class:`AdapterError` naming the bad field and what was expected."""
        for key, example in (("targets", "['llm.*']"), ("modules", "['q_proj', 'v_proj']")):
            value = getattr(self, key)
            if isinstance(value, str):
                value = [value]
            if not value or not all(isinstance(v, str) and v for v in value):
                raise AdapterError(
                    f"{where}: {key} must be a non-empty list of names such as {example}, "
                    f"got {getattr(self, key)!r}"
                )
            setattr(self, key, list(value))
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise AdapterError(f"{where}: r must be an integer >= 1, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise AdapterError(f"{where}: alpha must be a positive number, got {self.alpha!r}")
        if self.alpha <= 0:
            raise AdapterError(f"{where}: alpha must be a positive number, got {self.alpha!r}")
        self.alpha = float(self.alpha)
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"{where}: dropout must be in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        if self.quantize is not None and self.quantize not in LORA_QUANTIZE:
            raise AdapterError(
                f"{where}: quantize must be null or one of {list(LORA_QUANTIZE)}, "
                f"got {self.quantize!r}"
            )

    @classmethod
    def from_dict(cls, data: Any, where: str = "lora") -> LoraConfig:
        """Build from a plain dict; unknown or missing keys raise with the valid ones listed."""
        if isinstance(data, LoraConfig):
            data = dataclasses.asdict(data)
        if not isinstance(data, dict):
            raise AdapterError(f"{where}: expected a mapping, got {type(data).__name__}: {data!r}")
        valid = [f.name for f in dataclasses.fields(cls)]
        bad = sorted(set(data) - set(valid))
        if bad:
            raise AdapterError(f"{where}: unknown fields {bad}; valid fields: {valid}")
        missing = [k for k in ("targets", "modules") if k not in data]
        if missing:
            raise AdapterError(f"{where}: missing required fields {missing}")
        obj = cls.__new__(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            setattr(obj, f.name, data.get(f.name, default))
        obj.validate(where)
        return obj


def name_matches(name: str, pattern: str) -> bool:
    """Whether the module or parameter ``name`` is matched by the fnmatch ``pattern`` or lies
    under the module it names (``"llm"`` matches ``"llm.lm_head.weight"``)."""
    return fnmatch.fnmatchcase(name, pattern) or name.startswith(pattern + ".")


class QLoraUnavailableError(RuntimeError):
    """QLoRA was asked for where it cannot run (no CUDA device, or no bitsandbytes)."""


# ------------------------------------------------------------------------------ inspection
def _lora_layer_class() -> type | None:
    """peft's ``LoraLayer``, or ``None`` when peft was never imported (then no model has one)."""
    module = sys.modules.get("peft.tuners.lora.layer")
    return getattr(module, "LoraLayer", None)


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{module name: peft LoRA layer}`` of ``model`` (empty without adapters)."""
    cls = _lora_layer_class()
    if cls is None:
        return {}
    return {name: m for name, m in model.named_modules() if isinstance(m, cls)}


def is_adapter_key(key: str) -> bool:
    """Whether a parameter / state-dict name belongs to an adapter (``...lora_A.default...``)."""
    return _LORA_KEY.search(key) is not None


def is_4bit(t: torch.Tensor) -> bool:
    """Whether ``t`` is a bitsandbytes 4-bit weight (packed bytes plus a quantisation state)."""
    return getattr(t, "quant_state", None) is not None or type(t).__name__ == "Params4bit"


def num_elements(t: torch.Tensor) -> int:
    """Elements a parameter stands for (a 4-bit weight: its unpacked shape)."""
    state = getattr(t, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        return int(torch.Size(state.shape).numel())
    return t.numel()


def _adaptable(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, nn.Conv2d):
        return module.groups == 1
    if type(module).__name__ == "Linear4bit":
        return True
    return isinstance(module, (nn.Linear, nn.Embedding, Conv1D))


def select_modules(model: nn.Module, cfg: LoraConfig, where: str = "lora") -> list[str]:
    """Names of the modules ``cfg`` adapts in ``model`` (those with an adapter included).

    Raises :class:`AdapterError` when ``targets`` match no module, when no module under them
    ends with one of ``cfg.modules`` (listing the adaptable names there), or when a selected
    module is of a kind LoRA cannot adapt.
    """
    layers = lora_layers(model)
    inside = tuple(f"{n}." for n in layers)
    under, chosen, adaptable = [], [], set()
    for name, module in model.named_modules():
        if not name or name.startswith(inside):
            continue  # the model itself, or peft's own submodules (base_layer, lora_A, ...)
        if not any(name_matches(name, pat) for pat in cfg.targets):
            continue
        under.append(name)
        ok = name in layers or _adaptable(module)
        if ok:
            adaptable.add(name.rsplit(".", 1)[-1])
        if not any(name == m or name.endswith(f".{m}") for m in cfg.modules):
            continue
        if not ok:
            kind = type(module).__name__
            if getattr(module, "groups", 1) != 1:
                kind += f" with groups={module.groups}"
            raise AdapterError(
                f"{where}: module {name!r} is a {kind}; LoRA adapts nn.Linear, ungrouped "
                "nn.Conv2d and nn.Embedding modules (name those in 'modules')"
            )
        chosen.append(name)
    if not under:
        top = sorted({n.split(".")[0] for n, _ in model.named_modules() if n})
        raise AdapterError(
            f"{where}: targets {cfg.targets} match no module; top-level modules are {top}"
        )
    if not chosen:
        raise AdapterError(
            f"{where}: no module under targets {cfg.targets} ends with one of {cfg.modules}; "
            f"adaptable modules there are named {sorted(adaptable)[:40]}"
        )
    return chosen


# ------------------------------------------------------------------------------ adding
@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Draw from ``seed`` without disturbing the run's random streams."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _inject(model: nn.Module, names: list[str], r: int, alpha: float, dropout: float, seed: int):
    """Wrap the modules ``names`` of ``model`` in peft LoRA layers (``B = 0``; ``A`` seeded).

    ``requires_grad`` of the parameters already there, and the train/eval mode of the modules
    already there, are left as they were; a new adapter layer takes its wrapped module's mode.
    (peft freezes the parameters, and peft >= 0.22 ends each injection by putting every adapter
    of that name in the model, earlier entries' ``lora_dropout`` included, in train mode.)"""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = [(m, m.training) for m in model.modules()]  # by identity: a wrapped module is renamed
    config = PeftLoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules="^(" + "|".join(re.escape(n) for n in names) + ")$",
    )
    with _seeded(seed), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*peft_config.*")
        inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    if hasattr(model, "peft_config"):
        del model.peft_config  # peft's bookkeeping; the layers carry everything needed
    layers = lora_layers(model)
    missing = sorted(set(names) - set(layers))
    if missing:
        raise RuntimeError(f"peft added no adapter to {missing[:5]}")
    for name in names:  # new submodules (dropout) start in train mode: follow the wrapped module
        layers[name].train(layers[name].get_base_layer().training)
    for module, training in modes:  # non-recursive: each module that was there gets its own back
        module.training = training
    for n, p in model.named_parameters():
        base = n.replace(".base_layer.", ".")
        if n in flags:
            p.requires_grad_(flags[n])
        elif base in flags and not is_adapter_key(n):
            p.requires_grad_(flags[base] and not is_4bit(p))


def add_adapters(model: nn.Module, cfg: LoraConfig, seed: int, where: str = "lora") -> list[str]:
    """Give every module ``cfg`` selects an adapter (modules that have one keep it).

    Returns the selected module names. ``cfg.quantize`` first stores the new modules' base
    weights in 4 bits (CUDA and bitsandbytes only: :class:`QLoraUnavailableError` otherwise).
    """
    names = select_modules(model, cfg, where)
    layers = lora_layers(model)
    for name in (n for n in names if n in layers):
        layer = layers[name]
        have = (layer.r[ADAPTER_NAME], float(layer.lora_alpha[ADAPTER_NAME]))
        if have != (cfg.r, cfg.alpha):
            raise AdapterError(
                f"{where}: {name!r} already has an adapter with r={have[0]}, alpha={have[1]} "
                f"from an earlier stage; a stage continues it with the same r and alpha "
                f"(got r={cfg.r}, alpha={cfg.alpha})"
            )
    new = [n for n in names if n not in layers]
    if new:
        if cfg.quantize is not None:
            check_qlora_available(cfg, where)
            quantize_4bit(model, new, cfg.quantize, torch.device("cuda"), where)
        _inject(model, new, cfg.r, cfg.alpha, cfg.dropout, seed)
        logger.info(
            "%s: LoRA r=%d alpha=%g on %d modules%s (e.g. %s)",
            where,
            cfg.r,
            cfg.alpha,
            len(new),
            f", {cfg.quantize} base weights" if cfg.quantize else "",
            ", ".join(new[:3]),
        )
    return names


# ------------------------------------------------------------------------------ QLoRA
def check_qlora_available(cfg: LoraConfig, where: str = "lora") -> None:
    """Raise :class:`QLoraUnavailableError` unless CUDA and bitsandbytes are both here."""
    problems = []
    if not torch.cuda.is_available():
        problems.append("no CUDA device is visible")
    if importlib.util.find_spec("bitsandbytes") is None:
        problems.append("bitsandbytes is not installed (pip install 'moe-vision[qlora]')")
    if problems:
        raise QLoraUnavailableError(
            f"{where}: quantize={cfg.quantize!r} (QLoRA, 4-bit base weights) needs CUDA and "
            f"bitsandbytes, but {' and '.join(problems)}. Use plain LoRA here (drop 'quantize' "
            "from the stage's lora entry: same adapters, full-precision base), or run on a "
            "CUDA GPU node."
        )


def quantize_4bit(
    model: nn.Module, names: list[str], quant_type: str, device: torch.device, where: str = "lora"
) -> None:
    """Replace the ``nn.Linear`` modules ``names`` by bitsandbytes ``Linear4bit`` on ``device``
    (weights quantised there, frozen; bf16 compute where supported, else fp32)."""
    import bitsandbytes as bnb

    cuda = device.type == "cuda"
    compute = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    for name in names:
        module = model.get_submodule(name)
        if type(module) is not nn.Linear:
            raise AdapterError(
                f"{where}: QLoRA quantises nn.Linear modules; {name!r} is a "
                f"{type(module).__name__} (drop 'quantize' or name Linear modules only)"
            )
        q = bnb.nn.Linear4bit(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            compute_dtype=compute,
            quant_type=quant_type,
        )
        weight = module.weight.detach().to("cpu", torch.float32)
        q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=quant_type)
        if module.bias is not None:
            q.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, q.to(device))


def _dequantized(module: nn.Module) -> torch.Tensor:
    import bitsandbytes as bnb

    w = module.weight
    return bnb.functional.dequantize_4bit(w.data, w.quant_state).to(torch.float32)


# ------------------------------------------------------------------------------ save / load
def adapter_fingerprint(module: nn.Module) -> str:
    """What the adapters of ``module`` compute with beyond their tensors (rank, scaling,
    merged/disabled state), as text; ``""`` without adapters. Part of the feature-cache key."""
    layers = lora_layers(module)
    if not layers:
        return ""
    desc = {
        name: [
            sorted(layer.active_adapters),
            {a: float(s) for a, s in sorted(layer.scaling.items())},
            bool(layer.merged),
            bool(layer.disable_adapters),
        ]
        for name, layer in sorted(layers.items())
    }
    return json.dumps(desc, sort_keys=True)


def split_state_dict(
    model: nn.Module, merge: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(base, adapters)`` of a model with adapters.

    ``base`` is keyed like the model without adapters (``m.base_layer.weight`` becomes
    ``m.weight``; 4-bit weights dequantised); with ``merge`` an adapted module's weight is
    ``W + alpha / r * B @ A`` (peft's ``get_delta_weight``). ``adapters`` holds the adapter
    tensors under their names in the model (empty with ``merge``).
    """
    layers = lora_layers(model)
    if any(layer.merged for layer in layers.values()):
        raise ValueError("adapters merged in place (peft merge()) cannot be saved; unmerge first")
    base: dict[str, torch.Tensor] = {}
    adapters: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        if is_adapter_key(key):
            adapters[key] = t
        elif ".base_layer." in key:
            base[key.replace(".base_layer.", ".", 1)] = t
        else:
            base[key] = t
    for name, layer in layers.items():
        inner = layer.get_base_layer()
        if is_4bit(inner.weight):
            for key in [k for k in base if k.startswith(f"{name}.weight.")]:
                del base[key]  # bitsandbytes' quantisation state
            base[f"{name}.weight"] = _dequantized(inner)
        if merge:
            w = base[f"{name}.weight"]
            tied = [k for k, t in base.items() if t is not w and _same_memory(t, w)]
            if tied:
                raise ValueError(
                    f"cannot merge the adapter of {name!r}: its weight is tied to {tied[:3]}, "
                    "which merging would untie; save with the adapters beside the base "
                    "(merge_lora=False)"
                )
            delta = sum(layer.get_delta_weight(a) for a in layer.active_adapters)
            base[f"{name}.weight"] = (w.float() + delta.float()).to(w.dtype).detach()
    return base, ({} if merge else adapters)


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.device != b.device or a.device.type == "meta":
        return False
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors file written atomically; tensors sharing memory (tied weights) stored once."""
    tensors, metadata = dict(tensors), {"format": "pt"}
    for kept, removed in safetensors.torch._remove_duplicate_names(tensors).items():
        for key in removed:  # as safetensors.torch.save_model does
            metadata[key] = kept
            del tensors[key]
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        safetensors.torch.save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _adapter_spec(model: nn.Module) -> dict[str, Any]:
    from peft import __version__ as peft_version

    modules = {}
    for name, layer in lora_layers(model).items():
        drop = layer.lora_dropout[ADAPTER_NAME]
        modules[name] = {
            "r": int(layer.r[ADAPTER_NAME]),
            "alpha": float(layer.lora_alpha[ADAPTER_NAME]),
            "dropout": float(getattr(drop, "p", 0.0)),
            "quantized": is_4bit(layer.get_base_layer().weight),
        }
    return {"format": ADAPTERS_FORMAT, "peft": peft_version, "modules": modules}


def save_weights(model: nn.Module, folder: Path, weights_name: str, merge: bool = False) -> None:
    """Write ``weights_name`` (the base, or the merged weights) and, unmerged, the adapters
    (``adapters.safetensors`` + ``adapters.json``) into ``folder``; stale adapter files of an
    earlier save there are removed when there are none to write."""
    base, adapters = split_state_dict(model, merge)
    _atomic_save(base, folder / weights_name)
    if not adapters:
        remove_adapter_files(folder)
        return
    _atomic_save(adapters, folder / ADAPTERS_WEIGHTS)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{ADAPTERS_CONFIG}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(_adapter_spec(model), f, indent=1)
    os.replace(tmp, folder / ADAPTERS_CONFIG)


def remove_adapter_files(folder: Path) -> None:
    for name in (ADAPTERS_CONFIG, ADAPTERS_WEIGHTS):
        (folder / name).unlink(missing_ok=True)


def has_saved_adapters(folder: Path) -> bool:
    return (folder / ADAPTERS_CONFIG).is_file()


def load_adapters(model: nn.Module, folder: Path, device: str | torch.device = "cpu") -> None:
    """Add the adapters described in ``folder/adapters.json`` to ``model`` (whose base weights
    are loaded) and load their tensors from ``adapters.safetensors``; a missing file or a
    tensor that does not fit raises, naming the file and the keys."""
    spec_path, weights_path = folder / ADAPTERS_CONFIG, folder / ADAPTERS_WEIGHTS
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} not found (it goes with {spec_path})")
    try:
        spec = json.loads(spec_path.read_text("utf-8"))
        modules = spec["modules"]
    except (ValueError, KeyError) as err:
        raise ValueError(f"{spec_path}: not an adapters file of moe-vision ({err})") from err
    if spec.get("format") != ADAPTERS_FORMAT:
        raise ValueError(f"{spec_path}: format {spec.get('format')!r}, expected {ADAPTERS_FORMAT}")
    groups: dict[tuple[int, float, float], list[str]] = {}
    for name, m in modules.items():
        groups.setdefault((int(m["r"]), float(m["alpha"]), float(m["dropout"])), []).append(name)
    for (r, alpha, dropout), names in groups.items():
        _inject(model, names, r, alpha, dropout, seed=0)  # A, B are overwritten just below
    tensors = safetensors.torch.load_file(str(weights_path), device=str(device))
    expected = {k for k in model.state_dict() if is_adapter_key(k)}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{weights_path} does not fit {spec_path}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    model.load_state_dict(tensors, strict=False)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """``total``, ``trainable``, ``adapter`` and ``adapter_trainable`` parameter counts
    (4-bit weights counted by their unpacked size)."""
    out = dict.fromkeys(("total", "trainable", "adapter", "adapter_trainable"), 0)
    for name, p in model.named_parameters():
        n = num_elements(p)
        out["total"] += n
        out["trainable"] += n if p.requires_grad else 0
        if is_adapter_key(name):
            out["adapter"] += n
            out["adapter_trainable"] += n if p.requires_grad else 0
    return out
