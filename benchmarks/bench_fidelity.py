"""Does LLNM-Net learn what the synthetic data holds? Federated `tiny` against the generator, on held-out seeds.

    .venv/bin/python benchmarks/bench_fidelity.py --patients 2100 --evaluation-seeds 101,102,103
    .venv/bin/python benchmarks/bench_fidelity.py --patients 9836 --evaluation-seeds 101,102,103

For every seed a `llnm-synth --profile paper-calibrated` consortium (generated into `--data-pattern` when absent)
is trained on exactly as `make demo` trains: `llnm-server simulate` with `--config` (configs/demo.yaml as shipped)
and explanations on. Then, against the generator's truth (which no site or server reads):

* **fraction of Bayes**: the selected model's pooled test AUC over the Bayes AUC of the same test patients (the
  generator's true risk), with a 95% paired bootstrap interval of Bayes minus model (`_scoring.paired_difference`);
* **image only**: the pooled baseline trained on the image pathway alone (`bench_model.MODALITIES["image"]`: both
  views and their measurements; no report, age or sex), against the image bound llnm-synth recorded (the AUC of
  E[risk | what the images show]) on the same test split;
* **location step**: the model's mean probability within 2.5 mm of the capsule minus beyond it (the sites'
  aggregates), over the generator's same step on the same test patients (`bench_explain.truth_by_bin`);
* **feature-group shares**: the model's integrated-gradients shares in the paper's four groups, computed by the
  generator's own definition (`shares_like_generator`: from the consortium's mean input, signed sums per group),
  against the generator's shares on the test split (`consortium.json` `truth_shares`) and the paper's; the shares
  the sites sent (their definition: zero baseline, sums of absolute attributions) are recorded beside them.

Beside them, what the training split can teach at all (`_findings_oracle`): a well-specified additive model handed
the generator's own findings, fitted on the same training patients (``findings_oracle``: its fraction of Bayes and
image gap, site-agnostic and site-aware), and the same reader's fraction of Bayes against consortium size on the
patients llnm-synth would draw (``oracle_curve``, `--curve-sizes`). A model that falls as far short of the Bayes
AUC as this reader is limited by its data, not by how it reads the images.

The targets were fixed before the first run (issue 27, :data:`TARGETS`). The headline per consortium size is the
mean over the evaluation seeds (benchmarks/_seeds.py refuses a seed a design decision looked at); tuning seeds are
reported apart. Results of several invocations (sizes, seeds) with the same settings are merged into
`--out` (default benchmarks/results/model_fidelity.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
BIN = Path(sys.executable).parent

from _findings_oracle import findings_oracle, learning_curve, read_truth  # noqa: E402
from _provenance import provenance, write_result  # noqa: E402
from _results import merge_side_by_side  # noqa: E402
from _scoring import auc, paired_difference, score_test_split  # noqa: E402
from _seeds import add_seed_arguments, consortium_for_seed, seeds_from_arguments  # noqa: E402

#: Fixed before the first run: what "learns what the data holds" means (issue 27).
TARGETS = {"fraction_of_bayes_min": 0.99, "image_gap_max": 0.01, "location_step_ratio_min": 0.8,
           "share_gap_max": 0.10}


def _truth_risk(data: Path, ids: np.ndarray) -> np.ndarray:
    truth = read_truth(data)
    risk = truth.set_index(truth["site"] + "/" + truth["patient_id"])["risk"]
    return risk.loc[list(ids)].to_numpy(float)


def shares_like_generator(exp: Any, rd: Any, rnd: int, inputs: list[Any], steps: int = 32) -> dict[str, float]:
    """The model's feature-group shares on the pooled test patients, by the generator's own definition
    (`fl_research.synthetic.truth_attribution`): integrated gradients from the consortium's mean input, a group's
    attribution the signed sum over its inputs, then shares of absolute values, averaged over patients.

    The sites' explanations (which a hospital sends) use the zero baseline and sums of absolute attributions,
    a definition that depends on no other patient; this one needs the consortium's mean patient, which only a
    research comparison can use. ``inputs`` are every site's `load_site_inputs`."""
    import torch

    from fl_client.explain.attribution import group_totals, shares
    from shared_model.evaluation.explanation import feature_groups, paper_group_of
    from shared_model.model.architectures import build_model

    model = build_model(exp.architecture())
    model.load_state_dict(rd.load_checkpoint(rnd))
    baseline = {key: torch.nanmean(torch.cat([getattr(t, attr).float() for t in inputs]), dim=0, keepdim=True)
                for key, attr in (("image", "image"), ("text", "text"), ("clinical", "clinical"))}
    totals = np.concatenate([group_totals(model, t.subset("test"), steps=steps, baseline=baseline,
                                          signed_groups=True) for t in inputs])
    per_patient, ok = shares(totals)
    mean = per_patient[ok].mean(axis=0)
    four: dict[str, float] = {}
    for group, value in zip(feature_groups(exp.preprocess.inputs), mean, strict=True):
        paper = paper_group_of(group, exp.preprocess.inputs)
        four[paper] = four.get(paper, 0.0) + float(value)
    return {g: round(v, 4) for g, v in four.items()}


def federated(data: Path, config: str, work: Path, sets: list[str], n_boot: int) -> dict[str, Any]:
    """The shipped configuration trained federated, scored against the generator."""
    from bench_explain import recovered_step, truth_by_bin

    from fl_research.simulation import discover_sites
    from fl_server.run_dir import RunDirectory
    from shared_model.sitedata.model_inputs import load_site_inputs

    out = work / "federated"
    cmd = [str(BIN / "llnm-server"), "simulate", "--config", config, "--data", str(data), "--out", str(out),
           "--set", "evaluation.explain=true"]
    for s in sets:
        cmd += ["--set", s]
    started = time.perf_counter()
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - started
    rd = RunDirectory(out)
    metrics = json.loads(rd.metrics_path.read_text())
    exp = rd.load_config()
    sites = discover_sites(data)
    inputs = [load_site_inputs(site, exp.preprocess, exp.architecture(), cache_dir=exp.data.cache_dir)
              for site in sites]  # once, for the scores and the shares
    scores = score_test_split(exp, rd, metrics, sites, inputs)
    risk = _truth_risk(data, scores["ids"])
    model_auc, bayes_auc = auc(scores["y"], scores["score"]), auc(scores["y"], risk)
    gap = paired_difference(scores["y"], risk, [scores["score"]], n_boot)
    final = metrics["final"]
    expl = final.get("explanations") or {}
    truth = truth_by_bin(data, sorted(final["sites"]))
    model_step = recovered_step(expl["capsule"], "expected") if expl.get("capsule") else None
    generator_step = truth["step_2_5mm"]["generator_probability"]
    info = json.loads((data / "consortium.json").read_text())
    truth_shares = (info.get("truth_shares") or {}).get("pooled", {}).get("test")
    model_shares = shares_like_generator(exp, rd, scores["round"], inputs) if truth_shares else None
    share_gap = (max(abs(model_shares[g] - truth_shares[g]) for g in truth_shares)
                 if model_shares and truth_shares else None)
    return {
        "run_dir": str(out), "seconds": round(seconds, 1), "selected_round": scores["round"],
        "n_test": len(scores["y"]), "pooled_test_auc": round(model_auc, 4), "bayes_test_auc": round(bayes_auc, 4),
        "fraction_of_bayes": round(model_auc / bayes_auc, 4),
        "bayes_minus_model": gap,
        "location_step": {"model_mean_probability": model_step, "generator_probability": generator_step,
                          "observed_by_sites": recovered_step(expl["capsule"], "observed") if expl.get("capsule")
                          else None,
                          "ratio": round(model_step / generator_step, 4) if model_step is not None else None},
        "shares": {"model": model_shares, "generator": truth_shares, "paper": expl.get("paper_shares"),
                   "max_abs_gap_to_generator": round(share_gap, 4) if share_gap is not None else None,
                   "definition": "the generator's: integrated gradients from the consortium's mean input, signed "
                                 "sums per group (shares_like_generator)",
                   "sites_sent": {"paper_groups": expl.get("paper_group_shares"), "groups": expl.get("shares"),
                                  "definition": "the sites' own: zero baseline, sums of absolute attributions"}},
    }


def image_only(data: Path, config: str, sets: list[str], threads: int) -> dict[str, Any]:
    """The pooled baseline on the image pathway alone, for the data epochs of the shipped schedule."""
    import torch
    from bench_model import MODALITIES, train_eval

    from fl_server.config import load_config, parse_set_options
    from shared_model.sitedata.cache import build_site_tensors

    torch.set_num_threads(threads)
    exp = load_config(config, parse_set_options(sets))
    sites = sorted(p for p in data.iterdir() if (p / "patients.csv").is_file())
    tensors = {p.name: build_site_tensors(p, exp.preprocess, cache_dir=exp.data.cache_dir, progress=False)
               for p in sites}
    run = train_eval(exp, tensors, MODALITIES["image"], exp.data_epochs(), False)
    bound = json.loads((data / "consortium.json").read_text())["pooled"]["auc"]["test"]["image"]
    return {"pooled_test_auc": round(run["pooled_test_auc"], 4), "image_bound_test_auc": bound,
            "gap_to_bound": round(bound - run["pooled_test_auc"], 4), "epochs": exp.data_epochs(),
            "selected_epoch": run["selected_epoch"], "wall_seconds": run["wall_seconds"]}


def _verdict(entry: dict[str, Any]) -> dict[str, bool | None]:
    fed, img = entry["federated"], entry.get("image_only") or {}

    def at_least(v: float | None, lo: float) -> bool | None:
        return None if v is None else v >= lo

    def at_most(v: float | None, hi: float) -> bool | None:
        return None if v is None else v <= hi

    return {"fraction_of_bayes": at_least(fed["fraction_of_bayes"], TARGETS["fraction_of_bayes_min"]),
            "image_gap": at_most(img.get("gap_to_bound"), TARGETS["image_gap_max"]),
            "location_step_ratio": at_least(fed["location_step"]["ratio"], TARGETS["location_step_ratio_min"]),
            "shares": at_most(fed["shares"]["max_abs_gap_to_generator"], TARGETS["share_gap_max"])}


def headline(runs: dict[str, dict[str, Any]], role: str) -> dict[str, Any]:
    """Per consortium size: the means over the seeds of this role, and whether each target is met on average."""
    by_size: dict[str, list[dict[str, Any]]] = {}
    for entry in runs.values():
        if entry.get("role") == role:
            by_size.setdefault(str(entry["patients"]), []).append(entry)

    def mean(values: list[float | None]) -> float | None:
        nums = [v for v in values if v is not None]
        return round(statistics.mean(nums), 4) if nums else None

    out: dict[str, Any] = {}
    for size, entries in sorted(by_size.items(), key=lambda kv: int(kv[0])):
        fed = [e["federated"] for e in entries]
        # The runs that measured this row: theirs when they agree, else the latest (several commits are mixed).
        made = sorted((e.get("provenance") or {} for e in entries), key=lambda p: str(p.get("date", "")))
        row = {"provenance": made[-1], "provenance_agrees": all(m == made[-1] for m in made),
               "seeds": sorted(e["seed"] for e in entries),
               "fraction_of_bayes": mean([f["fraction_of_bayes"] for f in fed]),
               "pooled_test_auc": mean([f["pooled_test_auc"] for f in fed]),
               "bayes_test_auc": mean([f["bayes_test_auc"] for f in fed]),
               "image_gap_to_bound": mean([(e.get("image_only") or {}).get("gap_to_bound") for e in entries]),
               "oracle_fraction_of_bayes": mean([(e.get("findings_oracle") or {}).get("all", {})
                                                 .get("fraction_of_bayes") for e in entries]),
               "oracle_site_aware_fraction_of_bayes": mean([(e.get("findings_oracle") or {}).get("all+site", {})
                                                            .get("fraction_of_bayes") for e in entries]),
               "oracle_image_gap_to_bound": mean([(e.get("findings_oracle") or {}).get("image", {})
                                                  .get("gap_to_bound") for e in entries]),
               "location_step_ratio": mean([f["location_step"]["ratio"] for f in fed]),
               "share_gap_to_generator": mean([f["shares"]["max_abs_gap_to_generator"] for f in fed]),
               "model_shares": {g: mean([(f["shares"]["model"] or {}).get(g) for f in fed])
                                for g in ("location", "morphology", "report", "demographics")},
               "generator_shares": {g: mean([(f["shares"]["generator"] or {}).get(g) for f in fed])
                                    for g in ("location", "morphology", "report", "demographics")}}
        row["met"] = _verdict({"federated": {"fraction_of_bayes": row["fraction_of_bayes"],
                                             "location_step": {"ratio": row["location_step_ratio"]},
                                             "shares": {"max_abs_gap_to_generator": row["share_gap_to_generator"]}},
                               "image_only": {"gap_to_bound": row["image_gap_to_bound"]}})
        out[size] = row
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=2100)
    ap.add_argument("--profile", default="paper-calibrated", help="llnm-synth --profile of the consortia")
    add_seed_arguments(ap)
    ap.add_argument("--data-pattern", default=str(ROOT / "data" / "fid-{profile}-{patients}-s{seed}"))
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config overrides (a design under study; the headline is the shipped config)")
    ap.add_argument("--skip-image-only", action="store_true", help="no image-only baseline")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the image-only pooled baseline")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--curve-sizes", default="2100,4200,9836,39451",
                    help="consortium sizes of the findings reader's learning curve (empty: none)")
    ap.add_argument("--curve-only", action="store_true",
                    help="train nothing: recompute the learning curve over the evaluation seeds --out records")
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench-fidelity"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "model_fidelity.json"))
    args = ap.parse_args(argv)
    made = provenance()  # the code as it starts, before anything can change the tree
    seeds = seeds_from_arguments(args, "bench_fidelity")
    if seeds is None:
        return 2
    tuning, evaluation, protocol = seeds
    runs: dict[str, Any] = {}
    for seed in [] if args.curve_only else tuning + evaluation:
        data = consortium_for_seed(args.data_pattern, args.profile, args.patients, seed)
        work = Path(args.work) / f"{args.patients}-s{seed}" / time.strftime("%Y%m%d-%H%M%S")
        work.mkdir(parents=True, exist_ok=True)
        print(f"[bench] {data.name}: federated {Path(args.config).name} ...", flush=True)
        entry: dict[str, Any] = {"seed": seed, "patients": args.patients, "consortium": str(data),
                                 "role": "tuning" if seed in tuning else "evaluation",
                                 "federated": federated(data, args.config, work, args.set, args.bootstrap)}
        if not args.skip_image_only:
            print(f"[bench] {data.name}: image-only pooled baseline ...", flush=True)
            entry["image_only"] = image_only(data, args.config, args.set, args.threads)
        entry["findings_oracle"] = findings_oracle(data)
        entry["met"] = _verdict(entry)
        runs[f"{args.patients}/seed-{seed}"] = entry
        fed = entry["federated"]
        print(f"[bench] {data.name}: AUC {fed['pooled_test_auc']} of Bayes {fed['bayes_test_auc']} "
              f"({fed['fraction_of_bayes']:.3f}); step ratio {fed['location_step']['ratio']}; shares "
              f"{fed['shares']['model']} vs generator {fed['shares']['generator']}; image only "
              f"{(entry.get('image_only') or {}).get('gap_to_bound')} below its bound", flush=True)
    results: dict[str, Any] = {"settings": {"profile": args.profile, "config": args.config, "set": args.set},
                               "targets": TARGETS, "runs": runs}
    merge_side_by_side(Path(args.out), results, "runs", [], made)
    roles = {e["seed"]: e["role"] for e in results["runs"].values()}
    results["protocol"] = protocol | {"tuning_seeds": sorted(s for s, r in roles.items() if r == "tuning"),
                                      "evaluation_seeds": sorted(s for s, r in roles.items() if r == "evaluation")}
    sizes = [int(v) for v in args.curve_sizes.split(",") if v.strip()]
    recorded = results["protocol"]["evaluation_seeds"]  # every evaluation seed in the file, not only this run's
    if sizes and recorded:
        results["oracle_curve"] = {"profile": args.profile, "seeds": recorded, "provenance": made,
                                   "sizes": learning_curve(sizes, recorded, args.profile)}
    results["headline"] = headline(results["runs"], "evaluation")
    results["tuning_seeds_summary"] = headline(results["runs"], "tuning") or None
    write_result(args.out, results, made)
    print(json.dumps({"headline": results["headline"], "tuning_seeds_summary": results["tuning_seeds_summary"]},
                     indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
