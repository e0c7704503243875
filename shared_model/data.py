"""Site tensors: one hospital's patients as model-ready tensors, built once and cached outside the site.

Decoding every DICOM, computing the feature images and running the frozen text encoder takes seconds per
patient, and a site takes part in many federated rounds. So :func:`build_site_tensors` does it once per
(site content, preprocessing configuration) and caches the result as one ``.pt`` file in a cache folder that
is never inside the site folder (``docs/site-data.md``: nothing writes there). Every later call, e.g. each
round of ``llnm-site join``, only loads that file.

The cache key is a SHA-256 over the bytes of ``patients.csv``, ``site.yaml`` and every file the loaded
patients reference (streamed, each file once), the site's name and :meth:`PreprocessConfig.fingerprint`
(which includes the preprocessing code version and the text encoder's weight hash). Rehashing a large site
every round would cost minutes, so a *stat key* (path, size, mtime_ns, ctime_ns, inode of the same files)
is stored beside the cache and maps to the content key; when nothing was touched, the content is not hashed
again. ``ctime`` cannot be set back by a program, so a rewritten file always misses the stat key; the
content hash remains the authority (``verify_content=True`` forces it).

Batch layout (``docs/architecture.md``): ``LLNMDataset[i]`` is ``(image [2,3,S,S], view_mask [2],
text [L,D], text_mask [L], clinical [2,4], clinical_mask [2,4], llnm [], stage [])``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from shared_model.contract import PATIENTS_FILE, SITE_FILE, SPLITS, VIEWS, PatientRecord, Site, load_site
from shared_model.preprocessing import (
    PREPROCESSING_VERSION,
    PreprocessConfig,
    ViewFeatures,
    intensity_sample_region,
    preprocess_view,
    site_intensity_range,
)

__all__ = [
    "AGE_CENTER",
    "AGE_SCALE",
    "CLINICAL_FEATURES",
    "LLNMDataset",
    "SiteTensors",
    "build_site_tensors",
    "check_scalar_count",
    "default_cache_dir",
    "site_content_key",
    "view_scalars",
]

logger = logging.getLogger(__name__)

#: Age is standardised as (age - AGE_CENTER) / AGE_SCALE with the same constants at every site: a site's own
#: mean/std would leak site statistics into the features and make the same patient look different at two
#: sites. 45 and 15 are round numbers near the paper's cohort (median 43, IQR 35-52).
AGE_CENTER = 45.0
AGE_SCALE = 15.0
#: Order of the per-view scalar vector (each scalar is one token of the model): the paper's clinical variables
#: (age, sex, shape ratio, echogenicity), then the nodule's measurements from its masks: capsule distance (the
#: paper's strongest finding: < 2.5 mm carries > 72 % LLNM risk), size, and position along the gland (in a
#: longitudinal view: its third). The location map shows the first and last too, but as a picture a small
#: model has to learn to read; as numbers they reach the model exact, in millimetres.
CLINICAL_FEATURES: tuple[str, ...] = (
    "age", "sex", "shape_ratio", "echogenicity", "capsule_distance", "nodule_size", "nodule_position",
)
#: Capsule distance enters as d / CAPSULE_SCALE_MM (so the paper's 2.5 mm threshold is 0.5), clipped at
#: CAPSULE_CLIP_MM (beyond it a nodule is deep in the lobe; the exact depth no longer matters).
CAPSULE_SCALE_MM = 5.0
CAPSULE_CLIP_MM = 20.0
#: Size enters as log2(d_eq / SIZE_REF_MM), d_eq the diameter of the circle with the nodule's area: each
#: doubling of size is one unit, 10 mm (the usual micro-carcinoma cut-off) is 0.
SIZE_REF_MM = 10.0
#: Cache file format; a file of another format is rebuilt.
CACHE_FORMAT = "llnm-site-tensors/2"
#: Decoded frames kept in memory between the range pass and the feature pass (serial builds only).
_KEEP_DECODED_BYTES = 1 << 30

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
    clinical: torch.Tensor  # [N, 2, C] float32, C = len(CLINICAL_FEATURES)
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
        if tuple(self.image.shape[1:3]) != (len(VIEWS), 3) or self.image.shape[3] != self.image.shape[4]:
            raise ValueError(f"SiteTensors.image must be [N, 2, 3, S, S], got {tuple(self.image.shape)}")
        if tuple(self.clinical.shape[1:]) != (len(VIEWS), len(CLINICAL_FEATURES)):
            raise ValueError(
                f"SiteTensors.clinical must be [N, 2, {len(CLINICAL_FEATURES)}] ({', '.join(CLINICAL_FEATURES)}), "
                f"got {tuple(self.clinical.shape)}"
            )
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
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
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
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as handle:
                torch.save(payload, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

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


# ------------------------------------------------------------------------------------------ cache keys


def default_cache_dir() -> Path:
    """``$LLNM_CACHE_DIR`` if set, else ``~/.cache/llnm-fl``."""
    env = os.environ.get("LLNM_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llnm-fl"


def _site_files(site: Site) -> list[Path]:
    """Files the cache depends on: the table, site.yaml and every file of a loaded patient, sorted."""
    files = {site.root / PATIENTS_FILE}
    if (site.root / SITE_FILE).is_file():
        files.add(site.root / SITE_FILE)
    for patient in site.patients:
        if patient.report is not None:
            files.add(patient.report)
        for view in patient.views.values():
            for path in (view.image, view.nodule_mask, view.thyroid_mask):
                if path is not None:
                    files.add(path)
    return sorted(files, key=lambda p: site.relative(p))


def site_content_key(
    site: Site, cfg: PreprocessConfig, files: list[Path] | None = None, fingerprint: str | None = None
) -> str:
    """SHA-256 over the site's name, the config fingerprint and (path, size, bytes) of each file.

    Files are read in 1 MiB chunks, so a large DICOM never sits in memory for hashing. ``fingerprint``
    (``cfg.fingerprint()``) may be passed when the caller already has it.
    """
    fingerprint = fingerprint or cfg.fingerprint()
    digest = hashlib.sha256()
    digest.update(f"llnm-site-cache/{PREPROCESSING_VERSION}\0{site.name}\0{fingerprint}\0".encode())
    for path in files if files is not None else _site_files(site):
        digest.update(site.relative(path).encode("utf-8") + b"\0")
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            digest.update(f"{size}\0".encode())
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _stat_key(site: Site, fingerprint: str, files: list[Path]) -> str:
    """Cheap key from file metadata: changes whenever any file is rewritten, renamed or replaced."""
    entries = []
    for path in files:
        st = path.stat()
        entries.append([site.relative(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev])
    payload = json.dumps([str(site.root), site.name, fingerprint, entries], separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _check_cache_dir(cache_dir: Path, site_root: Path) -> Path:
    resolved = cache_dir.expanduser().resolve()
    if resolved == site_root or site_root in resolved.parents:
        raise ValueError(
            f"cache folder {resolved} is inside the site folder {site_root}: llnm-fl never writes into a site "
            "folder; choose another cache folder (--cache-dir or LLNM_CACHE_DIR)"
        )
    return resolved


def _try_load(path: Path, key: str) -> SiteTensors | None:
    """The cached tensors at ``path`` if it is a valid cache for ``key``; None (with a warning) otherwise."""
    if not path.is_file():
        return None
    try:
        tensors = SiteTensors.load(path)
    except Exception as exc:  # corrupt, truncated or foreign file: rebuild rather than fail the round
        logger.warning("cache file %s is unreadable (%s: %s); rebuilding it", path, type(exc).__name__, exc)
        return None
    if tensors.meta.get("cache_key") != key:
        logger.warning("cache file %s does not belong to key %s; rebuilding it", path, key[:16])
        return None
    return tensors


# ------------------------------------------------------------------------------------------ building


@dataclass
class _ViewJob:
    """One view to decode: everything a worker process needs, nothing it must look up."""

    patient: int
    view: int
    image: Path
    nodule_mask: Path | None
    thyroid_mask: Path | None
    table_spacing_mm: tuple[float, float] | None


@dataclass
class _Decoded:
    pixels: np.ndarray
    spacing_mm: tuple[float, float] | None
    spacing_source: str
    nodule: np.ndarray | None
    thyroid: np.ndarray | None


@dataclass
class _ViewOutcome:
    patient: int
    view: int
    features: ViewFeatures | None = None
    samples: np.ndarray | None = None
    decoded: _Decoded | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)


def _decode(job: _ViewJob, cfg: PreprocessConfig) -> _Decoded:
    """Read the masks first (the nodule centroid selects the calibrated ultrasound region), then the image."""
    from shared_model.imaging import ImageReadError, read_image, read_mask

    nodule = read_mask(job.nodule_mask) if job.nodule_mask is not None else None
    hint = None
    if nodule is not None and nodule.any():
        rows, cols = np.nonzero(nodule)
        hint = (float(rows.mean()), float(cols.mean()))
    image = read_image(job.image, frame=cfg.frame, table_spacing_mm=job.table_spacing_mm, region_hint=hint)
    shape = image.pixels.shape
    thyroid = read_mask(job.thyroid_mask, expected_shape=shape) if job.thyroid_mask is not None else None
    if nodule is not None and nodule.shape != shape:
        raise ImageReadError(
            f"{job.nodule_mask}: mask is {nodule.shape[0]}x{nodule.shape[1]} (rows x columns) but its image "
            f"{job.image.name} is {shape[0]}x{shape[1]}"
        )
    return _Decoded(image.pixels, image.spacing_mm, image.spacing_source, nodule, thyroid)


def _run_job(job: _ViewJob, cfg: PreprocessConfig, mode: str, intensity_range: tuple[float, float] | None,
             decoded: _Decoded | None = None, keep: bool = False) -> _ViewOutcome:
    """Decode (unless given) and either sample tissue pixels (``mode="sample"``) or compute features."""
    from shared_model.imaging import ImageReadError

    out = _ViewOutcome(job.patient, job.view)
    try:
        if decoded is None:
            decoded = _decode(job, cfg)
        if mode == "sample":
            region = intensity_sample_region(
                decoded.pixels.shape, decoded.nodule, decoded.thyroid, decoded.spacing_mm, cfg.crop_margin
            )
            values = decoded.pixels[region]
            step = max(1, math.ceil(values.size / cfg.range_samples_per_view))
            out.samples = np.ascontiguousarray(values[::step])
            if keep:
                out.decoded = decoded
        else:
            assert intensity_range is not None
            out.features = preprocess_view(
                decoded.pixels, decoded.nodule, decoded.thyroid, decoded.spacing_mm, cfg, intensity_range
            )
            if decoded.spacing_mm is None:
                out.notes.append("no calibration in the file or the table")
            if out.features is None:
                out.notes.append("nodule mask is empty: view marked missing")
    except (ImageReadError, ValueError, OSError) as exc:
        out.error = str(exc)
    return out


def _run_job_packed(args: tuple[_ViewJob, dict[str, Any], str, tuple[float, float] | None]) -> _ViewOutcome:
    """Process-pool entry point (the config travels as a dict: plain data pickles everywhere)."""
    job, cfg_dict, mode, intensity_range = args
    return _run_job(job, PreprocessConfig.from_dict(cfg_dict), mode, intensity_range)


def _map_jobs(
    jobs: list[_ViewJob], cfg: PreprocessConfig, mode: str, intensity_range: tuple[float, float] | None,
    pool: ProcessPoolExecutor | None, bar: Any, kept: dict[tuple[int, int], _Decoded], keep_budget: list[int],
) -> Iterable[_ViewOutcome]:
    """Run jobs serially (reusing/keeping decoded frames) or in the process pool; yield outcomes."""
    if pool is None or len(jobs) < 2:
        for job in jobs:
            decoded = kept.pop((job.patient, job.view), None)
            out = _run_job(job, cfg, mode, intensity_range, decoded=decoded, keep=keep_budget[0] > 0)
            if out.decoded is not None:
                kept[(job.patient, job.view)] = out.decoded
                keep_budget[0] -= out.decoded.pixels.nbytes
                out.decoded = None
            bar.update(1)
            yield out
        return
    cfg_dict = cfg.to_dict()
    packed = [(job, cfg_dict, mode, intensity_range) for job in jobs]
    for out in pool.map(_run_job_packed, packed, chunksize=4):
        bar.update(1)
        yield out


def _read_report(path: Path) -> str:
    from shared_model.contract import describe_utf8_error

    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: report is not valid UTF-8 ({describe_utf8_error(exc)})") from None


def _progress(total: int, description: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="view", file=sys.stderr, disable=not enabled, leave=False)


def build_site_tensors(
    site_dir: str | Path,
    cfg: PreprocessConfig,
    *,
    cache_dir: str | Path | None = None,
    workers: int = 1,
    progress: bool = True,
    verify_content: bool = False,
) -> SiteTensors:
    """The site's tensors, from the cache when its key matches, else built and cached.

    Building: ``load_site`` (rows with errors are left out by it; each is logged here as a skipped patient
    with its reasons), then per view: masks, image (``region_hint`` = nodule centroid), the site's intensity
    range from up to ``cfg.range_max_views`` views, :func:`preprocess_view`; then every report through the
    frozen text encoder, loaded once. A patient whose image, mask or report cannot be read is skipped and
    logged (never a crash); a view without image or nodule mask is marked missing, never invented.

    A cache hit decodes nothing and does not load the text encoder. ``workers > 1`` decodes in that many
    processes. ``verify_content=True`` ignores the stat key and rehashes every file.

    Raises:
        ValueError: the site has no usable patient at all (the message lists the site's errors), or the cache
            folder is inside the site folder.
    """
    started = time.perf_counter()
    site = load_site(site_dir)
    left_out = _skipped_rows(site)
    if not site.patients:
        errors = [p.format() for p in site.problems if p.level == "error"]
        shown = "; ".join(errors[:10]) + (f"; ... ({len(errors) - 10} more)" if len(errors) > 10 else "")
        raise ValueError(f"site {site.root} has no usable patient rows: {shown or 'patients.csv is empty'}")

    cache_root = _check_cache_dir(Path(cache_dir) if cache_dir is not None else default_cache_dir(), site.root)
    cache_root.mkdir(parents=True, exist_ok=True)
    files = _site_files(site)
    fingerprint = cfg.fingerprint()
    stat_key = _stat_key(site, fingerprint, files)
    stat_file = cache_root / f"{site.name}-{stat_key[:24]}.statkey.json"

    key: str | None = None
    if not verify_content and stat_file.is_file():
        try:
            key = str(json.loads(stat_file.read_text(encoding="utf-8"))["content_key"])
        except (OSError, ValueError, KeyError, TypeError):
            logger.warning("stat key file %s is unreadable; rehashing the site", stat_file)
            key = None
        if key is not None:
            cached = _try_load(cache_root / f"{site.name}-{key[:16]}.pt", key)
            if cached is not None:
                _log_hit(cached, cache_root / f"{site.name}-{key[:16]}.pt", started, "stat key")
                return cached
    hash_started = time.perf_counter()
    key = site_content_key(site, cfg, files, fingerprint)
    hash_seconds = time.perf_counter() - hash_started
    cache_path = cache_root / f"{site.name}-{key[:16]}.pt"
    cached = _try_load(cache_path, key)
    if cached is not None:
        _write_json_atomic(stat_file, {"content_key": key, "site": str(site.root)})
        _log_hit(cached, cache_path, started, "content key")
        return cached

    logger.info("%s: building site tensors (%d patients) into %s", site.name, len(site.patients), cache_path,
                extra={"llnm_event": "cache_build", "cache_path": str(cache_path)})
    for line in left_out:
        logger.warning("%s: skipping %s", site.name, line)
    tensors = _build(site, cfg, workers=workers, progress=progress)
    build_seconds = time.perf_counter() - started
    tensors.meta.update(
        cache_key=key,
        stat_key=stat_key,
        config=cfg.to_dict(),
        config_fingerprint=fingerprint,
        preprocessing_version=PREPROCESSING_VERSION,
        site_root=str(site.root),
        hash_seconds=round(hash_seconds, 3),
        build_seconds=round(build_seconds, 3),
        patients_per_second=round(len(site.patients) / build_seconds, 3) if build_seconds > 0 else None,
    )
    tensors.save(cache_path)
    _write_json_atomic(stat_file, {"content_key": key, "site": str(site.root)})
    logger.info(
        "%s: built %d patients in %.1f s (%.2f patients/s); cached at %s",
        site.name, len(tensors), build_seconds, len(site.patients) / max(build_seconds, 1e-9), cache_path,
        extra={"llnm_event": "cache_written", "cache_path": str(cache_path)},
    )
    return tensors


def _log_hit(tensors: SiteTensors, path: Path, started: float, how: str) -> None:
    """One line per hit; the skipped patients were logged one by one when the cache was built."""
    skipped = len(tensors.meta.get("skipped", []))
    logger.info(
        "%s: cache hit (%s) %s, %d patients (%d skipped when built, see meta['skipped']), loaded in %.3f s",
        tensors.site, how, path, len(tensors), skipped, time.perf_counter() - started,
        extra={"llnm_event": "cache_hit", "cache_path": str(path)},
    )


def _skipped_rows(site: Site) -> list[str]:
    """One line per table row that ``load_site`` left out, with all its errors."""
    loaded = {p.row for p in site.patients}
    by_row: dict[int, list[str]] = {}
    for problem in site.problems:
        if problem.level == "error" and problem.row is not None and problem.row not in loaded:
            where = f"{problem.field}: " if problem.field else ""
            by_row.setdefault(problem.row, []).append(f"{where}{problem.message}")
    return [f"row {row} of {PATIENTS_FILE} ({'; '.join(msgs)})" for row, msgs in sorted(by_row.items())]


def _build(site: Site, cfg: PreprocessConfig, *, workers: int, progress: bool) -> SiteTensors:
    from shared_model.text_encoder import encode_reports, load_text_encoder

    patients = site.patients
    jobs: list[_ViewJob] = []
    view_notes: list[list[list[str]]] = [[[] for _ in VIEWS] for _ in patients]
    for p_index, patient in enumerate(patients):
        for v_index, view in enumerate(VIEWS):
            files = patient.views[view]
            if files.image is None:
                continue
            if files.nodule_mask is None:
                view_notes[p_index][v_index].append("no nodule mask: view marked missing")
                continue
            jobs.append(_ViewJob(p_index, v_index, files.image, files.nodule_mask, files.thyroid_mask,
                                 files.table_spacing_mm))
    errors: dict[int, list[str]] = {}

    # Pass 1: the site's intensity range from an evenly spread, deterministic subset of views.
    if len(jobs) > cfg.range_max_views:
        picks = np.unique(np.linspace(0, len(jobs) - 1, cfg.range_max_views).round().astype(int))
        range_jobs = [jobs[i] for i in picks]
    else:
        range_jobs = list(jobs)
    kept: dict[tuple[int, int], _Decoded] = {}
    budget = [_KEEP_DECODED_BYTES]
    samples: list[np.ndarray] = []
    bar = _progress(len(range_jobs) + len(jobs), f"{site.name}: preprocess", progress)
    pool = None
    if workers > 1 and len(jobs) > 1:
        import multiprocessing

        # spawn, not fork: the parent has torch (and its thread pools) loaded, which fork does not copy safely.
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        for out in _map_jobs(range_jobs, cfg, "sample", None, pool, bar, kept, budget):
            if out.error is not None:
                errors.setdefault(out.patient, []).append(f"{VIEWS[out.view]} view: {out.error}")
            elif out.samples is not None:
                samples.append(out.samples)
        intensity_range = (
            site_intensity_range(samples, cfg.intensity_percentiles, max_samples_per_image=cfg.range_samples_per_view)
            if samples else (0.0, 255.0)
        )
        if not samples:
            logger.warning("%s: no decodable view to estimate the intensity range from; using 0..255", site.name)
        # Pass 2: features of every view (patients that already failed are not decoded again).
        todo = [job for job in jobs if job.patient not in errors]
        bar.total = len(range_jobs) + len(todo)
        features: dict[tuple[int, int], ViewFeatures] = {}
        for out in _map_jobs(todo, cfg, "features", intensity_range, pool, bar, kept, [0]):
            if out.error is not None:
                errors.setdefault(out.patient, []).append(f"{VIEWS[out.view]} view: {out.error}")
                continue
            view_notes[out.patient][out.view].extend(out.notes)
            if out.features is not None:
                features[(out.patient, out.view)] = out.features
                view_notes[out.patient][out.view].extend(out.features.notes)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    kept.clear()

    # Reports (read here, cheap), then one pass of the frozen encoder over the kept patients.
    texts: dict[int, str | None] = {}
    for p_index, patient in enumerate(patients):
        if patient.report is None:
            texts[p_index] = None
            continue
        try:
            texts[p_index] = _read_report(patient.report)
        except (OSError, ValueError) as exc:
            errors.setdefault(p_index, []).append(f"report: {exc}")

    for p_index in sorted(errors):
        patient = patients[p_index]
        logger.warning("%s: skipping patient %s (row %d of %s): %s", site.name, patient.patient_id,
                       patient.row, PATIENTS_FILE, "; ".join(errors[p_index]))
    keep = [i for i in range(len(patients)) if i not in errors]
    tokenizer, model = load_text_encoder(cfg.text)
    hidden, text_mask, present = encode_reports([texts[i] for i in keep], cfg.text, tokenizer, model)
    del model, tokenizer

    tensors = _assemble(site, cfg, keep, features, view_notes, hidden, text_mask, present)
    tensors.meta.update(
        intensity_range=[float(intensity_range[0]), float(intensity_range[1])],
        intensity_range_views=len(samples),
        skipped=[
            {"patient_id": patients[i].patient_id, "row": patients[i].row, "reasons": errors[i]}
            for i in sorted(errors)
        ] + [{"patient_id": None, "row": None, "reasons": [line]} for line in _skipped_rows(site)],
        warnings=[p.format() for p in site.problems if p.level == "warning"],
    )
    return tensors


def check_scalar_count(num_clinical: int, source: str) -> None:
    """Refuse a model whose per-view scalar count differs from what this version's preprocessing gives.

    A checkpoint or round config from an llnm-fl version with other scalars would otherwise fail deep in
    ``forward`` with a bare shape error; this names the cause and the way out.

    Raises:
        ValueError: ``num_clinical != len(CLINICAL_FEATURES)``.
    """
    if num_clinical != len(CLINICAL_FEATURES):
        raise ValueError(
            f"{source}: the model takes {num_clinical} per-view scalars, but this version's preprocessing gives "
            f"{len(CLINICAL_FEATURES)} ({', '.join(CLINICAL_FEATURES)}); the model was made by another llnm-fl "
            f"version: evaluate it with that version, or train again with this one"
        )


def view_scalars(feat: ViewFeatures) -> dict[str, float]:
    """The model's per-view scalars measured from one view (the keys of :data:`CLINICAL_FEATURES` after age
    and sex), scaled as documented there; a measurement that is unknown is left out, so the model gets its
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


def _assemble(
    site: Site, cfg: PreprocessConfig, keep: list[int], features: dict[tuple[int, int], ViewFeatures],
    view_notes: list[list[list[str]]], hidden: torch.Tensor, text_mask: torch.Tensor, present: torch.Tensor,
) -> SiteTensors:
    n, s, nv = len(keep), cfg.image_size, len(VIEWS)
    image = torch.zeros(n, nv, 3, s, s, dtype=torch.float32)
    view_mask = torch.zeros(n, nv, dtype=torch.float32)
    clinical = torch.zeros(n, nv, len(CLINICAL_FEATURES), dtype=torch.float32)
    clinical_mask = torch.zeros_like(clinical)
    capsule = torch.full((n, nv), math.nan, dtype=torch.float32)
    area = torch.full((n, nv), math.nan, dtype=torch.float32)
    calibrated = torch.zeros(n, nv, dtype=torch.bool)
    location_present = torch.zeros(n, nv, dtype=torch.bool)
    llnm = torch.full((n,), -1.0, dtype=torch.float32)
    stage = torch.full((n,), -1, dtype=torch.int64)
    rows = torch.zeros(n, dtype=torch.int64)
    patients: list[PatientRecord] = [site.patients[i] for i in keep]
    for k, (p_index, patient) in enumerate(zip(keep, patients, strict=True)):
        if patient.llnm is not None:
            llnm[k] = float(patient.llnm)
        if patient.risk_stage is not None:
            stage[k] = patient.risk_stage - 1
        rows[k] = patient.row
        # Age and sex are patient-level and always known; they are given for both views.
        clinical[k, :, 0] = (patient.age - AGE_CENTER) / AGE_SCALE
        clinical[k, :, 1] = 1.0 if patient.sex == "M" else 0.0
        clinical_mask[k, :, :2] = 1.0
        for v_index in range(nv):
            feat = features.get((p_index, v_index))
            if feat is None:
                continue
            image[k, v_index] = torch.from_numpy(feat.channels)
            view_mask[k, v_index] = 1.0
            for name, value in view_scalars(feat).items():
                j = CLINICAL_FEATURES.index(name)
                clinical[k, v_index, j] = value
                clinical_mask[k, v_index, j] = 1.0
            if feat.capsule_distance_mm is not None:
                capsule[k, v_index] = feat.capsule_distance_mm
            area[k, v_index] = feat.nodule_area_mm2
            calibrated[k, v_index] = feat.calibrated
            location_present[k, v_index] = not feat.thyroid_missing
    return SiteTensors(
        site=site.name,
        patient_ids=[p.patient_id for p in patients],
        splits=[p.split for p in patients],
        image=image,
        view_mask=view_mask,
        text=hidden.to(torch.float32),
        text_mask=text_mask.to(torch.float32),
        clinical=clinical,
        clinical_mask=clinical_mask,
        llnm=llnm,
        stage=stage,
        extras={
            "capsule_distance": capsule,
            "nodule_area": area,
            "calibrated": calibrated,
            "location_present": location_present,
            "report_present": present.to(torch.bool),
            "row": rows,
            "view_notes": [view_notes[i] for i in keep],
        },
        meta={"site": site.name, "views": list(VIEWS), "clinical_features": list(CLINICAL_FEATURES)},
    )

