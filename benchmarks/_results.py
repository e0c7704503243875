"""Results files shared by benchmark invocations that run side by side (one per core).

A benchmark that measures several things (modalities, methods) can be split across processes with the same
settings; each writes what it measured into the same `--out` JSON, and the entries already there with
identical `settings` are kept. A file written with other settings is replaced, never mixed in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _as_list(value: object) -> list:
    return value if isinstance(value, list) else ([value] if value else [])


def merge_side_by_side(out: Path, results: dict[str, Any], key: str, order: list[str]) -> dict[str, Any]:
    """Merge `results[key]` (name -> entry) with the entries of the same settings already in `out`.

    `out` is read only now, at the end of a run, so that runs started together all end up in it. Entries of
    this run win over older ones of the same name; the commands of every run that contributed are listed
    under "commands" (a list in `results`; an older file's single "command" is read too); entries are ordered
    by `order`, then any others. Returns the previous file's contents when they were merged (so a caller can
    combine other figures, e.g. a peak), else an empty dict.
    """
    previous = json.loads(out.read_text()) if out.is_file() else {}
    merged: dict[str, Any] = {}
    if previous.get("settings") == results["settings"]:
        results[key] = {k: v for k, v in previous.get(key, {}).items() if k not in results[key]} | results[key]
        results["commands"] = [*_as_list(previous.get("commands", previous.get("command"))), *results["commands"]]
        merged = previous
    results[key] = {k: results[key][k] for k in order if k in results[key]} | results[key]
    return merged
