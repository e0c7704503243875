"""Site tensors: one hospital's patients as model-ready tensors, and the model's per-view scalars.

:class:`SiteTensors` holds a site's patients in the batch layout below (and saves/loads itself as one ``.pt``
file); :class:`LLNMDataset` serves them to training, one patient per sample. The per-view scalar features
(:data:`CLINICAL_FEATURES`) and their scaling are defined here, once, for every site. Building a site's
tensors from its folder, and caching them, is :mod:`shared_model.sitedata.cache`.

Batch layout (``docs/architecture.md``): ``LLNMDataset[i]`` is ``(image [2,3,S,S], view_mask [2],
text [L,D], text_mask [L], clinical [2,4], clinical_mask [2,4], llnm [], stage [])``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset

from shared_model.config.inputs import InputsConfig
from shared_model.fileio import atomic_write
from shared_model.sitedata.contract import SPLITS, VIEWS, PatientRecord

if TYPE_CHECKING:
    from shared_model.sitedata.preprocessing import ViewFeatures

__all__ = [
    "CLINICAL_FEATURES",
    "LLNMDataset",
    "SiteTensors",
    "patient_scalars",
    "view_scalars",
]

#: The per-view scalars (each one token of the model) with the default inputs: the clinical variables age and
#: sex, then the nodule's measurements from its image and masks: shape ratio, echogenicity, capsule distance
#: (the paper's strongest finding: < 2.5 mm carries > 72 % LLNM risk), size, and position along the gland (in a
#: longitudinal view: its third). The location map shows the capsule distance and position too, but as a picture
#: a small model has to learn to read; as numbers they reach the model exact, in millimetres. For other inputs
#: (`shared_model.config.inputs`) the order is `InputsConfig.feature_names`: the declared clinical variables, then
#: these five measurements when images exist.
CLINICAL_FEATURES: tuple[str, ...] = InputsConfig().feature_names
#: Capsule distance enters as d / CAPSULE_SCALE_MM (so the paper's 2.5 mm threshold is 0.5), clipped at
#: CAPSULE_CLIP_MM (beyond it a nodule is deep in the lobe; the exact depth no longer matters).
CAPSULE_SCALE_MM = 5.0
CAPSULE_CLIP_MM = 20.0
#: Size enters as log2(d_eq / SIZE_REF_MM), d_eq the diameter of the circle with the nodule's area: each
#: doubling of size is one unit, 10 mm (the usual micro-carcinoma cut-off) is 0.
SIZE_REF_MM = 10.0
#: Cache file format; a file of another format is rebuilt.
CACHE_FORMAT = "llnm-site-tensors/2"

# The fields that form the model batch, in the order of ``docs/architecture.md``.
_BATCH_FIELDS: tuple[str, ...] = (
    "image", "view_mask", "text", "text_mask", "clinical", "clinical_mask", "llnm", "stage",
)


# ------------------------------------------------------------------------------------------ SiteTensors


@dataclass
class SiteTensors:
    """A site's patients as tensors, in the batch layout of ``docs/architecture.md``.

    ``extras`` holds per-patient side information (its values have N rows: tensors or lists), e.g.
    ``capsule_distance`` ``[N, 2]`` (mm, or pixels where ``calibrated`` is False; NaN when unknown),
    ``nodule_area`` ``[N, 2]``, ``calibrated`` / ``location_present`` ``[N, 2]`` bool, ``report_present``
    ``[N]``, ``row`` ``[N]`` (row in patients.csv) and ``view_notes`` (per patient, per view, a list of
    remarks). ``meta`` is site-level and JSON-able (cache key, configuration, intensity range, skipped
    patients, build timing).
    """

    site: str
    patient_ids: list[str]
    splits: list[str]
    image: torch.Tensor  # [N, 2, 3, S, S] float32
    view_mask: torch.Tensor  # [N, 2] float32
    text: torch.Tensor  # [N, L, D] float32
    text_mask: torch.Tensor  # [N, L] float32
    clinical: torch.Tensor  # [N, 2, C] float32, C = len(inputs.feature_names); meta["clinical_features"]
    clinical_mask: torch.Tensor  # [N, 2, C] float32
    llnm: torch.Tensor  # [N] float32, -1 unlabelled
    stage: torch.Tensor  # [N] int64, -1 unknown
    extras: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.patient_ids)
        if len(self.splits) != n:
            raise ValueError(f"SiteTensors: {len(self.splits)} splits for {n} patients")
        bad = sorted({s for s in self.splits if s not in SPLITS})
        if bad:
            raise ValueError(f"SiteTensors: unknown split(s) {bad}; known: {list(SPLITS)}")
        expected = {
            "image": (5, torch.float32), "view_mask": (2, torch.float32), "text": (3, torch.float32),
            "text_mask": (2, torch.float32), "clinical": (3, torch.float32),
            "clinical_mask": (3, torch.float32), "llnm": (1, torch.float32), "stage": (1, torch.int64),
        }
        for name, (ndim, dtype) in expected.items():
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"SiteTensors.{name} must be a torch.Tensor, got {type(value).__name__}")
            if value.ndim != ndim or value.shape[0] != n or value.dtype != dtype:
                raise ValueError(
                    f"SiteTensors.{name} must be {ndim}-D {dtype} with {n} rows, got "
                    f"{tuple(value.shape)} {value.dtype}"
                )
        # S = 0 where the inputs have no images (no image pathway: nothing to store).
        if tuple(self.image.shape[1:3]) != (len(VIEWS), 3) or self.image.shape[3] != self.image.shape[4]:
            raise ValueError(f"SiteTensors.image must be [N, 2, 3, S, S], got {tuple(self.image.shape)}")
        if tuple(self.clinical.shape[1:2]) != (len(VIEWS),):
            raise ValueError(f"SiteTensors.clinical must be [N, 2, C], got {tuple(self.clinical.shape)}")
        if self.clinical_mask.shape != self.clinical.shape:
            raise ValueError("SiteTensors.clinical_mask must have the shape of clinical")
        if tuple(self.view_mask.shape[1:]) != (len(VIEWS),):
            raise ValueError(f"SiteTensors.view_mask must be [N, 2], got {tuple(self.view_mask.shape)}")
        if self.text_mask.shape != self.text.shape[:2]:
            raise ValueError("SiteTensors.text_mask must be [N, L] matching text [N, L, D]")
        for key, value in self.extras.items():
            if len(value) != n:
                raise ValueError(f"SiteTensors.extras[{key!r}] has {len(value)} rows for {n} patients")

    def __len__(self) -> int:
        return len(self.patient_ids)

    @property
    def image_size(self) -> int:
        return int(self.image.shape[-1])

    def batch(self) -> tuple[torch.Tensor, ...]:
        """All patients as one batch tuple, in the model's ``forward`` order (plus labels)."""
        return tuple(getattr(self, name) for name in _BATCH_FIELDS)

    def select(self, indices: Sequence[int]) -> SiteTensors:
        """The patients at ``indices`` (in that order), extras included; ``meta`` is shared."""
        index = torch.as_tensor(list(indices), dtype=torch.long)
        picked = [int(i) for i in index]
        extras: dict[str, Any] = {}
        for key, value in self.extras.items():
            if isinstance(value, torch.Tensor):
                extras[key] = value.index_select(0, index) if len(picked) else value[:0]
            else:
                extras[key] = [value[i] for i in picked]
        tensors = {
            name: (getattr(self, name).index_select(0, index) if picked else getattr(self, name)[:0])
            for name in _BATCH_FIELDS
        }
        return SiteTensors(
            site=self.site,
            patient_ids=[self.patient_ids[i] for i in picked],
            splits=[self.splits[i] for i in picked],
            extras=extras,
            meta=dict(self.meta),
            **tensors,
        )

    def subset(self, split: str) -> SiteTensors:
        """The patients of one split (``train``, ``val`` or ``test``), in table order."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; known: {list(SPLITS)}")
        return self.select([i for i, s in enumerate(self.splits) if s == split])

    # --------------------------------------------------------------------------------------- persistence

    def save(self, path: str | Path) -> None:
        """Write to ``path`` (``torch.save``; readable with ``torch.load(weights_only=True)``).

        Written to a temporary file in the same folder, flushed to disk and renamed over ``path``, so a crash
        or a full disk never leaves a half-written file where a cache is expected.
        """
        tensor_extras = {k: v for k, v in self.extras.items() if isinstance(v, torch.Tensor)}
        json_extras = {k: v for k, v in self.extras.items() if not isinstance(v, torch.Tensor)}
        payload = {
            "format": CACHE_FORMAT,
            "tensors": {name: getattr(self, name).contiguous() for name in _BATCH_FIELDS},
            "extras": {k: v.contiguous() for k, v in tensor_extras.items()},
            "json": json.dumps(
                {
                    "site": self.site,
                    "patient_ids": self.patient_ids,
                    "splits": self.splits,
                    "extras": json_extras,
                    "meta": self.meta,
                },
                allow_nan=True,
            ),
        }
        atomic_write(path, lambda handle: torch.save(payload, handle))

    @classmethod
    def load(cls, path: str | Path) -> SiteTensors:
        """Read a file written by :meth:`save` (``weights_only=True``: no code is unpickled).

        Raises:
            ValueError: the file is not a site-tensor file of this format, or its contents are inconsistent.
            OSError / RuntimeError: unreadable or truncated file (torch's own errors).
        """
        path = Path(path)
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != CACHE_FORMAT:
            found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
            raise ValueError(f"{path}: not a site-tensor file of format {CACHE_FORMAT} (found {found!r})")
        try:
            info = json.loads(payload["json"])
            tensors = {name: payload["tensors"][name] for name in _BATCH_FIELDS}
            extras = dict(info.get("extras", {}))
            extras.update(payload.get("extras", {}))
            return cls(
                site=info["site"],
                patient_ids=list(info["patient_ids"]),
                splits=list(info["splits"]),
                extras=extras,
                meta=dict(info.get("meta", {})),
                **tensors,
            )
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: incomplete site-tensor file ({type(exc).__name__}: {exc})") from exc


# ------------------------------------------------------------------------------------------ dataset


class LLNMDataset(Dataset):
    """Patients of one or several sites as model samples (one patient = one sample, the DP unit).

    Several :class:`SiteTensors` are concatenated for pooled training (the research baseline); they must
    share the image size S and the text shape [L, D]. ``site_index[i]`` says which input patient i came from.
    """

    def __init__(self, sources: SiteTensors | Iterable[SiteTensors]) -> None:
        parts = [sources] if isinstance(sources, SiteTensors) else list(sources)
        if not parts:
            raise ValueError("LLNMDataset needs at least one SiteTensors")
        ref = parts[0]
        for part in parts[1:]:
            for name in ("image", "text", "clinical"):
                if getattr(part, name).shape[1:] != getattr(ref, name).shape[1:]:
                    raise ValueError(
                        f"cannot pool site {part.site!r} with {ref.site!r}: {name} shapes "
                        f"{tuple(getattr(part, name).shape[1:])} and {tuple(getattr(ref, name).shape[1:])} "
                        "differ (were they preprocessed with different configurations?)"
                    )
        if len(parts) == 1:
            self.tensors = ref.batch()
        else:
            self.tensors = tuple(torch.cat([getattr(p, name) for p in parts]) for name in _BATCH_FIELDS)
        self.sites = [p.site for p in parts]
        self.site_index = torch.cat(
            [torch.full((len(p),), k, dtype=torch.long) for k, p in enumerate(parts)]
        )
        self.patient_ids = [pid for p in parts for pid in p.patient_ids]

    def __len__(self) -> int:
        return int(self.tensors[0].shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        return tuple(t[index] for t in self.tensors)


# ------------------------------------------------------------------------------------------ scalar features


def view_scalars(feat: ViewFeatures) -> dict[str, float]:
    """The model's per-view scalars measured from one view (`shared_model.config.inputs.IMAGE_SCALARS`), scaled as
    documented with :data:`CLINICAL_FEATURES`; a measurement that is unknown is left out, so the model gets its
    "missing" placeholder instead of an invented value.

    Lengths in pixels (an uncalibrated image) are not millimetres and differ between scanners, so capsule
    distance and size are left out of uncalibrated views; the shape ratio and the position are ratios and
    stay.
    """
    out = {"shape_ratio": feat.shape_ratio, "echogenicity": feat.echogenicity}
    if feat.calibrated and feat.capsule_distance_mm is not None:
        out["capsule_distance"] = min(feat.capsule_distance_mm, CAPSULE_CLIP_MM) / CAPSULE_SCALE_MM
    if feat.calibrated and feat.nodule_area_mm2 > 0:
        out["nodule_size"] = math.log2(2.0 * math.sqrt(feat.nodule_area_mm2 / math.pi) / SIZE_REF_MM)
    if feat.nodule_position is not None:
        out["nodule_position"] = 2.0 * feat.nodule_position - 1.0
    return out



def patient_scalars(patient: PatientRecord, inputs: InputsConfig) -> dict[str, float]:
    """The model's patient-level scalars: each clinical variable of `inputs` the patient has, encoded
    (`ClinicalVariable.encode`); a missing one is left out, so the model gets its placeholder token."""
    return {var.name: var.encode(value) for var in inputs.clinical
            if (value := patient.clinical.get(var.name)) is not None}
