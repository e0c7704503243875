"""LLNM-Net on the synthetic consortium: pooled `tiny` training against the Bayes-optimal AUC, modality
ablations, training throughput, peak memory and parameter counts.

    .venv/bin/python benchmarks/bench_model.py --patients 2100 --seed 1 --epochs 20

Generates (or reuses) a consortium of 7 sites x 300 patients with `llnm-synth`, trains the pooled model on
all sites' training splits with all modalities and with one modality at a time, evaluates on all sites'
test splits, and writes benchmarks/results/model.json. Ablations remove inputs through the model's own
missing-modality masks (a removed modality is "absent", exactly as a missing report or view would be):

- image: both views' feature images plus the scalars measured on them (shape ratio, echogenicity, capsule
  distance, size, position along the gland); no report, no age or sex
- report: the report text only
- clinical: age and sex only
- all: everything
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _provenance import provenance, write_result  # noqa: E402
from _results import merge_side_by_side  # noqa: E402

from fl_research.baseline import train_reference  # noqa: E402
from fl_server.config import load_config, parse_set_options  # noqa: E402
from shared_model.evaluation.metrics import binary_metrics  # noqa: E402
from shared_model.model.modeling import LLNMNet, ModelConfig, count_parameters  # noqa: E402
from shared_model.model.training import predict  # noqa: E402
from shared_model.sitedata.cache import build_site_tensors  # noqa: E402
from shared_model.sitedata.tensors import CLINICAL_FEATURES, LLNMDataset, SiteTensors  # noqa: E402

# Per-view scalars by modality: age and sex are clinical; the others are measured on the image and its masks.
_IMAGE_SCALARS = [CLINICAL_FEATURES.index(n) for n in CLINICAL_FEATURES if n not in ("age", "sex")]
MODALITIES = {
    "all": {"image": True, "report": True, "clinical": list(range(len(CLINICAL_FEATURES)))},
    "image": {"image": True, "report": False, "clinical": _IMAGE_SCALARS},
    "report": {"image": False, "report": True, "clinical": []},
    "clinical": {"image": False, "report": False, "clinical": [CLINICAL_FEATURES.index("age"),
                                                               CLINICAL_FEATURES.index("sex")]},
}


def ablate(t: SiteTensors, keep: dict) -> SiteTensors:
    """A copy of `t` in which the removed modalities are marked absent (their values zeroed too)."""

    out = dataclasses.replace(t)
    if not keep["image"]:
        out.view_mask = torch.zeros_like(t.view_mask)
        out.image = torch.zeros_like(t.image)
    if not keep["report"]:
        out.text_mask = torch.zeros_like(t.text_mask)
        out.text = torch.zeros_like(t.text)
    cm = torch.zeros_like(t.clinical_mask)
    for idx in keep["clinical"]:
        cm[:, :, idx] = t.clinical_mask[:, :, idx]
    out.clinical_mask = cm
    out.clinical = t.clinical * cm
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def train_eval(exp, tensors: dict[str, SiteTensors], keep: dict, epochs: int, progress: bool) -> dict:
    """The pooled baseline's training (`fl_research.baseline.train_reference`) on the ablated tensors, then the
    pooled and per-site test AUCs of the epoch with the best validation AUC."""
    t0 = time.perf_counter()
    model, info = train_reference(exp, [ablate(t.subset("train"), keep) for t in tensors.values()],
                                  [ablate(t.subset("val"), keep) for t in tensors.values()], epochs, "pooled",
                                  progress)
    ys, ss, per_site = [], [], {}
    for name, t in tensors.items():
        p = predict(model, LLNMDataset(ablate(t.subset("test"), keep)))
        m = p["llnm"] >= 0
        y, s = p["llnm"][m].astype(int), p["score"][m]
        per_site[name] = binary_metrics(y, s, n_bootstrap=0)["auc"]
        ys.append(y)
        ss.append(s)
    pooled = binary_metrics(np.concatenate(ys), np.concatenate(ss), n_bootstrap=1000)
    return {
        "pooled_test_auc": pooled["auc"],
        "pooled_test_auc_ci": [pooled["auc_ci_low"], pooled["auc_ci_high"]],
        "pooled_test": {k: pooled[k] for k in ("accuracy", "sensitivity", "specificity", "n")},
        "site_test_auc": per_site,
        "selected_epoch": info["selected_epoch"],
        "history": [{"epoch": h["epoch"], "loss": round(h["loss"], 4), "val_auc": h.get("val_auc")}
                    for h in info["history"]],
        "train_seconds": info["train_seconds"],
        "wall_seconds": round(time.perf_counter() - t0, 2),
        "train_patients_per_second": round(info["patients_per_second"], 1) if info["patients_per_second"] else None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=2100)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--data", default=str(ROOT / "data" / "bench-2100"))
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--set", action="append", metavar="KEY=VALUE")
    ap.add_argument("--modalities", default="all,image,report,clinical")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "model.json"))
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)
    made = provenance()  # the code as it starts, before anything can change the tree
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("llnm").setLevel(logging.INFO)  # one line per epoch from train_reference

    data = Path(args.data)
    if not (data / "consortium.json").is_file():
        subprocess.run([str(Path(sys.executable).parent / "llnm-synth"), "--out", str(data), "--sites", "7",
                        "--patients", str(args.patients), "--seed", str(args.seed)], check=True)
    consortium = json.loads((data / "consortium.json").read_text())
    exp = load_config(args.config, parse_set_options(args.set))
    pre = exp.preprocess
    t0 = time.perf_counter()
    sites = sorted(p for p in data.iterdir() if (p / "patients.csv").is_file())
    tensors = {p.name: build_site_tensors(p, pre, progress=args.progress) for p in sites}
    cache_seconds = time.perf_counter() - t0

    results: dict = {
        # Part of the throughput figures (the rest of the machine is in "provenance").
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
        "consortium": {"dir": str(data), "patients": sum(len(t) for t in tensors.values()),
                       "seed": consortium.get("seed")},
        "bayes_auc": _bayes(consortium),
        "modality_auc_bound": _modality_bounds(consortium),
        "parameters": {
            "tiny": count_parameters(LLNMNet(ModelConfig.preset("tiny"))),
            "paper": count_parameters(LLNMNet(ModelConfig.preset("paper"))),
        },
        "cache_build_seconds": round(cache_seconds, 2),
        "epochs": args.epochs,
        "runs": {},
    }
    for name in args.modalities.split(","):
        print(f"[bench] pooled tiny, modality {name} ...", flush=True)
        results["runs"][name] = train_eval(exp, tensors, MODALITIES[name], args.epochs, args.progress)
        print(f"[bench]   pooled test AUC {results['runs'][name]['pooled_test_auc']:.3f}", flush=True)
    results["peak_rss_mb"] = round(peak_rss_mb(), 1)
    out = Path(args.out)
    # Modalities can run in separate invocations side by side (one per core): runs already in --out with the
    # same consortium, epochs and options are kept.
    results["settings"] = {"data": str(data.resolve()), "config": str(Path(args.config).resolve()),
                           "epochs": args.epochs, "set": list(args.set or [])}
    previous = merge_side_by_side(out, results, "runs", list(MODALITIES), made)
    if previous:
        results["peak_rss_mb"] = max(results["peak_rss_mb"], previous.get("peak_rss_mb", 0.0))
    write_result(out, results, made)
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=2))
    for name, r in results["runs"].items():
        print(f"{name:>9}: pooled test AUC {r['pooled_test_auc']:.3f}  ({r['train_patients_per_second']} patients/s)")
    print(f"wrote {out}")
    return 0


def _bayes(consortium: dict) -> dict:
    """Bayes-optimal AUCs from consortium.json: pooled and per site, on the test split and on all patients."""
    out = {"pooled": {"test": consortium["pooled"]["auc"]["test"]["bayes"],
                      "all": consortium["pooled"]["auc"]["all"]["bayes"]}}
    for name, site in consortium["sites"].items():
        out[name] = {"test": site["auc"]["test"]["bayes"], "all": site["auc"]["all"]["bayes"]}
    return out


def _modality_bounds(consortium: dict) -> dict:
    """The best AUC reachable from each modality alone (pooled), as recorded by llnm-synth."""
    return {split: {k: v for k, v in consortium["pooled"]["auc"][split].items() if k in ("image", "report", "clinical")}
            for split in ("test", "all")}


if __name__ == "__main__":
    sys.exit(main())
