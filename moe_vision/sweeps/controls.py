"""Control cells of a sweep: what part of a mixture's gain is pretraining, what part capacity.

A sweep spec's ``controls`` key adds, next to every cell whose expert combination adds experts
to a base, cells that take away one ingredient of the gain:

``random_init``
    For every added expert, its *random-init twin*: the same cell with that expert built from
    the same preset, not loaded from its weights (``expert_options: {name: {pretrained: false}}``,
    no ``checkpoint``). Same architecture, input resolution, token grid and channels. Its
    weights are ``create_expert(name, init_seed=0)``: the untrained expert the mini zoo's
    pretraining started from, the same in every seed of the sweep, as the pretrained expert's
    weights are the same in every seed (and so its maps are cached once, not once per seed).
    The global random stream advances exactly as in the cell it controls, so the fusion,
    projector and LLM start from the same weights as there. Pretrained minus twin is what the
    expert's pretraining adds.

``equal_tokens``
    The base alone, given as many tokens and channels as the mixture: the base's map repeated
    ``n`` times in the fusion (the base listed ``n`` times), with ``n`` the smallest count from
    the mixture's number of experts up whose fused map has the mixture's shape (tokens x
    channels), so the projector and the LLM see a sequence of the mixture's size and the
    projector has its input width (``channel_concat``: CLIP-mini's 96 channels three times for
    CLIP-mini + ConvNeXt-mini's 96 + 192). When no count matches with the fusion's own options
    (``sequence_append``'s width is the widest expert's), the fusion's ``dim`` is set to the
    mixture's width. The repeated map carries no information the base alone lacks: what the
    control gains over the base is extra tokens, channels and parameters, i.e. capacity. A
    duplicated map was chosen over a widened projection of one map because it leaves the
    projector and LLM exactly as in the mixture, and over a random second expert because that
    would add features of the image (that is the twin's question).

Each control cell is named for what it is (``clip-mini+convnext-mini (random init)``,
``clip-mini x3 (equal tokens: +convnext-mini)``), so it is its own setting in the tables, and
carries ``control`` (``random_init`` or ``equal_tokens``; empty for the cells themselves) in
its settings. The cells are made in
:meth:`moe_vision.sweeps.spec.SweepSpec.expand`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

RANDOM_INIT = "random_init"
EQUAL_TOKENS = "equal_tokens"
CONTROLS: tuple[str, ...] = (RANDOM_INIT, EQUAL_TOKENS)
"""The control kinds a sweep spec's ``controls`` list may name."""
MAX_COPIES = 8
"""The most copies of the base the ``equal_tokens`` control tries before setting ``dim``."""
TWIN_INIT_SEED = 0
"""The twin's init: ``create_expert(name, init_seed=0)``, the weights the mini zoo's
pretraining started from (it seeds 0 before building), the same in every seed of the sweep."""
WEIGHT_OPTIONS = ("pretrained", "checkpoint", "device", "init_seed")
"""Expert options that say where weights come from, not what the expert is."""


@dataclass(frozen=True)
class Variant:
    """A cell's model, as a control changes it.

    Attributes:
        control: ``None`` for the cell itself, else one of :data:`CONTROLS`.
        experts: the experts the model builds, in fusion order.
        labels: how the tables name them (the ``experts`` column joins them with ``+``): the
            twin's ``clip-mini``, ``convnext-mini (random init)``; the equal-token control's
            one ``clip-mini x3 (equal tokens: +convnext-mini)``.
        expert_options: per-expert options replacing the spec's (``None``: the spec's).
        fusion_options: fusion options added to the cell's.
    """

    control: str | None
    experts: tuple[str, ...]
    labels: tuple[str, ...]
    expert_options: dict[str, dict[str, Any]] | None = None
    fusion_options: dict[str, Any] = field(default_factory=dict)


def check_controls(value: Any) -> list[str]:
    """The ``controls`` key as a list of known control names; raises a ``ValueError`` naming
    the valid ones."""
    items = [value] if isinstance(value, str) else value
    if items is None:
        return []
    if not isinstance(items, (list, tuple)) or not all(isinstance(c, str) for c in items):
        raise ValueError(
            f"sweep spec: controls must be a list of control names, got {value!r}\n"
            f"  valid controls: {list(CONTROLS)}"
        )
    bad = [c for c in items if c not in CONTROLS]
    if bad:
        raise ValueError(f"sweep spec: unknown controls {bad}\n  valid controls: {list(CONTROLS)}")
    return list(dict.fromkeys(items))


def added_experts(combo: Sequence[str], base: str | None) -> list[str]:
    """The experts ``combo`` adds to the base (without a base: to its first expert)."""
    first = base if base is not None and base in combo else combo[0]
    return [e for e in combo if e != first]


def variants(
    combo: tuple[str, ...],
    base: str | None,
    controls: Sequence[str],
    expert_options: Mapping[str, Mapping[str, Any]],
    fusion_name: str,
    fusion_options: Mapping[str, Any],
) -> list[Variant]:
    """The cell itself, then its controls (in ``controls`` order; none for a lone expert)."""
    out = [Variant(None, combo, combo)]
    added = added_experts(combo, base)
    if not added:
        return out
    for control in controls:
        if control == RANDOM_INIT:
            out += [_random_init_twin(combo, name, expert_options) for name in added]
        elif control == EQUAL_TOKENS:
            out.append(_equal_tokens(combo, added, expert_options, fusion_name, fusion_options))
    return out


def _random_init_twin(
    combo: tuple[str, ...], name: str, expert_options: Mapping[str, Mapping[str, Any]]
) -> Variant:
    """``combo`` with ``name`` at random init (its other options kept)."""
    own = dict(expert_options.get(name) or {})
    if not (own.get("pretrained") or own.get("checkpoint")):
        raise ValueError(
            f"sweep spec: controls: random_init needs {name!r} to load weights, but it is at "
            "random init already\n  give it model.expert_options."
            f"{name}: {{pretrained: true}}, or leave random_init out of 'controls'"
        )
    options = {k: dict(v) for k, v in expert_options.items() if k in combo}
    options[name] = {
        **{k: v for k, v in own.items() if k != "checkpoint"},
        "pretrained": False,
        "init_seed": TWIN_INIT_SEED,
    }
    labels = tuple(f"{e} (random init)" if e == name else e for e in combo)
    return Variant(RANDOM_INIT, combo, labels, expert_options=options)


def _fused_shape(
    names: Sequence[str],
    expert_options: Mapping[str, Mapping[str, Any]],
    fusion_name: str,
    fusion_options: Mapping[str, Any],
) -> tuple[int, int]:
    """``(tokens, channels)`` of the fused map of ``names`` (the fusion built on CPU)."""
    import experts
    import fusion

    specs = [
        experts.get_spec(
            n, **{k: v for k, v in (expert_options.get(n) or {}).items() if k not in WEIGHT_OPTIONS}
        )
        for n in names
    ]
    built = fusion.create_fusion(fusion_name, specs, **dict(fusion_options))
    return int(built.num_tokens), int(built.out_dim)


def _equal_tokens(
    combo: tuple[str, ...],
    added: Sequence[str],
    expert_options: Mapping[str, Mapping[str, Any]],
    fusion_name: str,
    fusion_options: Mapping[str, Any],
) -> Variant:
    """The base repeated until its fused map has the mixture's shape (see the module doc)."""
    base = next(e for e in combo if e not in added)
    target = _fused_shape(combo, expert_options, fusion_name, fusion_options)
    tries: list[dict[str, Any]] = [{}]
    if fusion_options.get("dim") is None:
        tries.append({"dim": target[1]})
    for extra in tries:
        for n in range(len(combo), MAX_COPIES + 1):
            copies = (base,) * n
            shape = _fused_shape(copies, expert_options, fusion_name, {**fusion_options, **extra})
            if shape == target:
                return Variant(
                    EQUAL_TOKENS,
                    copies,
                    (f"{base} x{n} (equal tokens: +{'+'.join(added)})",),
                    expert_options={base: dict(expert_options.get(base) or {})},
                    fusion_options=extra,
                )
    raise ValueError(
        f"sweep spec: controls: equal_tokens found no number of copies of {base!r} whose "
        f"{fusion_name} map has {'+'.join(combo)}'s shape ({target[0]} tokens x {target[1]})\n"
        f"  leave equal_tokens out of 'controls' for fusion {fusion_name!r}"
    )
