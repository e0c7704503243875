"""LLNM-Net on the synthetic consortium: pooled `tiny` training against the Bayes-optimal AUC, modality
ablations, training throughput, peak memory and parameter counts.

    .venv/bin/python benchmarks/bench_model.py --patients 2100 --seed 1 --epochs 20

Generates (or reuses) a consortium of 7 sites x 300 patients with `llnm-synth`, trains the pooled model on
all sites' training splits with all modalities and with one modality at a time, evaluates on all sites'
test splits, and writes benchmarks/results/model.json. Ablations remove inputs through the model's own
missing-modality masks (a removed modality is "absent", exactly as a missing report or view would be):

- image: both views' feature images plus the image-derived scalars (shape ratio, echogenicity); no
  report, no age or sex
- report: the report text only
- clinical: age and sex only
- all: everything
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fl_server.config import load_config, parse_set_options  # noqa: E402
from fl_server.federation import preprocess_config_dict  # noqa: E402
from shared_model.data import LLNMDataset, SiteTensors, build_site_tensors  # noqa: E402
from shared_model.metrics import binary_metrics  # noqa: E402
from shared_model.modeling import LLNMNet, ModelConfig, count_parameters  # noqa: E402
from shared_model.preprocessing import PreprocessConfig  # noqa: E402
from shared_model.training import TrainConfig, predict, scheduled_lr, train_local  # noqa: E402

# clinical index: 0 age, 1 sex, 2 shape ratio, 3 echogenicity
MODALITIES = {
    "all": {"image": True, "report": True, "clinical": [0, 1, 2, 3]},
    "image": {"image": True, "report": False, "clinical": [2, 3]},
    "report": {"image": False, "report": True, "clinical": []},
    "clinical": {"image": False, "report": False, "clinical": [0, 1]},
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
    torch.manual_seed(exp.train.seed)
    model = LLNMNet(ModelConfig.from_dict(exp.model_config_dict()))
    base = dataclasses.replace(TrainConfig.from_dict(exp.train.model_dump(mode="json")), local_epochs=1)
    train = LLNMDataset([ablate(t.subset("train"), keep) for t in tensors.values()])
    val = LLNMDataset([ablate(t.subset("val"), keep) for t in tensors.values()])
    best, best_state, best_epoch, history = -1.0, None, 0, []
    t0 = time.perf_counter()
    seen = 0
    train_seconds = 0.0
    for epoch in range(1, epochs + 1):
        cfg = dataclasses.replace(base, seed=exp.train.seed * 1000 + epoch, lr=scheduled_lr(base, epoch - 1, epochs))
        res = train_local(model, train, cfg, progress=progress, description=f"epoch {epoch}")
        train_seconds += res.seconds
        seen += res.num_examples
        p = predict(model, val)
        keep_l = p["llnm"] >= 0
        auc = binary_metrics(p["llnm"][keep_l].astype(int), p["score"][keep_l], n_bootstrap=0)["auc"]
        history.append({"epoch": epoch, "loss": round(res.loss, 4), "val_auc": auc})
        print(f"[bench]   epoch {epoch}/{epochs} loss {res.loss:.4f} val AUC {auc}", flush=True)
        if auc is not None and auc > best:
            best, best_epoch = auc, epoch
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
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
        "selected_epoch": best_epoch,
        "history": history,
        "train_seconds": round(train_seconds, 2),
        "wall_seconds": round(time.perf_counter() - t0, 2),
        "train_patients_per_second": round(seen / train_seconds, 1) if train_seconds else None,
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
    torch.set_num_threads(args.threads)

    data = Path(args.data)
    if not (data / "consortium.json").is_file():
        subprocess.run([str(Path(sys.executable).parent / "llnm-synth"), "--out", str(data), "--sites", "7",
                        "--patients", str(args.patients), "--seed", str(args.seed)], check=True)
    consortium = json.loads((data / "consortium.json").read_text())
    exp = load_config(args.config, parse_set_options(args.set))
    pre = PreprocessConfig.from_dict(preprocess_config_dict(exp))
    t0 = time.perf_counter()
    sites = sorted(p for p in data.iterdir() if (p / "patients.csv").is_file())
    tensors = {p.name: build_site_tensors(p, pre, progress=args.progress) for p in sites}
    cache_seconds = time.perf_counter() - t0

    results: dict = {
        "command": "python benchmarks/bench_model.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpu_count": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__, "device": "cpu"},
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
    previous = json.loads(out.read_text()) if out.is_file() else {}
    if previous.get("settings") == results["settings"]:
        results["runs"] = {k: v for k, v in previous["runs"].items() if k not in results["runs"]} | results["runs"]
        results["command"] = [*_as_list(previous.get("command")), results["command"]]
        results["peak_rss_mb"] = max(results["peak_rss_mb"], previous.get("peak_rss_mb", 0.0))
    results["runs"] = {k: results["runs"][k] for k in MODALITIES if k in results["runs"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=2))
    for name, r in results["runs"].items():
        print(f"{name:>9}: pooled test AUC {r['pooled_test_auc']:.3f}  ({r['train_patients_per_second']} patients/s)")
    print(f"wrote {out}")
    return 0


def _as_list(value: object) -> list:
    return value if isinstance(value, list) else ([value] if value else [])


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
