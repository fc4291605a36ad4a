"""Files written whole or not at all: atomic writes, JSON, deterministic safetensors.

:func:`atomic_write` writes into a temporary file in the target's folder (same file system),
flushes it to disk (``fsync``) and moves it onto the target with ``os.replace``, so a reader
sees the old file or the complete new one, never a partial write, even when the process is
killed. Every file the project writes whole goes through it. :func:`safetensors_bytes` makes a
safetensors file's bytes a function of its tensors and metadata alone (the library's header
lists metadata keys in a random order per call), so identical runs write identical weights.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save


def atomic_write(
    path: str | os.PathLike[str], data: str | bytes | Callable[[Path], Any]
) -> Path:
    """Write ``path`` atomically and return it.

    Args:
        path: the target; its folder is created when missing.
        data: text (written as UTF-8), bytes, or a writer ``write(tmp_path)`` that writes the
            temporary file itself (``df.to_parquet``, ``fig.savefig``, ``torch.save``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        if isinstance(data, (str, bytes)):
            with os.fdopen(fd, "wb") as f:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
        else:
            os.close(fd)
            data(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Atomically write ``data`` as indented JSON (non-JSON values via ``str``)."""
    return atomic_write(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file, naming the file in the error when it is corrupt."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it to re-run that cell") from e


def safetensors_bytes(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> bytes:
    """A safetensors file's bytes, the same for the same tensors and metadata.

    ``safetensors`` keeps ``metadata`` in a Rust ``HashMap``, so its header lists the keys in
    a random order per call (two identical runs wrote different bytes, and a hash check of the
    weights gave false alarms). The header is re-serialised with the metadata keys sorted; it
    has the same length, so the tensor data's offsets are unchanged.
    """
    raw = save(tensors, metadata=metadata)
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(text) > n:  # cannot happen: the same JSON with its keys in another order
        raise RuntimeError(f"safetensors header grew from {n} to {len(text)} bytes")
    return raw[:8] + text.ljust(n, b" ") + raw[8 + n :]


def save_safetensors(
    tensors: dict[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: dict[str, str] | None = None,
) -> Path:
    """Atomically write ``tensors`` (contiguous, on CPU) as a deterministic safetensors file."""
    return atomic_write(path, safetensors_bytes(tensors, metadata))
