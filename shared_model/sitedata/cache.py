"""The site tensor cache: a site's tensors are built once and cached outside the site folder.

Decoding every DICOM, computing the feature images and running the frozen text encoder takes seconds per
patient, and a site takes part in many federated rounds. So :func:`build_site_tensors` does it once per
(site content, preprocessing configuration) (:func:`shared_model.sitedata.build.build_tensors`) and caches the
result as one ``.pt`` file (:meth:`SiteTensors.save`) in a cache folder that is never inside the site folder
(``docs/site-data.md``: nothing writes there). Every later call, e.g. each round of ``llnm-site join``, only
loads that file.

The cache key is a SHA-256 over the bytes of ``patients.csv``, ``site.yaml`` and every file the loaded
patients reference (streamed, each file once), the site's name and :meth:`PreprocessConfig.fingerprint`
(which includes the preprocessing code version and the text encoder's weight hash). Rehashing a large site
every round would cost minutes, so a *stat key* (path, size, mtime_ns, ctime_ns, inode of the same files)
is stored beside the cache and maps to the content key; when nothing was touched, the content is not hashed
again. ``ctime`` cannot be set back by a program, so a rewritten file always misses the stat key; the
content hash remains the authority (``verify_content=True`` forces it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from shared_model.config import PREPROCESSING_VERSION, PreprocessConfig
from shared_model.fileio import atomic_write_json
from shared_model.sitedata.build import build_tensors, skipped_rows
from shared_model.sitedata.contract import PATIENTS_FILE, SITE_FILE, Site, load_site
from shared_model.sitedata.mask_source import with_mask_source
from shared_model.sitedata.tensors import SiteTensors

__all__ = ["CacheWriteError", "build_site_tensors", "check_cache_dir", "check_outside_site", "default_cache_dir",
           "site_content_key", "write_cache"]

logger = logging.getLogger(__name__)


class CacheWriteError(OSError):
    """The cache folder could not take a cache file (disk full, quota, permissions); nothing was cached."""


def write_cache(path: Path, save: Callable[[Path], object], site_name: str) -> None:
    """``save(path)`` (an atomic write), turning a failure into a :class:`CacheWriteError` that says where,
    why, how much room is left and what to do. The atomic write leaves no partial file behind, so the next
    attempt finds no cache and builds again rather than read a half-written one."""
    try:
        save(path)
    except OSError as exc:
        try:
            free = f"{shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free there"
        except OSError:
            free = "free space unknown"
        error = CacheWriteError(
            f"{site_name}: cannot write the preprocessing cache {path} ({exc.strerror or exc}; {free}). "
            "Nothing was cached and the site folder is untouched; make room, or point the cache elsewhere "
            "(--cache-dir, LLNM_CACHE_DIR, or the SuperNode's node config cache-dir)")
        error.errno = exc.errno
        raise error from exc


def default_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where site tensors are cached: ``cache_dir`` when given (e.g. an experiment's ``data.cache_dir`` or a
    ``--cache-dir`` option), else ``$LLNM_CACHE_DIR`` if set, else ``~/.cache/llnm-fl``."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("LLNM_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llnm-fl"


def build_site_tensors(
    site_dir: str | Path,
    cfg: PreprocessConfig,
    *,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    verify_content: bool = False,
) -> SiteTensors:
    """The site's tensors, from the cache when its key matches, else built and cached.

    Building: ``load_site`` (rows with errors are left out by it; each is logged here as a skipped patient
    with its reasons), then per view: masks, image (``region_hint`` = nodule centroid), the site's intensity
    range from up to ``cfg.range_max_views`` views, :func:`preprocess_view`; then every report through the
    frozen text encoder, loaded once. A patient whose image, mask or report cannot be read is skipped and
    logged (never a crash); a view without image or nodule mask is marked missing, never invented.

    A cache hit decodes nothing and does not load the text encoder. ``cache_dir`` defaults to
    :func:`default_cache_dir`. ``verify_content=True`` ignores the stat key and rehashes every file.

    Raises:
        ValueError: the site has no usable patient at all (the message lists the site's errors), or the cache
            folder is inside the site folder.
    """
    started = time.perf_counter()
    site = load_site(site_dir, cfg.inputs)
    _refuse_other_inputs(site, cfg)
    left_out = skipped_rows(site)
    if not site.patients:
        errors = [p.format() for p in site.problems if p.level == "error"]
        shown = "; ".join(errors[:10]) + (f"; ... ({len(errors) - 10} more)" if len(errors) > 10 else "")
        raise ValueError(f"site {site.root} has no usable patient rows: {shown or 'patients.csv is empty'}")

    cache_root = check_cache_dir(default_cache_dir(cache_dir), site.root)
    cache_root.mkdir(parents=True, exist_ok=True)
    site = with_mask_source(site, cfg, cache_root)
    files = _site_files(site)
    fingerprint = cfg.fingerprint()
    stat_key = _stat_key(site, fingerprint, files)
    stat_file = cache_root / f"{site.name}-{stat_key[:24]}.statkey.json"

    if not verify_content:
        cached = _load_by_stat_key(stat_file, cache_root, site.name, started)
        if cached is not None:
            return cached
    hash_started = time.perf_counter()
    key = site_content_key(site, cfg, files, fingerprint)
    hash_seconds = time.perf_counter() - hash_started
    cache_path = cache_root / f"{site.name}-{key[:16]}.pt"
    cached = _try_load(cache_path, key)
    if cached is not None:
        _write_stat_key(stat_file, key, site)
        _log_hit(cached, cache_path, started, "content key")
        return cached

    logger.info("%s: building site tensors (%d patients) into %s", site.name, len(site.patients), cache_path,
                extra={"llnm_event": "cache_build", "cache_path": str(cache_path)})
    for line in left_out:
        logger.warning("%s: skipping %s", site.name, line)
    tensors = build_tensors(site, cfg, progress=progress)
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
    write_cache(cache_path, tensors.save, site.name)
    # Written after the cache file it points to, so a stat key never names a cache that is not complete.
    write_cache(stat_file, lambda path: _write_stat_key(path, key, site), site.name)
    logger.info(
        "%s: built %d patients in %.1f s (%.2f patients/s); cached at %s",
        site.name, len(tensors), build_seconds, len(site.patients) / max(build_seconds, 1e-9), cache_path,
        extra={"llnm_event": "cache_written", "cache_path": str(cache_path)},
    )
    return tensors


def cached_content_key(site_dir: str | Path, cfg: PreprocessConfig, *, cache_dir: str | Path | None = None
                       ) -> tuple[str | None, str, Path]:
    """(content key of the site's cached tensors or None, site name, cache folder), without loading them.

    The key is the one the stat-key file records for the site's current files and `cfg`; None when there is
    no such file (the tensors were never built, or a file changed since). Caches derived from the site
    tensors (e.g. `shared_model.sitedata.public_features`) are keyed by it.
    """
    site = load_site(site_dir, cfg.inputs)
    cache_root = check_cache_dir(default_cache_dir(cache_dir), site.root)
    site = with_mask_source(site, cfg, cache_root)
    stat_file = cache_root / f"{site.name}-{_stat_key(site, cfg.fingerprint(), _site_files(site))[:24]}.statkey.json"
    try:
        return str(json.loads(stat_file.read_text(encoding="utf-8"))["content_key"]), site.name, cache_root
    except (OSError, ValueError, KeyError, TypeError):
        return None, site.name, cache_root


def _refuse_other_inputs(site: Site, cfg: PreprocessConfig) -> None:
    """Refuse a site that lacks what the experiment's inputs need (a modality or a clinical variable, declared or
    as a column): training on it would silently treat the variable as missing for every patient."""
    names = {v.name for v in cfg.inputs.clinical}
    found = [p.format() for p in site.problems if p.level == "error" and (
        (p.file == SITE_FILE and (p.field or "").startswith("inputs"))
        or (p.row == 1 and p.field in names and "missing" in p.message))]
    if found:
        raise ValueError(f"site {site.root} does not provide the experiment's inputs (preprocess.inputs): "
                         + "; ".join(found))


# ------------------------------------------------------------------------------------------ cache keys


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


def check_cache_dir(cache_dir: Path, site_root: Path) -> Path:
    """`cache_dir` resolved; refused (ValueError) when it is the site folder or inside it."""
    return check_outside_site(cache_dir, site_root, what="cache folder ",
                              remedy="choose another cache folder (--cache-dir or LLNM_CACHE_DIR)")


def check_outside_site(path: Path, site_root: Path, *, what: str, remedy: str) -> Path:
    """`path` resolved; refused (ValueError, saying `what` it is and the `remedy`) when it is the site folder or
    inside it: llnm-fl never writes into a site folder."""
    resolved = path.expanduser().resolve()
    if resolved == site_root or site_root in resolved.parents:
        raise ValueError(f"{what}{resolved} is inside the site folder {site_root}: llnm-fl never writes into a site "
                         f"folder; {remedy}")
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


def _load_by_stat_key(stat_file: Path, cache_root: Path, site_name: str, started: float) -> SiteTensors | None:
    """The cached tensors the stat key file points to, when it and they are valid; None otherwise."""
    if not stat_file.is_file():
        return None
    try:
        key = str(json.loads(stat_file.read_text(encoding="utf-8"))["content_key"])
    except (OSError, ValueError, KeyError, TypeError):
        logger.warning("stat key file %s is unreadable; rehashing the site", stat_file)
        return None
    path = cache_root / f"{site_name}-{key[:16]}.pt"
    cached = _try_load(path, key)
    if cached is not None:
        _log_hit(cached, path, started, "stat key")
    return cached


def _write_stat_key(stat_file: Path, key: str, site: Site) -> None:
    atomic_write_json(stat_file, {"content_key": key, "site": str(site.root)}, indent=None)


def _log_hit(tensors: SiteTensors, path: Path, started: float, how: str) -> None:
    """One line per hit; the skipped patients were logged one by one when the cache was built."""
    skipped = len(tensors.meta.get("skipped", []))
    logger.info(
        "%s: cache hit (%s) %s, %d patients (%d skipped when built, see meta['skipped']), loaded in %.3f s",
        tensors.site, how, path, len(tensors), skipped, time.perf_counter() - started,
        extra={"llnm_event": "cache_hit", "cache_path": str(path)},
    )
