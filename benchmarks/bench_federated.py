"""Pooled vs federated (FedAvg; optionally local-only and FedProx) training, on several synthetic consortia.

    .venv/bin/python benchmarks/bench_federated.py --evaluation-seeds 101,102,103 [--tuning-seeds 1,2,3] \
        --methods pooled,fedavg

Each seed is its own 7-site consortium of `--patients` patients (`llnm-synth --profile P --seed S`, generated
into `--data-pattern` when absent). The summary (the headline) is over the evaluation seeds only, which no
design decision looked at (benchmarks/_seeds.py refuses any other); tuning seeds, on which the schedule was
chosen, are measured and summarised apart. The JSON records both lists.

Every method gets the same number of passes over the data (the config's
federation.rounds x train.local_epochs / federation.rounds_per_epoch: the epochs of the pooled and local-only
baselines), the same model, optimiser, training seed and data, and the same model selection (the epoch or
evaluated round with the best validation AUC). The summary is the pooled test AUC gap, pooled minus FedAvg,
per seed, with its mean and spread. Reports per-site test AUC for each
method beside the Bayes-optimal AUC that `llnm-synth` recorded for that site's test split, the pooled test
AUC, the validation AUC curve, wall time, and the bytes each site sends per round (the trainable LLNMNet
parameters only, vs the full model including the frozen text encoder that never travels). Writes
benchmarks/results/federated.json.

Seeds and methods can run in separate invocations (e.g. one per core): the entries already in `--out` are
kept when they were run with the same settings (patients, config, --set options, mu), and replaced otherwise.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
BIN = Path(sys.executable).parent

from _provenance import provenance, write_result  # noqa: E402
from _results import merge_side_by_side  # noqa: E402
from _seeds import add_seed_arguments, consortium_for_seed, seeds_from_arguments  # noqa: E402


def model_bytes(exp) -> dict:
    from shared_model.model.modeling import LLNMNet
    from shared_model.model.text_encoder import TextEncoderConfig, load_text_encoder

    model = LLNMNet(exp.architecture())
    trainable = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    _, encoder = load_text_encoder(TextEncoderConfig())
    frozen = sum(t.numel() * t.element_size() for t in encoder.state_dict().values())
    return {"trainable_bytes": trainable, "frozen_text_encoder_bytes": frozen, "full_model_bytes": trainable + frozen}


def run_sim(config: Path, data: Path, out: Path, sets: list[str]) -> tuple[dict, float]:
    t0 = time.perf_counter()
    cmd = [str(BIN / "llnm-server"), "simulate", "--config", str(config), "--data", str(data), "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    subprocess.run(cmd, check=True)
    return json.loads((out / "metrics.json").read_text()), time.perf_counter() - t0


ONE_PASS = "fedavg-one-pass-rounds"
METHODS = ("pooled", "local", "fedavg", ONE_PASS, "fedprox")


def run_method(method: str, exp, config: Path, data: Path, work: Path, sets: list[str], mu: float,
               threads: int, comm: dict) -> dict:
    t0 = time.perf_counter()
    if method in ("pooled", "local"):
        import torch

        from fl_research.baseline import run_baseline

        torch.set_num_threads(threads)
        res = run_baseline(exp, method, work / method, data_root=data, progress=False)
        train = res["train"].get("pooled", {})
        return {"site_test_auc": {k: v["auc"] for k, v in res["sites"].items()},
                "pooled_test_auc": res["pooled"]["auc"], "epochs": res["epochs"],
                "selected_epoch": train.get("selected_epoch"),
                "val_auc": [h.get("val_auc") for h in train.get("history", [])],
                "wall_seconds": round(time.perf_counter() - t0, 1), "bytes_per_round_per_site": None}
    strategy, extra = method, []
    if method == ONE_PASS:  # the schedule before rounds_per_epoch: one round per pass, evaluated every round
        strategy, extra = "fedavg", [f"federation.rounds={exp.data_epochs()}", "federation.rounds_per_epoch=1",
                                     "federation.eval_every=1"]
    metrics, seconds = run_sim(config, data, work / method,
                               [*sets, f"federation.strategy={strategy}", f"federation.proximal_mu={mu}", *extra])
    final = metrics["final"]
    return {"site_test_auc": {k: v["auc"] for k, v in final["sites"].items()},
            "pooled_test_auc": final["pooled"]["auc"], "selected_round": final["round"],
            "val_auc": {str(r["round"]): r["pooled"].get("auc") for r in metrics["rounds"] if r.get("pooled")},
            "wall_seconds": round(seconds, 1),
            # each round a site uploads its update once and downloads the global model once
            "bytes_per_round_per_site": {"upload": comm["trainable_bytes"], "download": comm["trainable_bytes"],
                                         "upload_if_full_model": comm["full_model_bytes"]}}


def _gap_summary(by_seed: dict[str, dict]) -> dict:
    """Per seed: pooled minus FedAvg test AUC; their mean, sample standard deviation and range."""
    import statistics

    gaps: dict[str, float] = {}
    for seed, m in by_seed.items():
        if "pooled" in m and "fedavg" in m:
            gaps[seed] = round(m["pooled"]["pooled_test_auc"] - m["fedavg"]["pooled_test_auc"], 4)
    summary: dict = {"gap_pooled_minus_fedavg": gaps}
    before = {seed: round(m["pooled"]["pooled_test_auc"] - m[ONE_PASS]["pooled_test_auc"], 4)
              for seed, m in by_seed.items() if "pooled" in m and ONE_PASS in m}
    if before:
        summary[f"gap_pooled_minus_{ONE_PASS}"] = before
        summary[f"mean_gap_{ONE_PASS}"] = round(statistics.fmean(before.values()), 4)
    if gaps:
        values = list(gaps.values())
        summary |= {"seeds": len(values), "mean_gap": round(statistics.fmean(values), 4),
                    "sd_gap": round(statistics.stdev(values), 4) if len(values) > 1 else None,
                    "min_gap": min(values), "max_gap": max(values),
                    "goal": "mean gap <= 0.01 and no seed above 0.03",
                    "goal_met": statistics.fmean(values) <= 0.01 and max(values) <= 0.03}
    return summary


def summarise(results: dict) -> None:
    """The headline over the evaluation seeds, the tuning seeds' summary apart, and the printed table."""
    by_seed: dict[str, dict] = {}
    for key, entry in sorted(results["runs"].items()):
        seed, method = key.split("/")
        by_seed.setdefault(seed, {})[method] = entry
    roles = {seed: results["seeds"].get(seed, {}).get("role", "tuning") for seed in by_seed}
    summary = _gap_summary({s: m for s, m in by_seed.items() if roles[s] == "evaluation"})
    tuning = _gap_summary({s: m for s, m in by_seed.items() if roles[s] != "evaluation"})
    results["summary"] = summary | {"seeds_role": "evaluation"}
    # "tuning_seeds_summary", not "tuning": the results page labels every figure of a file with a "tuning" block
    # as measured on its tuning data, and the headline here is not
    results.pop("tuning", None)
    results["tuning_seeds_summary"] = (tuning | {"seeds_role": "tuning", "label": "measured on its tuning data"}
                                       if tuning.get("gap_pooled_minus_fedavg") else None)
    gaps = summary.get("gap_pooled_minus_fedavg", {}) | tuning.get("gap_pooled_minus_fedavg", {})
    shown = [m for m in METHODS if any(m in v for v in by_seed.values())]
    lines = [f"{'seed':<10}{'role':<12}{'bayes':>8}" + "".join(f"{m[:12]:>13}" for m in shown) + f"{'gap':>9}"]
    for seed, m in by_seed.items():
        row = f"{seed:<10}{roles[seed]:<12}{results['seeds'][seed]['bayes_test_auc']['pooled']:>8.3f}"
        for name in shown:
            e = m.get(name)
            row += f"{e['pooled_test_auc']:>13.3f}" if e else f"{'-':>13}"
        row += f"{gaps[seed]:>+9.3f}" if seed in gaps else f"{'-':>9}"
        lines.append(row)
    for name, part in (("evaluation seeds (headline)", summary), ("tuning seeds", tuning)):
        if part.get("gap_pooled_minus_fedavg"):
            lines.append(f"{name}: mean gap {part['mean_gap']:+.3f}, sd {part['sd_gap'] or 0:.3f}, "
                         f"range {part['min_gap']:+.3f} to {part['max_gap']:+.3f}")
    results["table"] = lines


def main(argv: list[str] | None = None) -> int:
    from fl_server.config import load_config, parse_set_options

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=2100)
    add_seed_arguments(ap)
    ap.add_argument("--profile", default="default", help="llnm-synth --profile of the consortia")
    ap.add_argument("--data-pattern", default=str(ROOT / "data" / "fed-{patients}-s{seed}"),
                    help="where each seed's consortium is; {profile} may be used (default: the default profile's "
                         "folders; another profile gets data/fed-{profile}-{patients}-s{seed})")
    ap.add_argument("--proximal-mu", type=float, default=0.01)
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config overrides for every method (e.g. federation.rounds_per_epoch=1)")
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench-federated"))
    ap.add_argument("--methods", default="pooled,fedavg",
                    help=f"of {', '.join(METHODS)} ({ONE_PASS}: FedAvg with one round per pass over the data, "
                         "the schedule before federation.rounds_per_epoch)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of the pooled and local baselines (simulated sites get "
                         "simulation.cpus_per_site each)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "federated.json"))
    args = ap.parse_args(argv)
    made = provenance()  # the code as it starts, before anything can change the tree
    seeds = seeds_from_arguments(args, "bench_federated")
    if seeds is None:
        return 2
    tuning, evaluation, protocol = seeds
    if args.profile != "default" and args.data_pattern == ap.get_default("data_pattern"):
        args.data_pattern = str(ROOT / "data" / "fed-{profile}-{patients}-s{seed}")

    config = Path(args.config)
    exp = load_config(config, parse_set_options(args.set))
    fed = exp.federation
    settings = {"patients": args.patients, "config": str(config.resolve()), "rounds": fed.rounds,
                "rounds_per_epoch": fed.rounds_per_epoch, "local_epochs": exp.train.local_epochs,
                "data_epochs": exp.data_epochs(), "eval_every": fed.eval_every, "train_seed": exp.train.seed,
                "proximal_mu": args.proximal_mu, "set": list(args.set), "profile": args.profile}
    comm = model_bytes(exp)
    entries: dict = {}
    bayes: dict = {}
    for seed in tuning + evaluation:
        data = consortium_for_seed(args.data_pattern, args.profile, args.patients, seed)
        consortium = json.loads((data / "consortium.json").read_text())
        bayes[f"seed-{seed}"] = {"consortium": str(data), "role": "tuning" if seed in tuning else "evaluation",
                                 "bayes_test_auc": {
            name: s["auc"]["test"]["bayes"] for name, s in consortium["sites"].items()}
            | {"pooled": consortium["pooled"]["auc"]["test"]["bayes"]}}
        work = Path(args.work) / f"seed-{seed}" / time.strftime("%Y%m%d-%H%M%S")
        work.mkdir(parents=True, exist_ok=True)
        for method in args.methods.split(","):
            print(f"[bench] seed {seed}: {method} ...", flush=True)
            entry = run_method(method, exp, config, data, work, args.set, args.proximal_mu, args.threads, comm)
            entries[f"seed-{seed}/{method}"] = entry
            print(f"[bench]   pooled test AUC {entry['pooled_test_auc']:.3f} in {entry['wall_seconds']:.0f} s",
                  flush=True)

    out = Path(args.out)
    results: dict = {"settings": settings, "communication": comm, "runs": entries, "protocol": protocol}
    # Read --out only now, so that invocations running side by side all end up in it.
    previous = merge_side_by_side(out, results, "runs", [], made)
    results["seeds"] = previous.get("seeds", {}) | bayes
    # the protocol of everything in the file, this invocation's seeds and those kept from earlier ones
    roles = {int(k.split("-")[1]): v.get("role", "tuning") for k, v in results["seeds"].items()}
    protocol |= {"tuning_seeds": sorted(s for s, r in roles.items() if r != "evaluation"),
                 "evaluation_seeds": sorted(s for s, r in roles.items() if r == "evaluation")}
    summarise(results)
    write_result(out, results, made)
    print("\n".join(results["table"]))
    print(f"bytes per round per site: {comm['trainable_bytes']:,} (trainable LLNMNet) vs "
          f"{comm['full_model_bytes']:,} (with the frozen text encoder)")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
