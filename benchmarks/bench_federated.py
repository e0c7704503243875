"""Pooled vs local-only vs federated (FedAvg, FedProx) training on one synthetic consortium.

    .venv/bin/python benchmarks/bench_federated.py --patients 2100 --seed 1 --rounds 20 --local-epochs 1

Every method gets the same total number of local epochs (rounds x local epochs for the federation; that
many epochs for the pooled and local-only baselines), the same model, optimiser, seed and data, and the
same model selection (the epoch or round with the best validation AUC). Reports per-site test AUC for each
method beside the Bayes-optimal AUC that `llnm-synth` recorded for that site's test split, the pooled test
AUC, wall time, and the bytes each site sends per round (the trainable LLNMNet parameters only, vs the full
model including the frozen text encoder that never travels). Writes benchmarks/results/federated.json.

Methods can run in separate invocations (e.g. one per core): with `--methods fedavg`, the methods already in
`--out` are kept when they were run with the same settings (consortium, rounds, local epochs, mu, --set
options, config), and replaced otherwise.
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
BIN = Path(sys.executable).parent

from _results import merge_side_by_side  # noqa: E402


def model_bytes(exp) -> dict:
    from shared_model.modeling import LLNMNet
    from shared_model.text_encoder import TextEncoderConfig, load_text_encoder

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


def main(argv: list[str] | None = None) -> int:
    from fl_research.baseline import run_baseline
    from fl_server.config import load_config, parse_set_options

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=2100)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--proximal-mu", type=float, default=0.01)
    ap.add_argument("--data", default=str(ROOT / "data" / "bench-2100"))
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench-federated"))
    ap.add_argument("--methods", default="pooled,local,fedavg,fedprox")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of the pooled and local baselines (simulated sites get "
                         "simulation.cpus_per_site each)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "federated.json"))
    args = ap.parse_args(argv)

    data = Path(args.data)
    if not (data / "consortium.json").is_file():
        subprocess.run([str(BIN / "llnm-synth"), "--out", str(data), "--sites", "7", "--patients",
                        str(args.patients), "--seed", str(args.seed)], check=True)
    consortium = json.loads((data / "consortium.json").read_text())
    work = Path(args.work) / time.strftime("%Y%m%d-%H%M%S")
    work.mkdir(parents=True, exist_ok=True)
    common = [f"federation.rounds={args.rounds}", f"train.local_epochs={args.local_epochs}",
              f"baseline.epochs={args.rounds * args.local_epochs}", *args.set]
    config = Path(args.config)
    exp = load_config(config, parse_set_options(common))
    settings = {"consortium": str(data.resolve()), "config": str(config.resolve()), "rounds": args.rounds,
                "local_epochs": args.local_epochs, "proximal_mu": args.proximal_mu, "set": list(args.set)}
    out = Path(args.out)
    command = "python benchmarks/bench_federated.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results: dict = {
        "commands": [command],
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "settings": settings,
        "consortium": str(data),
        "total_local_epochs": args.rounds * args.local_epochs,
        "bayes_test_auc": {name: s["auc"]["test"]["bayes"] for name, s in consortium["sites"].items()}
        | {"pooled": consortium["pooled"]["auc"]["test"]["bayes"]},
        "communication": model_bytes(exp),
        "methods": {},
    }
    comm = results["communication"]
    for method in args.methods.split(","):
        print(f"[bench] {method} ...", flush=True)
        t0 = time.perf_counter()
        if method in ("pooled", "local"):
            import torch

            torch.set_num_threads(args.threads)
            res = run_baseline(exp, method, work / method, data_root=data, progress=False)
            seconds = time.perf_counter() - t0
            entry = {"site_test_auc": {k: v["auc"] for k, v in res["sites"].items()},
                     "pooled_test_auc": res["pooled"]["auc"], "wall_seconds": round(seconds, 1),
                     "bytes_per_round_per_site": None}
        else:
            sets = [*common, f"federation.strategy={method}", f"federation.proximal_mu={args.proximal_mu}"]
            metrics, seconds = run_sim(config, data, work / method, sets)
            final = metrics["final"]
            entry = {"site_test_auc": {k: v["auc"] for k, v in final["sites"].items()},
                     "pooled_test_auc": final["pooled"]["auc"], "selected_round": final["round"],
                     "wall_seconds": round(seconds, 1),
                     # each round a site uploads its update once and downloads the global model once
                     "bytes_per_round_per_site": {"upload": comm["trainable_bytes"],
                                                  "download": comm["trainable_bytes"],
                                                  "upload_if_full_model": comm["full_model_bytes"]}}
        results["methods"][method] = entry
        print(f"[bench]   pooled test AUC {entry['pooled_test_auc']:.3f} in {entry['wall_seconds']:.0f} s", flush=True)

    # Read --out only now, so that invocations running side by side all end up in it.
    merge_side_by_side(out, results, "methods", ["pooled", "local", "fedavg", "fedprox"])
    names = sorted(results["bayes_test_auc"].keys() - {"pooled"})
    header = f"{'site':<10}{'bayes':>8}" + "".join(f"{m:>9}" for m in results["methods"])
    lines = [header]
    for n in [*names, "pooled"]:
        row = f"{n:<10}{results['bayes_test_auc'][n]:>8.3f}"
        for e in results["methods"].values():
            v = e["pooled_test_auc"] if n == "pooled" else e["site_test_auc"].get(n)
            row += f"{v:>9.3f}" if v is not None else f"{'-':>9}"
        lines.append(row)
    lines.append(f"{'wall s':<18}" + "".join(f"{e['wall_seconds']:>9.0f}" for e in results["methods"].values()))
    results["table"] = lines
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print("\n".join(lines))
    print(f"bytes per round per site: {comm['trainable_bytes']:,} (trainable LLNMNet) vs "
          f"{comm['full_model_bytes']:,} (with the frozen text encoder)")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
