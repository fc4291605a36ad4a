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

A source may say ``layout: internvl`` (see :mod:`moe_vision.data.records`; default ``llava``).

**InternVL ``meta.json`` and Eagle 2 recipes** (a ``.json`` file holding an object, not a list)
are read as mixtures too, one source per entry::

    {"ai2d": {"root": "data/ai2d/", "annotation": "data/ai2d.jsonl",
              "repeat_time": 2, "length": 12413, "data_augment": false}}

``annotation`` is the source's records, ``root`` its image root (``""``: the run's) and
``repeat_time`` its weight (InternVL repeats a source ``repeat_time`` times and takes a random
fraction below 1, which is what a weight does). ``length``, Eagle's curriculum ``weight`` and
``modality`` and InternVL's augmentation keys are not used. Sources of such a file read in the
``internvl`` layout. A relative path is taken from the file's folder when it exists there, else
from the working directory, as InternVL and Eagle resolve them.

A weight must be finite, above 0 and at most :data:`MAX_WEIGHT` (a source repeated a thousand
times is a typo, and would make the run, and ``data check``, walk it that often).

Relative paths are relative to the YAML file's folder. ``P%`` takes ``ceil(P * n / 100)``
records, as LLaVA-OneVision does; asking for more records than a source holds is an error.
``random`` picks without replacement and keeps file order; a fractional weight adds a random
subset. Everything random is drawn from ``numpy.random.default_rng([seed, source number])``,
so a mixture resolves to the same records for the same seed. :meth:`Mixture.resolve` returns
the record index, the image root of every file of it and the per-source counts that the run
writes to its folder.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from moe_vision.data.index import RecordIndex, index_file
from moe_vision.data.records import LAYOUTS, DataError

MIXTURE_SUFFIXES = (".yaml", ".yml")
"""File suffixes read as mixtures (and a ``.json`` holding an object: InternVL / Eagle)."""

MAX_WEIGHT = 1000.0
"""Largest source weight accepted (see the module docstring)."""

_STRATEGY = re.compile(r"^(all|(first|end|random):(\d+)(%?))$")


def is_mixture(path: str | os.PathLike[str]) -> bool:
    """True for a mixture YAML (by suffix) or a ``.json`` file whose top level is an object (an
    InternVL ``meta.json`` or Eagle recipe; a data file is a list)."""
    return str(path).endswith(MIXTURE_SUFFIXES) or _json_object(Path(path))


def _json_object(path: Path) -> bool:
    if path.suffix != ".json" or not path.is_file():
        return False
    with open(path, "rb") as f:
        head = f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
    return head.startswith(b"{")


@dataclass
class Source:
    """One data file of a mixture.

    Attributes:
        json_path: ``.json`` or ``.jsonl`` records.
        image_root: folder of its images (``None``: the mixture's, else the run's).
        sampling_strategy: ``all``, ``first:N``, ``first:P%``, ``end:N``, ``end:P%``,
            ``random:N`` or ``random:P%``.
        weight: repeats of the selected records (finite, in ``(0, MAX_WEIGHT]``; fractional
            part: a random subset).
        layout: how its records read (:data:`~moe_vision.data.records.LAYOUTS`).
    """

    json_path: str
    image_root: str | None = None
    sampling_strategy: str = "all"
    weight: float = 1.0
    layout: str = "llava"

    def __post_init__(self) -> None:
        self.sampling_strategy = str(self.sampling_strategy).strip()
        if not _STRATEGY.match(self.sampling_strategy):
            raise DataError(
                f"source {self.json_path}: sampling_strategy {self.sampling_strategy!r}; expected "
                "all, first:N, first:P%, end:N, end:P%, random:N or random:P%"
            )
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise DataError(
                f"source {self.json_path}: weight must be a finite number, got {self.weight!r}"
            )
        if not w > 0:
            raise DataError(f"source {self.json_path}: weight must be > 0, got {w!r}")
        if w > MAX_WEIGHT:
            raise DataError(
                f"source {self.json_path}: weight {w!r} is above the maximum {MAX_WEIGHT:g} (a "
                "weight repeats the source's selected records that many times)"
            )
        if self.layout not in LAYOUTS:
            raise DataError(
                f"source {self.json_path}: layout {self.layout!r}; expected one of {LAYOUTS}"
            )

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
    def from_file(cls, path: str | os.PathLike[str]) -> Mixture:
        """A mixture YAML, or an InternVL ``meta.json`` / Eagle recipe (see the module doc)."""
        if str(path).endswith(MIXTURE_SUFFIXES):
            return cls.from_yaml(path)
        return cls.from_meta_json(path)

    @classmethod
    def from_meta_json(cls, path: str | os.PathLike[str]) -> Mixture:
        """Read an InternVL ``meta.json`` or an Eagle 2 recipe (see the module docstring)."""
        p = Path(path)
        where = f"InternVL/Eagle meta file {p}"
        try:
            data = json.loads(p.read_bytes().decode("utf-8-sig"))
        except (ValueError, RecursionError) as err:
            raise DataError(f"{where}: invalid JSON: {err}") from err
        if not isinstance(data, dict) or not data:
            raise DataError(f"{where}: expected an object of datasets, got {type(data).__name__}")

        def rel(value: Any) -> str | None:
            if value is None or not str(value).strip():
                return None
            here = p.parent / Path(str(value)).expanduser()
            return str(here if here.exists() or not Path(str(value)).exists() else value)

        sources = []
        for name, entry in data.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("annotation"), str):
                raise DataError(
                    f"{where}: dataset {name!r} must be an object with an 'annotation' path "
                    f"(and 'root', 'repeat_time'), got {entry!r:.120}"
                )
            weight = entry.get("repeat_time", 1)
            try:
                sources.append(
                    Source(
                        json_path=str(rel(entry["annotation"])),
                        image_root=rel(entry.get("root")),
                        weight=weight,
                        layout="internvl",
                    )
                )
            except DataError as err:
                raise DataError(f"{where}: dataset {name!r}: {err}") from err
        return cls(sources, None, str(p))

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
        valid = {"json_path", "image_root", "sampling_strategy", "weight", "layout"}
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
                    layout=s.get("layout", "llava"),
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
            parts.append(index.select(rows).with_layout(source.layout))
            roots.append(Path(root))
            counts.append(
                {
                    "json_path": source.json_path,
                    "image_root": str(root),
                    "sampling_strategy": source.sampling_strategy,
                    "weight": source.weight,
                    "layout": source.layout,
                    "available": len(index),
                    "selected": int(rows.shape[0]),
                }
            )
        return RecordIndex.concat(parts), roots, counts
