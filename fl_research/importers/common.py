"""What every importer shares: the split into simulated hospitals and splits, and writing the site folders.

An importer turns a data set into `SitePatient`s (the table row, the files to copy or draw, a group key that
keeps records of one patient, or identical records, together) plus the records it could not express.
`write_sites` then:

* assigns patients to K sites and, within each site, to train/val/test (60/20/20), both stratified by label
  with scikit-learn's `StratifiedGroupKFold` under one seed, so a group never straddles two sites or splits;
* writes each site folder (`patients.csv`, `site.yaml` with the inputs declaration and an `import` record of
  how the site was made, and the files), and `import.json` beside them with every count.

Nothing is written inside the source folder, and an existing site folder is never overwritten.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from shared_model.config.inputs import InputsConfig
from shared_model.fileio import atomic_write_json, atomic_write_text
from shared_model.sitedata.contract import PATIENTS_FILE, SITE_FILE, required_columns

#: Shares of each site's patients in train / val / test (in fifths).
SPLIT_FIFTHS = {"test": 1, "val": 1, "train": 3}


class SourceError(ValueError):
    """The source cannot be imported at all (missing, unreadable, or the output folder is not allowed)."""


@dataclass
class SitePatient:
    """One patient as the importer expresses it.

    `row` maps contract columns to cell text (paths relative to the site folder); `files` maps those relative
    paths to a function that writes the file at an absolute path; `group` keeps patients together in every
    split (one DDTI case, or identical UCI records); `label` is 0, 1 or None (unlabelled).
    """

    patient_id: str
    row: dict[str, str]
    label: int | None
    group: str
    files: dict[str, Callable[[Path], None]] = field(default_factory=dict)


@dataclass
class ImportResult:
    """What an importer read: the patients it can express, and the records it cannot (reason -> count)."""

    dataset: str
    source: Path
    inputs: InputsConfig
    patients: list[SitePatient]
    not_expressed: Counter[str] = field(default_factory=Counter)
    notes: Counter[str] = field(default_factory=Counter)  # expressed, but with something left out or missing
    records_read: int = 0
    source_files: list[Path] = field(default_factory=list)
    description: str = ""
    class_names: tuple[str, str] = ("negative", "positive")


def check_output(source: Path, out: Path) -> None:
    """Refuse an output folder inside the source (nothing is ever written into a data folder) or one that
    already holds site folders (an import never overwrites)."""
    src, dst = source.resolve(), out.resolve()
    if dst == src or src in dst.parents:
        raise SourceError(f"--out {out} is inside the source {source}: nothing is ever written into a data "
                           "folder; choose an output folder elsewhere")
    if dst.exists() and not dst.is_dir():
        raise SourceError(f"--out {out} exists and is not a folder")
    if dst.is_dir() and any(p.is_dir() and (p / PATIENTS_FILE).exists() for p in dst.iterdir()):
        raise SourceError(f"--out {out} already holds site folders; remove them or choose another folder "
                           "(an import never overwrites)")


def _fold_assignment(labels: np.ndarray, groups: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold index per item: stratified by label, groups kept whole, seeded."""
    from sklearn.model_selection import StratifiedGroupKFold

    folds = np.zeros(len(labels), dtype=int)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, test) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
        folds[test] = k
    return folds


def assign(patients: list[SitePatient], n_sites: int, seed: int) -> tuple[list[int], list[str]]:
    """(site index, split) per patient: K sites, then 60/20/20 train/val/test within each site."""
    if n_sites < 1:
        raise SourceError(f"--sites {n_sites}: at least one site")
    labels = np.array([-1 if p.label is None else p.label for p in patients])
    groups = np.array([p.group for p in patients])
    if len(set(groups)) < n_sites * 5:
        raise SourceError(f"--sites {n_sites}: {len(set(groups))} patients (groups) are too few for "
                           f"{n_sites} sites of at least 5")
    sites = _fold_assignment(labels, groups, n_sites, seed) if n_sites > 1 else np.zeros(len(patients), int)
    splits = [""] * len(patients)
    order = [name for name, n in SPLIT_FIFTHS.items() for _ in range(n)]
    for site in range(n_sites):
        members = np.flatnonzero(sites == site)
        fifths = _fold_assignment(labels[members], groups[members], 5, seed + 1 + site)
        for index, fifth in zip(members, fifths, strict=True):
            splits[index] = order[fifth]
    return [int(s) for s in sites], splits


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _table(rows: list[dict[str, str]], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_sites(result: ImportResult, out: Path, n_sites: int, seed: int, prefix: str) -> dict[str, Any]:
    """Write `n_sites` site folders `<out>/<prefix>-<k>` and `<out>/import.json`; returns import.json's content."""
    check_output(result.source, out)
    if not result.patients:
        raise SourceError(f"{result.source}: no record could be expressed in the contract: "
                           f"{dict(result.not_expressed)}")
    sites, splits = assign(result.patients, n_sites, seed)
    columns = list(required_columns(result.inputs))
    extra = sorted({c for p in result.patients for c in p.row} - set(columns))
    columns += extra
    source_hashes = {str(p.relative_to(result.source)) if p.is_relative_to(result.source) else p.name: _sha256(p)
                     for p in result.source_files}
    # What every site's `import` record and import.json share: where the data came from and how it was split.
    provenance = {"dataset": result.dataset, "source": str(result.source.resolve()), "source_sha256": source_hashes,
                  "seed": seed, "sites": n_sites}
    out.mkdir(parents=True, exist_ok=True)
    summary_sites: dict[str, Any] = {}
    for k in range(n_sites):
        members = [i for i, s in enumerate(sites) if s == k]
        name, split_counts = _write_site(result, out, prefix, k, members, splits, columns, provenance)
        summary_sites[name] = {"patients": len(members), "splits": split_counts}
    labels = Counter(str(p.label) for p in result.patients)
    summary = {
        **provenance,
        "records_read": result.records_read,
        "patients_written": len(result.patients),
        "not_expressed": dict(result.not_expressed),
        "notes": dict(result.notes),
        "classes": {result.class_names[0]: labels.get("0", 0), result.class_names[1]: labels.get("1", 0),
                    "unlabelled": labels.get("None", 0)},
        "per_site": summary_sites,
        "outcome": result.inputs.outcome,
    }
    atomic_write_json(out / "import.json", summary)
    return summary


def _write_site(result: ImportResult, out: Path, prefix: str, k: int, members: list[int], splits: list[str],
                columns: list[str], provenance: dict[str, Any]) -> tuple[str, dict[str, dict[str, int]]]:
    """Site k's folder (its files, patients.csv, site.yaml); returns its name and split counts."""
    name = f"{prefix}-{k + 1}"
    folder = out / name
    folder.mkdir()
    rows = []
    for i in members:
        patient = result.patients[i]
        for relative, write in patient.files.items():
            target = folder / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            write(target)
        rows.append({**dict.fromkeys(columns, ""), **patient.row, "split": splits[i]})
    counts = {split: Counter(str(result.patients[i].label) for i in members if splits[i] == split)
              for split in SPLIT_FIFTHS}
    split_counts = {split: {"patients": sum(c.values()), "positive": c.get("1", 0), "negative": c.get("0", 0),
                            "unlabelled": c.get("None", 0)} for split, c in counts.items()}
    record = {**provenance, "site_index": k + 1, "patients": len(members), "splits": split_counts,
              "split_rule": "StratifiedGroupKFold: K sites, then 60/20/20 train/val/test per site, by label"}
    site_yaml = {"name": name, "description": result.description, "inputs": result.inputs.to_dict(), "import": record}
    atomic_write_text(folder / SITE_FILE, yaml.safe_dump(site_yaml, sort_keys=False, allow_unicode=True))
    atomic_write_text(folder / PATIENTS_FILE, _table(rows, columns))
    return name, split_counts


def copy_file(source: Path) -> Callable[[Path], None]:
    """A writer that copies `source` (bytes unchanged) to its target."""
    def write(target: Path) -> None:
        with source.open("rb") as src, target.open("wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.chmod(target, 0o644)
    return write


__all__ = ["ImportResult", "SitePatient", "SourceError", "assign", "check_output", "copy_file", "write_sites"]
