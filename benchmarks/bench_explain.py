"""Do the sites' explanations recover what the synthetic consortium was generated with?

    .venv/bin/python benchmarks/bench_explain.py                      # the demo consortium, configs/demo.yaml
    .venv/bin/python benchmarks/bench_explain.py --data data/paper-2100 --out runs/bench-explain-2100

Runs `llnm-server simulate` with `evaluation.explain: true`, so that every site returns only its explanation
aggregates with the final test evaluation (shared_model.evaluation.explanation), then compares what the coordinator
received with the generator's truth files (`truth/<site>.csv`, which no site or server ever reads):

* **capsule-distance curve**: per bin (0-1, 1-2.5, 2.5-5, >5 mm) the observed LLNM rate the sites counted,
  the model's mean predicted probability, and the generator's own mean LLNM probability (`risk`) of the same
  test patients, binned by their true distance. The step at 2.5 mm is the rate within 2.5 mm minus the rate
  beyond it, for each of the three;
* **bin agreement**: how many test patients each bin holds by the sites' measured distance (from the masks)
  against the generator's true distance;
* **lobe thirds**: the same three rates per third;
* **feature-group shares**: the sites' mean integrated-gradients shares, in the paper's four groups and ours,
  beside the paper's (location 48.8%, morphology 29.9%, report 19.7%, demographics 1.6%).

Writes benchmarks/results/explain.json (or --result).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
BIN = Path(sys.executable).parent

from _provenance import provenance, write_result  # noqa: E402

EDGES = (0.0, 1.0, 2.5, 5.0, np.inf)
THIRDS = ("upper", "middle", "lower")


def truth_by_bin(data: Path, sites: list[str]) -> dict:
    """The generator's view of the same test patients the sites explained."""
    frames = [pd.read_csv(data / "truth" / f"{s}.csv") for s in sites]
    df = pd.concat(frames)
    df = df[df["split"] == "test"]
    bins = np.clip(np.searchsorted(EDGES, df["capsule_mm"].to_numpy(float), side="right") - 1, 0, 3)
    out = {"capsule": [], "third": []}
    for b in range(4):
        sel = df[bins == b]
        out["capsule"].append({"n": len(sel), "llnm_rate": float(sel["llnm"].mean()) if len(sel) else None,
                               "generator_probability": float(sel["risk"].mean()) if len(sel) else None})
    for t in THIRDS:
        sel = df[df["third"] == t]
        out["third"].append({"n": len(sel), "llnm_rate": float(sel["llnm"].mean()) if len(sel) else None,
                             "generator_probability": float(sel["risk"].mean()) if len(sel) else None})
    near = df["capsule_mm"] < 2.5
    out["step_2_5mm"] = {"llnm_rate": float(df[near]["llnm"].mean() - df[~near]["llnm"].mean()),
                         "generator_probability": float(df[near]["risk"].mean() - df[~near]["risk"].mean())}
    return out


def recovered_step(bins: list[dict], key: str) -> float | None:
    """Rate within 2.5 mm (bins 0-1, 1-2.5) minus beyond it, from the summed counts."""
    def rate(part: list[dict]) -> float | None:
        if key == "observed":
            n = sum(b["n"] for b in part)
            return sum(b["observed"] for b in part) / n if n else None
        n = sum(b["n_with_probability_sum"] for b in part)
        return sum(b["expected"] or 0.0 for b in part) / n if n else None

    near, far = rate(bins[:2]), rate(bins[2:])
    return None if near is None or far is None else near - far


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT / "data" / "consortium"))
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-explain"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--result", default=str(ROOT / "benchmarks" / "results" / "explain.json"))
    args = ap.parse_args(argv)
    data, out = Path(args.data), Path(args.out)
    if not (data / "truth").is_dir():
        print(f"error: {data} has no truth/ folder: generate a synthetic consortium with llnm-synth first "
              "(make demo writes data/consortium)", file=sys.stderr)
        return 2
    made = provenance()  # the code as it starts, before anything can change the tree
    cmd = [str(BIN / "llnm-server"), "simulate", "--config", args.config, "--data", str(data), "--out", str(out),
           "--set", "evaluation.explain=true"]
    for s in args.set:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - t0
    final = json.loads((out / "metrics.json").read_text())["final"]
    expl = final["explanations"]
    sites = sorted(final["sites"])
    truth = truth_by_bin(data, sites)
    capsule = [{"bin": b["bin"], "sites_n": b["n"], "truth_n": t["n"], "observed_rate": b["observed_rate"],
                "model_mean_probability": b["mean_probability"], "truth_llnm_rate": t["llnm_rate"],
                "generator_probability": t["generator_probability"]}
               for b, t in zip(expl["capsule"], truth["capsule"], strict=True)]
    thirds = [{"third": b["bin"], "sites_n": b["n"], "truth_n": t["n"], "observed_rate": b["observed_rate"],
               "model_mean_probability": b["mean_probability"], "generator_probability": t["generator_probability"]}
              for b, t in zip(expl["third"], truth["third"], strict=True)]
    result = {
        "data": str(data), "config": args.config, "sets": args.set, "run_dir": str(out), "seconds": round(seconds, 1),
        "final_round": final["round"], "pooled_test_auc": final["pooled"].get("auc"),
        "capsule_curve": capsule,
        "step_at_2_5mm": {"observed_by_sites": recovered_step(expl["capsule"], "observed"),
                          "model_mean_probability": recovered_step(expl["capsule"], "expected"),
                          "truth_llnm_rate": truth["step_2_5mm"]["llnm_rate"],
                          "generator_probability": truth["step_2_5mm"]["generator_probability"]},
        "thirds": thirds,
        "feature_group_shares": {"this_model_paper_groups": expl.get("paper_group_shares"),
                                 "paper": expl["paper_shares"], "this_model_groups": expl.get("shares"),
                                 "method": expl["method"]},
        "withheld": expl.get("withheld"),
    }
    write_result(args.result, result, made)
    print(json.dumps({k: result[k] for k in ("step_at_2_5mm", "feature_group_shares")}, indent=2))
    for row in capsule:
        print(row)
    print(f"wrote {args.result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
