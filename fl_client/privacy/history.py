"""A site's accountant history for one run, on the site's own disk.

The history file (one JSON file per site and run, in ``privacy-state-dir`` from the node config, else
``$LLNM_PRIVACY_DIR``, else ``~/.local/share/llnm-fl/privacy``) survives the fresh ClientApp process of every
round and SuperNode restarts. It is keyed by server round, and every release of a round (an "attempt") is
recorded with a fingerprint of everything that determines it, and with the seeds' secret: noise and Poisson
sampling draw from generators seeded from a random secret kept in this file, never from the run's seed,
which the coordinator knows.

The file is locked (an exclusive inter-process lock on ``<history>.lock`` beside it, `history_lock`) from the
moment a round's DP session reads it until it has saved it, so two trainings of one site run at once (a
restarted SuperNode while the old ClientApp still runs, two SuperNodes on one site folder) cannot both start
from the same history and lose one release: the second waits and then reads the first one's release.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock, Timeout

from fl_client.privacy.plan import HistoryEntry, merge_history
from shared_model.fileio import atomic_write_json

if TYPE_CHECKING:  # pragma: no cover - typing only
    from fl_client.settings import SiteSettings

ENV_STATE_DIR = "LLNM_PRIVACY_DIR"
STATE_FORMAT = "llnm-fl patient DP-SGD accountant history"
STATE_VERSION = 1
# How long a round waits for another training of the same site to release the history file. A whole local
# round may run in between, so this is generous; a crashed process releases its lock at once (fcntl).
LOCK_TIMEOUT_S = 6 * 3600.0


class PrivacyStateError(RuntimeError):
    """The site's accountant history file is unreadable or inconsistent; nothing is trained until fixed."""


def default_state_dir(settings: SiteSettings | None = None) -> Path:
    """Node config ``privacy-state-dir``, else ``$LLNM_PRIVACY_DIR``, else ``~/.local/share/llnm-fl/privacy``."""
    if settings is not None and settings.privacy_state_dir is not None:
        return Path(settings.privacy_state_dir)
    if os.environ.get(ENV_STATE_DIR):
        return Path(os.environ[ENV_STATE_DIR])
    return Path.home() / ".local" / "share" / "llnm-fl" / "privacy"


def _slug(text: str) -> str:
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in text)[:60]
    return f"{safe}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def state_path(state_dir: Path, site_name: str, run_id: str) -> Path:
    """The history file of one site in one run."""
    return Path(state_dir) / f"{_slug(site_name)}__{_slug(run_id)}.json"


def lock_path(path: Path) -> Path:
    """The lock file of a history file: beside it, in the privacy state folder (never in the site folder)."""
    return Path(path).with_name(Path(path).name + ".lock")


def history_lock(path: Path, timeout: float = LOCK_TIMEOUT_S) -> FileLock:
    """Acquire the exclusive inter-process lock of the history file `path` and return it (release() frees it).

    Waits up to `timeout` seconds for another training of this site; raises `PrivacyStateError` after that.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path(path)), timeout=timeout)
    try:
        lock.acquire()
    except Timeout:
        raise PrivacyStateError(
            f"{path}: another training of this site holds the DP accountant history (lock {lock_path(path)}) and "
            f"did not release it within {timeout:g} s; two trainings of one site in one run must not overlap: "
            "stop the other one (a stale SuperNode or ClientApp) and retry"
        ) from None
    return lock


def now() -> str:
    """The local time as the history file records it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class SiteHistory:
    """One site's accountant history for one run, as stored on the site's disk.

    Layout: ``{"format", "version", "site", "run_id", "accountant", "delta", "secret", "calibrated",
    "rounds": {"<server round>": {"attempts": [{"fingerprint", "result_sha256", "history", "steps",
    "noise_multiplier", "sample_rate", "max_grad_norm", "epsilon_after", "finished_at", "replays"}]}},
    "refusals": [...]}``. Every attempt's ``history`` is the Opacus history entries it added; the run's
    history is their composition over all rounds and attempts.
    """

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data

    @classmethod
    def load_or_create(cls, path: Path, *, site_name: str, run_id: str, accountant: str,
                       delta: float) -> SiteHistory:
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise PrivacyStateError(
                    f"{path}: the site's DP accountant history cannot be read ({exc}); it records the privacy "
                    "already spent, so it is never silently reset: restore it from a backup, or move it away "
                    "only if this site never trained in this run"
                ) from None
            hist = cls(path, data)
            hist._validate(site_name=site_name, run_id=run_id, accountant=accountant, delta=delta)
            return hist
        data = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "site": site_name,
            "run_id": run_id,
            "accountant": accountant,
            "delta": delta,
            "secret": secrets.token_hex(32),
            "created_at": now(),
            "calibrated": {},
            "rounds": {},
            "refusals": [],
        }
        return cls(path, data)

    def _validate(self, *, site_name: str, run_id: str, accountant: str, delta: float) -> None:
        d = self.data
        where = str(self.path)
        if not isinstance(d, dict) or d.get("format") != STATE_FORMAT or d.get("version") != STATE_VERSION:
            raise PrivacyStateError(f"{where}: not a version-{STATE_VERSION} {STATE_FORMAT!r} file")
        for key, want in (("site", site_name), ("run_id", run_id)):
            if d.get(key) != want:
                raise PrivacyStateError(f"{where}: field {key!r} is {d.get(key)!r}, expected {want!r}")
        if d.get("accountant") != accountant:
            raise PrivacyStateError(
                f"{where}: this run's history was accounted with {d.get('accountant')!r}, but the coordinator now "
                f"asks for {accountant!r}; one run keeps one accountant"
            )
        if d.get("delta") != delta:
            raise PrivacyStateError(f"{where}: this run's delta was {d.get('delta')!r}, the coordinator now sends "
                                    f"{delta!r}; one run keeps one delta")
        if not isinstance(d.get("secret"), str) or len(d["secret"]) < 32:
            raise PrivacyStateError(f"{where}: field 'secret' is missing or too short")
        rounds = d.get("rounds")
        if not isinstance(rounds, dict):
            raise PrivacyStateError(f"{where}: field 'rounds' must be a mapping")
        for rnd, rec in rounds.items():
            if not str(rnd).isdigit() or not isinstance(rec, dict) or not isinstance(rec.get("attempts"), list):
                raise PrivacyStateError(f"{where}: rounds[{rnd!r}] is malformed")
            for i, att in enumerate(rec["attempts"]):
                try:
                    entries = [(float(z), float(q), int(n)) for z, q, n in att["history"]]
                except (KeyError, TypeError, ValueError):
                    raise PrivacyStateError(f"{where}: rounds[{rnd}].attempts[{i}].history is malformed") from None
                if any(not (z > 0 and 0 < q <= 1 and n >= 0) for z, q, n in entries):
                    raise PrivacyStateError(f"{where}: rounds[{rnd}].attempts[{i}].history has impossible values")
        d.setdefault("calibrated", {})
        d.setdefault("refusals", [])

    # ---- queries -------------------------------------------------------------------------------
    def attempts(self, server_round: int) -> list[dict[str, Any]]:
        return list(self.data["rounds"].get(str(server_round), {}).get("attempts", []))

    def history(self, *, exclude: tuple[int, int] | None = None) -> list[HistoryEntry]:
        """Composition of every recorded release, optionally leaving out one (round, attempt index)."""
        entries: list[Sequence[float]] = []
        for rnd in sorted(self.data["rounds"], key=int):
            for i, att in enumerate(self.data["rounds"][rnd]["attempts"]):
                if exclude == (int(rnd), i):
                    continue
                entries.extend(att["history"])
        return merge_history(entries)

    def seeds(self, server_round: int, attempt: int) -> tuple[int, int]:
        """(noise seed, sampling seed): secret to the site, fixed per (round, attempt) so retries replay."""
        key = bytes.fromhex(self.data["secret"])

        def derive(purpose: str) -> int:
            digest = hmac.new(key, f"{server_round}:{attempt}:{purpose}".encode(), hashlib.sha256).digest()
            return int.from_bytes(digest[:8], "big") & (2**63 - 1)

        return derive("noise"), derive("poisson-sampling")

    # ---- updates -------------------------------------------------------------------------------
    def add_attempt(self, server_round: int, attempt: dict[str, Any]) -> None:
        self.data["rounds"].setdefault(str(server_round), {"attempts": []})["attempts"].append(attempt)

    def save(self) -> None:
        self.data["updated_at"] = now()
        atomic_write_json(self.path, self.data, indent=2)
