"""What a site's explanation aggregates are, and how the coordinator combines them (role-free).

A site explains the global model on its own patients (`fl_client.explain`) and, when the coordinator asks
(`evaluation.explain: true`), sends back only the aggregates defined here:

* **feature-group shares**: for each feature group, the mean over the site's explained patients of that
  group's share of the patient's total absolute integrated-gradients attribution (captum's
  `IntegratedGradients`, zero baseline, on the patient's LLNM probability). One number per group; they sum
  to 1 over the groups;
* **location counts**: per capsule-distance bin and per lobe third, the number of labelled patients, how
  many had LLNM (observed), how many the model called positive at 0.5, and the sum of its probabilities
  (expected positives). Counts and one sum per bin; nothing per patient.

A cell over fewer patients than the site's ``min-cell-count`` (default `MIN_AGGREGATE_PATIENTS`) is not sent: a
site that explained fewer withholds its shares, and such a bin is sent as suppressed (`protocol.SUPPRESSED_CELL`
counts, no probability sum), since a count or a sum over one patient is that patient's label or score. By
default the aggregates are also differentially private (`fl_client.privacy.evaluation`): the counts and sums
are noisy, and the suppression is decided on the noisy counts.

The groups follow the model's inputs (`InputsConfig.feature_names`): the three image channels, the report,
each declared clinical variable, and each per-view measurement from the masks. The paper's four groups
(location, morphology, report, demographics) are sums of ours (`PAPER_GROUPS`), so that a report can print
both. The message keys are in `shared_model.protocol`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from shared_model.config.inputs import IMAGE_SCALARS, InputsConfig

__all__ = [
    "CAPSULE_BIN_EDGES_MM",
    "CAPSULE_BIN_LABELS",
    "IMAGE_CHANNEL_GROUPS",
    "LOBE_THIRDS",
    "LOCATION_FIELDS",
    "MIN_AGGREGATE_PATIENTS",
    "PAPER_FEATURE_SHARES",
    "PAPER_LOCATION_FINDINGS",
    "combine_site_explanations",
    "feature_groups",
    "paper_group_of",
]

#: The fewest patients a sent cell may hold, unless the site sets its own min-cell-count (module docstring).
MIN_AGGREGATE_PATIENTS = 5
#: Capsule-distance bins (mm) of the paper's finding: [0, 1), [1, 2.5), [2.5, 5), [5, inf).
CAPSULE_BIN_EDGES_MM: tuple[float, ...] = (0.0, 1.0, 2.5, 5.0, math.inf)
CAPSULE_BIN_LABELS: tuple[str, ...] = ("0-1 mm", "1-2.5 mm", "2.5-5 mm", ">5 mm")
#: Thirds of the lobe along its long axis, from the longitudinal view's nodule position (cranial first).
LOBE_THIRDS: tuple[str, ...] = ("upper", "middle", "lower")
#: The counts sent per bin (each a list over the bins).
LOCATION_FIELDS: tuple[str, ...] = ("n", "observed", "predicted", "expected")
#: Image channels in the order of the site tensors (`shared_model.sitedata.preprocessing`): texture, margin, location.
IMAGE_CHANNEL_GROUPS: tuple[str, ...] = ("morphology/texture", "margin", "location map")
_SCALAR_GROUPS = {"shape_ratio": "shape", "echogenicity": "echogenicity", "capsule_distance": "capsule distance",
                  "nodule_size": "size", "nodule_position": "position in the lobe"}
#: The paper's feature-group shares (Shen et al. 2025, feature contribution analysis).
PAPER_FEATURE_SHARES: dict[str, float] = {"location": 0.488, "morphology": 0.299, "report": 0.197,
                                          "demographics": 0.016}
#: The paper's location findings, as quoted beside the recovered counts.
PAPER_LOCATION_FINDINGS: tuple[str, ...] = (
    "nodules within 2.5 mm of the capsule carry more than 72% LLNM risk",
    "the upper and middle thirds carry higher risk than the lower third",
)


def feature_groups(inputs: InputsConfig) -> list[str]:
    """The feature groups of a model with these inputs, in the order their shares are sent."""
    groups: list[str] = list(IMAGE_CHANNEL_GROUPS) if inputs.images else []
    if inputs.reports:
        groups.append("report")
    groups += [v.name for v in inputs.clinical]
    if inputs.images:
        groups += [_SCALAR_GROUPS[name] for name in IMAGE_SCALARS]
    return groups


def paper_group_of(group: str, inputs: InputsConfig) -> str:
    """Which of the paper's four groups one of ours belongs to."""
    if group in ("location map", "capsule distance", "position in the lobe"):
        return "location"
    if group == "report":
        return "report"
    if group in {v.name for v in inputs.clinical}:
        return "demographics"
    return "morphology"


def _weighted_mean(values: Sequence[Sequence[float]], weights: Sequence[int]) -> list[float] | None:
    total = sum(weights)
    if not values or total <= 0:
        return None
    return [sum(w * v[i] for v, w in zip(values, weights, strict=True)) / total for i in range(len(values[0]))]


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(float(value))


def _rates(parts: Sequence[Mapping[str, Sequence[Any]]], labels: Sequence[str]) -> list[dict[str, Any]]:
    """Summed counts per bin over the sites that sent the bin (not suppressed), and their rates; the mean
    probability is over the sites that sent a sum."""
    out = []
    for i, label in enumerate(labels):
        sent = [p for p in parts if p["n"][i] is not None and int(p["n"][i]) >= 0]
        n = sum(int(p["n"][i]) for p in sent)
        observed = sum(int(p["observed"][i]) for p in sent)
        predicted = sum(int(p["predicted"][i]) for p in sent)
        with_sum = [p for p in sent if _finite(p["expected"][i])]
        expected = sum(float(p["expected"][i]) for p in with_sum)
        n_sum = sum(int(p["n"][i]) for p in with_sum)
        out.append({"bin": label, "n": n, "observed": observed, "predicted": predicted,
                    "expected": expected if with_sum else None, "n_with_probability_sum": n_sum,
                    "sites_suppressed": len(parts) - len(sent),
                    "observed_rate": observed / n if n else None, "predicted_rate": predicted / n if n else None,
                    "mean_probability": expected / n_sum if n_sum else None})
    return out


def combine_site_explanations(sites: Mapping[str, Mapping[str, Any]], inputs: InputsConfig) -> dict[str, Any]:
    """The consortium's explanation from the sites' aggregates (`protocol.decode_explanation` of each).

    Shares are averaged over sites weighted by the patients each explained; location counts are summed, and
    the rates are those of the sums. The paper's numbers are put beside ours.
    """
    groups = feature_groups(inputs)
    usable = {s: e for s, e in sites.items() if e.get("shares") and len(e["shares"]) == len(groups)}
    shares = _weighted_mean([e["shares"] for e in usable.values()], [int(e["n"]) for e in usable.values()])
    result: dict[str, Any] = {
        "method": "integrated gradients (captum), zero baseline, on the patient's LLNM probability; "
                  "a group's share of each patient's total |attribution|, averaged over patients, then over sites "
                  "weighted by patients",
        "groups": groups,
        "sites": {s: {"n": int(e["n"]), "shares": dict(zip(groups, e["shares"], strict=True))}
                  for s, e in sorted(usable.items())},
        "shares": dict(zip(groups, shares, strict=True)) if shares else None,
        "paper_groups": {g: paper_group_of(g, inputs) for g in groups},
        "paper_shares": dict(PAPER_FEATURE_SHARES),
        "paper_findings": list(PAPER_LOCATION_FINDINGS),
    }
    if shares:
        four: dict[str, float] = dict.fromkeys(PAPER_FEATURE_SHARES, 0.0)
        for g, v in zip(groups, shares, strict=True):
            four[result["paper_groups"][g]] += v
        result["paper_group_shares"] = four
    for key, labels in (("capsule", CAPSULE_BIN_LABELS), ("third", LOBE_THIRDS)):
        parts = [e[key] for e in sites.values() if e.get(key)]
        if parts:
            result[key] = _rates(parts, labels)
    return result
