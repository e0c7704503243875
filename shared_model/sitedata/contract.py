"""The site data contract (docs/site-data.md): load one hospital's folder and judge its table.

`load_site` reads `site.yaml` and `patients.csv` and applies every check that can be made from the table
alone (values, identifiers, paths). It never opens an image, mask or report for reading: decoding is the job
of `shared_model.sitedata.check`, which builds on this module. It never writes anything either, and it never
follows a path that leaves the site folder, so a hostile or careless table cannot make it touch files outside
the site.

The contract's constants and records live in `shared_model.sitedata.records` and the `patients.csv` parser in
`shared_model.sitedata.rows`; this module re-exports every public name, so importers use it alone.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from shared_model.config.base import ConfigError
from shared_model.config.inputs import InputsConfig
from shared_model.naming import SITE_NAME_PATTERN, check_site_name
from shared_model.sitedata.records import (
    IDENTITY_COLUMNS,
    IMAGE_COLUMNS,
    MAX_REPORT_BYTES,
    MAX_TABLE_BYTES,
    OPTIONAL_COLUMNS,
    PATH_COLUMNS,
    PATIENT_ID_PATTERN,
    PATIENTS_FILE,
    PLAUSIBLE_SPACING_MM,
    REQUIRED_COLUMNS,
    SPLITS,
    VIEWS,
    Level,
    PatientRecord,
    Problem,
    Site,
    ViewFiles,
    _inside,
    describe_utf8_error,
    read_report_text,
    required_columns,
)
from shared_model.sitedata.rows import _read_patients

__all__ = [
    "IDENTITY_COLUMNS",
    "IMAGE_COLUMNS",
    "MAX_REPORT_BYTES",
    "MAX_TABLE_BYTES",
    "OPTIONAL_COLUMNS",
    "PATH_COLUMNS",
    "PATIENTS_FILE",
    "PATIENT_ID_PATTERN",
    "PLAUSIBLE_SPACING_MM",
    "REQUIRED_COLUMNS",
    "SITE_FILE",
    "SITE_NAME_PATTERN",
    "SITE_YAML_KEYS",
    "SPLITS",
    "VIEWS",
    "Level",
    "PatientRecord",
    "Problem",
    "Site",
    "ViewFiles",
    "coarse_count",
    "describe_utf8_error",
    "load_site",
    "read_report_text",
    "required_columns",
]

SITE_FILE = "site.yaml"
SITE_YAML_KEYS = ("name", "description", "contact", "public_patient_count", "inputs", "import")


def coarse_count(n: int) -> int:
    """`n` rounded up to two significant digits (413 -> 420, 2066 -> 2100): a public patient count.

    What `llnm-synth` declares as each site's ``public_patient_count``, and what a site that declares none
    derives at training time; a derived count is computed from the data, so the grid cell it reveals is outside
    the DP guarantee (docs/privacy.md says so and the site's ledger records the source).
    """
    if n <= 0:
        raise ValueError(f"no training patients (n={n})")
    step = 10 ** max(0, len(str(int(n))) - 2)
    return -(-int(n) // step) * step


def load_site(site_dir: str | os.PathLike[str], inputs: InputsConfig | None = None) -> Site:
    """Read a site folder's `site.yaml` and `patients.csv` and check the table against the contract.

    The table is judged against `inputs` (an experiment's `preprocess.inputs`) when given, else against what
    `site.yaml` declares under `inputs` (else the defaults: the paper's). With `inputs` given, everything it
    needs that the site's declaration lacks or encodes differently is an error of `site.yaml`.

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
    if inputs is not None:
        for column, reason in inputs.mismatches(site.declared_inputs or InputsConfig()):
            where = "" if site.declared_inputs is not None else " (it declares no inputs, so the defaults apply)"
            site.problems.append(Problem("error", SITE_FILE, None, f"inputs.{column}", reason + where))
        site.inputs = inputs
    elif site.declared_inputs is not None:
        site.inputs = site.declared_inputs
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
        error(f"must be a mapping of keys ({', '.join(SITE_YAML_KEYS)}), not a {type(data).__name__}")
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
        try:
            site.name = check_site_name(name)
        except ValueError as exc:
            error(f"{exc} (it names the site in every metric, log and run folder)", "name")
    description = data.get("description")
    if description is not None:
        site.description = str(description)
    if "inputs" in data:
        try:
            site.declared_inputs = InputsConfig.from_dict(data["inputs"], source="inputs")
        except ConfigError as exc:
            error(f"{exc}; see docs/site-data.md", "inputs")
    if "import" in data:
        record = data["import"]
        if isinstance(record, dict):
            site.provenance = dict(record)
        else:
            error(f"import must be a mapping (what an importer recorded), not a {type(record).__name__}", "import")
    if "public_patient_count" in data:
        count = data["public_patient_count"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            error(
                f"public_patient_count {count!r} must be a positive integer: the number of training patients the "
                "site declares public (patient-level DP-SGD is parameterised by it)",
                "public_patient_count",
            )
