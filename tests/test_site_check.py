"""`llnm-site check` against a real generated consortium and deliberately broken copies of its sites.

The consortium is the session's shared one (conftest `small_consortium`, written by the real `llnm-synth`
console script). Every broken copy is made in the test's own temporary folder; each test asserts that the
check reports the damage with the right file, row and field, still checks the other patients, and leaves
every byte of the site folder as it was.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from fl_client.cli import main as llnm_site_main
from shared_model.sitedata.check import check_site
from shared_model.sitedata.contract import REQUIRED_COLUMNS, load_site

BIN = Path(sys.executable).parent
SITES = [f"site-{letter}" for letter in "abcdefg"]


def _script(name: str) -> str:
    """The installed console script (the venv's, beside this interpreter)."""
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"console script {name} is not installed (run `make venv`)")
    return found


@pytest.fixture(scope="module")
def consortium(small_consortium: Path) -> Path:
    for name in SITES:
        assert (small_consortium / name / "patients.csv").is_file(), f"llnm-synth wrote no {name}/patients.csv"
    return small_consortium


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file plus every folder name: any write, new file or deletion changes it."""
    state: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        base = Path(dirpath)
        for d in dirnames:
            state[(base / d).relative_to(folder).as_posix() + "/"] = "dir"
        for f in filenames:
            path = base / f
            state[path.relative_to(folder).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def read_table(site: Path) -> tuple[list[str], list[dict[str, str]]]:
    with (site / "patients.csv").open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def write_table(site: Path, header: list[str], rows: list[dict[str, str]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    (site / "patients.csv").write_text(buffer.getvalue(), encoding="utf-8")


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """The `llnm-site` entry point in-process (the same code path as the console script, minus start-up)."""
    capsys.readouterr()
    rc = llnm_site_main(args)
    return rc, capsys.readouterr().out


def run_cli_err(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    rc = llnm_site_main(args)
    return rc, capsys.readouterr().err


# -------------------------------------------------------------------------------------- the clean consortium


def test_every_generated_site_passes(consortium: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every site of the generated consortium passes the deep check (every file decoded), with a summary that
    counts what the table lists. In process for the JSON form (the console script's code path, minus
    start-up); the installed console script itself for the human-readable form on one site."""
    before = snapshot(consortium)
    for name in SITES:
        site = consortium / name
        rc, out = run_cli(["check", str(site), "--json"], capsys)
        report = json.loads(out)
        assert rc == 0, f"{name}: exit {rc}\n{out[-3000:]}"
        _, rows = read_table(site)
        summary = report["summary"]
        assert report["usable"] is True and report["deep"] is True
        assert report["site"] == name
        assert not [p for p in report["problems"] if p["level"] == "error"]
        assert summary["rows"] == summary["patients"] == len(rows)
        assert summary["labels"]["positive"] == sum(r["llnm"] == "1" for r in rows)
        assert summary["labels"]["negative"] == sum(r["llnm"] == "0" for r in rows)
        for split in ("train", "val", "test"):
            assert summary["splits"][split]["patients"] == sum(r["split"] == split for r in rows)
        for view in ("trans", "long"):
            listed = sum(r[f"{view}_image"] != "" for r in rows)
            assert summary["images"][view] == {"listed": listed, "readable": listed}
            assert summary["missing"][f"{view}_image"] == len(rows) - listed
        decoded = summary["images"]["trans"]["readable"] + summary["images"]["long"]["readable"]
        assert sum(entry["count"] for entry in summary["image_sizes"]) == decoded
        assert sum(summary["spacing_sources"].values()) == decoded
    # The human-readable form, through the real console script, on one site.
    done = subprocess.run(
        [_script("llnm-site"), "check", str(consortium / "site-a")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "USABLE" in done.stdout and "NOT USABLE" not in done.stdout
    assert "\x1b[" not in done.stdout  # piped output carries no terminal escapes
    assert snapshot(consortium) == before


def test_quick_mode_checks_the_table_only(consortium: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = run_cli(["check", str(consortium / "site-b"), "--quick", "--json"], capsys)
    report = json.loads(out)
    assert rc == 0
    assert report["deep"] is False
    assert report["summary"]["images"]["trans"]["readable"] is None
    assert "image_sizes" not in report["summary"]


def test_missing_site_folder_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = run_cli_err(["check", str(tmp_path / "nowhere")], capsys)
    assert rc == 2 and "does not exist" in err
    (tmp_path / "file.txt").write_text("x")
    rc, err = run_cli_err(["check", str(tmp_path / "file.txt")], capsys)
    assert rc == 2 and "not a folder" in err


# ------------------------------------------------------------------------------------------ broken copies


@dataclass
class Expect:
    """Where the check must report the damage, and how many rows it must leave out."""

    file: str
    row: int | None
    field: str | None
    rows_left_out: int = 0
    level: str = "error"
    text: str = ""  # a fragment the message must contain (case-insensitive)
    also: tuple[tuple[str, int, str], ...] = ()  # further (file, row, field) errors that must be reported


class SiteCopy:
    """A private copy of one generated site, with helpers to find and break a patient's files."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.header, self.rows = read_table(root)

    def find(self, predicate: Callable[[dict[str, str]], bool]) -> int:
        """The first patient the predicate accepts; the seeded consortium always has one, so none is a bug."""
        matches = [i for i, r in enumerate(self.rows) if predicate(r)]
        assert matches, f"{self.root.name}: the generated site has no patient of the kind this case needs"
        return matches[0]

    def with_dicom(self, view: str = "trans") -> int:
        return self.find(
            lambda r: r[f"{view}_image"].lower().endswith(".dcm") and r[f"{view}_nodule_mask"] != ""
        )

    def with_png_mask(self, kind: str = "trans_nodule_mask") -> int:
        return self.find(
            lambda r: r[kind].lower().endswith(".png") and r[kind.split("_")[0] + "_image"] != ""
        )

    def with_report(self) -> int:
        return self.find(lambda r: r["report"] != "")

    @staticmethod
    def table_row(index: int) -> int:
        return index + 2  # the header is row 1

    def path(self, index: int, column: str) -> Path:
        return self.root / self.rows[index][column]

    def save(self) -> None:
        write_table(self.root, self.header, self.rows)


def _truncated_dicom(s: SiteCopy) -> Expect:
    i = s.with_dicom()
    p = s.path(i, "trans_image")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return Expect(s.rows[i]["trans_image"], s.table_row(i), "trans_image")


def _garbage_dicom(s: SiteCopy) -> Expect:
    i = s.with_dicom()
    s.path(i, "trans_image").write_bytes(np.random.default_rng(0).bytes(5000))
    return Expect(s.rows[i]["trans_image"], s.table_row(i), "trans_image", text="not a DICOM")


def _dicom_without_pixels(s: SiteCopy) -> Expect:
    i = s.with_dicom("long")
    p = s.path(i, "long_image")
    ds = pydicom.dcmread(p)
    del ds.PixelData
    ds.save_as(p)
    return Expect(s.rows[i]["long_image"], s.table_row(i), "long_image", text="no pixel data")


def _dicom_undecodable_syntax(s: SiteCopy) -> Expect:
    from pydicom.encaps import encapsulate
    from pydicom.pixels import get_decoder
    from pydicom.uid import MPEG2MPML

    with pytest.raises(NotImplementedError):  # the premise: nothing installed here decodes MPEG-2 video
        get_decoder(MPEG2MPML)
    i = s.with_dicom()
    p = s.path(i, "trans_image")
    ds = pydicom.dcmread(p)
    ds.PixelData = encapsulate([bytes(ds.PixelData)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.save_as(p, enforce_file_format=True)
    return Expect(s.rows[i]["trans_image"], s.table_row(i), "trans_image", text="decoder")


def _mask_wrong_size(s: SiteCopy) -> Expect:
    i = s.with_png_mask()
    p = s.path(i, "trans_nodule_mask")
    with Image.open(p) as img:
        mask = np.asarray(img)
    Image.fromarray(np.ascontiguousarray(mask[:-7, :-5])).save(p)
    return Expect(s.rows[i]["trans_nodule_mask"], s.table_row(i), "trans_nodule_mask", text="but its image")


def _mask_empty(s: SiteCopy) -> Expect:
    i = s.with_png_mask("long_thyroid_mask")
    p = s.path(i, "long_thyroid_mask")
    with Image.open(p) as img:
        mask = np.asarray(img)
    Image.fromarray(np.zeros_like(mask)).save(p)
    return Expect(s.rows[i]["long_thyroid_mask"], s.table_row(i), "long_thyroid_mask", text="empty")


def _mask_unreadable(s: SiteCopy) -> Expect:
    i = s.with_png_mask("trans_thyroid_mask")
    p = s.path(i, "trans_thyroid_mask")
    p.write_bytes(p.read_bytes()[:40])  # a PNG signature and a cut-off header
    return Expect(s.rows[i]["trans_thyroid_mask"], s.table_row(i), "trans_thyroid_mask")


def _report_huge(s: SiteCopy) -> Expect:
    import os

    i = s.with_report()
    os.truncate(s.path(i, "report"), 3 * 2**20)  # sparse: 3 MiB on paper, no disk used
    return Expect(s.rows[i]["report"], s.table_row(i), "report", text="a report is at most 1 MiB")


def _report_latin1(s: SiteCopy) -> Expect:
    i = s.with_report()
    s.path(i, "report").write_bytes("Nodule hypoéchogène, 8 mm, lobe droit.".encode("latin-1"))
    return Expect(s.rows[i]["report"], s.table_row(i), "report", text="utf-8")


def _report_empty(s: SiteCopy) -> Expect:
    i = s.with_report()
    s.path(i, "report").write_bytes(b"  \n")
    return Expect(s.rows[i]["report"], s.table_row(i), "report", level="warning", text="empty")


def _missing_column(s: SiteCopy) -> Expect:
    s.header.remove("sex")
    for row in s.rows:
        del row["sex"]
    s.rows[4]["age"] = "old"  # rows are still checked for everything else
    s.save()
    # Without a sex column no row can become a patient record, but every row is still read and judged.
    return Expect(
        "patients.csv",
        1,
        "sex",
        rows_left_out=len(s.rows),
        text="required column",
        also=(("patients.csv", s.table_row(4), "age"),),
    )


def _cell(column: str, value: str, text: str = "", pick: int = 3) -> Callable[[SiteCopy], Expect]:
    def breaker(s: SiteCopy) -> Expect:
        s.rows[pick][column] = value
        s.save()
        return Expect("patients.csv", s.table_row(pick), column, rows_left_out=1, text=text)

    breaker.__name__ = "_" + re.sub(r"[^A-Za-z0-9]+", "_", f"cell_{column}_{value}")
    return breaker


def _duplicate_id(s: SiteCopy) -> Expect:
    first, second = s.rows[1], s.rows[5]
    second["patient_id"] = first["patient_id"]
    second["split"] = first["split"]
    s.save()
    return Expect("patients.csv", s.table_row(5), "patient_id", rows_left_out=1, text="duplicated")


def _two_splits(s: SiteCopy) -> Expect:
    first, second = s.rows[1], s.rows[6]
    second["patient_id"] = first["patient_id"]
    second["split"] = "test" if first["split"] != "test" else "train"
    s.save()
    return Expect("patients.csv", s.table_row(6), "split", rows_left_out=1, text="one split")


def _stage_for_negative(s: SiteCopy) -> Expect:
    i = s.find(lambda r: r["llnm"] == "0")
    s.rows[i]["risk_stage"] = "2"
    if "risk_stage" not in s.header:
        s.header.append("risk_stage")
    s.save()
    return Expect("patients.csv", s.table_row(i), "risk_stage", rows_left_out=1, text="llnm = 0")


def _missing_file(s: SiteCopy) -> Expect:
    i = s.find(lambda r: r["long_image"] != "")
    s.path(i, "long_image").unlink()
    return Expect("patients.csv", s.table_row(i), "long_image", rows_left_out=1, text="does not exist")


def _symlink_outside(s: SiteCopy) -> Expect:
    i = s.with_dicom()
    p = s.path(i, "trans_image")
    p.unlink()
    p.symlink_to(Path(sys.executable).resolve())
    return Expect("patients.csv", s.table_row(i), "trans_image", rows_left_out=1, text="outside")


def _folder_symlink_outside(s: SiteCopy) -> Expect:
    """A regular file reached through a linked folder that leads outside the site (each folder is resolved once
    for all the files in it, so this is the check that must still refuse it)."""
    i = s.with_dicom()
    image = s.path(i, "trans_image")
    outside = s.root.parent / "elsewhere"
    outside.mkdir()
    shutil.copy(image, outside / image.name)
    (s.root / "linked").symlink_to(outside, target_is_directory=True)
    s.rows[i]["trans_image"] = f"linked/{image.name}"
    s.save()
    return Expect("patients.csv", s.table_row(i), "trans_image", rows_left_out=1, text="outside")


def _ragged_row(s: SiteCopy) -> Expect:
    text = (s.root / "patients.csv").read_text(encoding="utf-8").splitlines()
    text[3] = text[3] + ",surplus,cells"
    (s.root / "patients.csv").write_text("\n".join(text) + "\n", encoding="utf-8")
    return Expect("patients.csv", 4, None, rows_left_out=1, text="cells")


CORRUPTIONS: list[Callable[[SiteCopy], Expect]] = [
    _truncated_dicom,
    _garbage_dicom,
    _dicom_without_pixels,
    _dicom_undecodable_syntax,
    _mask_wrong_size,
    _mask_empty,
    _mask_unreadable,
    _report_latin1,
    _report_huge,
    _missing_column,
    _cell("age", "forty", "not a number"),
    _cell("age", "200", "outside"),
    _cell("age", "-3", "outside"),
    _cell("llnm", "2", "0 or 1"),
    _cell("sex", "female", "F or M"),
    _cell("split", "training", "train, val, test"),
    _cell("patient_id", "P 1/..", "characters"),
    _cell("risk_stage", "4", "1, 2 or 3"),
    _cell("report", "../../etc/passwd", "outside the site"),
    _cell("trans_image", "/etc/passwd", "absolute"),
    _cell("trans_nodule_mask", "masks/does_not_exist.png", "does not exist"),
    _duplicate_id,
    _two_splits,
    _stage_for_negative,
    _missing_file,
    _symlink_outside,
    _folder_symlink_outside,
    _ragged_row,
]


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__.strip("_"))
def test_broken_site_is_reported_precisely(
    consortium: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    corrupt: Callable[[SiteCopy], Expect],
) -> None:
    site = tmp_path / "site"
    shutil.copytree(consortium / "site-f", site, symlinks=True)  # a small site keeps each case fast
    copy = SiteCopy(site)
    total = len(copy.rows)
    expect = corrupt(copy)
    before = snapshot(site)

    rc, out = run_cli(["check", str(site), "--json"], capsys)

    assert snapshot(site) == before, "the check changed the site folder"
    report = json.loads(out)
    assert rc == 1 and report["usable"] is False
    matches = [
        p
        for p in report["problems"]
        if p["level"] == expect.level
        and p["file"] == expect.file
        and p["row"] == expect.row
        and p["field"] == expect.field
        and expect.text.lower() in p["message"].lower()
    ]
    assert matches, f"expected {expect} among:\n" + "\n".join(map(str, report["problems"]))
    for file, row, column in expect.also:
        assert any((p["file"], p["row"], p["field"]) == (file, row, column) for p in report["problems"])
    # The other patients were still read, loaded and their files decoded.
    summary = report["summary"]
    assert summary["rows"] == total
    assert summary["patients"] == total - expect.rows_left_out
    assert summary["rows_left_out"] == expect.rows_left_out
    decoded = summary["images"]["trans"]["readable"] + summary["images"]["long"]["readable"]
    listed = summary["images"]["trans"]["listed"] + summary["images"]["long"]["listed"]
    broken_image = expect.field in ("trans_image", "long_image") and expect.file != "patients.csv"
    assert decoded == listed - (1 if broken_image else 0)
    if expect.field and expect.field.endswith("_mask") and expect.file != "patients.csv":
        mask = summary["masks"][expect.field]
        assert mask["readable"] == mask["listed"] - 1


def test_report_not_utf8_is_an_error_but_empty_report_only_a_warning(
    consortium: Path, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    shutil.copytree(consortium / "site-c", site)
    copy = SiteCopy(site)
    expect = _report_empty(copy)
    report = check_site(site)
    assert report.usable, [p.format() for p in report.errors]
    assert any(
        p.level == "warning" and p.file == expect.file and p.row == expect.row and p.field == "report"
        for p in report.problems
    )
    assert report.summary["reports"]["readable"] == report.summary["reports"]["listed"] - 1


def test_missing_modalities_are_allowed_and_counted(
    consortium: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = tmp_path / "site"
    shutil.copytree(consortium / "site-d", site)
    copy = SiteCopy(site)
    rows = [dict(r) for r in copy.rows]
    baseline = {c: sum(r[c] == "" for r in rows) for c in ("report", "long_image", "trans_thyroid_mask")}
    a = copy.find(lambda r: r["report"] != "")
    b = copy.find(lambda r: r["long_image"] != "")
    c = copy.find(lambda r: r["trans_thyroid_mask"] != "" and r["trans_image"] != "")
    copy.rows[a]["report"] = ""
    for kind in ("long_image", "long_nodule_mask", "long_thyroid_mask"):
        copy.rows[b][kind] = ""
    copy.rows[c]["trans_thyroid_mask"] = ""
    copy.save()
    before = snapshot(site)

    rc, out = run_cli(["check", str(site), "--json"], capsys)

    assert snapshot(site) == before
    report = json.loads(out)
    assert rc == 0, [p for p in report["problems"] if p["level"] == "error"]
    missing = report["summary"]["missing"]
    for column, count in baseline.items():  # each emptied cell was filled before
        assert missing[column] == count + 1
    assert report["summary"]["patients"] == len(rows)
    assert any(  # an image without its thyroid mask is worth a warning, not an error
        p["level"] == "warning" and p["row"] == c + 2 and p["field"] == "trans_thyroid_mask"
        for p in report["problems"]
    )


def test_text_report_lists_every_problem_on_one_line(
    consortium: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = tmp_path / "site"
    shutil.copytree(consortium / "site-g", site)
    copy = SiteCopy(site)
    copy.rows[2]["age"] = "200"
    copy.rows[3]["sex"] = "x"
    copy.save()
    rc, out = run_cli(["check", str(site)], capsys)
    assert rc == 1
    lines = out.splitlines()
    assert "NOT USABLE: 2 error(s)" in lines[1]
    assert "ERROR patients.csv:4 age: 200 is outside 0-120 years" in lines
    assert "ERROR patients.csv:5 sex: 'x' must be F or M" in lines
    assert any(line.startswith("train ") for line in lines)  # the per-split label table


def test_load_site_keeps_good_rows_and_never_invents_files(consortium: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    shutil.copytree(consortium / "site-e", site)
    copy = SiteCopy(site)
    copy.rows[0]["age"] = "abc"
    copy.rows[2]["trans_image"] = ""
    copy.save()
    loaded = load_site(site)
    assert not loaded.usable
    assert len(loaded.patients) == len(copy.rows) - 1
    assert [p.row for p in loaded.patients][:2] == [3, 4]
    third = next(p for p in loaded.patients if p.row == 4)
    assert third.views["trans"].image is None and not third.views["trans"].present
    for patient in loaded.patients:
        assert set(patient.views) == {"trans", "long"}
        for files in patient.views.values():
            for path in (files.image, files.nodule_mask, files.thyroid_mask):
                assert path is None or (path.is_file() and path.resolve().is_relative_to(loaded.root))


def test_csv_that_is_not_utf8_or_not_csv(tmp_path: Path) -> None:
    header = ",".join(REQUIRED_COLUMNS)
    site = tmp_path / "latin"
    site.mkdir()
    (site / "patients.csv").write_bytes(f"{header}\nP\u00e91,40,F,1,train,,,,,,,\n".encode("latin-1"))
    report = check_site(site)
    assert not report.usable
    assert [(p.file, p.field) for p in report.errors] == [("patients.csv", None)]
    assert "UTF-8" in report.errors[0].message and "line 2" in report.errors[0].message

    site = tmp_path / "quote"
    site.mkdir()
    (site / "patients.csv").write_text(f'{header}\nP1,40,F,1,train,,,,,,,\nP2,"41,F,1,train,,,,,,,\n')
    report = check_site(site)
    assert not report.usable and report.summary["patients"] == 1  # the row before the damage still loads
    assert any("well-formed" in p.message for p in report.errors)

    site = tmp_path / "huge"
    site.mkdir()
    (site / "patients.csv").write_text(f"{header}\nP1,40,F,1,train,,,,,,,\n")
    os.truncate(site / "patients.csv", 65 * 2**20)  # a sparse 65 MiB file: refused before it is read
    report = check_site(site)
    assert not report.usable and [(p.file, p.row) for p in report.errors] == [("patients.csv", None)]
    assert "65 MiB" in report.errors[0].message and "64 MiB" in report.errors[0].message

    site = tmp_path / "site.yaml-only"
    site.mkdir()
    (site / "site.yaml").write_text("name: hospital-x\n")
    report = check_site(site)
    assert report.site == "hospital-x"
    assert any(p.file == "patients.csv" and "missing" in p.message for p in report.errors)
