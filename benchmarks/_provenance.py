"""What every result file records about how it was made: the commit, whether the tree was dirty, the date, the
command and the machine; and how a benchmark writes its result with it (benchmarks/README.md)."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    """Git's output (not stripped: `status --porcelain` lines start with a space), None if git fails."""
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _portable(arg: str) -> str:
    """A path inside the checkout, relative to it (also after `--flag=`): the command reads the same wherever the
    checkout is, and docs/results.md does not change with it."""
    flag, eq, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
    path = Path(value)
    if path.is_absolute() and (path == ROOT or ROOT in path.parents):
        value = str(path.relative_to(ROOT)) or "."
    return f"{flag}{eq}{value}"


def provenance(argv: list[str] | None = None) -> dict[str, Any]:
    """The commit (and whether tracked files differed from it), the UTC date, the command and the machine."""
    import torch

    argv = [_portable(a) for a in (sys.argv if argv is None else argv)]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": (_git("rev-parse", "HEAD") or "").strip() or None,
        # Dirty: a tracked file other than a result differs from the commit (results are what runs write);
        # None when git could not say (no checkout).
        "dirty": None if status is None else any(not line[3:].startswith("benchmarks/results/")
                                                  for line in status.splitlines()),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in ["python", *argv]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "gpu": gpu},
    }


def write_result(path: str | Path, result: dict[str, Any], made: dict[str, Any] | None, **dumps_kwargs: Any) -> None:
    """Write `result` to `path` as JSON with `made` as its top-level "provenance".

    `made` is `provenance()` as the benchmark's main took it when the run started (so the commit is the code that
    ran, even if the tree changes during the run). None leaves whatever `result` records already (a reanalysis of
    a stored run keeps the run's own). Indent 2 and a trailing newline; `dumps_kwargs` go to `json.dumps` (e.g.
    `default=float`). The text goes to a temporary file beside `path` that then replaces it, so that a reader, or
    a run merging its entries into the same file, never sees half a file.
    """
    path = Path(path)
    if made is not None:
        result["provenance"] = made
    text = json.dumps(result, **{"indent": 2, **dumps_kwargs}) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def carry_earlier(result: dict[str, Any], previous: dict[str, Any], kept: Iterable[Any]) -> None:
    """Keep in `result` what made the entries kept from `previous` (an older result file) that record no provenance
    of their own, under "earlier_provenance": `previous`'s own "earlier_provenance", else its top-level
    "provenance" (a file measured before entries recorded theirs: its provenance is theirs). Removed once every
    kept entry records its own. The entries themselves are left as they are: none is given a provenance.

    `previous` is read before `result` is changed, so it may be the same dict (a file updated in place).
    """
    earlier = previous.get("earlier_provenance", previous.get("provenance"))
    if earlier is None or all(isinstance(e, dict) and "provenance" in e for e in kept):
        result.pop("earlier_provenance", None)
    else:
        result["earlier_provenance"] = earlier
