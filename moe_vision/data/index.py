"""A dataset as an index: (file, byte offset, length) per record, built without parsing records.

Eagle's SFT set has 1.8M records and Cambrian's 7M: reading, validating and tokenising them all
before the first step costs minutes and gigabytes. :func:`index_file` only finds where each
record lies:

* ``.jsonl``: newline positions, found with numpy over 16 MB chunks (no record is decoded);
  blank lines are not records; a leading UTF-8 byte order mark is skipped (as for ``.json``);
* ``.json`` (a list of records): each element is located with the C JSON decoder over a
  window that starts at the element (the file is never held in memory as a whole); a file
  whose structure is broken fails here, naming the line.

:meth:`RecordIndex.read` decodes and parses one record; it runs in ``__getitem__``, so in the
DataLoader workers. Non-UTF-8 bytes and malformed JSON become a
:class:`~moe_vision.data.records.RecordProblem` naming the line (and, for the file-level scan,
a :class:`~moe_vision.data.records.DataError` naming the file and line). Indexes are cached per
process by (path, size, modification time).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moe_vision.data.records import DataError, RecordProblem, apply_layout

CHUNK = 1 << 24
"""Bytes read at a time while scanning a JSONL file."""

_WS = re.compile(rb"[ \t\r\n]*")
_INDEX_CACHE: dict[tuple[str, int, int, int], RecordIndex] = {}
_FDS: dict[tuple[int, str, tuple[int, int, int] | None], int] = {}


@dataclass
class RecordIndex:
    """Where every record lies.

    Attributes:
        files: the data files; ``file_id`` indexes this list (a mixture may list a file twice,
            once per source).
        file_id: ``(N,)`` int32, the record's file.
        offset: ``(N,)`` int64, byte offset of the record in its file.
        length: ``(N,)`` int64, its length in bytes.
        position: ``(N,)`` int64, its position among its file's records (0-based).
        line: ``(N,)`` int64, the line it starts on (1-based).
        stamps: per file, ``(inode, size, mtime_ns)`` when indexed: a file replaced since is
            opened afresh, never read through a stale descriptor.
        layouts: per file, its :data:`~moe_vision.data.records.LAYOUTS` entry (empty: every
            file ``llava``); :meth:`read` applies it.
    """

    files: list[str]
    file_id: np.ndarray
    offset: np.ndarray
    length: np.ndarray
    position: np.ndarray
    line: np.ndarray
    stamps: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)
    layouts: list[str] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return int(self.offset.shape[0])

    def file(self, i: int) -> str:
        return self.files[int(self.file_id[i])]

    def where(self, i: int) -> str:
        """``"<file> record <k> (line <l>)"`` of record ``i``."""
        return f"{self.file(i)} record {int(self.position[i])} (line {int(self.line[i])})"

    def raw(self, i: int) -> bytes:
        """The record's bytes (``os.pread`` on a per-process file descriptor)."""
        f = int(self.file_id[i])
        path = self.files[f]
        key = (os.getpid(), path, self.stamps[f] if self.stamps else None)
        fd = _FDS.get(key)
        if fd is None:
            for old in [k for k in _FDS if k[:2] == key[:2]]:  # the file was replaced
                os.close(_FDS.pop(old))
            fd = _FDS[key] = os.open(path, os.O_RDONLY)
        return os.pread(fd, int(self.length[i]), int(self.offset[i]))

    def layout(self, i: int) -> str:
        """The layout of record ``i``'s file."""
        return self.layouts[int(self.file_id[i])] if self.layouts else "llava"

    def with_layout(self, layout: str) -> RecordIndex:
        """This index with every file read in ``layout``."""
        return dataclasses.replace(self, layouts=[layout] * len(self.files))

    def read(self, i: int) -> Any:
        """Record ``i`` parsed (and read in its file's layout).

        Raises:
            RecordProblem: ``not_utf8`` or ``malformed`` (with the line and column; also JSON
                nested past Python's recursion limit and integers past its digit limit).
        """
        data = self.raw(i)
        line = int(self.line[i])
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            col = err.start - data.rfind(b"\n", 0, err.start)
            at = line + data.count(b"\n", 0, err.start)
            raise RecordProblem(
                "not_utf8",
                f"bytes that are not UTF-8 on line {at} column {col} "
                f"({data[err.start : err.end]!r}); expected UTF-8 text",
            ) from err
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            raise RecordProblem(
                "malformed",
                f"malformed JSON on line {line + err.lineno - 1} column {err.colno}: {err.msg}",
            ) from err
        except RecursionError as err:
            raise RecordProblem(
                "malformed", f"JSON on line {line} is nested too deeply to parse"
            ) from err
        except ValueError as err:  # e.g. an integer of more than 4300 digits
            raise RecordProblem("malformed", f"JSON on line {line} cannot be read: {err}") from err
        return apply_layout(record, self.layout(i))

    def select(self, rows: np.ndarray) -> RecordIndex:
        """The records at ``rows`` (an int array; repeats allowed), in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        return RecordIndex(
            list(self.files),
            self.file_id[rows],
            self.offset[rows],
            self.length[rows],
            self.position[rows],
            self.line[rows],
            list(self.stamps),
            list(self.layouts),
        )

    @staticmethod
    def concat(parts: list[RecordIndex]) -> RecordIndex:
        """One index over ``parts`` (their files listed in order; ``file_id`` shifted)."""
        files: list[str] = []
        ids = []
        for p in parts:
            ids.append(p.file_id + len(files))
            files.extend(p.files)
        return RecordIndex(
            files,
            np.concatenate(ids).astype(np.int32),
            np.concatenate([p.offset for p in parts]),
            np.concatenate([p.length for p in parts]),
            np.concatenate([p.position for p in parts]),
            np.concatenate([p.line for p in parts]),
            [s for p in parts for s in p.stamps],
            [lay for p in parts for lay in (p.layouts or ["llava"] * len(p.files))],
        )


def index_file(path: str | os.PathLike[str], block_size: int | None = None) -> RecordIndex:
    """Index a ``.json`` list or a ``.jsonl`` file of records (cached per process).

    Args:
        block_size: bytes read at a time (``None``: :data:`CHUNK`, 16 MiB); the index does not
            depend on it.

    Raises:
        DataError: missing file, a ``.json`` file that is not a list, broken JSON structure or
            non-UTF-8 bytes in a ``.json`` file (file and line named).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file not found: {p}")
    st = p.stat()
    block = int(block_size) if block_size is not None else CHUNK
    if block < 1:
        raise ValueError(f"block_size must be >= 1 byte, got {block_size}")
    key = (str(p.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _INDEX_CACHE:
        if len(_INDEX_CACHE) >= 16:
            _INDEX_CACHE.pop(next(iter(_INDEX_CACHE)))
        if p.suffix == ".jsonl":
            offsets, lengths, lines = _scan_jsonl(p, block)
        else:
            offsets, lengths, lines = _scan_json(p, block)
        n = offsets.shape[0]
        _INDEX_CACHE[key] = RecordIndex(
            [str(p)],
            np.zeros(n, dtype=np.int32),
            offsets,
            lengths,
            np.arange(n, dtype=np.int64),
            lines,
            [(st.st_ino, st.st_size, st.st_mtime_ns)],
        )
    return _INDEX_CACHE[key]


def _scan_jsonl(path: Path, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Offsets, lengths and 1-based line numbers of the non-blank lines (``block`` bytes read at
    a time)."""
    starts, ends = [], []
    start, base = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(block):
            nl = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10) + base
            if nl.size:
                starts.append(np.concatenate(([start], nl[:-1] + 1)))
                ends.append(nl)
                start = int(nl[-1]) + 1
            base += len(chunk)
    if start < base:  # last line without a newline
        starts.append(np.array([start]))
        ends.append(np.array([base]))
    if not starts:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    s = np.concatenate(starts).astype(np.int64)
    length = np.concatenate(ends).astype(np.int64) - s
    with open(path, "rb") as f:
        if f.read(3) == b"\xef\xbb\xbf":  # a UTF-8 byte order mark is not part of record 0
            s[0] += 3
            length[0] -= 3
    lines = np.arange(1, s.shape[0] + 1, dtype=np.int64)
    keep = length > 0
    short = np.flatnonzero(keep & (length < 8))
    if short.size:
        with open(path, "rb") as f:
            for i in short:
                f.seek(int(s[i]))
                if not f.read(int(length[i])).strip():
                    keep[i] = False
    return s[keep], length[keep], lines[keep]


def _scan_json(path: Path, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Offsets, lengths and lines of the elements of a top-level JSON list.

    The file is read in blocks of ``block_size`` bytes; each element is located with the C
    decoder's ``raw_decode`` inside the decoded block (a block that cuts an element is read
    again from the element's start, larger if the element is larger than a block).
    """
    decoder = json.JSONDecoder(parse_int=str)  # locates elements only: no digit limit
    size = path.stat().st_size
    offsets: list[int] = []
    lengths: list[int] = []
    lines: list[int] = []
    with open(path, "rb") as f:
        fd = f.fileno()
        start = 3 if os.pread(fd, 3, 0) == b"\xef\xbb\xbf" else 0
        block = _Block(path, fd, start, size, 1, block_size)
        i = block.skip(0)
        if block.text[i : i + 1] != "[":
            found = repr(block.text[i : i + 1]) if i < len(block.text) else "nothing"
            raise DataError(f"{path}: expected a JSON list of LLaVA records, found {found} first")
        block, i = block.skip_across(i + 1)
        if block.text[i : i + 1] == "]":
            return _arrays(offsets, lengths, lines)
        while True:
            block, i, end = block.element(i, decoder)
            offsets.append(block.byte_at(i))
            lengths.append(block.byte_at(end) - offsets[-1])
            lines.append(block.line_at(i))
            block, i = block.skip_across(end)
            sep = block.text[i : i + 1]
            if sep == "]":
                return _arrays(offsets, lengths, lines)
            if sep != ",":
                raise DataError(
                    f"{path}: malformed JSON at line {block.line_at(i)}: expected ',' or ']' after "
                    f"record {len(offsets) - 1}, found {sep or 'the end of the file'!r}"
                )
            i = block.skip(i + 1)


class _Block:
    """A decoded block of a JSON file: text, its byte offset and first line, byte positions."""

    def __init__(self, path: Path, fd: int, start: int, size: int, line: int, want: int) -> None:
        self.path, self.fd, self.start, self.size, self.line, self.want = (
            path,
            fd,
            start,
            size,
            line,
            want,
        )
        data = os.pread(fd, want, start)
        self.final = start + len(data) >= size
        try:
            self.text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            if self.final or err.start < len(data) - 3:
                at = line + data.count(b"\n", 0, err.start)
                raise DataError(
                    f"{path}: bytes that are not UTF-8 on line {at} "
                    f"({data[err.start : err.end]!r}); expected UTF-8 text"
                ) from err
            self.text = data[: err.start].decode("utf-8")  # a character cut by the block end
        self.ascii = self.text.isascii()
        self._mark = (0, start, line)  # (char, byte, line) of the last position asked for

    def byte_at(self, i: int) -> int:
        c, b, _ = self._mark
        if self.ascii:
            return self.start + i
        if i < c:
            c, b = 0, self.start
        return b + len(self.text[c:i].encode("utf-8"))

    def line_at(self, i: int) -> int:
        c, _, ln = self._mark
        if i < c:
            c, ln = 0, self.line
        ln += self.text.count("\n", c, i)
        self._mark = (i, self.byte_at(i), ln)
        return ln

    def skip(self, i: int) -> int:
        while i < len(self.text) and self.text[i] in " \t\r\n":
            i += 1
        return i

    def skip_across(self, i: int) -> tuple[_Block, int]:
        """``(block, j)``: the first character after the whitespace at ``i``, in this block or,
        when the whitespace runs to its end, in the blocks after it."""
        i = self.skip(i)
        block = self
        while i >= len(block.text) and not block.final:
            block = block.refill(i, block.want)
            i = block.skip(0)
        return block, i

    def refill(self, i: int, want: int) -> _Block:
        """A block starting at character ``i`` of this one."""
        return _Block(self.path, self.fd, self.byte_at(i), self.size, self.line_at(i), want)

    def element(self, i: int, decoder: json.JSONDecoder) -> tuple[_Block, int, int]:
        """``(block, start, end)`` of the JSON value at or after character ``i`` (whitespace
        skipped; refilled if cut, or if the block ends before the value starts)."""
        block = self
        while True:
            block, i = block.skip_across(i)  # a block may end right after a ','
            try:
                _, end = decoder.raw_decode(block.text, i)
                if end < len(block.text) or block.final:
                    return block, i, end
            except RecursionError as err:
                raise DataError(
                    f"{block.path}: JSON nested too deeply to parse at line {block.line_at(i)}"
                ) from err
            except json.JSONDecodeError as err:
                if block.final:
                    raise DataError(
                        f"{block.path}: malformed JSON at line {block.line + err.lineno - 1} "
                        f"column {err.colno}: {err.msg}"
                    ) from err
            grow = block.want * (4 if i == 0 else 1)  # the element alone outgrows the block
            block, i = block.refill(i, grow), 0


def _arrays(*cols: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tuple(np.asarray(c, dtype=np.int64) for c in cols)  # type: ignore[return-value]
