"""A site's record of every run it took part in, and of every evaluation release, on its own disk.

The DP-SGD ledgers (`fl_client.privacy.history`) account the training patients under DP. This record holds the
rest of what a hospital's operator and auditor must see, and what the site must remember to enforce its policy
against a coordinator that changes its messages between rounds:

* **every run**, with or without DP: the rounds it trained with DP-SGD, the rounds it trained *without* DP
  (whose training patients that run left unprotected), its exact evaluations (whose patients it left
  unprotected), and its DP evaluation replies;
* **the run's DP terms** (target epsilon, noise multiplier, delta, clipping norm, accountant), pinned when the
  site first trains in the run under DP: a later round of the same run with other terms is refused, so a
  coordinator cannot raise a run's target after the sites have started;
* **the evaluation releases** (`fl_client.privacy.evaluation`): each DP evaluate reply is a Gaussian release of
  a sensitivity-1 vector at noise ``sigma``, i.e. the accountant entry ``(sigma, 1.0, 1)``; their composition
  is the site's lifetime evaluation epsilon, bounded by its ``max-eval-epsilon``;
* **explanations**: the runs whose final model the site has explained (once per run).

One JSON file per site, ``<site>__site-record.json``, beside its DP-SGD ledgers, written atomically and only
under the site's lock (`fl_client.privacy.history.site_lock`). Nothing in it leaves the site.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fl_client.privacy.history import PrivacyStateError, _slug, default_state_dir, now, read_state_json, site_lock
from shared_model.dp_accounting import HistoryEntry, check_history
from shared_model.fileio import atomic_write_json

if TYPE_CHECKING:  # pragma: no cover - typing only
    from fl_client.settings import SiteSettings

RECORD_FORMAT = "llnm-fl site privacy record"
RECORD_VERSION = 1
#: The DP terms of a run the site pins when it first trains in it under DP.
RUN_TERMS = ("target_epsilon", "noise_multiplier", "delta", "max_grad_norm", "accountant")


def record_path(state_dir: Path, site_name: str) -> Path:
    return Path(state_dir) / f"{_slug(site_name)}__site-record.json"


class SiteRecord:
    """The site's record (see the module docstring); load, change, `save` under the site's lock."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data

    @classmethod
    def load_or_create(cls, state_dir: Path, site_name: str) -> SiteRecord:
        path = record_path(state_dir, site_name)
        if not path.is_file():
            return cls(path, {"format": RECORD_FORMAT, "version": RECORD_VERSION, "site": site_name,
                              "created_at": now(), "runs": {}, "evaluations": [], "refusals": []})
        data = read_state_json(path, "the site's privacy record")
        if data.get("format") != RECORD_FORMAT or data.get("version") != RECORD_VERSION:
            raise PrivacyStateError(f"{path}: not a version-{RECORD_VERSION} {RECORD_FORMAT!r} file")
        if data.get("site") != site_name:
            raise PrivacyStateError(f"{path}: field 'site' is {data.get('site')!r}, expected {site_name!r}")
        for key, kind in (("runs", dict), ("evaluations", list), ("refusals", list)):
            if not isinstance(data.get(key), kind):
                raise PrivacyStateError(f"{path}: field {key!r} must be a {kind.__name__}")
        for i, rel in enumerate(data["evaluations"]):
            try:
                check_history(rel["history"], f"{path}: evaluations[{i}].history")
            except (ValueError, TypeError, KeyError) as exc:
                raise PrivacyStateError(str(exc) if isinstance(exc, ValueError) else
                                        f"{path}: evaluations[{i}] has no accountant history") from None
        return cls(path, data)

    def save(self) -> None:
        self.data["updated_at"] = now()
        atomic_write_json(self.path, self.data, indent=2)

    # ---- runs ----------------------------------------------------------------------------------------
    def run(self, run_id: str) -> dict[str, Any]:
        """The run's entry, created on first use."""
        runs = self.data["runs"]
        if run_id not in runs:
            runs[run_id] = {"first": now(), "last": now(), "terms": None, "dp_rounds": [], "unprotected_rounds": [],
                            "exact_evaluations": [], "dp_evaluations": 0, "explained": None}
        return runs[run_id]

    def pinned_terms(self, run_id: str) -> dict[str, Any] | None:
        entry = self.data["runs"].get(run_id)
        return None if entry is None else entry.get("terms")

    def pin_terms(self, run_id: str, terms: dict[str, Any]) -> None:
        entry = self.run(run_id)
        if entry.get("terms") is None:
            entry["terms"] = {k: terms[k] for k in RUN_TERMS}

    def note_dp_round(self, run_id: str, server_round: int) -> None:
        entry = self.run(run_id)
        entry["last"] = now()
        if server_round not in entry["dp_rounds"]:
            entry["dp_rounds"].append(server_round)

    def note_unprotected_round(self, run_id: str, server_round: int, patients: int, data_id: str) -> None:
        """A round trained without DP-SGD: its `patients` training patients (data id) are not protected."""
        entry = self.run(run_id)
        entry["last"] = now()
        entry["unprotected_rounds"].append({"round": server_round, "patients": int(patients), "data_id": data_id,
                                            "at": now()})

    def note_exact_evaluation(self, run_id: str, server_round: int, split: str, patients: int) -> None:
        """An exact (not DP) evaluate reply: the split's `patients` are not protected by it."""
        entry = self.run(run_id)
        entry["last"] = now()
        entry["exact_evaluations"].append({"round": server_round, "split": split, "patients": int(patients),
                                           "at": now()})

    # ---- evaluation releases ---------------------------------------------------------------------------
    def evaluation_history(self) -> list[HistoryEntry]:
        return [tuple(e) for rel in self.data["evaluations"] for e in rel["history"]]  # type: ignore[misc]

    def add_evaluation(self, run_id: str, server_round: int, split: str, kind: str, sigma: float,
                       epsilon: float, delta: float) -> None:
        """One DP evaluation release: a Gaussian release of a sensitivity-1 vector at noise `sigma`."""
        self.data["evaluations"].append({"run_id": run_id, "round": server_round, "split": split, "kind": kind,
                                         "history": [[float(sigma), 1.0, 1]], "epsilon": float(epsilon),
                                         "delta": float(delta), "at": now()})
        entry = self.run(run_id)
        entry["last"] = now()
        entry["dp_evaluations"] = int(entry.get("dp_evaluations", 0)) + 1

    def explained(self, run_id: str) -> str | None:
        entry = self.data["runs"].get(run_id)
        return None if entry is None else entry.get("explained")

    def note_explained(self, run_id: str) -> None:
        self.run(run_id)["explained"] = now()

    def add_refusal(self, refusal: dict[str, Any]) -> None:
        self.data["refusals"].append({"at": now(), **refusal})


@contextmanager
def locked_record(settings: SiteSettings, site_name: str) -> Iterator[SiteRecord]:
    """The site's record under the site's lock; saved when the block ends without an error."""
    state_dir = default_state_dir(settings).expanduser().resolve()
    lock = site_lock(state_dir, site_name)
    try:
        record = SiteRecord.load_or_create(state_dir, site_name)
        yield record
        record.save()
    finally:
        lock.release()


def note_unprotected_round(settings: SiteSettings, site_name: str, run_id: str, server_round: int, patients: int,
                           data: str) -> None:
    """Record a round trained without DP-SGD (its training patients are not protected by that run)."""
    with locked_record(settings, site_name) as record:
        record.note_unprotected_round(run_id, server_round, patients, data)


def note_exact_evaluation(settings: SiteSettings, site_name: str, run_id: str, server_round: int, split: str,
                          patients: int) -> None:
    """Record an exact evaluate reply (those patients are not protected by it)."""
    with locked_record(settings, site_name) as record:
        record.note_exact_evaluation(run_id, server_round, split, patients)


def claim_explanation(settings: SiteSettings, site_name: str, run_id: str) -> str | None:
    """Claim run `run_id`'s one explanation (check and mark under the site's lock, so that two evaluations at once
    cannot both explain): None when claimed now, else when it was claimed before."""
    with locked_record(settings, site_name) as record:
        before = record.explained(run_id)
        if before is None:
            record.note_explained(run_id)
        return before
