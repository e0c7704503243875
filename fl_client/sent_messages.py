"""Copies of what left the site, kept by the site's gate, and a scan of them for the site's own patients.

With ``llnm-site join --keep-sent`` the app gate (:mod:`fl_client.app_gate`) writes every reply the ClientApp
hands to the SuperNode, as the exact objects Flower pushes (the message with its metadata and error, then
every record and array chunk; each object's ID is the SHA-256 of its bytes), to
``STATE/sent/<site>/run-<run id>/<time>-<kind>-r<round>.bin`` in the site's state folder. The SuperNode relays
these objects to the SuperLink unchanged, so the copies are what the coordinator receives from the site.
(The SuperNode itself also sends its registration, heartbeats and the ClientApp's exit status, which Flower
builds from no patient data.)

``llnm-site audit --scan-sent --data SITE`` (:func:`scan_sent`) then looks in every kept copy for the site's
patients:

* every patient id of the table, in every string of the message and in its raw bytes;
* every report segment of 16 characters or more, in the raw bytes;
* 32-byte windows of every image's decoded pixels (as the reader returns them) and of the preprocessed image
  and report tensors in the site's cache, in the raw bytes, at any offset;
* the message's structure, for a reply whose size would grow with the number of patients: array names and
  shapes, metric names and list lengths, config keys (:func:`signature`). Sites of different sizes must send
  replies of the same signature, and the scan reports each reply's.

A finding names the kept file, the byte offset and what was found, never the value itself.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared_model.fileio import atomic_write
from shared_model.naming import safe_filename

ENV_KEEP_SENT = "LLNM_KEEP_SENT"
SENT_DIR = "sent"
WINDOW = 32  # bytes of pixels or tensor values looked for
MIN_SEGMENT = 16  # characters of a report segment looked for
MIN_RAW_ID = 4  # ids shorter than this are looked for in the message's strings only (too likely by chance)
_LENGTH = struct.Struct(">Q")


def sent_folder(root: Path, site: str) -> Path:
    return root / SENT_DIR / safe_filename(site, fallback="site")


def keep_sent(root: Path, site: str, context: dict[str, Any], reply: Any) -> dict[str, Any]:
    """Write `reply` as the objects Flower pushes; returns the audit fields naming the copy."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    blobs = [obj.deflate() for obj in get_all_nested_objects(reply).values()]  # children first, message last
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%f")
    kind = safe_filename(str(context.get("message_type", "reply")))
    name = f"{stamp}-{kind}-r{context.get('round', 'x')}.bin"
    path = sent_folder(root, site) / f"run-{context.get('run_id', 'x')}" / name

    def write(handle: Any) -> None:
        for blob in blobs:
            handle.write(_LENGTH.pack(len(blob)))
            handle.write(blob)

    atomic_write(path, write)
    return {"kept": str(path.relative_to(root)), "kept_bytes": sum(len(b) for b in blobs), "kept_objects": len(blobs)}


def read_objects(path: Path) -> list[bytes]:
    """The objects of a kept copy, in the order written (the message last)."""
    data = path.read_bytes()
    out, at = [], 0
    while at < len(data):
        if at + _LENGTH.size > len(data):
            raise ValueError(f"{path}: truncated at byte {at}")
        (size,) = _LENGTH.unpack_from(data, at)
        at += _LENGTH.size
        if at + size > len(data):
            raise ValueError(f"{path}: object at byte {at} is cut short")
        out.append(data[at:at + size])
        at += size
    if not out:
        raise ValueError(f"{path}: empty")
    return out


def read_message(path: Path, objects: list[bytes] | None = None) -> Any:
    """The kept reply as a Flower Message (each object's ID checked against its bytes by Flower); `objects`:
    the file's objects when already read."""
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    objects = read_objects(path) if objects is None else objects
    contents = {hashlib.sha256(blob).hexdigest(): blob for blob in objects}
    return inflate_object_from_contents(hashlib.sha256(objects[-1]).hexdigest(), contents)


def signature(message: Any) -> dict[str, Any]:
    """What a reply's size depends on: array names and shapes, metric names (with list lengths), config keys,
    and whether it carries an error."""
    if message.has_error():
        return {"error": True}
    content = message.content
    return {
        "arrays": {f"{name}/{key}": list(arr.shape) for name, rec in content.array_records.items()
                   for key, arr in rec.items()},
        "metrics": {f"{name}/{key}": (len(v) if isinstance(v, list) else None)
                    for name, rec in content.metric_records.items() for key, v in rec.items()},
        "config": sorted(f"{name}/{key}" for name, rec in content.config_records.items() for key in rec),
    }


def message_strings(message: Any) -> Iterator[str]:
    """Every string a message carries: record names, keys, config values, the error's reason."""
    if message.has_error():
        yield str(message.error.reason)
        return
    content = message.content
    for records, has_text in ((content.array_records, False), (content.metric_records, False),
                              (content.config_records, True)):
        for name, rec in records.items():
            yield name
            for key, value in rec.items():
                yield key
                for v in (value if isinstance(value, list) else [value]) if has_text else []:
                    if isinstance(v, str):
                        yield v
                    elif isinstance(v, bytes):
                        yield v.decode("utf-8", "replace")


# ---- what the site holds ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Needle:
    what: str  # e.g. "report text of patient P3 (row 5)"; never the value
    data: bytes


def site_needles(site_dir: Path, cache_dir: Path | None = None) -> tuple[list[str], list[Needle]]:
    """(the table's patient ids, the byte strings that must never leave: report segments, pixel windows,
    cached tensor windows)."""
    from shared_model.model.text_encoder import split_report
    from shared_model.sitedata.contract import load_site
    from shared_model.sitedata.imaging import read_image

    site = load_site(site_dir)
    ids = sorted({p.patient_id for p in site.patients} | _table_ids(site.root))
    needles: list[Needle] = []
    for patient in site.patients:
        who = f"patient {patient.patient_id} (row {patient.row})"
        if patient.report is not None:
            try:
                text = patient.report.read_bytes().decode("utf-8-sig", "replace")
            except OSError:
                text = ""
            for segment in split_report(text):
                if len(segment) >= MIN_SEGMENT:
                    needles.append(Needle(f"report text of {who}", segment.encode("utf-8")))
        for view, files in patient.views.items():
            if files.image is None:
                continue
            try:
                pixels = read_image(files.image).pixels
            except Exception:  # an unreadable image has no pixels to leak; check says why
                continue
            for window in _windows(np.ascontiguousarray(pixels).tobytes(), 4):
                needles.append(Needle(f"pixels of {who}'s {view} image {files.image.name}", window))
    needles.extend(_cache_needles(site.name, cache_dir))
    return ids, needles


def _table_ids(root: Path) -> set[str]:
    """Ids of every table row, those left out for errors included."""
    import csv

    try:
        with open(root / "patients.csv", encoding="utf-8-sig", newline="") as fh:
            return {row["patient_id"].strip() for row in csv.DictReader(fh) if (row.get("patient_id") or "").strip()}
    except (OSError, UnicodeDecodeError, KeyError, csv.Error):
        return set()


def _windows(data: bytes, count: int) -> list[bytes]:
    """Up to `count` non-uniform WINDOW-byte windows spread over `data`."""
    out: list[bytes] = []
    if len(data) < WINDOW:
        return out
    for k in range(1, 4 * count + 1):
        start = (len(data) - WINDOW) * k // (4 * count + 1)
        window = data[start:start + WINDOW]
        if len(set(window)) >= 8 and window not in out:  # a flat background patch could occur by chance
            out.append(window)
        if len(out) == count:
            break
    return out


def _cache_needles(site_name: str, cache_dir: Path | None) -> Iterable[Needle]:
    """Windows of every patient's preprocessed image and report tensors in the site's cache files."""
    import torch

    from shared_model.sitedata.cache import default_cache_dir
    from shared_model.sitedata.tensors import SiteTensors

    folder = default_cache_dir(cache_dir)
    for path in sorted(folder.glob(f"{site_name}-*.pt")):
        if "-public-" in path.name:
            continue
        try:
            tensors = SiteTensors.load(path)
        except Exception:  # not a site cache of this version: nothing to compare with
            continue
        for i, pid in enumerate(tensors.patient_ids):
            for label, tensor in (("preprocessed image", tensors.image[i]), ("report embedding", tensors.text[i])):
                raw = tensor.to(torch.float32).contiguous().numpy().tobytes()
                for window in _windows(raw, 2):
                    yield Needle(f"{label} of patient {pid} (cache {path.name})", window)


# ---- the scan -----------------------------------------------------------------------------------------

@dataclass
class Finding:
    file: str
    offset: int | None
    what: str


def find_needles(data: bytes, needles: list[Needle]) -> list[tuple[int, Needle]]:
    """(offset, needle) of every needle of 8 bytes or more found in `data`, at any offset. Candidates come
    from the needles' first 8 bytes, compared at every offset at once (numpy), then checked in full."""
    by_prefix: dict[int, list[Needle]] = {}
    for n in needles:
        if len(n.data) >= 8:
            by_prefix.setdefault(int.from_bytes(n.data[:8], "little"), []).append(n)
    if not by_prefix or len(data) < 8:
        return []
    prefixes = np.fromiter(by_prefix, dtype=np.uint64, count=len(by_prefix))
    found: list[tuple[int, Needle]] = []
    chunk = 1 << 22
    raw = np.frombuffer(data, dtype=np.uint8)
    for begin in range(0, len(data) - 7, chunk):
        end = min(begin + chunk, len(data) - 7)
        keys = np.zeros(end - begin, dtype=np.uint64)
        for k in range(8):
            keys |= raw[begin + k:end + k].astype(np.uint64) << np.uint64(8 * k)
        for offset in np.flatnonzero(np.isin(keys, prefixes)):
            at = begin + int(offset)
            for n in by_prefix[int(keys[offset])]:
                if data[at:at + len(n.data)] == n.data:
                    found.append((at, n))
    return found


def scan_sent(root: Path, site: str, site_dir: Path, cache_dir: Path | None = None) -> dict[str, Any]:
    """Look for the site's patients in every reply kept for `site` under the state folder `root`."""
    ids, needles = site_needles(site_dir, cache_dir)
    raw_ids = [Needle(f"patient id {pid}", pid.encode("utf-8")) for pid in ids if len(pid) >= MIN_RAW_ID]
    files = sorted(sent_folder(root, site).rglob("*.bin"))
    findings: list[Finding] = []
    messages: list[dict[str, Any]] = []
    for path in files:
        rel = str(path.relative_to(root))
        try:
            objects = read_objects(path)
            message = read_message(path, objects)
        except Exception as exc:  # a damaged copy is reported, and the others still scanned
            findings.append(Finding(rel, None, f"unreadable kept copy ({type(exc).__name__}: {exc})"))
            continue
        data = b"".join(objects)
        strings = list(message_strings(message))
        for pid in ids:
            if any(_contains_id(s, pid) for s in strings):
                findings.append(Finding(rel, None, f"patient id {pid} in a string of the message"))
        for offset, needle in find_needles(data, needles):
            findings.append(Finding(rel, offset, needle.what))
        for needle in raw_ids:
            at = data.find(needle.data)
            if at >= 0 and not any(f.file == rel and needle.what in f.what for f in findings):
                findings.append(Finding(rel, at, f"{needle.what} in the raw bytes"))
        messages.append({"file": rel, "bytes": len(data), "kind": str(message.metadata.message_type),
                         "signature": signature(message)})
    return {"site": site, "data": str(site_dir), "kept_messages": len(files), "patient_ids": len(ids),
            "needles": len(needles) + len(raw_ids), "messages": messages,
            "findings": [f.__dict__ for f in findings]}


def _contains_id(text: str, pid: str) -> bool:
    """`pid` as a whole token of `text` (so that id "P1" is not found inside "P10" or "APP1")."""
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(pid)}(?![A-Za-z0-9])", text) is not None


def keep_sent_enabled() -> bool:
    return os.environ.get(ENV_KEEP_SENT, "") not in ("", "0", "false", "no")


__all__ = ["ENV_KEEP_SENT", "Finding", "find_needles", "keep_sent", "keep_sent_enabled", "read_message",
           "read_objects", "scan_sent", "sent_folder", "signature", "site_needles"]
