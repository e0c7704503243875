"""A site's lifetime privacy ledger: every DP-SGD release of every run that touched its patients, on its own disk.

Why lifetime: a patient's privacy loss adds up over every model trained on them, whoever names the run. So
the ledger is keyed by the site's identity, its name and a fingerprint of the patients it trains on (the
"data id"), never by the coordinator's run name, and a site's epsilon is the composition of all its
releases. Runs are sections inside the ledger, for reporting.

* One JSON file per (site name, data id) in ``privacy-state-dir`` from the node config, else
  ``$LLNM_PRIVACY_DIR``, else ``privacy/`` in the site's state folder (``$LLNM_SITE_STATE_DIR``, else
  ``~/.local/share/llnm-fl``).
* When a site's patients change (new patients, a new split), its data id changes and a new ledger starts, and
  **every** other ledger of the same site in the folder is composed into its epsilon, whatever patients they
  share. Composing only the ledgers that share a patient would make the epsilon a site reports, and whether it
  refuses a round, depend on whether one returning patient is present: one bit about that patient, sent
  without noise. Composing all of them over-counts for patients who were never in the older sets, which is
  safe. (So two unrelated consortia that both call a site ``site-a`` on one machine should keep separate
  privacy folders.) Version-1 files (one per site and run, from before the lifetime ledger) are composed too.
* Every release (an "attempt" of a run's round) is recorded with a fingerprint of everything that determines
  it and with the seeds' secret: noise and Poisson sampling draw from generators seeded from a random secret
  kept in this file, never from the run's seed, which the coordinator knows.
* One exclusive inter-process lock per site (``<site>.lock`` in the folder, `site_lock`) covers every ledger of
  the site and its record (`fl_client.privacy.site_record`), from the moment a round reads them until it has
  saved them: two trainings or evaluations of one site at once, on the same patients or not, cannot both start
  from the same history and lose a release; the second waits and then reads the first one's release.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock, Timeout

from fl_client.privacy.plan import HistoryEntry, merge_history
from shared_model.fileio import atomic_write_json
from shared_model.naming import safe_filename

if TYPE_CHECKING:  # pragma: no cover - typing only
    from fl_client.settings import SiteSettings

ENV_STATE_DIR = "LLNM_PRIVACY_DIR"
STATE_FORMAT = "llnm-fl patient DP lifetime ledger"
STATE_VERSION = 2
LEGACY_FORMAT = "llnm-fl patient DP-SGD accountant history"  # version 1: one file per (site, run)
# How long a round waits for another training of the same site to release the ledger. A whole local round
# may run in between, so this is generous; a crashed process releases its lock at once (fcntl).
LOCK_TIMEOUT_S = 6 * 3600.0


class PrivacyStateError(RuntimeError):
    """The site's privacy ledger is unreadable or inconsistent; nothing is trained until fixed."""


def default_state_dir(settings: SiteSettings | None = None) -> Path:
    """Node config ``privacy-state-dir``, else ``$LLNM_PRIVACY_DIR``, else ``privacy/`` in the site's state folder
    (``$LLNM_SITE_STATE_DIR``, else ``~/.local/share/llnm-fl``), where `llnm-site join --state-dir` puts it."""
    from fl_client.site_state import state_root

    if settings is not None and settings.privacy_state_dir is not None:
        return Path(settings.privacy_state_dir)
    if os.environ.get(ENV_STATE_DIR):
        return Path(os.environ[ENV_STATE_DIR])
    return state_root() / "privacy"


def _slug(text: str) -> str:
    """A site's name in its privacy files: the safe name, cut, and a digest (two names never share a file)."""
    return f"{safe_filename(text)[:60]}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def patient_digests(patient_ids: Iterable[str]) -> list[str]:
    """Sorted digests of patient ids: enough to tell whether two ledgers share a patient, not who they are."""
    return sorted({hashlib.sha256(f"llnm-fl patient:{pid}".encode()).hexdigest()[:20] for pid in patient_ids})


def data_id(digests: Sequence[str]) -> str:
    """The fingerprint of a set of training patients (of their `patient_digests`)."""
    return hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()[:16]


def ledger_path(state_dir: Path, site_name: str, data: str) -> Path:
    """The lifetime ledger of one site and one set of training patients."""
    return Path(state_dir) / f"{_slug(site_name)}__data-{data}.json"


def lock_path(state_dir: Path, site_name: str) -> Path:
    """The site's lock file: in the privacy state folder (never in the site folder), one for all its ledgers."""
    return Path(state_dir) / f"{_slug(site_name)}.lock"


def site_lock(state_dir: Path, site_name: str, timeout: float = LOCK_TIMEOUT_S) -> FileLock:
    """Acquire the site's exclusive inter-process privacy lock and return it (release() frees it).

    Waits up to `timeout` seconds for another training or evaluation of this site; raises `PrivacyStateError`
    after that.
    """
    path = lock_path(state_dir, site_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), timeout=timeout)
    try:
        lock.acquire()
    except Timeout:
        raise PrivacyStateError(
            f"another training or evaluation of site {site_name!r} holds its privacy records (lock {path}) and "
            f"did not release them within {timeout:g} s; two trainings of one site must not overlap: stop the "
            "other one (a stale SuperNode or ClientApp) and retry"
        ) from None
    return lock


def now() -> str:
    """The local time as the ledger records it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


@dataclass(frozen=True)
class RelatedLedger:
    """Another ledger of the same site (other training patients, or a version-1 file): its releases count here."""

    path: Path
    releases: list[dict[str, Any]]


class SiteLedger:
    """One site's lifetime privacy ledger, as stored on the site's disk.

    Layout: ``{"format", "version", "site", "data_id", "patients": [digests], "secret", "created_at",
    "calibrated", "releases": [{"run_id", "round", "attempt", "fingerprint", "result_sha256", "history",
    "steps", "noise_multiplier", "sample_rate", "max_grad_norm", "public_count", "count_source",
    "delta", "accountant", "epsilon_run_after", "epsilon_lifetime_after", "finished_at", "replays"}],
    "refusals": [...]}``. Every release's ``history`` is the Opacus accountant entries it added.
    """

    def __init__(self, path: Path, data: dict[str, Any], related: list[RelatedLedger] | None = None) -> None:
        self.path = path
        self.data = data
        self.related = related or []

    @classmethod
    def load_or_create(cls, path: Path, *, site_name: str, patients: Sequence[str]) -> SiteLedger:
        """The ledger at `path` (created if absent) for `site_name` and the training `patients` digests."""
        digests = sorted(patients)
        data_fp = data_id(digests)
        if path.is_file():
            data = read_state_json(path)
            ledger = cls(path, data)
            ledger._validate(site_name=site_name, data=data_fp)
        else:
            ledger = cls(path, {
                "format": STATE_FORMAT,
                "version": STATE_VERSION,
                "site": site_name,
                "data_id": data_fp,
                "patients": digests,
                "secret": secrets.token_hex(32),
                "created_at": now(),
                "calibrated": {},
                "releases": [],
                "refusals": [],
            })
        ledger.related = find_related(path.parent, site_name, exclude=path)
        return ledger

    def _validate(self, *, site_name: str, data: str) -> None:
        d, where = self.data, str(self.path)
        if not isinstance(d, dict) or d.get("format") != STATE_FORMAT or d.get("version") != STATE_VERSION:
            raise PrivacyStateError(f"{where}: not a version-{STATE_VERSION} {STATE_FORMAT!r} file")
        for key, want in (("site", site_name), ("data_id", data)):
            if d.get(key) != want:
                raise PrivacyStateError(f"{where}: field {key!r} is {d.get(key)!r}, expected {want!r}")
        if not isinstance(d.get("secret"), str) or len(d["secret"]) < 32:
            raise PrivacyStateError(f"{where}: field 'secret' is missing or too short")
        if not isinstance(d.get("releases"), list):
            raise PrivacyStateError(f"{where}: field 'releases' must be a list")
        for i, rel in enumerate(d["releases"]):
            _check_release(rel, f"{where}: releases[{i}]")
        d.setdefault("calibrated", {})
        d.setdefault("refusals", [])

    # ---- queries -------------------------------------------------------------------------------
    def releases(self, *, include_related: bool = False) -> list[dict[str, Any]]:
        out = list(self.data["releases"])
        if include_related:
            for rel in self.related:
                out.extend(rel.releases)
        return out

    def attempts(self, run_id: str, server_round: int) -> list[dict[str, Any]]:
        """This ledger's releases of one round of one run, in attempt order."""
        return [r for r in self.data["releases"] if r["run_id"] == run_id and int(r["round"]) == server_round]

    def history(self, *, run_id: str | None = None, exclude: dict[str, Any] | None = None) -> list[HistoryEntry]:
        """Composition of the releases: the whole lifetime (with related ledgers), or one run's; `exclude` one."""
        entries: list[Sequence[float]] = []
        for rel in self.releases(include_related=True):
            if rel is exclude or (run_id is not None and rel["run_id"] != run_id):
                continue
            entries.extend(rel["history"])
        return merge_history(entries)

    def run_ids(self) -> list[str]:
        """Every run that made a release counted in this ledger, in first-release order."""
        return list(dict.fromkeys(str(r["run_id"]) for r in self.releases(include_related=True)))

    def seeds(self, run_id: str, server_round: int, attempt: int) -> tuple[int, int]:
        """(noise seed, sampling seed): secret to the site, fixed per (run, round, attempt) so retries replay."""
        key = bytes.fromhex(self.data["secret"])

        def derive(purpose: str) -> int:
            msg = f"{run_id}\x00{server_round}:{attempt}:{purpose}".encode()
            digest = hmac.new(key, msg, hashlib.sha256).digest()
            return int.from_bytes(digest[:8], "big") & (2**63 - 1)

        return derive("noise"), derive("poisson-sampling")

    # ---- updates -------------------------------------------------------------------------------
    def add_release(self, release: dict[str, Any]) -> None:
        _check_release(release, f"{self.path}: new release")
        self.data["releases"].append(release)

    def add_refusal(self, refusal: dict[str, Any]) -> None:
        self.data["refusals"].append({"at": now(), **refusal})

    def save(self) -> None:
        self.data["updated_at"] = now()
        atomic_write_json(self.path, self.data, indent=2)


def read_state_json(path: Path, what: str = "the site's privacy ledger") -> dict[str, Any]:
    """A privacy state file (`what` names it in errors); unreadable is an error, never a reset."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PrivacyStateError(
            f"{path}: {what} cannot be read ({exc}); it records the privacy already spent, so it is never "
            "silently reset: restore it from a backup"
        ) from None
    if not isinstance(data, dict):
        raise PrivacyStateError(f"{path}: {what} is not a JSON object")
    return data


def _check_release(rel: Any, where: str) -> None:
    if not isinstance(rel, dict):
        raise PrivacyStateError(f"{where} is not an object")
    for key in ("run_id", "round", "history"):
        if key not in rel:
            raise PrivacyStateError(f"{where} lacks {key!r}")
    try:
        entries = [(float(z), float(q), int(n)) for z, q, n in rel["history"]]
    except (TypeError, ValueError):
        raise PrivacyStateError(f"{where}.history is malformed") from None
    if any(not (z > 0 and 0 < q <= 1 and n >= 0) for z, q, n in entries):
        raise PrivacyStateError(f"{where}.history has impossible values")


def site_ledgers(state_dir: Path, site_name: str) -> list[tuple[Path, dict[str, Any], list[dict[str, Any]]]]:
    """Every ledger file of `site_name` in `state_dir`: (path, its contents, its releases, checked).

    Version-1 per-run files are included, their releases in the lifetime layout. An unreadable file is an
    error: it may hold privacy already spent.
    """
    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        return []
    out: list[tuple[Path, dict[str, Any], list[dict[str, Any]]]] = []
    for path in sorted(state_dir.glob(f"{_slug(site_name)}__*.json")):
        data = read_state_json(path)
        if data.get("site") != site_name:
            continue
        if data.get("format") == STATE_FORMAT:
            releases = list(data.get("releases") or [])
            for i, rel in enumerate(releases):
                _check_release(rel, f"{path}: releases[{i}]")
            out.append((path, data, releases))
        elif data.get("format") == LEGACY_FORMAT:
            out.append((path, data, _legacy_releases(path, data)))
    return out


def find_related(state_dir: Path, site_name: str, *, exclude: Path | None = None) -> list[RelatedLedger]:
    """Every other ledger of `site_name` in `state_dir`, whatever patients it holds (see the module docstring)."""
    return [RelatedLedger(path, releases) for path, _data, releases in site_ledgers(state_dir, site_name)
            if exclude is None or path.resolve() != Path(exclude).resolve()]


def _legacy_releases(path: Path, data: dict[str, Any]) -> list[dict[str, Any]]:
    """The releases of a version-1 file (one run of one site) in the lifetime ledger's release layout."""
    out: list[dict[str, Any]] = []
    for rnd, rec in sorted((data.get("rounds") or {}).items(), key=lambda kv: int(kv[0])):
        for i, att in enumerate(rec.get("attempts") or []):
            rel = {"run_id": str(data.get("run_id")), "round": int(rnd), "attempt": i,
                   "history": att.get("history"), "steps": att.get("steps"), "accountant": data.get("accountant"),
                   "delta": data.get("delta"), "source": f"version-1 file {path}"}
            _check_release(rel, f"{path}: rounds[{rnd}].attempts[{i}]")
            out.append(rel)
    return out
