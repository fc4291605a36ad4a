"""Data mixtures as data: a YAML list of sources with sampling strategies and weights.

The LLaVA-OneVision format (Li et al., arXiv 2408.03326, ``scripts/train/*.yaml``), with an
image root per source and a weight::

    image_root: /data/images              # default image root of every source (optional)
    datasets:
      - json_path: llava_v1_5_mix665k.json
        sampling_strategy: all            # all | first:N | first:P% | end:N | end:P%
      - json_path: sharegpt4v.jsonl       #   | random:N | random:P%
        image_root: /data/sharegpt4v
        sampling_strategy: random:10%
        weight: 2                         # every selected record twice (0.5: a random half)

Relative paths are relative to the YAML file's folder. ``P%`` takes ``ceil(P * n / 100)``
records, as LLaVA-OneVision does; asking for more records than a source holds is an error.
``random`` picks without replacement and keeps file order; a fractional weight adds a random
subset. Everything random is drawn from ``numpy.random.default_rng([seed, source number])``,
so a mixture resolves to the same records for the same seed. :meth:`Mixture.resolve` returns
the record index, the image root of every file of it and the per-source counts that the run
writes to its folder.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from moe_vision.data.index import RecordIndex, index_file
from moe_vision.data.records import DataError

MIXTURE_SUFFIXES = (".yaml", ".yml")
"""File suffixes read as mixtures (everything else is one data file)."""

_STRATEGY = re.compile(r"^(all|(first|end|random):(\d+)(%?))$")


def is_mixture(path: str | os.PathLike[str]) -> bool:
    """True for a mixture YAML (by suffix)."""
    return str(path).endswith(MIXTURE_SUFFIXES)


@dataclass
class Source:
    """One data file of a mixture.

    Attributes:
        json_path: ``.json`` or ``.jsonl`` records.
        image_root: folder of its images (``None``: the mixture's, else the run's).
        sampling_strategy: ``all``, ``first:N``, ``first:P%``, ``end:N``, ``end:P%``,
            ``random:N`` or ``random:P%``.
        weight: repeats of the selected records (``> 0``; fractional part: a random subset).
    """

    json_path: str
    image_root: str | None = None
    sampling_strategy: str = "all"
    weight: float = 1.0

    def __post_init__(self) -> None:
        self.sampling_strategy = str(self.sampling_strategy).strip()
        if not _STRATEGY.match(self.sampling_strategy):
            raise DataError(
                f"source {self.json_path}: sampling_strategy {self.sampling_strategy!r}; expected "
                "all, first:N, first:P%, end:N, end:P%, random:N or random:P%"
            )
        if not isinstance(self.weight, (int, float)) or not self.weight > 0:
            raise DataError(f"source {self.json_path}: weight must be > 0, got {self.weight!r}")

    def count(self, available: int) -> int:
        """Records the strategy takes from ``available``."""
        m = _STRATEGY.match(self.sampling_strategy)
        assert m is not None
        if m.group(1) == "all":
            return available
        n, percent = int(m.group(3)), m.group(4) == "%"
        if percent and n > 100:
            raise DataError(f"source {self.json_path}: {self.sampling_strategy} is over 100%")
        k = math.ceil(n * available / 100) if percent else n
        if k > available:
            raise DataError(
                f"source {self.json_path}: {self.sampling_strategy} asks for {k} records, the "
                f"file holds {available}"
            )
        return k

    def select(self, available: int, rng: np.random.Generator) -> np.ndarray:
        """Positions of the selected records (with repeats for the weight)."""
        k = self.count(available)
        kind = self.sampling_strategy.split(":")[0]
        if kind in ("all", "first"):
            rows = np.arange(k)
        elif kind == "end":
            rows = np.arange(available - k, available)
        else:
            rows = np.sort(rng.choice(available, size=k, replace=False))
        whole = int(self.weight)
        extra = int(round((self.weight - whole) * len(rows)))
        parts = [rows] * whole
        if extra:
            parts.append(np.sort(rng.choice(rows, size=extra, replace=False)))
        return np.concatenate(parts) if parts else rows[:0]


@dataclass
class Mixture:
    """A list of :class:`Source` s (see the module docstring)."""

    sources: list[Source]
    image_root: str | None = None
    path: str | None = None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> Mixture:
        """Read a mixture YAML; relative paths are made relative to its folder."""
        p = Path(path)
        if not p.is_file():
            raise DataError(f"mixture file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise DataError(f"mixture {p}: invalid YAML: {err}") from err
        return cls.from_dict(data, base=p.parent, path=str(p))

    @classmethod
    def from_dict(
        cls, data: Any, base: str | os.PathLike[str] = ".", path: str | None = None
    ) -> Mixture:
        where = f"mixture {path or '(dict)'}"
        if isinstance(data, list):
            data = {"datasets": data}
        if not isinstance(data, dict) or not isinstance(data.get("datasets"), list):
            raise DataError(f"{where}: expected a mapping with a 'datasets' list of sources")
        bad = sorted(set(data) - {"datasets", "image_root"})
        if bad:
            raise DataError(f"{where}: unknown keys {bad}; expected 'datasets' and 'image_root'")
        base = Path(base)

        def rel(value: Any) -> str | None:
            return None if value is None else str(base / Path(str(value)).expanduser())

        sources = []
        valid = {"json_path", "image_root", "sampling_strategy", "weight"}
        for k, s in enumerate(data["datasets"]):
            if not isinstance(s, dict) or "json_path" not in s or set(s) - valid:
                raise DataError(
                    f"{where}: source {k} must be a mapping with 'json_path' and optionally "
                    f"{sorted(valid - {'json_path'})}, got {s!r}"
                )
            sources.append(
                Source(
                    json_path=str(rel(s["json_path"])),
                    image_root=rel(s.get("image_root")),
                    sampling_strategy=s.get("sampling_strategy", "all"),
                    weight=s.get("weight", 1.0),
                )
            )
        if not sources:
            raise DataError(f"{where}: no sources")
        return cls(sources, rel(data.get("image_root")), path)

    def resolve(
        self, seed: int, image_root: str | os.PathLike[str] | None = None
    ) -> tuple[RecordIndex, list[Path], list[dict[str, Any]]]:
        """The mixture's records for ``seed``.

        Args:
            seed: draws of the ``random`` strategies and fractional weights.
            image_root: image root of sources that name none (after the mixture's own).

        Returns:
            ``(index, roots, counts)``: the record index (one file entry per source), the image
            root of each source, and per source ``json_path``, ``image_root``,
            ``sampling_strategy``, ``weight``, ``available`` and ``selected`` records.
        """
        parts, roots, counts = [], [], []
        for k, source in enumerate(self.sources):
            root = source.image_root or self.image_root or image_root
            if root is None:
                raise DataError(
                    f"mixture {self.path or ''}: source {source.json_path} has no image_root (set "
                    "it on the source, at the top of the mixture, or as the run's image root)"
                )
            index = index_file(source.json_path)
            rows = source.select(len(index), np.random.default_rng([seed, k]))
            parts.append(index.select(rows))
            roots.append(Path(root))
            counts.append(
                {
                    "json_path": source.json_path,
                    "image_root": str(root),
                    "sampling_strategy": source.sampling_strategy,
                    "weight": source.weight,
                    "available": len(index),
                    "selected": int(rows.shape[0]),
                }
            )
        return RecordIndex.concat(parts), roots, counts
