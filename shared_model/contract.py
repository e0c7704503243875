"""The site data contract (docs/site-data.md): load one hospital's folder and judge its table.

`load_site` reads `site.yaml` and `patients.csv` and applies every check that can be made from the table
alone (values, identifiers, paths). It never opens an image, mask or report for reading: decoding is the job
of `shared_model.site_check`, which builds on this module. It never writes anything either, and it never
follows a path that leaves the site folder, so a hostile or careless table cannot make it touch files outside
the site.

Every cell is read as a string, so that values such as `1.0`, `abc` or an empty cell reach the validators
exactly as written and are judged here instead of being coerced silently by a CSV library. The standard
`csv` module is used rather than pandas because it reports each ragged row (wrong number of cells) with its
row number, so such a row can be left out and the rest still loaded. A bad row is reported and left out;
every other row still loads, so one broken record never hides the state of the rest of the site.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Literal

import yaml

VIEWS: tuple[str, ...] = ("trans", "long")
SPLITS: tuple[str, ...] = ("train", "val", "test")

PATIENTS_FILE = "patients.csv"
SITE_FILE = "site.yaml"

#: Columns a table must have (a cell may still be empty where the contract allows a missing value).
REQUIRED_COLUMNS: tuple[str, ...] = (
    "patient_id",
    "age",
    "sex",
    "llnm",
    "split",
    "report",
    *(f"{view}_{kind}" for view in VIEWS for kind in ("image", "nodule_mask", "thyroid_mask")),
)
#: Columns a table may have.
OPTIONAL_COLUMNS: tuple[str, ...] = (
    "risk_stage",
    *(f"{view}_{axis}_spacing_mm" for view in VIEWS for axis in ("row", "col")),
)
#: Columns without which a row cannot become a patient record.
IDENTITY_COLUMNS: tuple[str, ...] = ("patient_id", "age", "sex", "llnm", "split")
#: Columns holding a path to a file inside the site folder.
PATH_COLUMNS: tuple[str, ...] = (
    "report",
    *(f"{view}_{kind}" for view in VIEWS for kind in ("image", "nodule_mask", "thyroid_mask")),
)

PATIENT_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
SITE_NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
SITE_YAML_KEYS = ("name", "description", "contact")
AGE_RANGE = (0.0, 120.0)
ADULT_AGE = 18.0
# Ultrasound pixels are a few hundredths to a few tenths of a millimetre; values far outside this range are
# almost always centimetres or micrometres typed into a millimetre column, so they are flagged (not refused).
PLAUSIBLE_SPACING_MM = (0.005, 2.0)

Level = Literal["error", "warning"]


@dataclass(frozen=True)
class Problem:
    """One finding about a site. `file` is relative to the site folder, `row` counts the header as row 1."""

    level: Level
    file: str
    row: int | None
    field: str | None
    message: str

    def to_dict(self) -> dict[str, object]:
        return {
            "level": self.level,
            "file": self.file,
            "row": self.row,
            "field": self.field,
            "message": self.message,
        }

    def format(self) -> str:
        """`LEVEL file:row field: message`, the one-line form the CLI prints."""
        where = self.file if self.row is None else f"{self.file}:{self.row}"
        column = f" {self.field}" if self.field else ""
        return f"{self.level.upper()} {where}{column}: {self.message}"


@dataclass(frozen=True)
class ViewFiles:
    """The files of one ultrasound view; `None` means the cell was empty (missing, never invented)."""

    image: Path | None = None
    nodule_mask: Path | None = None
    thyroid_mask: Path | None = None
    table_spacing_mm: tuple[float, float] | None = None  # (row, column) pixel size from the table

    @property
    def present(self) -> bool:
        """A view exists when its image does; masks without an image cannot be used."""
        return self.image is not None


@dataclass(frozen=True)
class PatientRecord:
    """One valid row of `patients.csv`. Paths are absolute (site root joined with the table's relative path).

    `views` always holds every name in `VIEWS`, so callers can index it without checking; a missing view has
    `image is None`.
    """

    patient_id: str
    age: float
    sex: str
    llnm: int | None
    risk_stage: int | None
    split: str
    report: Path | None
    views: dict[str, ViewFiles]
    row: int


@dataclass
class Site:
    """A loaded site: its valid patients and everything found wrong while loading it."""

    name: str
    root: Path
    patients: list[PatientRecord] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    description: str | None = None
    rows: int = 0  # data rows in patients.csv, including the ones left out because they were bad

    @property
    def usable(self) -> bool:
        return not any(p.level == "error" for p in self.problems)

    def relative(self, path: Path) -> str:
        """A path as the site operator wrote it: relative to the site folder, with forward slashes."""
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return str(path)


class _RowChecker:
    """Collects the problems of one table row, so a row is kept only when it has no error."""

    def __init__(self, problems: list[Problem], row: int, absent: frozenset[str] = frozenset()) -> None:
        self.problems = problems
        self.row = row
        self.absent = absent  # columns missing from the header: reported once there, not on every row
        self.failed = False

    def error(self, column: str | None, message: str) -> None:
        self.failed = True
        if column not in self.absent:
            self.problems.append(Problem("error", PATIENTS_FILE, self.row, column, message))

    def warning(self, column: str | None, message: str) -> None:
        if column not in self.absent:
            self.problems.append(Problem("warning", PATIENTS_FILE, self.row, column, message))


def load_site(site_dir: str | os.PathLike[str]) -> Site:
    """Read a site folder's `site.yaml` and `patients.csv` and check the table against the contract.

    Raises `FileNotFoundError`/`NotADirectoryError` only when `site_dir` itself is not a folder; everything
    wrong inside the folder becomes a `Problem` instead, so a caller always gets the full picture in one pass.
    """
    root = Path(site_dir).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"site folder {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"site folder {root} is not a folder")
    root = root.resolve()
    site = Site(name=root.name, root=root)
    _read_site_yaml(site)
    _read_patients(site)
    return site


# ------------------------------------------------------------------------------------------------ site.yaml


def _read_site_yaml(site: Site) -> None:
    path = site.root / SITE_FILE
    if not path.exists() and not path.is_symlink():
        return

    def error(message: str, column: str | None = None) -> None:
        site.problems.append(Problem("error", SITE_FILE, None, column, message))

    if not _inside(path, site.root):
        error("is a symbolic link leading outside the site folder")
        return
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        error(f"is not valid UTF-8 ({describe_utf8_error(exc)})")
        return
    except OSError as exc:
        error(f"cannot be read: {exc.strerror or exc}")
        return
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        error(f"is not valid YAML: {' '.join(str(exc).split())}")
        return
    if data is None:
        return
    if not isinstance(data, dict):
        error(f"must be a mapping of keys (name, description, contact), not a {type(data).__name__}")
        return
    for key in data:
        if key not in SITE_YAML_KEYS:
            site.problems.append(
                Problem(
                    "warning", SITE_FILE, None, str(key), f"unknown key (known: {', '.join(SITE_YAML_KEYS)})"
                )
            )
    if "name" in data:
        name = data["name"]
        if not isinstance(name, str) or not SITE_NAME_PATTERN.fullmatch(name):
            error(
                f"site name {name!r} must be 1-64 characters from A-Z a-z 0-9 . _ - "
                "(it names the site in every metric, log and run folder)",
                "name",
            )
        else:
            site.name = name
    description = data.get("description")
    if description is not None:
        site.description = str(description)


# --------------------------------------------------------------------------------------------- patients.csv


def _read_patients(site: Site) -> None:
    path = site.root / PATIENTS_FILE
    problems = site.problems

    def fatal(message: str, row: int | None = None, column: str | None = None) -> None:
        problems.append(Problem("error", PATIENTS_FILE, row, column, message))

    if not path.exists() and not path.is_symlink():
        fatal("is missing: every site needs a patients.csv (see docs/site-data.md)")
        return
    if not _inside(path, site.root):
        fatal("is a symbolic link leading outside the site folder")
        return
    if not path.is_file():
        fatal("is not a regular file")
        return
    try:
        raw = path.read_bytes()
    except OSError as exc:
        fatal(f"cannot be read: {exc.strerror or exc}")
        return
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (as Excel writes) is accepted and dropped
    except UnicodeDecodeError as exc:
        fatal(f"is not valid UTF-8 ({describe_utf8_error(exc)}); save it as UTF-8 CSV")
        return

    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
    except csv.Error as exc:
        fatal(f"is not a well-formed CSV file: {exc}", 1)
        return
    if header is None or not any(cell.strip() for cell in header):
        fatal("is empty: it needs a header row and one row per patient", 1)
        return
    columns = [cell.strip() for cell in header]
    absent = _check_header(columns, problems)
    if absent is None:
        return

    seen: dict[str, tuple[int, str]] = {}  # patient_id -> (row, split) of its first valid-looking row
    used: dict[Path, tuple[int, str]] = {}  # file -> (row, column) that first listed it
    row = 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            fatal(
                f"is not a well-formed CSV file after row {row}: {exc}; rows after it were not read", row + 1
            )
            break
        row += 1
        if not cells or (len(cells) == 1 and not cells[0].strip()):
            continue  # a blank line: nothing to load, but it still counts as a row, as in a spreadsheet
        site.rows += 1
        if len(cells) != len(columns):
            fatal(f"row has {len(cells)} cells but the header has {len(columns)} columns; row left out", row)
            continue
        values = dict.fromkeys(absent, "")  # an absent column reads as empty; its cells are not judged
        values.update((name, cell.strip()) for name, cell in zip(columns, cells, strict=True) if name)
        record = _parse_row(site, values, row, seen, used, absent)
        if record is not None:
            site.patients.append(record)

    if site.rows == 0:
        fatal("has no patient rows", None)


def _check_header(columns: list[str], problems: list[Problem]) -> frozenset[str] | None:
    """Judge the header: the required columns it lacks, or None when its cells cannot be mapped to columns.

    A missing required column makes the site unusable, but the rows are still read and checked for
    everything else, so the operator sees all other problems in the same pass.
    """
    if len(columns) == 1 and any(sep in columns[0] for sep in ";\t"):
        problems.append(
            Problem(
                "error",
                PATIENTS_FILE,
                1,
                None,
                f"header {columns[0][:60]!r} is one column: the file looks semicolon- or tab-separated, "
                "but patients.csv must be comma-separated",
            )
        )
        return None
    duplicates = sorted({c for c in columns if c and columns.count(c) > 1})
    for name in duplicates:
        problems.append(
            Problem("error", PATIENTS_FILE, 1, name, "column appears more than once in the header")
        )
    for index, name in enumerate(columns):
        if not name:
            problems.append(
                Problem("warning", PATIENTS_FILE, 1, None, f"column {index + 1} has no name; it is ignored")
            )
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    for name in missing:
        problems.append(Problem("error", PATIENTS_FILE, 1, name, "required column is missing"))
    known = set(REQUIRED_COLUMNS) | set(OPTIONAL_COLUMNS)
    for name in columns:
        if name and name not in known:
            problems.append(Problem("warning", PATIENTS_FILE, 1, name, "unknown column, ignored"))
    return None if duplicates else frozenset(missing)


def _parse_row(
    site: Site,
    values: dict[str, str],
    row: int,
    seen: dict[str, tuple[int, str]],
    used: dict[Path, tuple[int, str]],
    absent: frozenset[str],
) -> PatientRecord | None:
    """Judge one row; the record, or None when the row has an error (its problems are then recorded).

    Columns in `absent` (missing from the header, already reported once) are not judged cell by cell; a row
    lacking an identity or label column cannot become a record.
    """
    check = _RowChecker(site.problems, row, absent)
    if absent & set(IDENTITY_COLUMNS):
        check.failed = True

    patient_id = _parse_patient_id(values["patient_id"], check)
    age = _parse_age(values["age"], check)
    sex = _parse_sex(values["sex"], check)
    llnm, risk_stage = _parse_labels(values, check)
    split = _parse_split(values["split"], check)
    _check_unique_patient(patient_id, split, row, seen, check)
    paths = _parse_paths(site.root, values, row, used, check)
    views = {view: _parse_view(values, paths, view, check) for view in VIEWS}

    if check.failed:
        return None
    assert age is not None  # a row without a valid age has failed above
    return PatientRecord(
        patient_id=patient_id,
        age=age,
        sex=sex,
        llnm=llnm,
        risk_stage=risk_stage,
        split=split,
        report=paths["report"],
        views=views,
        row=row,
    )


def _parse_patient_id(patient_id: str, check: _RowChecker) -> str:
    if not patient_id:
        check.error("patient_id", "is empty")
    elif not PATIENT_ID_PATTERN.fullmatch(patient_id):
        check.error("patient_id", f"{patient_id!r} must be 1-64 characters from A-Z a-z 0-9 . _ -")
    return patient_id


def _parse_sex(sex: str, check: _RowChecker) -> str:
    if sex not in ("F", "M"):
        check.error("sex", f"{sex!r} must be F or M" if sex else "is empty (must be F or M)")
    return sex


def _parse_labels(values: dict[str, str], check: _RowChecker) -> tuple[int | None, int | None]:
    """The LLNM label (None: unlabelled) and the risk stage, which only a positive patient may have."""
    llnm = _parse_int_choice(values["llnm"], "llnm", (0, 1), check)
    if not values["llnm"]:
        check.warning("llnm", "is empty: unlabelled patient, used for inference only")
    risk_stage = None
    if values.get("risk_stage", ""):
        risk_stage = _parse_int_choice(values["risk_stage"], "risk_stage", (1, 2, 3), check)
        # An invalid llnm has been reported already; only judge the stage against a readable label.
        if risk_stage is not None and (llnm == 0 or not values["llnm"]):
            label = "llnm = 0" if llnm == 0 else "an unlabelled patient"
            check.error(
                "risk_stage", f"is {risk_stage} but a risk stage is only given for llnm = 1, not {label}"
            )
    return llnm, risk_stage


def _parse_split(split: str, check: _RowChecker) -> str:
    if split not in SPLITS:
        check.error(
            "split",
            f"{split!r} must be one of {', '.join(SPLITS)}"
            if split
            else f"is empty (must be one of {', '.join(SPLITS)})",
        )
    return split


def _check_unique_patient(
    patient_id: str, split: str, row: int, seen: dict[str, tuple[int, str]], check: _RowChecker
) -> None:
    """One row per patient: a repeated identifier is an error (worded as a split leak when the splits differ)."""
    if not (patient_id and PATIENT_ID_PATTERN.fullmatch(patient_id)):
        return
    if patient_id not in seen:
        seen[patient_id] = (row, split)
        return
    first_row, first_split = seen[patient_id]
    if split in SPLITS and first_split in SPLITS and split != first_split:
        check.error(
            "split",
            f"patient {patient_id} is in {split!r} here but in {first_split!r} at "
            f"row {first_row}: one patient must be in one split (otherwise it "
            "leaks between training and evaluation)",
        )
    else:
        check.error("patient_id", f"{patient_id} is duplicated (first at row {first_row}); row left out")


def _parse_paths(
    root: Path, values: dict[str, str], row: int, used: dict[Path, tuple[int, str]], check: _RowChecker
) -> dict[str, Path | None]:
    """Every path column of the row, resolved; a file listed before (in any row) is warned about."""
    paths = {column: _parse_path(root, values[column], column, check) for column in PATH_COLUMNS}
    for column, path in paths.items():
        if path is None:
            continue
        # One file listed twice is almost always a copy-paste slip in the table (two patients, one image).
        first = used.setdefault(path.resolve(), (row, column))
        if first != (row, column):
            check.warning(
                column,
                f"{values[column]!r} is also listed at row {first[0]} ({first[1]}): same file used twice",
            )
    return paths


def _parse_view(
    values: dict[str, str], paths: dict[str, Path | None], view: str, check: _RowChecker
) -> ViewFiles:
    """One view's files and table spacing; masks or spacing without an image, or an image without masks,
    are warned about."""
    spacing = _parse_spacing(values, view, check)
    image = paths[f"{view}_image"]
    nodule, thyroid = paths[f"{view}_nodule_mask"], paths[f"{view}_thyroid_mask"]
    if image is None and values[f"{view}_image"] == "":
        for kind, mask in (("nodule_mask", nodule), ("thyroid_mask", thyroid)):
            if mask is not None:
                check.warning(f"{view}_{kind}", f"mask given but the {view} view has no image; it is ignored")
        if spacing is not None:
            check.warning(f"{view}_row_spacing_mm", f"spacing given but the {view} view has no image")
    elif image is not None and (
        lacking := [k for k in ("nodule", "thyroid") if values[f"{view}_{k}_mask"] == ""]
    ):
        check.warning(f"{view}_{lacking[0]}_mask", f"the {view} image has no {' and no '.join(lacking)} mask")
    return ViewFiles(image=image, nodule_mask=nodule, thyroid_mask=thyroid, table_spacing_mm=spacing)


def _parse_age(text: str, check: _RowChecker) -> float | None:
    if not text:
        check.error("age", "is empty (years at ultrasound, 0-120)")
        return None
    number = _to_float(text)
    if number is None:
        check.error("age", f"{text!r} is not a number (years at ultrasound, 0-120)")
        return None
    low, high = AGE_RANGE
    if not low <= number <= high:
        check.error("age", f"{text} is outside {low:g}-{high:g} years")
        return None
    if number < ADULT_AGE:
        check.warning("age", f"{text} is under {ADULT_AGE:g}: the paper's cohort is adults")
    return number


def _parse_int_choice(text: str, column: str, choices: tuple[int, ...], check: _RowChecker) -> int | None:
    """An integer code; `1.0` is accepted as `1` because pandas writes integer columns with gaps that way."""
    if not text:
        return None
    number = _to_float(text)
    allowed = ", ".join(str(c) for c in choices[:-1]) + f" or {choices[-1]}"
    if number is None or not number.is_integer() or int(number) not in choices:
        check.error(column, f"{text!r} must be {allowed}")
        return None
    return int(number)


def _parse_spacing(values: dict[str, str], view: str, check: _RowChecker) -> tuple[float, float] | None:
    pair: list[float | None] = []
    columns = (f"{view}_row_spacing_mm", f"{view}_col_spacing_mm")
    for column in columns:
        text = values.get(column, "")
        if not text:
            pair.append(None)
            continue
        number = _to_float(text)
        if number is None or number <= 0:
            check.error(column, f"{text!r} must be a positive number of millimetres per pixel")
            pair.append(None)
            continue
        low, high = PLAUSIBLE_SPACING_MM
        if not low <= number <= high:
            check.warning(
                column,
                f"{text} mm per pixel is implausible for ultrasound "
                f"(expected {low:g}-{high:g} mm): is it in another unit?",
            )
        pair.append(number)
    given = [values.get(c, "") != "" for c in columns]
    if any(given) and not all(given):
        missing = columns[given.index(False)]
        check.error(missing, "is empty but the other spacing of this view is given: give both or neither")
        return None
    if pair[0] is None or pair[1] is None:
        return None
    return (pair[0], pair[1])


def _parse_path(root: Path, text: str, column: str, check: _RowChecker) -> Path | None:
    """Resolve a table path, refusing anything that is not a file inside the site folder.

    Absolute paths and `..` escapes are refused before the file system is touched at all; symbolic links are
    followed only to confirm they stay inside the site.
    """
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
    if not _inside(path, root):
        check.error(column, f"{text!r} is a symbolic link leading outside the site folder")
        return None
    if not path.exists():
        check.error(column, f"{text!r} does not exist")
        return None
    if not path.is_file():
        check.error(column, f"{text!r} is not a regular file")
        return None
    return path


# ------------------------------------------------------------------------------------------------- helpers


def _inside(path: Path, root: Path) -> bool:
    """Whether `path`, with every symbolic link followed, stays within `root` (already resolved)."""
    try:
        path.resolve().relative_to(root)
    except ValueError:
        return False
    except (OSError, RuntimeError):  # a link loop: treat as outside, it cannot be a valid file anyway
        return False
    return True


def _to_float(text: str) -> float | None:
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def describe_utf8_error(exc: UnicodeDecodeError) -> str:
    """Where the first non-UTF-8 byte is, in terms a person can find in an editor."""
    data = exc.object if isinstance(exc.object, bytes | bytearray) else b""
    line = data[: exc.start].count(b"\n") + 1
    bad = data[exc.start : exc.start + 1].hex()
    return f"byte 0x{bad} at line {line}, offset {exc.start}"
