"""What a consortium's patients bring: which modalities exist, and which clinical variables the table holds.

An `InputsConfig` is declared twice with the same schema: by each site in `site.yaml` (what its table holds)
and by the coordinator under `preprocess.inputs` of the experiment (what the model uses; it travels in every
round's preprocessing config). The defaults are the paper's: two ultrasound views, the radiology report, and
the clinical variables age and sex.

Each clinical variable is one column of `patients.csv` named like the variable and one token of the model:

* numeric (with its unit and allowed range): ``(value - center) / scale``, with the same constants at every
  site (a site's own mean would leak site statistics and make one patient look different at two sites);
* categorical (with its levels): the level's index; a two-level variable is one 0/1 indicator (as sex has
  always been), a variable with more levels is one-hot encoded into its token.

An empty cell is *missing*: the model puts the variable's learned placeholder token there, never an invented
value (unless the variable is ``required``, when an empty cell is an error).

A modality may be absent by design (``images: false`` or ``reports: false``): the site's table then needs no
column for it, `llnm-site check` does not ask for it, and the model builds no pathway for it.
"""

from __future__ import annotations

import math
import re
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from shared_model.config.base import Float, Schema

__all__ = [
    "IMAGE_SCALARS",
    "PAPER_CLINICAL",
    "RESERVED_NAMES",
    "ClinicalVariable",
    "InputsConfig",
]

#: Per-view measurements made from the image and its masks when images are used, after the clinical variables
#: (see `shared_model.sitedata.tensors`): shape ratio, echogenicity, capsule distance, size and position along
#: the gland.
IMAGE_SCALARS: tuple[str, ...] = (
    "shape_ratio", "echogenicity", "capsule_distance", "nodule_size", "nodule_position",
)
#: Names a clinical variable cannot take: the contract's own columns and the image measurements' tokens.
RESERVED_NAMES: frozenset[str] = frozenset({
    "patient_id", "llnm", "risk_stage", "split", "report",
    *(f"{v}_{k}" for v in ("trans", "long") for k in ("image", "nodule_mask", "thyroid_mask")),
    *(f"{v}_{a}_spacing_mm" for v in ("trans", "long") for a in ("row", "col")),
    *IMAGE_SCALARS,
})
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")


class ClinicalVariable(Schema):
    """One clinical variable: a `patients.csv` column and a model token.

    Attributes:
        name: the column name and the token's name (``[a-z][a-z0-9_]*``, at most 40 characters).
        kind: ``numeric`` or ``categorical``.
        description: what it is, in words (shown by `llnm-site check` and in the docs).
        unit: numeric only: the unit the column is written in (``years``, ``mm``...).
        range: numeric only: the values allowed; a value outside it is an error in its row.
        typical: numeric only: values outside this range are accepted with a warning.
        center, scale: numeric only: the token's input is ``(value - center) / scale``; by default the middle of
            ``range`` and a quarter of its width.
        levels: categorical only: the allowed values (at least two), matched ignoring case; their order fixes
            the encoding, so every site and the experiment must list them in the same order.
        required: an empty cell is an error (otherwise it is a missing value and gets the placeholder token).
    """

    WHAT: ClassVar[str] = "clinical variable"

    name: str
    kind: Literal["numeric", "categorical"]
    description: str | None = None
    unit: str | None = None
    range: tuple[Float, Float] | None = None
    typical: tuple[Float, Float] | None = None
    center: Float | None = None
    scale: Float | None = Field(None, gt=0.0)
    levels: list[str] | None = None
    required: bool = False

    @field_validator("levels", mode="before")
    @classmethod
    def _levels_are_text(cls, v: Any) -> Any:
        if isinstance(v, list) and any(isinstance(level, bool) for level in v):
            raise ValueError(f"levels {v} hold a boolean: YAML reads unquoted no/yes/on/off as booleans; write the "
                             "levels in quotes ('No', 'Yes')")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"{v!r} must be 1-40 characters from a-z 0-9 _ starting with a letter "
                             "(it is also the patients.csv column)")
        if v in RESERVED_NAMES:
            raise ValueError(f"{v!r} is a column or token of the contract itself; choose another name")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ClinicalVariable:
        if self.kind == "numeric":
            if self.levels is not None:
                raise ValueError(f"{self.name}: levels are for categorical variables, not numeric ones")
            if self.range is None:
                raise ValueError(f"{self.name}: a numeric variable needs its range [low, high]")
            low, high = self.range
            if not low < high:
                raise ValueError(f"{self.name}: range must be [low, high] with low < high, got {list(self.range)}")
            if self.typical is not None and not (low <= self.typical[0] < self.typical[1] <= high):
                raise ValueError(f"{self.name}: typical must lie within range and have low < high")
        else:
            for key in ("unit", "range", "typical", "center", "scale"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{self.name}: {key} is for numeric variables, not categorical ones")
            levels = self.levels or []
            if len(levels) < 2:
                raise ValueError(f"{self.name}: a categorical variable needs at least two levels")
            folded = [str(level).strip().casefold() for level in levels]
            if any(not f for f in folded) or len(set(folded)) != len(folded):
                raise ValueError(f"{self.name}: levels must be non-empty and distinct (ignoring case), got {levels}")
            self.levels = [str(level).strip() for level in levels]
        return self

    # ------------------------------------------------------------------------------------------ encoding

    @property
    def num_levels(self) -> int:
        return len(self.levels or [])

    @property
    def token_levels(self) -> int:
        """What the model's token takes: 0 for one number (numeric, or a two-level indicator), else k levels."""
        return self.num_levels if self.kind == "categorical" and self.num_levels > 2 else 0

    def encode(self, value: float | str) -> float:
        """The token's input for a parsed value (see :meth:`parse`)."""
        if self.kind == "numeric":
            assert self.range is not None
            low, high = self.range
            center = self.center if self.center is not None else (low + high) / 2.0
            scale = self.scale if self.scale is not None else (high - low) / 4.0
            return (float(value) - center) / scale
        return float((self.levels or []).index(str(value)))

    def what(self) -> str:
        """The variable in words, for messages: ``age (years, 0-120)``, ``sex (F or M)``."""
        if self.kind == "numeric":
            assert self.range is not None
            unit = f"{self.unit}, " if self.unit else ""
            return f"{self.description or self.name} ({unit}{self.range[0]:g}-{self.range[1]:g})"
        return f"{self.description or self.name} ({_levels_text(self.levels or [])})"

    def parse(self, text: str) -> tuple[float | str | None, str | None, str | None]:
        """(value, error, warning) of one table cell: a float or the canonical level, None when missing.

        An empty cell is missing (an error only when ``required``); anything else that is not a valid value is
        an error, worded for the site operator.
        """
        if not text:
            if self.required:
                return None, f"is empty ({self.what()} is required)", None
            return None, None, None
        if self.kind == "categorical":
            levels = self.levels or []
            for level in levels:
                if text.casefold() == level.casefold():
                    return level, None, None
            return None, f"{text!r} must be {_levels_text(levels)}", None
        assert self.range is not None
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        unit = f" {self.unit}" if self.unit else ""
        if not math.isfinite(number):
            return None, f"{text!r} is not a number ({self.what()})", None
        low, high = self.range
        if not low <= number <= high:
            return None, f"{text} is outside {low:g}-{high:g}{unit}", None
        if self.typical is not None and not self.typical[0] <= number <= self.typical[1]:
            t_low, t_high = self.typical
            side = f"under {t_low:g}" if number < t_low else f"over {t_high:g}"
            return number, None, f"{text} is {side}{unit}: outside the typical {t_low:g}-{t_high:g}{unit}"
        return number, None, None

    def same_encoding(self, other: ClinicalVariable) -> str | None:
        """Why `other` (another declaration of this name) would encode values differently; None if it would not."""
        if self.kind != other.kind:
            return f"it is {other.kind} there but {self.kind} here"
        if self.kind == "categorical":
            if [lv.casefold() for lv in self.levels or []] != [lv.casefold() for lv in other.levels or []]:
                return f"its levels are {other.levels} there but {self.levels} here (same levels, same order)"
            return None
        if (self.unit or "") != (other.unit or ""):
            return f"its unit is {other.unit!r} there but {self.unit!r} here"
        if self.encode(0.0) != other.encode(0.0) or self.encode(1.0) != other.encode(1.0):
            return "its center/scale (or range) differ, so the same value would enter the model differently"
        return None


def _levels_text(levels: list[str]) -> str:
    if len(levels) == 2:
        return f"{levels[0]} or {levels[1]}"
    return "one of " + ", ".join(levels)


#: The paper's clinical variables: age (years at ultrasound) and sex, both required. Age enters as
#: (age - 45) / 15: round numbers near the paper's cohort (median 43, IQR 35-52).
PAPER_CLINICAL: tuple[dict[str, Any], ...] = (
    {"name": "age", "kind": "numeric", "description": "age at ultrasound", "unit": "years",
     "range": (0.0, 120.0), "typical": (18.0, 120.0), "center": 45.0, "scale": 15.0, "required": True},
    {"name": "sex", "kind": "categorical", "levels": ["F", "M"], "required": True},
)


def _paper_clinical() -> list[ClinicalVariable]:
    return [ClinicalVariable.model_validate(v) for v in PAPER_CLINICAL]


class InputsConfig(Schema):
    """Which modalities exist and which clinical variables the table holds (see the module docstring).

    Attributes:
        images: the ultrasound views (images and masks) exist; ``false``: no image pathway, no image columns.
        reports: the radiology reports exist; ``false``: no report pathway, no report column.
        clinical: the clinical variables, in token order (default: the paper's age and sex).
        outcome: what the binary label column ``llnm`` holds, in words (an imported data set may carry
            another outcome, e.g. TI-RADS 4-5 vs 2-3; every report names it).
    """

    WHAT: ClassVar[str] = "inputs"

    images: bool = True
    reports: bool = True
    clinical: list[ClinicalVariable] = Field(default_factory=_paper_clinical)
    outcome: str = Field("lateral lymph node metastasis (LLNM)", min_length=1, max_length=200)

    @model_validator(mode="after")
    def _consistent(self) -> InputsConfig:
        names = [v.name for v in self.clinical]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"clinical variable(s) {twice} declared more than once")
        if not (self.images or self.reports or self.clinical):
            raise ValueError("no inputs at all: declare images, reports or at least one clinical variable")
        return self

    def variable(self, name: str) -> ClinicalVariable | None:
        return next((v for v in self.clinical if v.name == name), None)

    @property
    def feature_names(self) -> tuple[str, ...]:
        """The per-view scalar tokens in order: the clinical variables, then the image measurements."""
        return tuple(v.name for v in self.clinical) + (IMAGE_SCALARS if self.images else ())

    @property
    def token_levels(self) -> list[int]:
        """Per scalar token, what it takes (`ClinicalVariable.token_levels`; image measurements are numbers)."""
        return [v.token_levels for v in self.clinical] + ([0] * len(IMAGE_SCALARS) if self.images else [])

    def mismatches(self, site: InputsConfig) -> list[tuple[str, str]]:
        """(field, reason) for everything this experiment needs that `site` (a site's declaration) lacks."""
        out: list[tuple[str, str]] = []
        if self.images and not site.images:
            out.append(("images", "the experiment uses ultrasound images, but the site declares images: false"))
        if self.reports and not site.reports:
            out.append(("reports", "the experiment uses reports, but the site declares reports: false"))
        for var in self.clinical:
            theirs = site.variable(var.name)
            if theirs is None:
                out.append((var.name, f"the experiment uses clinical variable {var.name!r}, which the site does "
                                      f"not declare (it declares {[v.name for v in site.clinical]})"))
            elif (why := var.same_encoding(theirs)) is not None:
                out.append((var.name, f"the site's declaration differs from the experiment's: {why}"))
        return out
