"""The privacy guarantee of a run in plain words, from its ledger ``privacy.json`` (``llnm-server status``)."""

from __future__ import annotations

from typing import Any

from fl_server.privacy.wrappers import SERVER_ACCOUNTANT


def guarantee_sentences(data: dict[str, Any]) -> list[str]:
    """One plain sentence per enabled level: what the run whose ledger is `data` guarantees so far."""
    out: list[str] = []
    rounds = [e for e in data["rounds"] if e.get("complete")]
    pat = data.get("patient", {})
    if pat.get("enabled"):
        out.append(_patient_sentence(rounds, pat))
    site = data.get("site", {})
    if site.get("enabled"):
        out.append(_site_sentence(rounds, site, data.get("abandoned", [])))
    policies = policy_sentence(data)
    if policies:
        out.append(policies)
    return out


def policy_sentence(data: dict[str, Any]) -> str | None:
    """The sites' own privacy policies, as their last train replies stated them (None if none did)."""
    latest: dict[str, dict[str, Any]] = {}
    for entry in data.get("rounds", []):
        for name, rec in entry.get("sites", {}).items():
            if isinstance(rec.get("policy"), dict):
                latest[name] = rec["policy"]
    if not latest:
        return None

    def words(p: dict[str, Any]) -> str:
        parts = ["requires patient DP" if p.get("require-patient-dp") else "patient DP optional"]
        if p.get("require-secure-aggregation"):
            parts.append("requires secure aggregation")
        if p.get("max-patient-epsilon") is not None:
            parts.append(f"lifetime max-patient-epsilon {float(p['max-patient-epsilon']):g}")
        if p.get("max-run-epsilon") is not None:
            parts.append(f"max-run-epsilon {float(p['max-run-epsilon']):g}")
        if p.get("min-noise-multiplier") is not None:
            parts.append(f"noise multiplier >= {float(p['min-noise-multiplier']):g}")
        parts.append(f"delta <= {float(p.get('patient-delta', 1e-5)):g}")
        if p.get("max-clipping-norm") is not None:
            parts.append(f"clipping norm <= {float(p['max-clipping-norm']):g}")
        parts.append(f"evaluates on {p.get('eval-splits', 'val,test')}")
        if p.get("exact-evaluation"):
            parts.append(f"exact evaluation (val/test patients not protected), histograms <= "
                         f"{p.get('max-histogram-bins', 100)} bins")
        elif p.get("eval-epsilon") is not None:
            parts.append(f"DP evaluation at epsilon {float(p['eval-epsilon']):g} per reply, lifetime "
                         f"max-eval-epsilon {float(p.get('max-eval-epsilon') or 0):g}")
        return ", ".join(parts)

    return "site policies (each site's own node config, enforced by the site): " + "; ".join(
        f"{name}: {words(p)}" for name, p in sorted(latest.items()))


def _patient_sentence(rounds: list[dict[str, Any]], pat: dict[str, Any]) -> str:
    last: dict[str, dict[str, Any]] = {}
    refused: set[str] = set()
    rejected: dict[str, str] = {}
    for entry in rounds:
        for name, rec in entry.get("sites", {}).items():
            if rec.get("status") == "trained":
                last[name] = rec
            elif rec.get("status") == "refused":
                refused.add(name)
            elif rec.get("status") == "rejected":
                rejected[name] = f"round {entry.get('round')}: {rec.get('reason')}"
    rejected_text = "".join(f"; REJECTED {name}'s update ({why}), not aggregated"
                            for name, why in sorted(rejected.items()))
    delta = pat.get("delta")
    if not last:
        target = pat.get("target_epsilon")
        return (f"patient-level DP-SGD is configured at every site (delta {delta:g}"
                + (f", target epsilon {target:g}" if target else "") + ") but no site has reported training yet"
                + rejected_text)
    worst = max(rec["epsilon"] for rec in last.values())
    noises = sorted({round(rec["noise_multiplier"], 4) for rec in last.values()})
    noise = f"{noises[0]:g}" if len(noises) == 1 else f"{noises[0]:g} to {noises[-1]:g}"
    per_site = ", ".join(f"{name} {rec['epsilon']:.3f}" for name, rec in sorted(last.items()))
    stops = "; ".join(f"{name} stopped at its own budget" for name in sorted(refused))
    return (
        f"patient-level ({worst:.3f}, {delta:g})-DP at every site after {len(rounds)} round(s): each hospital "
        f"trained with DP-SGD (Opacus, Poisson sampling, per-patient clipping norm {pat.get('max_grad_norm'):g}, "
        f"noise multiplier {noise}, {str(pat.get('accountant')).upper()} accountant) and has spent epsilon "
        f"{per_site} in this run" + (f" ({stops})" if stops else "")
        + " (each recomputed by the coordinator from the mechanism the site reported); adjacency: add or remove one "
          "patient, with sampling and weights from each site's public patient count; each site keeps its patients' "
          "lifetime epsilon over every run on its own disk (`llnm-site privacy`)" + rejected_text
    )


def _site_sentence(rounds: list[dict[str, Any]], site: dict[str, Any], abandoned_rounds: list[dict[str, Any]]) -> str:
    released = [e["server"] for e in rounds if e.get("server")]
    abandoned = [e["server"] for e in abandoned_rounds if (e.get("server") or {}).get("released")]
    where = "the coordinator clipped" if str(site.get("clipping")).startswith("server") else "each site clipped"
    noise_by = "added" if where.startswith("the coordinator") else "the coordinator added"
    wrapper = site.get("wrapper") or "Flower's DP wrapper"
    if not released:
        return (f"site-level DP ({site.get('clipping')} clipping, noise multiplier "
                f"{site.get('noise_multiplier'):g}) is configured but no round has been released yet")
    last = released[-1]
    n = len(released) + len(abandoned)
    secure = ("; under secure aggregation the coordinator saw only the sum of the clipped updates, before it "
              "added the noise" if site.get("secure_aggregation") else "")
    if last.get("epsilon") is not None:
        return (
            f"site-level ({last['epsilon']:.3f}, {site.get('delta'):g})-DP for each hospital's whole contribution "
            f"after {n} release(s): {where} every model update to norm {site.get('clipping_norm'):g} and "
            f"{noise_by} Gaussian noise with multiplier {site.get('noise_multiplier'):g} to the average "
            f"({wrapper}; {SERVER_ACCOUNTANT}; the number of participating sites is treated as public{secure})"
        )
    return (
        f"site-level: {where} every model update adaptively (clipping norm now "
        f"{last.get('clipping_norm_next', 0):.4g}) "
        f"and {noise_by} Gaussian noise (multiplier {last.get('noise_multiplier'):.4g}) to the average "
        f"in {n} release(s) ({wrapper}), but Flower has no privacy accountant for adaptive clipping, so no "
        "site-level epsilon is claimed"
    )
