"""The site data contract's vocabulary (docs/site-data.md): table columns, value ranges and the records.

Shared by the `patients.csv` parser (`shared_model.sitedata.rows`) and `shared_model.sitedata.contract.load_site`;
importers use `shared_model.sitedata.contract`, which re-exports every public name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from shared_model.config.inputs import InputsConfig

VIEWS: tuple[str, ...] = ("trans", "long")
SPLITS: tuple[str, ...] = ("train", "val", "test")

PATIENTS_FILE = "patients.csv"

#: Columns holding a path to the files of the image modality.
IMAGE_COLUMNS: tuple[str, ...] = tuple(
    f"{view}_{kind}" for view in VIEWS for kind in ("image", "nodule_mask", "thyroid_mask")
)
#: Columns holding a path to a file inside the site folder.
PATH_COLUMNS: tuple[str, ...] = ("report", *IMAGE_COLUMNS)
#: Columns without which a row cannot become a patient record.
IDENTITY_COLUMNS: tuple[str, ...] = ("patient_id", "llnm", "split")
#: Columns a table with the default inputs (the paper's: images, reports, age and sex) must have; a cell may
#: still be empty where the contract allows a missing value. `required_columns` gives them for any inputs.
REQUIRED_COLUMNS: tuple[str, ...] = ("patient_id", "age", "sex", "llnm", "split", *PATH_COLUMNS)
#: Columns a table may have (with images: the pixel spacing of PNG/JPEG views).
OPTIONAL_COLUMNS: tuple[str, ...] = (
    "risk_stage",
    *(f"{view}_{axis}_spacing_mm" for view in VIEWS for axis in ("row", "col")),
)


def required_columns(inputs: InputsConfig) -> tuple[str, ...]:
    """The columns a table must have for `inputs`: identity and label, one per clinical variable, then the
    report column when reports exist and the image and mask columns when images do."""
    return (
        "patient_id",
        *(v.name for v in inputs.clinical),
        "llnm",
        "split",
        *(("report",) if inputs.reports else ()),
        *(IMAGE_COLUMNS if inputs.images else ()),
    )

PATIENT_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Size limits, so that a wrong file (a database export, an image saved as a report) is a clear error and not an
# out-of-memory crash. A table row is about 200 bytes, so the table limit is some 300,000 patients; a radiology
# report is a few kilobytes.
MAX_TABLE_BYTES = 64 * 2**20
MAX_REPORT_BYTES = 2**20
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
    clinical: dict[str, float | str | None]  # every clinical variable of the inputs: its value, None if missing
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
    #: What the table is judged against: the caller's inputs (an experiment's), else the site's declaration.
    inputs: InputsConfig = field(default_factory=InputsConfig)
    #: What `site.yaml` declares (None: it declares nothing, i.e. the default inputs).
    declared_inputs: InputsConfig | None = None
    #: `site.yaml`'s `import` record (how an importer made this site), kept as written.
    provenance: dict[str, object] | None = None

    @property
    def usable(self) -> bool:
        return not any(p.level == "error" for p in self.problems)

    def relative(self, path: Path) -> str:
        """A path as the site operator wrote it: relative to the site folder, with forward slashes."""
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return str(path)


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


def describe_utf8_error(exc: UnicodeDecodeError) -> str:
    """Where the first non-UTF-8 byte is, in terms a person can find in an editor."""
    data = exc.object if isinstance(exc.object, bytes | bytearray) else b""
    line = data[: exc.start].count(b"\n") + 1
    bad = data[exc.start : exc.start + 1].hex()
    return f"byte 0x{bad} at line {line}, offset {exc.start}"


def read_report_text(path: Path) -> str:
    """A report file's text (UTF-8, a byte-order mark dropped).

    Raises:
        OSError: it cannot be read.
        ValueError: it is larger than ``MAX_REPORT_BYTES`` (checked before reading) or not UTF-8; the message
            says which and where.
    """
    size = path.stat().st_size
    if size > MAX_REPORT_BYTES:
        raise ValueError(f"is {size / 2**20:.1f} MiB; a report is at most {MAX_REPORT_BYTES // 2**20} MiB of text "
                         "here (is this the right file?)")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"is not valid UTF-8 ({describe_utf8_error(exc)}); save the report as UTF-8 text") from None
