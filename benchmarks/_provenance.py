"""What every result file records about how it was made: the commit, whether the tree was dirty, the date, the
command and the machine."""

from __future__ import annotations

import datetime as dt
import os
import platform
import shlex
import subprocess
import sys
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


def provenance(argv: list[str] | None = None) -> dict[str, Any]:
    """The commit (and whether tracked files differed from it), the UTC date, the command and the machine."""
    import torch

    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0])
    if script.is_absolute() and ROOT in script.parents:
        argv[0] = str(script.relative_to(ROOT))
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "commit": (_git("rev-parse", "HEAD") or "").strip() or None,
        # Dirty: a tracked file other than a result differs from the commit (results are what runs write).
        "dirty": any(not line[3:].startswith("benchmarks/results/")
                     for line in (_git("status", "--porcelain", "--untracked-files=no") or "").splitlines()),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in ["python", *argv]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "gpu": gpu},
    }
