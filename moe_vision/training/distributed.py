"""FSDP on CPU processes (gloo): what ``accelerate launch --use_fsdp`` asks for, made real.

accelerate 1.16 picks FSDP only for accelerator processes (``MULTI_GPU``, ``MULTI_XPU``, ...):
with ``Accelerator(cpu=True)`` on several CPU processes the state is ``MULTI_CPU`` and the
plugin that ``accelerate launch --use_fsdp`` describes (``ACCELERATE_USE_FSDP``, ``FSDP_*``) is
silently ignored, so the model is wrapped in DDP. torch's FSDP2 (``fully_shard``, DTensor
parameters) runs on a CPU device mesh with gloo, so :func:`enable_cpu_fsdp` hands accelerate
the launcher's plugin and marks the state FSDP; ``accelerator.prepare`` then shards the model as
it does on GPUs (:func:`accelerate.utils.fsdp_utils.fsdp2_prepare_model`). That is how the test
suite exercises FSDP without a GPU (``tests/test_fsdp.py``). FSDP1 (``FlatParameter``) is
refused on CPU: use ``--fsdp_version 2``.

Only the launch environment decides (:func:`fsdp_requested`); nothing else in training changes.
"""

from __future__ import annotations

import os

from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch import nn


def fsdp_requested() -> bool:
    """Whether the launcher asked for FSDP (``accelerate launch --use_fsdp`` sets
    ``ACCELERATE_USE_FSDP=true``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def enable_cpu_fsdp(accelerator: Accelerator) -> FullyShardedDataParallelPlugin:
    """Make a multi-process CPU ``accelerator`` shard with FSDP2 (module docstring).

    The plugin is read from the launcher's ``FSDP_*`` variables. Raises ``ValueError`` when they
    ask for FSDP1, which accelerate does not prepare on CPU processes.
    """
    plugin = FullyShardedDataParallelPlugin()  # reads FSDP_VERSION, FSDP_AUTO_WRAP_POLICY, ...
    if plugin.fsdp_version != 2:
        raise ValueError(
            f"FSDP on CPU processes needs FSDP2 (accelerate launch --use_fsdp --fsdp_version 2), "
            f"got FSDP_VERSION={os.environ.get('FSDP_VERSION')!r}"
        )
    state = accelerator.state
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # noqa: SLF001
    return plugin


def gather_fsdp(model: nn.Module) -> int:
    """Undo ``fully_shard`` on ``model`` in place; returns how many modules were sharded.

    Every DTensor parameter becomes a plain parameter holding the full tensor (an all-gather:
    every process calls this at the same point), keeping ``requires_grad`` and shared
    (tied) parameters shared; FSDP's forward hooks, state and class are removed. The trainer
    calls it at the end of each unit, so the next unit (other trainable tensors, another
    per-expert model, the feature cache's keys) starts from an ordinary module and is sharded
    again by ``accelerator.prepare``.
    """
    # torch has no public "unshard for good"; these are where fully_shard records a module
    from torch.distributed._composable.contract import REGISTRY_KEY, STATE_KEY
    from torch.distributed._composable_state import _module_state_mapping
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not sharded:
        return 0
    full: dict[int, nn.Parameter] = {}
    for module in model.modules():  # the same order on every process
        for name, p in list(module._parameters.items()):  # noqa: SLF001
            if isinstance(p, DTensor):
                if id(p) not in full:
                    tensor = p.full_tensor().detach().clone()
                    full[id(p)] = nn.Parameter(tensor, requires_grad=p.requires_grad)
                module._parameters[name] = full[id(p)]  # noqa: SLF001
    for module in sharded:
        state = module._get_fsdp_state()  # noqa: SLF001
        for handle in ("_pre_forward_hook_handle", "_post_forward_hook_handle"):
            hook = getattr(state, handle, None)
            if hook is not None:
                hook.remove()
        _module_state_mapping.pop(module, None)
        module.__dict__.pop(STATE_KEY, None)
        module.__dict__.pop(REGISTRY_KEY, None)
        module.__class__ = next(c for c in type(module).__bases__ if c is not FSDPModule)
    return len(sharded)


def shard_experts(model: nn.Module, accelerator: Accelerator) -> list[str]:
    """Under FSDP2, make each vision expert of ``model`` an FSDP unit of its own before
    ``accelerator.prepare`` shards the rest (LLM, fusion, projector) into the root unit.

    A frozen expert's weights are then split across the processes but gathered only when that
    expert runs: never while the feature cache serves it (the root unit's all-gather, done at
    every forward, would otherwise bring every expert's weights in for nothing). A trained
    expert's gradients are reduce-scattered in its own unit. Returns the names sharded (none
    unless the accelerator is FSDP2).
    """
    if accelerator.distributed_type != DistributedType.FSDP or not accelerator.is_fsdp2:
        return []
    from torch.distributed.fsdp import FSDPModule, fully_shard

    # Every process already holds the whole model (built, or the previous unit's, gathered):
    # accelerate's rank-0 loading would capture the experts' shards as the model's weights.
    accelerator.state.fsdp_plugin.cpu_ram_efficient_loading = False
    names = []
    for name, module in model.named_modules():
        if name.startswith("experts.") and name.count(".") == 1:
            if not isinstance(module, FSDPModule):
                fully_shard(module, reshard_after_forward=True)
            names.append(name)
    return names
