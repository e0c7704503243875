"""The files `patients.csv` lists: each path checked to name a regular file inside the site folder (no absolute
path, no `..`, no symbolic link leading out), resolved with one `lstat` per file and one `resolve` per folder,
and a file listed twice warned about. Problems go to the row's reporter (`shared_model.sitedata.rows`)."""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Protocol

from shared_model.sitedata.records import _inside

__all__ = ["CellReporter", "TableFiles", "parse_path", "parse_paths"]


class CellReporter(Protocol):
    """Where a row's problems go: an error leaves the row out, a warning keeps it."""

    def error(self, column: str | None, message: str) -> None: ...

    def warning(self, column: str | None, message: str) -> None: ...


class TableFiles:
    """The files a table lists: where each really is, and which row first listed it.

    A site lists thousands of files in a few folders, and resolving each file's full path costs a system call
    per path component (this was most of a warm-cache round's data loading). Here each folder is resolved once
    and each file takes one `lstat`; a file that is itself a symbolic link, is missing or is not a regular file
    goes the full way (`_inside`, `exists`, `is_file`), so what is accepted and every message are unchanged.
    """

    def __init__(self, root: Path) -> None:
        self.root = root  # resolved
        self.first_listed: dict[Path, tuple[int, str]] = {}  # real file -> (row, column) that first listed it
        self._folders: dict[Path, Path] = {}

    def real_regular_file(self, path: Path) -> Path | None:
        """`path`'s real location when it is a regular file, not a link, in a folder that resolves inside the
        site; None when it needs the full checks."""
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                return None
            folder = self._folders.get(path.parent)
            if folder is None:
                folder = self._folders[path.parent] = path.parent.resolve()
        except (OSError, RuntimeError):
            return None
        real = folder / path.name
        return real if real.is_relative_to(self.root) else None


def parse_paths(
    files: TableFiles, values: dict[str, str], columns: tuple[str, ...], row: int, check: CellReporter
) -> dict[str, Path | None]:
    """The row's path `columns`, checked; a file listed before (in any row) is warned about."""
    paths: dict[str, Path | None] = {}
    for column in columns:
        found = parse_path(files, values[column], column, check)
        paths[column] = found[0] if found else None
        if found is None:
            continue
        # One file listed twice is almost always a copy-paste slip in the table (two patients, one image).
        first = files.first_listed.setdefault(found[1], (row, column))
        if first != (row, column):
            check.warning(
                column,
                f"{values[column]!r} is also listed at row {first[0]} ({first[1]}): same file used twice",
            )
    return paths


def parse_path(files: TableFiles, text: str, column: str, check: CellReporter) -> tuple[Path, Path] | None:
    """A table path as (the path in the site folder, its real location), refusing anything that is not a file
    inside the site folder.

    Absolute paths and `..` escapes are refused before the file system is touched at all; symbolic links are
    followed only to confirm they stay inside the site.
    """
    root = files.root
    if not text:
        return None
    if "\\" in text:
        check.error(
            column,
            f"{text!r} uses backslashes: write paths with forward slashes, relative to the site folder",
        )
        return None
    if PurePosixPath(text).is_absolute() or PureWindowsPath(text).drive:
        check.error(column, f"{text!r} is an absolute path: paths must be relative to the site folder")
        return None
    if "\x00" in text:
        check.error(column, f"{text!r} contains a NUL character")
        return None
    normal = os.path.normpath(text)
    if normal == ".." or normal.startswith("../"):
        check.error(column, f"{text!r} leads outside the site folder")
        return None
    if normal == ".":
        check.error(column, f"{text!r} is the site folder itself, not a file")
        return None
    path = root / normal
    real = files.real_regular_file(path)
    if real is not None:
        return path, real
    if not _inside(path, root):
        check.error(column, f"{text!r} is a symbolic link leading outside the site folder")
        return None
    if not path.exists():
        check.error(column, f"{text!r} does not exist")
        return None
    if not path.is_file():
        check.error(column, f"{text!r} is not a regular file")
        return None
    return path, path.resolve()
