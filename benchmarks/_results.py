"""Results files shared by benchmark invocations that run side by side (one per core).

A benchmark that measures several things (modalities, methods) can be split across processes with the same
settings; each writes what it measured into the same `--out` JSON, and the entries already there with
identical `settings` are kept. A file written with other settings is replaced, never mixed in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from _provenance import carry_earlier


def merge_side_by_side(out: Path, results: dict[str, Any], key: str, order: list[str],
                       made: dict[str, Any]) -> dict[str, Any]:
    """Merge `results[key]` (name -> entry) with the entries of the same settings already in `out`.

    `out` is read only now, at the end of a run, so that runs started together all end up in it. Every entry of
    this run records `made` (this run's `provenance()`, taken when it started) as its own "provenance"; an entry
    kept from `out` keeps the provenance it has, and one without (measured before entries recorded theirs) stays
    without, the older file's record of it kept as "earlier_provenance" (`_provenance.carry_earlier`). The
    file's top-level "provenance", which `write_result` sets, is the run that wrote it last. Entries of this run
    win over older ones of the same name; entries are ordered by `order`, then any others. Returns the previous
    file's contents when they were merged (so a caller can combine other figures, e.g. a peak), else an empty
    dict.
    """
    previous = json.loads(out.read_text()) if out.is_file() else {}
    for entry in results[key].values():
        entry["provenance"] = made
    merged: dict[str, Any] = {}
    if previous.get("settings") == results["settings"]:
        kept = {k: v for k, v in previous.get(key, {}).items() if k not in results[key]}
        results[key] = kept | results[key]
        carry_earlier(results, previous, kept.values())
        merged = previous
    results[key] = {k: results[key][k] for k in order if k in results[key]} | results[key]
    return merged
