"""moe_vision.io: atomic writes of text, bytes and writer functions; deterministic safetensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moe_vision.io import atomic_write, read_json, safetensors_bytes, save_safetensors, write_json


def test_text_bytes_and_writer_land_whole(tmp_path: Path) -> None:
    assert atomic_write(tmp_path / "a" / "t.txt", "héllo").read_text(encoding="utf-8") == "héllo"
    assert atomic_write(tmp_path / "b.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    atomic_write(tmp_path / "c.txt", lambda p: p.write_text("via writer"))
    assert (tmp_path / "c.txt").read_text() == "via writer"
    write_json(tmp_path / "d.json", {"x": [1, 2]})
    assert read_json(tmp_path / "d.json") == {"x": [1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b.bin", "c.txt", "d.json"]


def test_a_failing_writer_keeps_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = atomic_write(tmp_path / "f.txt", "old")

    def broken(p: Path) -> None:
        p.write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        atomic_write(path, broken)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_safetensors_bytes_do_not_depend_on_the_call(tmp_path: Path) -> None:
    """The library orders metadata keys at random per call; ours are sorted, so two saves of
    the same tensors and metadata are byte-identical (and still load)."""
    tensors = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}
    meta = {f"key{i}": str(i) for i in range(20)}
    first = {safetensors_bytes(tensors, meta) for _ in range(5)}
    assert len(first) == 1
    a = save_safetensors(tensors, tmp_path / "a.safetensors", meta)
    b = save_safetensors(tensors, tmp_path / "b.safetensors", meta)
    assert a.read_bytes() == b.read_bytes() == first.pop()
    assert torch.equal(load_file(a)["w"], tensors["w"])
