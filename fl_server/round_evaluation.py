"""What the sites' evaluate replies hold, read into one `Evaluation`: per-site metrics, the pooled metrics
estimated from their score histograms, and (final evaluation) their explanation aggregates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flwr.app import Message

from fl_server.records import Failure
from fl_server.site_channel import reply_site_name
from shared_model import protocol
from shared_model.numbers import none_if_nan

__all__ = ["Evaluation", "read_evaluation"]


@dataclass
class Evaluation:
    """What the sites' evaluate replies held: per-site metrics, pooled metrics merged from their score
    histograms, the failures, the histograms, and (final evaluation with `evaluation.explain`) the sites'
    explanation aggregates and why any site withheld them."""

    sites: dict[str, Any]
    pooled: dict[str, Any]
    failures: list[Failure]
    histograms: dict[str, Any]
    explanations: dict[str, Any]
    withheld: dict[str, str]

    @classmethod
    def none(cls) -> Evaluation:
        """A round without evaluation (federation.eval_every)."""
        return cls({}, {}, [], {}, {}, {})


def read_evaluation(replies: list[Message], failures: list[Failure], *, explain: bool,
                    task: str = protocol.TASK_LLNM) -> Evaluation:
    """Decode the sites' replies; pooled metrics come from their histograms (or a segmentation round's sums) alone,
    never from patient rows."""
    from shared_model.evaluation.metrics import metrics_from_histograms

    if task == protocol.TASK_SEGMENT:
        return _read_segmentation(replies, failures)

    sites: dict[str, Any] = {}
    hists: dict[str, Any] = {}
    explanations: dict[str, Any] = {}
    withheld: dict[str, str] = {}
    for r in replies:
        name = reply_site_name(r)
        record = r.content[protocol.METRICS_RECORD]
        sites[name], hists[name] = protocol.decode_eval_metrics(record)
        population = protocol.decode_population(record)
        if population is not None:
            sites[name]["population"] = population
        stage = protocol.decode_stage_metrics(record)
        if stage is not None:
            sites[name]["risk_stage"] = stage
        explanation = protocol.decode_explanation(record)
        if explanation is not None:
            explanations[name] = explanation
        site_record = r.content[protocol.SITE_RECORD]
        if explain and protocol.EXPLAIN_WITHHELD in site_record:
            withheld[name] = str(site_record[protocol.EXPLAIN_WITHHELD])
    pooled = metrics_from_histograms(list(hists.values())) if hists else {}
    pooled = {k: none_if_nan(v) if isinstance(v, float) else v for k, v in pooled.items()}
    return Evaluation(dict(sorted(sites.items())), pooled, failures, dict(sorted(hists.items())),
                      dict(sorted(explanations.items())), withheld)


def _read_segmentation(replies: list[Message], failures: list[Failure]) -> Evaluation:
    """A segmentation round's replies: each site's summary, and the pooled one from the sums of all sites (noisy
    sums added as they are when any site answered with DP)."""
    from shared_model.protocol import segmentation_metrics

    sites: dict[str, Any] = {}
    sums: list[dict[str, float]] = []
    for r in replies:
        name = reply_site_name(r)
        sites[name], site_sums = segmentation_metrics.decode(r.content[protocol.METRICS_RECORD])
        sums.append(site_sums)
    noisy = any("dp" in m for m in sites.values())
    pooled = segmentation_metrics.pool(sums, noisy=noisy)
    if pooled and noisy:
        pooled["noisy"] = True
    return Evaluation(dict(sorted(sites.items())), pooled, failures, {}, {}, {})
