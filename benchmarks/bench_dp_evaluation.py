"""What differentially private evaluation replies cost the per-site and pooled AUC, and their intervals.

A trained model's exact per-patient scores on every site's validation or test patients are passed through the
sites' own mechanism (`fl_client.privacy.evaluation`: counts in bins, Gaussian noise of the sigma that one reply
at `eval-epsilon` needs, rounded and clipped; the metrics and the parametric-bootstrap interval computed from the
noisy histogram alone; the coordinator's pooled metrics merged from the sites' noisy histograms), many times, and
compared with the exact evaluation of the same patients:

* per site and pooled: the exact AUC with its 95% bootstrap interval; over the noise draws the DP AUC's mean,
  bias, RMSE and 95th-percentile absolute error, the DP reply's interval width and how often it covers the exact
  AUC;
* the estimators: a site's AUC from its noisy counts clipped at zero, the pooled AUC from the sites' unclipped
  noisy counts; the other choice of each is recorded beside it (``rmse_if_unclipped``, ``rmse_if_clipped``);
* the rule, fixed before the run: DP evaluation keeps a site's (or the pooled) evaluation **useful** when the RMSE
  its noise adds is at most half the half-width of the exact interval (so the total uncertainty grows by at most
  about 12%).

The number of bins is chosen on `--tune` runs and reported on others (the JSON names which is which).

    python benchmarks/bench_dp_evaluation.py --model runs/demo --data data/consortium --label demo-700 --tune
    python benchmarks/bench_dp_evaluation.py --model runs/p9836 --data data/paper-9836-s2501 --label paper-9836
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _provenance import carry_earlier, provenance, write_result  # noqa: E402

RULE = ("useful: the RMSE that the DP noise adds to the AUC is at most half the half-width of the exact 95% "
        "bootstrap interval (the total uncertainty grows by at most ~12%); fixed before the first run")


def site_predictions(model: str, data: Path, split: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Exact (labels, scores) of every site's labelled patients of `split`, as `llnm-site evaluate` computes them."""
    from fl_client.cmd_evaluate import evaluate_site

    out = {}
    for site in sorted(p for p in data.iterdir() if (p / "patients.csv").is_file()):
        _, _, preds = evaluate_site(model, str(site), split=split, n_bootstrap=0)
        labelled = preds["llnm"] >= 0
        out[site.name] = (preds["llnm"][labelled].astype(int), preds["score"][labelled].astype(float))
    return out


def _auc(y: np.ndarray, s: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else None


def _summary(exact: float | None, exact_ci: tuple[float | None, float | None], values: list[float],
             widths: list[float], covered: list[bool]) -> dict[str, Any]:
    vals = np.array([v for v in values if v is not None and math.isfinite(v)])
    out: dict[str, Any] = {"exact_auc": exact, "exact_ci": list(exact_ci), "draws": len(vals)}
    if exact is None or not len(vals):
        return out
    err = vals - exact
    half = (exact_ci[1] - exact_ci[0]) / 2 if exact_ci[0] is not None else None
    rmse = float(np.sqrt(np.mean(err ** 2)))
    out.update({"dp_auc_mean": float(vals.mean()), "bias": float(err.mean()), "rmse": rmse,
                "abs_error_p95": float(np.quantile(np.abs(err), 0.95)),
                "exact_ci_half_width": half,
                "dp_ci_width_mean": float(np.mean(widths)) if widths else None,
                "dp_ci_coverage_of_exact": float(np.mean(covered)) if covered else None,
                "useful": bool(half is not None and rmse <= half / 2)})
    return out


def measure(preds: dict[str, tuple[np.ndarray, np.ndarray]], *, epsilon: float, bins: int, draws: int,
            ci_draws: int, delta: float = 1e-5) -> dict[str, Any]:
    """The DP mechanism `draws` times on every site's exact scores (see the module docstring)."""
    from fl_client.privacy.evaluation import as_histogram, dense_histogram, histogram_metrics, noisy_counts
    from shared_model.dp_accounting import gaussian_sigma
    from shared_model.evaluation.metrics import binary_metrics, metrics_from_histograms

    sigma = gaussian_sigma(epsilon, delta)
    exact: dict[str, Any] = {}
    for name, (y, s) in preds.items():
        m = binary_metrics(y, s, n_bootstrap=1000, seed=0)
        exact[name] = (m["auc"], (m["auc_ci_low"], m["auc_ci_high"]), dense_histogram(y, s, bins))
    all_y = np.concatenate([y for y, _ in preds.values()])
    all_s = np.concatenate([s for _, s in preds.values()])
    pooled_m = binary_metrics(all_y, all_s, n_bootstrap=1000, seed=0)
    site_values: dict[str, list[float]] = {n: [] for n in preds}
    site_widths: dict[str, list[float]] = {n: [] for n in preds}
    site_cover: dict[str, list[bool]] = {n: [] for n in preds}
    pooled_values: list[float] = []
    # The alternative estimators, for the record: one site's AUC from its unclipped noisy counts, the pooled AUC
    # from the sites' counts clipped at zero (the shipped ones are the other way round).
    unclipped_site: dict[str, list[float]] = {n: [] for n in preds}
    clipped_pooled: list[float] = []
    for d in range(draws):
        noisy = {}
        clipped = {}
        for name, (auc, _, (neg, pos)) in exact.items():
            n_neg, n_pos = noisy_counts(neg, sigma), noisy_counts(pos, sigma)
            noisy[name] = as_histogram(n_neg, n_pos, noisy=True)
            clipped[name] = as_histogram(np.clip(n_neg, 0, None), np.clip(n_pos, 0, None))
            u = metrics_from_histograms([noisy[name]])["auc"]
            unclipped_site[name].append(u if u is not None else math.nan)
            with_ci = d < ci_draws
            m = histogram_metrics(n_neg, n_pos, sigma=sigma, n_bootstrap=200 if with_ci else 0)
            site_values[name].append(m["auc"] if m["auc"] is not None else math.nan)
            if with_ci and m["auc_ci_low"] is not None and auc is not None:
                site_widths[name].append(m["auc_ci_high"] - m["auc_ci_low"])
                site_cover[name].append(m["auc_ci_low"] <= auc <= m["auc_ci_high"])
        pooled = metrics_from_histograms(list(noisy.values()))
        pooled_values.append(pooled["auc"] if pooled["auc"] is not None else math.nan)
        c = metrics_from_histograms(list(clipped.values()))["auc"]
        clipped_pooled.append(c if c is not None else math.nan)
    sites = {}
    for name, (y, _s) in preds.items():
        auc, ci, _ = exact[name]
        sites[name] = {"n": len(y), "n_pos": int(y.sum()),
                       **_summary(auc, ci, site_values[name], site_widths[name], site_cover[name]),
                       "rmse_if_unclipped": _summary(auc, ci, unclipped_site[name], [], []).get("rmse")}
    return {"epsilon": epsilon, "delta": delta, "sigma": sigma, "bins": bins, "sites": sites,
            "pooled": {"n": len(all_y), **_summary(pooled_m["auc"], (pooled_m["auc_ci_low"],
                                                                           pooled_m["auc_ci_high"]),
                                                       pooled_values, [], []),
                       "rmse_if_clipped": _summary(pooled_m["auc"], (None, None), clipped_pooled, [], []).get("rmse")},
            "useful_sites": sorted(n for n, v in sites.items() if v.get("useful")),
            "pooled_useful": bool(_summary(pooled_m["auc"], (pooled_m["auc_ci_low"], pooled_m["auc_ci_high"]),
                                           pooled_values, [], []).get("useful"))}


def markdown_table(results: dict[str, Any], epsilon: float, bins: int) -> str:
    """The docs' table for one (epsilon, bins): per consortium and split, the pooled and per-site figures."""
    rows = ["| consortium, split | patients | exact AUC [95% CI] | DP AUC RMSE | DP interval width (coverage) | "
            "useful (rule) |", "|---|---|---|---|---|---|"]
    for label, entry in results["consortia"].items():
        for res in entry["results"]:
            if res["epsilon"] != epsilon or res["bins"] != bins:
                continue
            for name, m in [("pooled", res["pooled"]), *sorted(res["sites"].items())]:
                if m.get("exact_auc") is None:
                    continue
                lo, hi = m["exact_ci"]
                width = m.get("dp_ci_width_mean")
                cover = m.get("dp_ci_coverage_of_exact")
                rows.append(f"| {label} {res['split']}, {name} | {m['n']} | {m['exact_auc']:.3f} [{lo:.3f}, "
                            f"{hi:.3f}] | {m['rmse']:.3f} | "
                            + (f"{width:.3f} ({cover:.0%})" if width is not None else "-")
                            + f" | {'yes' if m.get('useful') else 'no'} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a checkpoint or run directory, as `llnm-site evaluate` takes it")
    p.add_argument("--data", type=Path, help="the consortium folder (one site folder each)")
    p.add_argument("--label", help="the name of this consortium's entry in the JSON")
    p.add_argument("--table", metavar="EPSILON,BINS", help="print the docs' table from --out for one setting and stop")
    p.add_argument("--splits", default="val,test")
    p.add_argument("--epsilons", default="0.5,1,2")
    p.add_argument("--bins", default="4,10,20,100")
    p.add_argument("--draws", type=int, default=300)
    p.add_argument("--ci-draws", type=int, default=40, help="draws whose DP interval is also computed")
    p.add_argument("--tune", action="store_true", help="this consortium chooses the bins (a tuning consortium)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "dp_evaluation.json")
    args = p.parse_args(argv)
    if args.table:
        eps, bins = args.table.split(",")
        print(markdown_table(json.loads(args.out.read_text()), float(eps), int(bins)))
        return 0
    if not (args.model and args.data and args.label):
        p.error("--model, --data and --label are required (or --table)")
    started = time.time()
    made = provenance()  # the code as it starts, before anything can change the tree
    entry: dict[str, Any] = {"provenance": made, "data": str(args.data), "model": str(args.model),
                             "role": "tuning (chooses the bins)" if args.tune else "held out (bins fixed before)",
                             "rule": RULE, "results": []}
    for split in args.splits.split(","):
        preds = site_predictions(args.model, args.data, split)
        for eps in (float(e) for e in args.epsilons.split(",")):
            for bins in (int(b) for b in args.bins.split(",")):
                res = measure(preds, epsilon=eps, bins=bins, draws=args.draws, ci_draws=args.ci_draws)
                entry["results"].append({"split": split, **res})
                pooled = res["pooled"]
                print(f"{args.label} {split} eps {eps:g} bins {bins}: pooled exact {pooled['exact_auc']:.3f} "
                      f"rmse {pooled.get('rmse', float('nan')):.4f}; useful sites {len(res['useful_sites'])}/"
                      f"{len(res['sites'])}", flush=True)
    entry["seconds"] = round(time.time() - started, 1)
    # The other consortia's entries are kept, each with its own provenance.
    out = json.loads(args.out.read_text()) if args.out.is_file() else {"consortia": {}}
    out["description"] = __doc__.split("\n\n")[0]
    out["consortia"][args.label] = entry
    carry_earlier(out, out, out["consortia"].values())
    write_result(args.out, out, made, default=float)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
