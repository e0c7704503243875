"""The typed records a run directory holds, as they pass between the round loop, the run directory, the
tracker, `status`, the report and the model card. They are JSON objects on disk (`metrics.json`, `run.json`),
so they are TypedDicts: the type checker knows their fields and the files stay plain JSON."""

from __future__ import annotations

import datetime as dt
from typing import Any, NotRequired, TypedDict

__all__ = ["Failure", "FinalRecord", "MetricsFile", "RoundRecord", "RunInfo", "SiteMetrics", "is_segmentation",
           "timestamp"]

#: One site's evaluation metrics as metrics.json holds them (`shared_model.protocol.decode_eval_metrics`).
SiteMetrics = dict[str, Any]


def is_segmentation(sites: dict[str, SiteMetrics], pooled: dict[str, Any]) -> bool:
    """Whether an evaluation's metrics are a segmentation round's (Dice per structure) rather than LLNM-Net's."""
    return "dice" in pooled or any("dice" in m for m in sites.values())


class Failure(TypedDict):
    """A site that did not take part in a phase of a round, and why (in the site's words for a refusal)."""

    site: str
    node_id: int | None
    phase: str  # "train" or "evaluate"
    reason: str


class RoundRecord(TypedDict):
    """One complete round in metrics.json."""

    round: int
    split: str
    sites: dict[str, SiteMetrics]  # empty in a round without evaluation (federation.eval_every)
    pooled: dict[str, Any]
    train: dict[str, dict[str, Any]]  # the training metrics each site sent
    failures: list[Failure]
    participants: list[str]  # the sites whose update was aggregated
    idle: NotRequired[list[str]]  # sites that replied with nothing trained (no drawn masks in a segmentation round)
    aggregated: dict[str, str]  # site -> the id of the instruction its aggregated update answers
    seconds: float
    train_seconds: float
    secure_aggregation: NotRequired[dict[str, Any]]


class FinalRecord(TypedDict):
    """The final evaluation of the chosen model in metrics.json."""

    round: int
    model: str  # "best" or "last"
    split: str
    sites: dict[str, SiteMetrics]
    pooled: dict[str, Any]
    failures: list[Failure]
    histograms: dict[str, Any]
    explanations: NotRequired[dict[str, Any]]


class MetricsFile(TypedDict, total=False):
    """metrics.json."""

    run: str
    rounds: list[RoundRecord]
    best_round: int | None
    best_round_rule: dict[str, Any] | None
    final: FinalRecord


class RunInfo(TypedDict, total=False):
    """run.json: what the run is and how its latest attempt went."""

    run_uid: str
    mode: str  # "deployment" or "simulation"
    superlink: str
    root_certificates: str | None
    insecure: bool
    data_root: str
    sites: list[str]
    status: str  # "created", "running", "completed", "stopped" or "failed"
    attempt_started_at: str  # UTC, ISO 8601: when the latest attempt (the run, or its latest resume) started
    rounds_completed: int
    stopped_at_round: int
    stopped_by: str
    error: str
    failures: list[Failure]
    trained_sites: list[str]
    rejected_nodes: dict[str, Any]
    previous_attempts: list[dict[str, Any]]
    app_sha256: str
    flwr_run_id: int
    provision_dir: str | None
    refused_connections: list[dict[str, Any]]  # `superlink_events.summarise_refusals`, per attempt


def timestamp() -> str:
    """The time a record is written: UTC, ISO 8601, whole seconds (so that records compare as strings)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
