"""`llnm-synth --drawn-masks / --drawn-masks-sites`: a consortium where only some patients have drawn masks."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

from conftest import CONSORTIUM_PATIENTS, CONSORTIUM_SEED, CONSORTIUM_SITES

BIN = Path(sys.executable).parent
MASK_COLUMNS = ("trans_nodule_mask", "trans_thyroid_mask", "long_nodule_mask", "long_thyroid_mask")


def _digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.name):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _synth(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "llnm-synth"), "--out", str(out), "--sites", str(CONSORTIUM_SITES),
                           "--patients", str(CONSORTIUM_PATIENTS), "--seed", str(CONSORTIUM_SEED), "--quiet",
                           *extra], capture_output=True, text=True, timeout=600)


def test_some_patients_at_some_sites_keep_their_masks_and_nothing_else_changes(small_consortium: Path,
                                                                              tmp_path: Path) -> None:
    out = tmp_path / "partial"
    done = _synth(out, "--drawn-masks", "0.5", "--drawn-masks-sites", "site-a,site-c")
    assert done.returncode == 0, done.stderr
    info = json.loads((out / "consortium.json").read_text())["drawn_masks"]
    assert info["fraction"] == 0.5 and info["sites"] == ["site-a", "site-c"]
    for site in sorted(p.name for p in out.iterdir() if (p / "patients.csv").is_file()):
        rows = list(csv.DictReader((out / site / "patients.csv").open()))
        with_masks = [r for r in rows if any(r[c] for c in MASK_COLUMNS)]
        expected = round(0.5 * len(rows)) if site in ("site-a", "site-c") else 0
        assert len(with_masks) == expected == info["patients_with_masks"][site], site
        for r in with_masks:  # a drawn patient keeps every mask of every view it has
            assert all(bool(r[f"{v}_image"]) == bool(r[f"{v}_nodule_mask"]) == bool(r[f"{v}_thyroid_mask"])
                       for v in ("trans", "long"))
        kept = {p.name for p in (out / site / "masks").glob("*.png")}
        moved = {p.name for p in (out / "truth" / "masks" / site).glob("*.png")}
        assert not kept & moved
        # The withheld masks are the generator's own: together they are the complete consortium's masks.
        assert kept | moved == {p.name for p in (small_consortium / site / "masks").glob("*.png")}
        together = [out / "truth" / "masks" / site / n for n in moved] + [out / site / "masks" / n for n in kept]
        assert _digest(together) == _digest(list((small_consortium / site / "masks").glob("*.png")))
        # Images, reports and the truth table are those of the fully annotated consortium.
        for sub in ("images", "reports"):
            ours, full = list((out / site / sub).iterdir()), list((small_consortium / site / sub).iterdir())
            assert _digest(ours) == _digest(full)
        truth = f"truth/{site}.csv"
        assert (out / truth).read_bytes() == (small_consortium / truth).read_bytes()


def test_bad_annotation_options_are_refused_by_name(tmp_path: Path) -> None:
    done = _synth(tmp_path / "a", "--drawn-masks-sites", "site-a,site-z")
    assert done.returncode == 2 and "['site-z']" in done.stderr and "site-a, site-b" in done.stderr
    done = _synth(tmp_path / "b", "--drawn-masks", "1.5")
    assert done.returncode == 2 and "drawn_masks must be a fraction from 0 to 1, got 1.5" in done.stderr
