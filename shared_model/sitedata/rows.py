"""`patients.csv` against the contract (docs/site-data.md): the header, then every row on its own.

Every cell is read as a string, so that values such as `1.0`, `abc` or an empty cell reach the validators
exactly as written and are judged here instead of being coerced silently by a CSV library. The standard
`csv` module is used rather than pandas because it reports each ragged row (wrong number of cells) with its
row number, so such a row can be left out and the rest still loaded. A bad row is reported and left out;
every other row still loads, so one broken record never hides the state of the rest of the site. No path
may leave the site folder, and no file is opened here except the table itself.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from shared_model.config.inputs import InputsConfig
from shared_model.sitedata.records import (
    IDENTITY_COLUMNS,
    IMAGE_COLUMNS,
    MAX_TABLE_BYTES,
    OPTIONAL_COLUMNS,
    PATH_COLUMNS,
    PATIENT_ID_PATTERN,
    PATIENTS_FILE,
    PLAUSIBLE_SPACING_MM,
    SPLITS,
    VIEWS,
    PatientRecord,
    Problem,
    Site,
    ViewFiles,
    _inside,
    describe_utf8_error,
    required_columns,
)
from shared_model.sitedata.table_paths import TableFiles, parse_paths


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
        size = path.stat().st_size
        if size > MAX_TABLE_BYTES:
            fatal(f"is {size / 2**20:.0f} MiB; the largest table read is {MAX_TABLE_BYTES // 2**20} MiB (some "
                  "300,000 patients): is this the right file?")
            return
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
    absent = _check_header(columns, problems, site)
    if absent is None:
        return

    seen: dict[str, tuple[int, str]] = {}  # patient_id -> (row, split) of its first valid-looking row
    files = TableFiles(site.root)
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
        record = _parse_row(site, values, row, seen, files, absent)
        if record is not None:
            site.patients.append(record)

    if site.rows == 0:
        fatal("has no patient rows", None)


def _check_header(columns: list[str], problems: list[Problem], site: Site) -> frozenset[str] | None:
    """Judge the header: the required columns it lacks, or None when its cells cannot be mapped to columns.

    A missing required column makes the site unusable, but the rows are still read and checked for
    everything else, so the operator sees all other problems in the same pass. Which columns are required
    depends on the inputs the table is judged against (`Site.inputs`).
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
    inputs = site.inputs
    required = required_columns(inputs)
    missing = [c for c in required if c not in columns]
    for name in missing:
        problems.append(Problem("error", PATIENTS_FILE, 1, name, "required column is missing"))
    declared = {v.name for v in (site.declared_inputs or InputsConfig()).clinical}
    unused = {"report"} if not inputs.reports else set()
    if not inputs.images:
        unused |= set(IMAGE_COLUMNS) | {c for c in OPTIONAL_COLUMNS if c.endswith("_spacing_mm")}
    known = set(required) | set(OPTIONAL_COLUMNS) | declared
    for name in columns:
        if name in unused and name not in missing:
            modality = "reports" if name == "report" else "images"
            problems.append(Problem("warning", PATIENTS_FILE, 1, name,
                                    f"ignored: the inputs declare {modality}: false"))
        elif name and name not in known and name not in unused:
            problems.append(Problem("warning", PATIENTS_FILE, 1, name, "unknown column, ignored"))
    return None if duplicates else frozenset(missing)


def _parse_row(
    site: Site,
    values: dict[str, str],
    row: int,
    seen: dict[str, tuple[int, str]],
    files: TableFiles,
    absent: frozenset[str],
) -> PatientRecord | None:
    """Judge one row; the record, or None when the row has an error (its problems are then recorded).

    Columns in `absent` (missing from the header, already reported once) are not judged cell by cell; a row
    lacking an identity or label column cannot become a record.
    """
    check = _RowChecker(site.problems, row, absent)
    if absent & set(IDENTITY_COLUMNS):
        check.failed = True

    inputs = site.inputs
    patient_id = _parse_patient_id(values["patient_id"], check)
    clinical = _parse_clinical(inputs, values, check)
    llnm, risk_stage = _parse_labels(values, check)
    split = _parse_split(values["split"], check)
    _check_unique_patient(patient_id, split, row, seen, check)
    columns = (("report",) if inputs.reports else ()) + (IMAGE_COLUMNS if inputs.images else ())
    paths = dict.fromkeys(PATH_COLUMNS, None) | parse_paths(files, values, columns, row, check)
    if inputs.images:
        views = {view: _parse_view(values, paths, view, check) for view in VIEWS}
    else:
        views = {view: ViewFiles() for view in VIEWS}

    if check.failed:
        return None
    return PatientRecord(
        patient_id=patient_id,
        clinical=clinical,
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


def _parse_clinical(inputs: InputsConfig, values: dict[str, str], check: _RowChecker) -> dict[str, float | str | None]:
    """Every clinical variable's value (None where missing); an invalid value is an error of its column."""
    out: dict[str, float | str | None] = {}
    for var in inputs.clinical:
        value, error, warning = var.parse(values.get(var.name, ""))
        if error is not None:
            check.error(var.name, error)
        if warning is not None:
            check.warning(var.name, warning)
        out[var.name] = value
    return out


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


def _to_float(text: str) -> float | None:
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None
