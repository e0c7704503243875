"""UCI "Differentiated Thyroid Cancer Recurrence" (Borzooei & Tarokhian 2023, CC BY 4.0) as site folders.

383 real patients, one CSV row each. The label is LLNM = N1b (lateral or mediastinal neck nodes) against
N0 and N1a. Only the pre-operative variables become inputs (`UCI_VARIABLES`): Pathology, Focality, Risk, T,
N, M, Stage, Response and Recurred come from surgery or follow-up, or are derived from the N stage, so they are
never inputs. There are no images or reports: the inputs declare both absent.

The data set has 19 rows identical to another row in every column; they are kept (they are distinct patients
in the source) but grouped, so identical records always fall in the same site and the same split.
"""

from __future__ import annotations

import csv
from pathlib import Path

from fl_research.importers.common import ImportResult, SitePatient, SourceError
from shared_model.config.inputs import ClinicalVariable, InputsConfig

DATA_FILE = "Thyroid_Diff.csv"
_YES_NO = ["No", "Yes"]
#: (source column, variable): the pre-operative predictors, in the source's spelling of their levels.
UCI_VARIABLES: tuple[tuple[str, dict[str, object]], ...] = (
    ("Age", {"name": "age", "kind": "numeric", "description": "age at diagnosis", "unit": "years",
             "range": (0.0, 120.0), "center": 45.0, "scale": 15.0, "required": True}),
    ("Gender", {"name": "sex", "kind": "categorical", "levels": ["F", "M"], "required": True}),
    ("Smoking", {"name": "smoking", "kind": "categorical", "levels": _YES_NO, "description": "current smoker"}),
    ("Hx Smoking", {"name": "hx_smoking", "kind": "categorical", "levels": _YES_NO,
                    "description": "history of smoking"}),
    ("Hx Radiothreapy", {"name": "hx_radiotherapy", "kind": "categorical", "levels": _YES_NO,
                         "description": "history of radiotherapy"}),
    ("Thyroid Function", {"name": "thyroid_function", "kind": "categorical", "description": "thyroid function",
                          "levels": ["Euthyroid", "Clinical Hyperthyroidism", "Subclinical Hyperthyroidism",
                                     "Clinical Hypothyroidism", "Subclinical Hypothyroidism"]}),
    ("Physical Examination", {"name": "physical_examination", "kind": "categorical",
                              "description": "physical examination of the thyroid",
                              "levels": ["Normal", "Single nodular goiter-left", "Single nodular goiter-right",
                                         "Multinodular goiter", "Diffuse goiter"]}),
    ("Adenopathy", {"name": "adenopathy", "kind": "categorical",
                    "description": "clinically enlarged neck lymph nodes on examination",
                    "levels": ["No", "Right", "Left", "Bilateral", "Posterior", "Extensive"]}),
)
#: Columns that are never inputs: post-operative, follow-up, or derived from the N stage (the label).
EXCLUDED = ("Pathology", "Focality", "Risk", "T", "N", "M", "Stage", "Response", "Recurred")
LABEL_COLUMN = "N"
LABELS = {"N1b": 1, "N0": 0, "N1a": 0}


def uci_inputs() -> InputsConfig:
    return InputsConfig(
        images=False, reports=False,
        clinical=[ClinicalVariable.model_validate(spec) for _, spec in UCI_VARIABLES],
        outcome="lateral lymph node metastasis (LLNM): N1b against N0/N1a (UCI DTC)",
    )


def read_uci_dtc(source: Path) -> ImportResult:
    """Every row of `source/Thyroid_Diff.csv` (or `source` itself, the CSV) as a patient, or counted as not
    expressible with its reason."""
    path = source / DATA_FILE if source.is_dir() else source
    if not path.is_file():
        raise SourceError(f"{path}: not found (the UCI DTC data set is one CSV file, {DATA_FILE})")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"{path}: cannot be read as UTF-8 CSV: {exc}") from None
    reader = csv.DictReader(text.splitlines())
    needed = [column for column, _ in UCI_VARIABLES] + [LABEL_COLUMN]
    missing = [c for c in needed if c not in (reader.fieldnames or [])]
    if missing:
        raise SourceError(f"{path}: column(s) {missing} missing; found {reader.fieldnames}")
    inputs = uci_inputs()
    result = ImportResult(
        dataset="uci-dtc", source=path.parent if not source.is_dir() else source, inputs=inputs, patients=[],
        source_files=[path], class_names=("N0/N1a", "N1b"),
        description="Simulated hospital from the UCI Differentiated Thyroid Cancer Recurrence data set "
                    "(Borzooei & Tarokhian 2023, doi:10.24432/C5632J, CC BY 4.0): clinical variables only",
    )
    for number, record in enumerate(reader, start=2):
        result.records_read += 1
        label = LABELS.get((record.get(LABEL_COLUMN) or "").strip())
        if label is None:
            result.not_expressed[f"N stage {record.get(LABEL_COLUMN)!r} is not N0, N1a or N1b"] += 1
            continue
        row: dict[str, str] = {"patient_id": f"uci-{number:04d}", "llnm": str(label)}
        problems = []
        for (column, _), var in zip(UCI_VARIABLES, inputs.clinical, strict=True):
            cell = (record.get(column) or "").strip()
            value, error, _warning = var.parse(cell)
            if error is not None:
                problems.append(f"{column} {error}")
            row[var.name] = "" if value is None else (f"{value:g}" if isinstance(value, float) else str(value))
        if problems:
            result.not_expressed[f"a value outside the declared variables ({problems[0]})"] += 1
            continue
        # Identical records (every column, excluded ones too) stay together in every split.
        group = "|".join((record.get(c) or "").strip() for c in reader.fieldnames or [])
        result.patients.append(SitePatient(f"uci-{number:04d}", row, label, group))
    return result
