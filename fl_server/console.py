"""What the coordinator's console says about a run: round lines, the final evaluation, explanations, and why a
round stopped the run (with what can be done next). Text only; the records are `fl_server.records`."""

from __future__ import annotations

import re
from typing import Any

from fl_server.records import Failure, RoundRecord, is_segmentation
from shared_model import protocol

__all__ = ["explanation_lines", "quorum_message", "round_line", "segmentation_line", "site_line"]

#: The app hash in a site's refusal of an app it has not approved (`fl_client.app_gate`).
_UNAPPROVED_APP = re.compile(r"app ([0-9a-f]{64}) is not approved")


def quorum_message(rnd: int, trained: int, min_sites: int, failures: list[Failure], run_path: object) -> str:
    """Why a round stopped the run, and what can actually be done next.

    A site that refused under its own privacy budget or policy will refuse a resumed round too, so resuming is
    only suggested when some failures were something else (a crash, a timeout, an unreachable site).
    """
    unapproved = sorted({f["site"] for f in failures if "runs only apps it approved" in str(f.get("reason", ""))})
    refused = sorted({f["site"] for f in failures if str(f.get("reason", "")).startswith(
        (protocol.REFUSAL_MARKER, protocol.POLICY_REFUSAL_MARKER))} - set(unapproved))
    other = sorted({f["site"] for f in failures} - set(refused) - set(unapproved))
    text = f"round {rnd}: {trained} site(s) trained, fewer than min_sites={min_sites}."
    listed = [f"{f['site']} ({f['phase']}): {f['reason']}" for f in failures if f["site"] not in unapproved]
    if listed:
        text += f" Failures: {'; '.join(listed)}."
    if unapproved:
        apps = sorted({m.group(1) for f in failures if (m := _UNAPPROVED_APP.search(str(f.get("reason", ""))))})
        text += (f" {', '.join(unapproved)} have not approved this app yet (app {', '.join(apps) or 'unknown'}): "
                 "once they have (`llnm-site approve HASH`, the hash `llnm-server app-hash` prints), "
                 f"`llnm-server resume {run_path}` goes on.")
    if refused:
        text += (f" {', '.join(refused)} refused under their own privacy budget or policy (their messages say "
                 "which rule); resuming this run cannot change that: start a new experiment that fits their "
                 "policies, or run with fewer sites (federation.min_sites).")
    if other:
        text += f" Fix {', '.join(other)} and run `llnm-server resume {run_path}`."
    return text


def _fmt(v: Any) -> str:
    return "  -  " if v is None else f"{v:.3f}"


def site_line(sites: dict[str, Any], pooled: dict[str, Any]) -> str:
    """Each site's AUC and the pooled AUC, on one line; in a segmentation run, each site's Dice of the thyroid and
    the nodule and the pooled ones with the capsule-distance error."""
    if is_segmentation(sites, pooled):
        return segmentation_line(sites, pooled)
    parts = [f"{name} {_fmt(m.get('auc'))}" for name, m in sites.items()]
    return "AUC " + ", ".join(parts) + f" | pooled {_fmt(pooled.get('auc'))}"


def segmentation_line(sites: dict[str, Any], pooled: dict[str, Any]) -> str:
    """Dice thyroid/nodule per site (views scored), pooled, and the pooled capsule-distance error."""

    def pair(m: dict[str, Any]) -> str:
        return "/".join(_fmt((m.get(s) or {}).get("dice")) for s in ("thyroid", "nodule"))

    parts = [f"{name} {pair(m)} (n={m.get('n', 0)}{', DP' if 'dp' in m else ''})" for name, m in sites.items()]
    capsule = pooled.get("capsule_error_mm") or {}
    tail = (f" | capsule-distance error {_fmt(capsule.get('mean_abs'))} mm mean absolute, "
            f"{_fmt(capsule.get('within_1mm'))} within 1 mm (n={capsule.get('n', 0)})" if capsule.get("n") else "")
    return "Dice thyroid/nodule " + ", ".join(parts) + f" | pooled {pair(pooled)}" + tail


def round_line(entry: RoundRecord, rounds: int) -> str:
    fails = "; ".join(f"{f['site']} {f['phase']}: {f['reason']}" for f in entry["failures"])
    metrics = (f"{entry['split']} " + site_line(entry["sites"], entry["pooled"]) if entry["sites"]
               else f"trained by {len(entry['participants'])} site(s), not evaluated (federation.eval_every)")
    if entry.get("idle"):
        metrics += f" | nothing to train at {', '.join(entry['idle'])}"
    return (f"[llnm] round {entry['round']}/{rounds} ({entry['seconds']:.0f} s) " + metrics
            + (f" | failed: {fails}" if fails else ""))


def explanation_lines(expl: dict[str, Any]) -> list[str]:
    """The combined explanation of the final model: feature-group shares beside the paper's, the LLNM rate by
    capsule distance, and the sites that sent none."""
    lines = []
    if expl.get("paper_group_shares"):
        ours = ", ".join(f"{g} {v:.1%}" for g, v in expl["paper_group_shares"].items())
        paper = ", ".join(f"{g} {v:.1%}" for g, v in expl["paper_shares"].items())
        lines.append(f"[llnm] feature-group shares (integrated gradients): {ours} | paper: {paper}")
    if expl.get("capsule"):
        rates = ", ".join(f"{b['bin']} {_fmt(b['observed_rate'])} observed / {_fmt(b['mean_probability'])} "
                          f"predicted (n={b['n']})" for b in expl["capsule"])
        lines.append(f"[llnm] LLNM rate by capsule distance: {rates}")
    lines += [f"[llnm] {site} sent no explanation: {why}" for site, why in expl.get("withheld", {}).items()]
    return lines
