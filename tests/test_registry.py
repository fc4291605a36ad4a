"""The one generic registry (experts.registry.Registry) and the registries built on it."""

from __future__ import annotations

import pytest

from experts.registry import Registry


def test_register_list_get_create() -> None:
    reg: Registry[type] = Registry("widget")

    @reg.register("b-small")
    class Small:
        def __init__(self, size: int = 1) -> None:
            self.size = size

    reg.register("a-large", dict)
    assert reg.list() == ["a-large", "b-small"]  # sorted
    assert reg.list("*-small") == ["b-small"]  # fnmatch filter
    assert list(reg) == ["b-small", "a-large"] and len(reg) == 2  # registration order
    assert "b-small" in reg and "c" not in reg
    assert reg.get("b-small") is Small
    assert reg.create("b-small", size=3).size == 3
    with pytest.raises(ValueError, match="widget 'b-small' is already registered"):
        reg.register("b-small", Small)
    with pytest.raises(KeyError, match="unknown widget 'c'; valid widgets are: a-large, b-small"):
        reg.get("c")


def test_ordered_registry_and_plural() -> None:
    reg: Registry[int] = Registry("bench section", plural="bench sections", ordered=True)
    reg.register("z", 1)
    reg.register("a", 2)
    assert reg.list() == ["z", "a"] and reg.items() == [("z", 1), ("a", 2)]
    with pytest.raises(KeyError, match="valid bench sections are: z, a"):
        reg.get("q")


def test_project_registries_share_the_class() -> None:
    import experts
    import fusion
    from experts.registry import EXPERTS
    from fusion.projectors.compressors import COMPRESSORS, create_compressor
    from fusion.reducers.base import REDUCERS
    from fusion.registry import FUSIONS, PROJECTORS

    for reg in (EXPERTS, FUSIONS, PROJECTORS, COMPRESSORS, REDUCERS):
        assert isinstance(reg, Registry) and len(reg) > 0
    assert experts.list_experts() == EXPERTS.list()
    assert fusion.list_fusions() == FUSIONS.list()
    with pytest.raises(KeyError, match="unknown compressor 'x'; valid compressors are: avg_pool"):
        create_compressor("x", 4, 4, None)
