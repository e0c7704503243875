"""The run directory `runs/<name>/`: the coordinator's durable record of one federated experiment.

Layout:
    config.yaml                 the resolved experiment configuration (what actually ran)
    run.json                    how the run is launched (simulation / deployment), data root, status
    metrics.json                {"rounds": [{"round", "split", "sites": {...}, "pooled": {...}, "train": {...},
                                 "failures": [...]}], "best_round", "final"}
    privacy.json                the privacy ledger (see fl_server.privacy), when DP is on
    checkpoints/round-NNNN.safetensors   global model after round N (LLNMNet state dict)
    checkpoints/round-NNNN.json          its model / preprocessing config and round metrics
    checkpoints/server-state-NNNN.json   strategy state needed to resume after round N
    checkpoints/best.json                the round with the best pooled validation AUC
    log.txt                     the run's log

Every file is written atomically (temporary file + rename) and a round counts as complete only once its
checkpoint, server state and metrics entry are all on disk, in that order; `resume` restarts from the
last complete round and drops anything a crash left half-written.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from fl_server.config import ConfigError, ExperimentConfig, load_config, parse_config, parse_set_options
from fl_server.records import FinalRecord, MetricsFile, RoundRecord, RunInfo, is_segmentation, timestamp
from shared_model.fileio import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    import torch


class NothingToResume(Exception):
    """The run in a run directory has completed all its rounds; there is nothing to continue."""


class RunInUse(ConfigError):
    """A live ServerApp holds the run directory's lock; the text names the process."""


def start_error_exit_code(exc: NothingToResume | ConfigError) -> int:
    """What `run`, `simulate` and `resume` print and return when a run cannot start: nothing to resume is
    not an error (exit 0); an unusable configuration or run directory, or one a live run holds, is (exit 2)."""
    if isinstance(exc, NothingToResume):
        print(exc)
        return 0
    print(f"error: {exc}", file=sys.stderr)
    return 2


class RunDirectory:
    """Create, read and append to a run directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).resolve()

    # ---- paths ---------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.json"

    @property
    def run_info_path(self) -> Path:
        return self.path / "run.json"

    @property
    def privacy_path(self) -> Path:
        return self.path / "privacy.json"

    @property
    def lock_path(self) -> Path:
        return self.path / ".run.lock"

    @property
    def holder_path(self) -> Path:
        """Who holds the lock (pid, host, since): written by the holder, read by whoever is refused."""
        return self.path / "lock.json"

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Hold the run directory for one live ServerApp (an OS file lock: a crashed holder releases it).

        Raises `RunInUse` naming the holder when another process holds it."""
        from filelock import FileLock, Timeout

        lock = FileLock(str(self.lock_path))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise RunInUse(self._in_use_text()) from None
        try:
            atomic_write_json(self.holder_path, {"pid": os.getpid(), "host": socket.gethostname(),
                                                 "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            yield
        finally:
            self.holder_path.unlink(missing_ok=True)
            lock.release()

    def ensure_not_running(self) -> None:
        """Raise `RunInUse` when a live ServerApp holds this run directory (before resuming it)."""
        if not self.path.is_dir():
            return
        with self.hold():
            pass

    def _in_use_text(self) -> str:
        try:
            holder = json.loads(self.holder_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            holder = {}
        who = (f"process {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}" if holder
               else "another process")
        return (f"{self.path} is in use by a live run ({who}, its ServerApp); it cannot be resumed or started "
                f"twice. Wait for it, or stop it with `llnm-server stop {self.path}`")

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def log_path(self) -> Path:
        return self.path / "log.txt"

    def checkpoint_file(self, rnd: int) -> Path:
        return self.checkpoints / f"round-{rnd:04d}.safetensors"

    # ---- creation ------------------------------------------------------------------------------
    def create(self, config: ExperimentConfig, run_info: RunInfo) -> None:
        """Start a new run; refuses to reuse a folder that already holds a run (use resume)."""
        if self.metrics_path.exists() or self.config_path.exists():
            raise ConfigError(
                f"{self.path}: already holds a run; use `llnm-server resume {self.path}` to continue it, "
                "or choose another --out"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        self.checkpoints.mkdir(exist_ok=True)
        atomic_write_text(self.config_path, config.to_yaml())
        # The run's identity at the sites (`run-id` of every message): the experiment's name made unique, so that a
        # fresh run under a reused name is a new run at every site (its own DP terms, its own explanation) while a
        # resumed run keeps its id.
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        atomic_write_json(self.run_info_path, {"run_uid": f"{config.name}-{stamp}-{secrets.token_hex(3)}",
                                               **run_info})
        atomic_write_json(self.metrics_path, {"run": config.name, "rounds": [], "best_round": None})

    def exists(self) -> bool:
        return self.config_path.is_file()

    def load_config(self) -> ExperimentConfig:
        if not self.config_path.is_file():
            raise ConfigError(f"{self.path}: not a run directory (no config.yaml)")
        data = yaml.safe_load(self.config_path.read_text(encoding="utf-8"))
        return parse_config(data, source=str(self.config_path))

    def resume_config(self) -> ExperimentConfig:
        """The saved configuration of the run to continue from its last complete round (every way of resuming
        a run, `llnm-server resume` or `--resume`, simulation or deployment, decides here).

        Raises:
            ConfigError: the folder holds no run.
            NothingToResume: every round is complete and the run finished.
        """
        exp = self.load_config()
        rounds = exp.federation.rounds
        if self.last_complete_round() >= rounds and self.run_info().get("status") == "completed":
            raise NothingToResume(f"{self.path}: all {rounds} rounds are complete; nothing to resume")
        return exp

    def run_info(self) -> RunInfo:
        if not self.run_info_path.is_file():
            return {}
        return json.loads(self.run_info_path.read_text(encoding="utf-8"))

    def run_uid(self) -> str:
        """The run's identity at the sites (see `create`); a run made before it existed keeps its name."""
        return str(self.run_info().get("run_uid") or self.load_config().name)

    #: What one attempt at the run leaves in run.json when it stops: moved aside when the next attempt starts,
    #: so that a resumed run never reports the previous attempt's error or failures as its own.
    ATTEMPT_FIELDS = ("error", "failures", "stopped_at_round", "trained_sites", "stopped_by", "stopped_at")

    def begin_attempt(self) -> None:
        """A run (or a resume) starts: the previous attempt's outcome moves to ``previous_attempts``."""
        info = self.run_info()
        ended = {k: info.pop(k) for k in self.ATTEMPT_FIELDS if k in info}
        if ended:
            ended["status"] = info.get("status")
            info.setdefault("previous_attempts", []).append(ended)
        info["status"] = "running"
        info["attempt_started_at"] = timestamp()
        atomic_write_json(self.run_info_path, info)

    def update_run_info(self, **changes: Any) -> None:
        info = self.run_info()
        info.update(changes)
        atomic_write_json(self.run_info_path, info)

    # ---- metrics -------------------------------------------------------------------------------
    def metrics(self) -> MetricsFile:
        if not self.metrics_path.is_file():
            return {"rounds": [], "best_round": None}
        return json.loads(self.metrics_path.read_text(encoding="utf-8"))

    def last_complete_round(self) -> int:
        """The last round whose checkpoint, server state and metrics entry all exist."""
        done = 0
        rounds = {r["round"] for r in self.metrics().get("rounds", [])}
        for rnd in sorted(rounds):
            if self.checkpoint_file(rnd).is_file() and self.server_state_path(rnd).is_file():
                done = rnd
            else:
                break
        return done

    def truncate_to(self, rnd: int) -> None:
        """Forget everything after round `rnd` (a crash may have left a round half-written)."""
        m = self.metrics()
        m["rounds"] = [r for r in m.get("rounds", []) if r["round"] <= rnd]
        m.pop("final", None)
        if m.get("best_round") is not None and m["best_round"] > rnd:
            m["best_round"] = _best_round(m["rounds"])
        atomic_write_json(self.metrics_path, m)
        for f in self.checkpoints.glob("round-*.safetensors"):
            if int(f.stem.split("-")[1]) > rnd:
                f.unlink()
        for f in self.checkpoints.glob("round-*.json"):
            if int(f.stem.split("-")[1]) > rnd:
                f.unlink()
        for f in self.checkpoints.glob("server-state-*.json"):
            if int(f.stem.split("-")[-1]) > rnd:
                f.unlink()

    def append_round(self, entry: RoundRecord) -> MetricsFile:
        m = self.metrics()
        rounds = [r for r in m.get("rounds", []) if r["round"] != entry["round"]]
        rounds.append(entry)
        rounds.sort(key=lambda r: r["round"])
        m["rounds"] = rounds
        choice = best_round_choice(rounds)
        m["best_round"] = None if choice is None else choice["round"]
        m["best_round_rule"] = choice
        atomic_write_json(self.metrics_path, m)
        if choice is not None:
            atomic_write_json(self.checkpoints / "best.json", {
                **choice, "checkpoint": self.checkpoint_file(choice["round"]).name})
        return m

    def set_final(self, final: FinalRecord) -> None:
        m = self.metrics()
        m["final"] = final
        atomic_write_json(self.metrics_path, m)

    # ---- checkpoints ---------------------------------------------------------------------------
    def server_state_path(self, rnd: int) -> Path:
        return self.checkpoints / f"server-state-{rnd:04d}.json"

    def save_checkpoint(self, rnd: int, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
        from shared_model.model.checkpoint import save_checkpoint

        return save_checkpoint(self.checkpoint_file(rnd), state, {"round": rnd, **meta})

    def save_server_state(self, rnd: int, state: dict[str, Any]) -> None:
        atomic_write_json(self.server_state_path(rnd), state)

    def load_server_state(self, rnd: int) -> dict[str, Any]:
        return json.loads(self.server_state_path(rnd).read_text(encoding="utf-8"))

    def load_checkpoint(self, rnd: int) -> dict[str, torch.Tensor]:
        """Round `rnd`'s global weights; a damaged file (its SHA-256 not the side-car's) raises CheckpointError."""
        from shared_model.model.checkpoint import load_checkpoint

        return load_checkpoint(self.checkpoint_file(rnd))[0]

    # ---- logging -------------------------------------------------------------------------------
    def attach_log(self, path: Path | None = None) -> logging.Handler:
        """Send the `llnm` and `flwr` loggers (llnm at INFO) to `path` (default `log.txt`) until
        :meth:`detach_log`."""
        handler = logging.FileHandler(path or self.log_path, encoding="utf-8")
        handler.setFormatter(PlainFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        for name in ("llnm", "flwr"):
            logging.getLogger(name).addHandler(handler)
        logging.getLogger("llnm").setLevel(logging.INFO)
        return handler

    @staticmethod
    def detach_log(handler: logging.Handler) -> None:
        for name in ("llnm", "flwr"):
            logging.getLogger(name).removeHandler(handler)
        handler.close()


class PlainFormatter(logging.Formatter):
    """A log line for a file: terminal colour codes removed, and a progress bar's carriage-return redraws
    reduced to their last state."""

    _ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")

    def format(self, record: logging.LogRecord) -> str:
        text = self._ANSI.sub("", super().format(record))
        return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


def best_round_choice(rounds: list[RoundRecord]) -> dict[str, Any] | None:
    """The round whose global model is best on validation, compared over the same sites.

    The score is the AUC (LLNM-Net) or, in a segmentation run, the mean Dice of the structures measured. A pooled score
    depends on which sites evaluated: a round that three sites evaluated and one that four did are not measured on
    the same patients. So: when every round with a pooled score was evaluated by the same sites, the highest pooled
    score wins. Otherwise each round is scored on the weighted mean (patients, or views) of the per-site scores of
    the sites that have one in every such round (the common sites, whose validation patients do not change); with
    no common site, the rounds evaluated by the most sites are compared on their pooled score. Ties go to the
    earlier round. Returns ``{"round", "criterion", "value", "sites"}`` or None.
    """
    key = "dice" if any(is_segmentation(r.get("sites") or {}, r.get("pooled") or {}) for r in rounds) else "auc"
    label = {"dice": "mean Dice", "auc": "AUC"}[key]
    scored = [r for r in rounds if (r.get("pooled") or {}).get(key) is not None]
    if not scored:
        return None

    def with_score(r: RoundRecord) -> frozenset[str]:
        return frozenset(s for s, m in (r.get("sites") or {}).items() if m.get(key) is not None)

    sets = [with_score(r) for r in scored]
    split = scored[0].get("split", "val")
    if len(set(sets)) == 1:
        best = max(scored, key=lambda r: (r["pooled"][key], -r["round"]))
        return {"round": best["round"], "criterion": f"pooled {split} {label}", "value": best["pooled"][key],
                "sites": sorted(sets[0])}
    common = frozenset.intersection(*sets)
    if common:
        def mean_score(r: RoundRecord) -> float:
            sites = r["sites"]
            n = sum(sites[s].get("n") or 1 for s in common)
            return sum((sites[s].get("n") or 1) * sites[s][key] for s in common) / n

        best = max(scored, key=lambda r: (mean_score(r), -r["round"]))
        return {"round": best["round"], "value": mean_score(best), "sites": sorted(common),
                "criterion": f"{'view' if key == 'dice' else 'patient'}-weighted mean {split} {label} of the sites "
                             "that evaluated every round"}
    most = max(len(x) for x in sets)
    widest = [r for r, x in zip(scored, sets, strict=True) if len(x) == most]
    best = max(widest, key=lambda r: (r["pooled"][key], -r["round"]))
    return {"round": best["round"], "value": best["pooled"][key], "sites": sorted(with_score(best)),
            "criterion": f"pooled {split} {label} among the rounds the most sites evaluated (no site evaluated all)"}


def _best_round(rounds: list[RoundRecord]) -> int | None:
    choice = best_round_choice(rounds)
    return None if choice is None else int(choice["round"])


def experiment_for(rd: RunDirectory, *, resume: bool, config: str, overrides: list[str] | None
                   ) -> tuple[ExperimentConfig, bool]:
    """The experiment a command with `--config`, `--set` and `--resume` runs, and whether it resumes: with
    `--resume` and a run already in `rd`, that run's saved configuration (:meth:`RunDirectory.resume_config`);
    otherwise the config file with the `--set` overrides, for a new run."""
    if resume and rd.exists():
        rd.ensure_not_running()
        return rd.resume_config(), True
    return load_config(config, parse_set_options(overrides)), False
