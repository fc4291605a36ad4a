"""What a person sees on the console, and what goes to each run's log file.

The commands keep the console short: a progress bar, one line per finished piece of work and the
result table. Library logging (ours at INFO, transformers, accelerate, Python warnings) goes to
the run folder's log file (``<run>/train.log``) through a :class:`logging.FileHandler` attached
for the duration of the run (:func:`run_log`); ``moe-vision -v`` brings it back to the console.

* :func:`configure_console` sets the console's level once per command (``WARNING`` for
  ``train``, ``ERROR`` for ``sweep``, whose cells' warnings are read back from their log files
  and said once per sweep by :func:`new_warnings`) and says every distinct warning once
  (:class:`OnceFilter`).
* :func:`run_log` lowers the root logger to ``INFO`` for the run's file while pinning the console
  handlers to the level they had, so a worker process of a sweep prints what its parent would.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
RUN_LOG = "train.log"
"""File name of a run's log in its run folder."""

T = TypeVar("T")
_LINE = re.compile(r"^\S+ \S+ (WARNING|ERROR|CRITICAL) (\S+): (.*)$")


class OnceFilter(logging.Filter):
    """Pass each distinct ``(logger, message)`` once; repeats go to the log file only."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def _console_handlers(logger: logging.Logger) -> list[logging.Handler]:
    return [
        h
        for h in logger.handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
    ]


def configure_console(verbose: bool, quiet_level: int = logging.WARNING) -> None:
    """Console at ``quiet_level`` (``verbose``: ``DEBUG``, everything), each warning once.

    Sets the root logger's level (which a sweep's worker processes copy) and adds a console
    handler when there is none yet (library use outside the CLI).
    """
    level = logging.DEBUG if verbose else quiet_level
    root = logging.getLogger()
    if not _console_handlers(root):
        logging.basicConfig(format=LOG_FORMAT)
    root.setLevel(level)
    for handler in _console_handlers(root):
        handler.setLevel(logging.NOTSET)
        if not verbose and not any(isinstance(f, OnceFilter) for f in handler.filters):
            handler.addFilter(OnceFilter())
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error" if not verbose else "info")


@contextlib.contextmanager
def run_log(path: str | os.PathLike[str], level: int = logging.INFO) -> Iterator[Path]:
    """Send logging at ``level`` and up to ``path`` while the block runs (appending).

    The console handlers keep the level the root logger had before (pinned for the block), so
    the file gets the run's INFO lines and the console does not; transformers' own handler is
    replaced by propagation to the root for the block, and Python warnings are captured.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    before = root.level
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setLevel(level)
    file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
    pinned = [h for h in _console_handlers(root) if h.level == logging.NOTSET]
    for handler in pinned:
        handler.setLevel(before)
    root.addHandler(file_handler)
    root.setLevel(min(before, level) if before != logging.NOTSET else level)
    hf = _route_transformers()
    logging.captureWarnings(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            yield path
    finally:
        logging.captureWarnings(False)
        if hf is not None:
            hf()
        root.removeHandler(file_handler)
        file_handler.close()
        root.setLevel(before)
        for handler in pinned:
            handler.setLevel(logging.NOTSET)


def _route_transformers():  # noqa: ANN202 - returns the undo function or None
    """Let the transformers logger propagate to the root (and so to the run's file) instead of
    printing through its own handler; returns the function that undoes it."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    hf_root = logging.getLogger("transformers")
    level = hf_root.level
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    hf_root.setLevel(logging.INFO)

    def undo() -> None:
        hf_logging.disable_propagation()
        hf_logging.enable_default_handler()
        hf_root.setLevel(level)

    return undo


def new_warnings(log_file: str | os.PathLike[str], seen: set[str]) -> list[str]:
    """The warning and error messages of ``log_file`` not in ``seen`` yet (added to it), as
    ``"<logger>: <message>"`` (first line of each)."""
    path = Path(log_file)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        m = _LINE.match(line)
        if m is None:
            continue
        text = f"{m.group(2)}: {m.group(3)}"
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def logs_to_run_folder(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorate ``fn(cfg, out_dir, ...)`` so that it runs inside :func:`run_log` of
    ``<out_dir>/train.log``."""

    @functools.wraps(fn)
    def wrapper(cfg: Any, out_dir: str | os.PathLike[str], *args: Any, **kwargs: Any) -> T:
        with run_log(Path(out_dir) / RUN_LOG):
            return fn(cfg, out_dir, *args, **kwargs)

    return wrapper
