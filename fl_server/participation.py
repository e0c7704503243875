"""Who trained in a run, who refused and why, and who failed: one reading of the run's records, for
`llnm-server status`, the report and the model card alike."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fl_server.records import MetricsFile, RunInfo
from shared_model import protocol
from shared_model.text_table import format_rounds


@dataclass
class SiteParticipation:
    """One site's part in the run's training rounds."""

    trained: list[int] = field(default_factory=list)
    refused: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    reason: str | None = None  # the last refusal's or failure's words

    def to_dict(self) -> dict[str, Any]:
        return {"trained": self.trained, "refused": self.refused, "failed": self.failed, "reason": self.reason}


def _is_refusal(reason: str) -> bool:
    return reason.startswith((protocol.REFUSAL_MARKER, protocol.POLICY_REFUSAL_MARKER))


def participation(metrics: MetricsFile, run_info: RunInfo | None = None) -> dict[str, SiteParticipation]:
    """Per site, the training rounds it took part in, refused and failed, from metrics.json's rounds (and, for a
    round that stopped the run before it was recorded, run.json's failures)."""
    out: dict[str, SiteParticipation] = {}
    rounds = list(metrics.get("rounds", []))
    info = run_info or {}
    if info.get("stopped_at_round") and info.get("failures"):
        rounds.append({"round": info["stopped_at_round"], "participants": info.get("trained_sites", []),
                       "failures": info["failures"]})
    for entry in rounds:
        rnd = int(entry["round"])
        for site in entry.get("participants", []):
            out.setdefault(site, SiteParticipation()).trained.append(rnd)
        for fail in entry.get("failures", []):
            if fail.get("phase") != "train":
                continue
            rec = out.setdefault(fail["site"], SiteParticipation())
            reason = str(fail.get("reason", ""))
            (rec.refused if _is_refusal(reason) else rec.failed).append(rnd)
            rec.reason = reason
    return dict(sorted(out.items()))


def participation_lines(parts: dict[str, SiteParticipation], *, only_problems: bool = False) -> list[str]:
    """One plain line per site: the rounds it trained, and any it refused or failed, with the last reason
    (`only_problems`: only the sites that refused, failed or never trained)."""
    lines = []
    for site, p in parts.items():
        if only_problems and p.trained and not (p.refused or p.failed):
            continue
        words = [f"trained in round(s) {format_rounds(p.trained)}" if p.trained else "trained in no round"]
        if p.refused:
            words.append(f"refused round(s) {format_rounds(p.refused)}")
        if p.failed:
            words.append(f"failed round(s) {format_rounds(p.failed)}")
        line = f"{site}: {', '.join(words)}"
        if p.reason and (p.refused or p.failed):
            line += f" ({p.reason})"
        lines.append(line)
    return lines
