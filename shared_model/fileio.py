"""Atomic file writes: a reader sees the old file or the new one, never half of one.

The text goes to a temporary file in the destination's folder (same file system, so the rename is atomic),
is flushed and fsync'ed, and is renamed over the destination; the folder is then fsync'ed too where the
platform allows it, so the rename itself survives a power cut. A failed write leaves no temporary file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import IO, Any


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object]) -> None:
    """Create or replace `path` atomically with what `write(binary_handle)` writes (parent folders are made)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            recorder = _WriteErrors(handle)
            try:
                write(recorder)
            except OSError:
                raise
            except Exception as exc:
                # torch.save's zip writer turns a failed write (disk full) into a RuntimeError about file
                # positions; the OSError underneath is what the caller can act on.
                if recorder.error is not None:
                    raise recorder.error from exc
                raise
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


class _WriteErrors:
    """A binary file handle that remembers the first OSError its ``write`` raised."""

    def __init__(self, handle: IO[bytes]) -> None:
        self._handle = handle
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._handle.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Create or replace `path` atomically with `text` (UTF-8)."""
    data = text.encode("utf-8")
    atomic_write(path, lambda handle: handle.write(data))


def atomic_write_json(path: str | os.PathLike[str], data: Any, **json_kwargs: Any) -> None:
    """Create or replace `path` atomically with `data` as JSON and a final newline.

    `json_kwargs` go to `json.dumps`; by default the JSON is indented by 2 and numpy scalars and paths are
    written as plain numbers and strings.
    """
    json_kwargs.setdefault("indent", 2)
    json_kwargs.setdefault("default", _json_default)
    atomic_write_text(path, json.dumps(data, **json_kwargs) + "\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable; a no-op where folders cannot be opened (Windows)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(folder, flags)
    except OSError:
        return
    try:
        with suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
