"""Real patients: federated LLNM-Net against pooled, local-only and scikit-learn, by repeated stratified CV.

    .venv/bin/python benchmarks/bench_real.py                          # both data sets, 5 x 2 folds
    .venv/bin/python benchmarks/bench_real.py --datasets uci-dtc       # one data set (results are merged)

Data sets (read from ../shared/data, never copied into the repository; imported with `llnm-site import` into
--work):

* **uci-dtc** (383 patients, clinical variables only; LLNM = N1b): federated LLNM-Net with the clinical pathway
  only across K = 3 and K = 7 simulated sites, the same model pooled, local-only (K = 3 and 7), scikit-learn
  `LogisticRegression` and `HistGradientBoostingClassifier` pooled, and federated DP-SGD at epsilon 3 (K = 3).
* **ddti** (298 labelled cases, images only; TI-RADS 4a-5 vs 2-3): federated, pooled and local-only (K = 3) with
  the `tiny` LLNM-Net and with the `feature-head` on the pretrained (ImageNet EfficientNet-Lite0) image features,
  and federated DP-SGD at epsilon 3 with the feature head.

Folds: `--repeats` x `--folds` stratified folds over the labelled patients (groups kept whole: a DDTI case,
identical UCI records), the same folds for every method and every K. In each fold, the held-out part is every
site's `test` split; 20 % of the rest (stratified, seeded) is `val` (model selection: best round or epoch) and
the remainder `train`. scikit-learn fits on train + val (it selects nothing). Every method is scored by the AUC
over all held-out patients (the federation's pooled AUC comes from the sites' score histograms, 100 bins).

Federated runs are real `llnm-server simulate` runs (Flower's simulation engine, the same ServerApp and
ClientApp as a deployment); pooled and local-only are `fl_research.baseline` at the same number of epochs over
the data (rounds x local epochs). The 95 % intervals use the corrected resampled t-test variance (Nadeau &
Bengio 2003), since the folds' training sets overlap. Writes benchmarks/results/real.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
BIN = Path(sys.executable).parent
SHARED = ROOT.parent / "shared" / "data"

from _provenance import carry_earlier, provenance, write_result  # noqa: E402

#: Data sets: source folder, experiment config, importer name, site counts, and the methods run on them.
DATASETS: dict[str, dict[str, Any]] = {
    "uci-dtc": {"source": SHARED / "uci_dtc", "config": ROOT / "configs" / "uci-dtc.yaml", "ks": (3, 7)},
    "ddti": {"source": SHARED / "ddti", "config": ROOT / "configs" / "ddti.yaml", "ks": (3,)},
}
#: DP-SGD at epsilon 3 with the small head that DP trains well (docs/privacy.md), as configs/demo-dp.yaml.
DP_SETTINGS = [
    "model.preset=feature-head", "privacy.patient.enabled=true", "privacy.patient.target_epsilon=3",
    "privacy.patient.delta=1e-5", "train.optimizer=sgd", "train.lr=1.0", "train.momentum=0.9",
    "train.batch_size=256", "train.lr_schedule=constant", "train.weight_decay=0", "train.local_epochs=1",
]


def methods_for(dataset: str) -> list[dict[str, Any]]:
    """(name, kind, K, --set overrides) of every method run on `dataset`."""
    if dataset == "uci-dtc":
        return [
            {"name": "sklearn-logistic-regression", "kind": "sklearn-lr", "k": 3, "sets": []},
            {"name": "sklearn-hist-gradient-boosting", "kind": "sklearn-hgb", "k": 3, "sets": []},
            {"name": "llnm-net-pooled", "kind": "pooled", "k": 3, "sets": []},
            {"name": "llnm-net-local-K3", "kind": "local", "k": 3, "sets": []},
            {"name": "llnm-net-local-K7", "kind": "local", "k": 7, "sets": []},
            {"name": "llnm-net-federated-K3", "kind": "federated", "k": 3, "sets": []},
            {"name": "llnm-net-federated-K7", "kind": "federated", "k": 7, "sets": []},
            {"name": "feature-head-federated-dp-eps3-K3", "kind": "federated", "k": 3, "sets": DP_SETTINGS},
        ]
    head = ["model.preset=feature-head"]
    return [
        {"name": "tiny-pooled", "kind": "pooled", "k": 3, "sets": []},
        {"name": "tiny-local-K3", "kind": "local", "k": 3, "sets": []},
        {"name": "tiny-federated-K3", "kind": "federated", "k": 3, "sets": []},
        {"name": "feature-head-pooled", "kind": "pooled", "k": 3, "sets": head},
        {"name": "feature-head-local-K3", "kind": "local", "k": 3, "sets": head},
        {"name": "feature-head-federated-K3", "kind": "federated", "k": 3, "sets": head},
        {"name": "feature-head-federated-dp-eps3-K3", "kind": "federated", "k": 3, "sets": DP_SETTINGS},
    ]


# ------------------------------------------------------------------------------------------------ folds


def import_sites(dataset: str, k: int, work: Path) -> Path:
    """The data set imported as K sites (seed 0) under `work/base`, once."""
    out = work / "base" / f"{dataset}-K{k}"
    if not (out / "import.json").is_file():
        if out.exists():
            shutil.rmtree(out)
        subprocess.run([str(BIN / "llnm-site"), "import", dataset, str(DATASETS[dataset]["source"]), "--out",
                        str(out), "--sites", str(k), "--seed", "0"], check=True, stdout=subprocess.DEVNULL)
    return out


def patient_groups(dataset: str) -> dict[str, tuple[int, str]]:
    """patient id -> (label, group) for the labelled patients, as the importer sees them."""
    from fl_research.importers.ddti import read_ddti
    from fl_research.importers.uci_dtc import read_uci_dtc

    reader = read_uci_dtc if dataset == "uci-dtc" else read_ddti
    result = reader(DATASETS[dataset]["source"])
    return {p.patient_id: (p.label, p.group) for p in result.patients if p.label is not None}


def make_folds(groups: dict[str, tuple[int, str]], repeats: int, folds: int, seed: int
               ) -> list[dict[str, Any]]:
    """Each fold: its held-out ids, and the val ids (20 % of the rest); the same for every method."""
    import numpy as np
    from sklearn.model_selection import StratifiedGroupKFold

    ids = sorted(groups)
    y = np.array([groups[i][0] for i in ids])
    g = np.array([groups[i][1] for i in ids])
    out = []
    for r in range(repeats):
        outer = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed + r)
        for f, (train, test) in enumerate(outer.split(np.zeros(len(ids)), y, g)):
            inner = StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=seed + 100 * (r + 1) + f)
            _, val = next(inner.split(np.zeros(len(train)), y[train], g[train]))
            out.append({"repeat": r, "fold": f, "test": {ids[i] for i in test},
                        "val": {ids[i] for i in train[val]}, "n_train": len(train), "n_test": len(test)})
    return out


def link_site_files(site: Path, dest: Path, skip: tuple[str, ...]) -> Path:
    """Every file of `site` but those named in `skip`, hard-linked (copied where links fail) under `dest`."""
    for path in site.rglob("*"):
        if path.is_file() and path.name not in skip:
            link = dest / path.relative_to(site)
            link.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, link)
            except OSError:
                shutil.copyfile(path, link)
    dest.mkdir(parents=True, exist_ok=True)
    return dest


def write_fold(base: Path, target: Path, fold: dict[str, Any]) -> Path:
    """The base sites with this fold's splits (labelled patients only); files hard-linked, never rewritten."""
    import yaml

    if (target / "done").is_file():
        return target
    if target.exists():
        shutil.rmtree(target)
    for site in sorted(p for p in base.iterdir() if (p / "patients.csv").is_file()):
        dest = link_site_files(site, target / site.name, skip=("patients.csv", "site.yaml"))
        with (site / "patients.csv").open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = list(reader.fieldnames or [])
            rows = [row for row in reader if row["llnm"] != ""]
        for row in rows:
            pid = row["patient_id"]
            row["split"] = "test" if pid in fold["test"] else "val" if pid in fold["val"] else "train"
        with (dest / "patients.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        info = yaml.safe_load((site / "site.yaml").read_text(encoding="utf-8"))
        info["import"]["cv"] = {"repeat": fold["repeat"], "fold": fold["fold"],
                                "note": "benchmark fold: splits rewritten by benchmarks/bench_real.py"}
        (dest / "site.yaml").write_text(yaml.safe_dump(info, sort_keys=False), encoding="utf-8")
    (target / "done").write_text("ok\n")
    return target


# ---------------------------------------------------------------------------------------------- methods


def _table(fold_dir: Path) -> list[dict[str, str]]:
    rows = []
    for site in sorted(p for p in fold_dir.iterdir() if (p / "patients.csv").is_file()):
        with (site / "patients.csv").open(newline="", encoding="utf-8") as handle:
            rows += list(csv.DictReader(handle))
    return rows


def run_sklearn(kind: str, fold_dir: Path, config: Path) -> float:
    """Pooled scikit-learn on the clinical variables: fit on train + val, AUC on test."""
    import numpy as np
    import pandas as pd
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    from fl_server.config import load_config

    inputs = load_config(config).preprocess.inputs
    frame = pd.DataFrame(_table(fold_dir))
    numeric = [v.name for v in inputs.clinical if v.kind == "numeric"]
    categorical = [v.name for v in inputs.clinical if v.kind == "categorical"]
    x = frame[numeric + categorical].copy()
    for name in numeric:
        x[name] = pd.to_numeric(x[name].replace("", np.nan))
    for var in inputs.clinical:
        if var.kind == "categorical":
            x[var.name] = pd.Categorical(x[var.name].replace("", np.nan), categories=var.levels)
    y = frame["llnm"].astype(int).to_numpy()
    fit = (frame["split"] != "test").to_numpy()
    if kind == "sklearn-lr":
        model = make_pipeline(
            ColumnTransformer([
                ("num", make_pipeline(SimpleImputer(strategy="median"), StandardScaler()), numeric),
                ("cat", OneHotEncoder(handle_unknown="ignore"), categorical),
            ]),
            LogisticRegression(max_iter=2000),
        )
    else:
        model = HistGradientBoostingClassifier(categorical_features="from_dtype", random_state=0)
    model.fit(x[fit], y[fit])
    return float(roc_auc_score(y[~fit], model.predict_proba(x[~fit])[:, 1]))


def run_baseline(kind: str, fold_dir: Path, config: Path, sets: list[str], out: Path) -> float:
    from fl_research.baseline import run_baseline as baseline
    from fl_server.config import load_config, parse_set_options

    exp = load_config(config, parse_set_options(sets))
    result = baseline(exp, kind, out, data_root=fold_dir, progress=False)
    return float(result["pooled"]["auc"])


def run_federated(fold_dir: Path, config: Path, sets: list[str], out: Path, state: Path) -> float:
    if out.exists():
        shutil.rmtree(out)
    cmd = [str(BIN / "llnm-server"), "simulate", "--config", str(config), "--data", str(fold_dir), "--out", str(out)]
    for item in sets:
        cmd += ["--set", item]
    # Each fold is an independent replicate of the experiment: its sites' lifetime privacy ledgers start empty
    # (in one state folder per fold), since in the benchmark the same real patients recur across folds.
    env = {**os.environ, "LLNM_PRIVACY_DIR": str(state / "privacy"), "LLNM_SITE_STATE_DIR": str(state)}
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"simulate failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    return float(metrics["final"]["pooled"]["auc"])


# ---------------------------------------------------------------------------------------------- summary


def corrected_ci(values: list[float], n_train: float, n_test: float) -> dict[str, Any]:
    """Mean and 95 % interval with the corrected resampled t variance: (1/J + n_test/n_train) * s^2."""
    from scipy import stats

    j = len(values)
    mean = sum(values) / j
    if j < 2:
        return {"mean": round(mean, 4), "ci95": None, "folds": j}
    var = sum((v - mean) ** 2 for v in values) / (j - 1)
    half = stats.t.ppf(0.975, j - 1) * math.sqrt((1 / j + n_test / n_train) * var)
    return {"mean": round(mean, 4), "ci95": [round(mean - half, 4), round(mean + half, 4)], "sd": round(
        math.sqrt(var), 4), "folds": j}


def summarise(entry: dict[str, Any], folds: list[dict[str, Any]]) -> None:
    n_train = sum(f["n_train"] for f in folds) / len(folds)
    n_test = sum(f["n_test"] for f in folds) / len(folds)
    for method in entry["methods"].values():
        aucs = [a for a in method["auc"] if a is not None]
        if aucs:
            method.update(corrected_ci(aucs, n_train, n_test))
    # Paired comparisons on the same folds.
    m = entry["methods"]
    pairs = []
    if "sklearn-logistic-regression" in m and "sklearn-hist-gradient-boosting" in m:
        lr, hgb = m["sklearn-logistic-regression"], m["sklearn-hist-gradient-boosting"]
        best = "sklearn-logistic-regression" if lr.get("mean", 0) >= hgb.get("mean", 0) else \
            "sklearn-hist-gradient-boosting"
        pairs = [(f"llnm-net-federated-K{k} - {best}", f"llnm-net-federated-K{k}", best) for k in (3, 7)]
    pairs += [(f"{a} - {b}", a, b) for a, b in (
        ("llnm-net-federated-K3", "llnm-net-pooled"), ("tiny-federated-K3", "tiny-pooled"),
        ("feature-head-federated-K3", "feature-head-pooled"))]
    entry["paired_differences"] = {}
    for label, a, b in pairs:
        if a in m and b in m:
            diffs = [x - y for x, y in zip(m[a]["auc"], m[b]["auc"], strict=True) if x is not None and y is not None]
            if diffs:
                entry["paired_differences"][label] = corrected_ci(diffs, n_train, n_test)


def markdown_table(results: dict[str, Any]) -> str:
    """The docs/real-data.md table of `results` (real.json): mean AUC, 95 % interval, folds, seconds per fold."""
    lines = ["| data set | method | sites | AUC (mean of folds) | 95% CI | folds | s per fold |",
             "|---|---|---|---|---|---|---|"]
    for dataset, entry in results.get("datasets", {}).items():
        for name, m in entry["methods"].items():
            ci = m.get("ci95")
            shown = f"{ci[0]:.3f}–{min(ci[1], 1.0):.3f}" if ci else "-"
            sites = "pooled" if m["kind"] == "pooled" or m["kind"].startswith("sklearn") else m["sites"]
            per_fold = m["seconds"] / max(len(m["auc"]), 1)
            lines.append(f"| {dataset} | {name} | {sites} | {m.get('mean', float('nan')):.3f} | {shown} | "
                         f"{m.get('folds', 0)} | {per_fold:.0f} |")
        for label, d in entry.get("paired_differences", {}).items():
            ci = d.get("ci95")
            shown = f"{ci[0]:+.3f} to {ci[1]:+.3f}" if ci else "-"
            lines.append(f"| {dataset} | paired: {label} | | {d['mean']:+.3f} | {shown} | {d['folds']} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="uci-dtc,ddti")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default=None, help="comma-separated method names (default: all)")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-real")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "real.json")
    ap.add_argument("--table", action="store_true", help="print the markdown table of --out and exit (no runs)")
    args = ap.parse_args(argv)
    if args.table:
        print(markdown_table(json.loads(args.out.read_text())))
        return 0
    made = provenance()  # the code as it starts, before anything can change the tree

    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    os.environ.setdefault("LLNM_CACHE_DIR", str(args.work / "cache"))
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    # Data sets and methods not run now are kept with their own provenance; the file's, as it was, is what made
    # those that record none (see carry_earlier).
    previous = {k: results[k] for k in ("provenance", "earlier_provenance") if k in results}
    for ad_hoc in ("command", "machine"):  # an older file's, now in "provenance"
        results.pop(ad_hoc, None)
    results.update({
        "benchmark": "bench_real",
        "cv": {"repeats": args.repeats, "folds": args.folds, "seed": args.seed,
               "interval": "95% corrected resampled t (Nadeau & Bengio 2003) over the folds",
               "val": "20% of each fold's training part (model selection); scikit-learn fits on train + val"},
    })
    results.setdefault("datasets", {})
    for dataset in args.datasets.split(","):
        spec = DATASETS[dataset]
        if not spec["source"].exists():
            print(f"skip {dataset}: {spec['source']} is absent", file=sys.stderr)
            continue
        groups = patient_groups(dataset)
        folds = make_folds(groups, args.repeats, args.folds, args.seed)
        bases = {k: import_sites(dataset, k, args.work) for k in spec["ks"]}
        chosen = [m for m in methods_for(dataset) if args.methods is None or m["name"] in args.methods.split(",")]
        labels = [label for label, _ in groups.values()]
        entry = results["datasets"].get(dataset, {}) if args.methods else {}
        entry.update({"patients": len(groups), "positive": sum(labels), "config": str(spec["config"].relative_to(
            ROOT)), "outcome": json.loads((bases[spec["ks"][0]] / "import.json").read_text())["outcome"]})
        entry.setdefault("methods", {})
        for method in chosen:
            entry["methods"][method["name"]] = {"kind": method["kind"], "sites": method["k"],
                                                "settings": method["sets"], "auc": [], "seconds": 0.0,
                                                "provenance": made}
        for index, fold in enumerate(folds):
            for method in chosen:
                name, kind, k = method["name"], method["kind"], method["k"]
                fold_dir = write_fold(bases[k], args.work / dataset / f"K{k}" / f"r{fold['repeat']}f{fold['fold']}",
                                      fold)
                run_out = args.work / "runs" / dataset / name / f"r{fold['repeat']}f{fold['fold']}"
                started = time.perf_counter()
                if kind.startswith("sklearn"):
                    auc = run_sklearn(kind, fold_dir, spec["config"])
                elif kind in ("pooled", "local"):
                    auc = run_baseline(kind, fold_dir, spec["config"], method["sets"], run_out)
                else:
                    auc = run_federated(fold_dir, spec["config"], method["sets"], run_out,
                                        args.work / "state" / name / f"r{fold['repeat']}f{fold['fold']}")
                seconds = time.perf_counter() - started
                record = entry["methods"][name]
                record["auc"].append(round(auc, 4))
                record["seconds"] = round(record["seconds"] + seconds, 1)
                print(f"{dataset} fold {index + 1}/{len(folds)} {name}: AUC {auc:.3f} ({seconds:.0f} s)", flush=True)
            summarise(entry, folds[: index + 1])
            results["datasets"][dataset] = entry
            carry_earlier(results, previous, (m for d in results["datasets"].values() for m in d["methods"].values()))
            write_result(args.out, results, made)
        for name, record in entry["methods"].items():
            ci = record.get("ci95")
            shown = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "-"
            print(f"{dataset} {name}: AUC {record.get('mean', float('nan')):.3f} {shown}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
