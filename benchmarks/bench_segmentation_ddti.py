"""Nodule segmentation on real ultrasound (DDTI), federated across K = 3 and 7 simulated sites, against pooled and
local-only training on the same split. Writes benchmarks/results/segmentation_ddti.json.

DDTI (read from ../shared/data/ddti, imported with `llnm-site import ddti`) outlines the nodule only: the thyroid
channel is not trained and not scored, and the images are uncalibrated (no HD95 in mm, no capsule distance). One
patient-level split for every method and every K: the cases (a case's images together) are split 60/20/20 into
train, validation (model selection: best round or pass) and test, seeded; every site keeps its cases' rows with
those splits. Scored on every test image with an outline: mean Dice and IoU with a 95% bootstrap interval over
cases. Federated runs are real `llnm-server simulate` runs with configs/segment.yaml; pooled and local-only train
the same segmenter for as many passes with the same schedule (`bench_segmentation.centralised`).

Reference points from the issue, measured before this benchmark existed: a pooled MONAI BasicUNet (0.5M parameters,
128 px, DiceCE, flips) reached test Dice 0.708 after 15 minutes; an ellipse at the mean nodule position, or the
thresholded mean mask, score 0.42-0.46.

    python benchmarks/bench_segmentation_ddti.py [--ks 3,7]
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
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
SOURCE = ROOT.parent / "shared" / "data" / "ddti"

from _provenance import provenance, write_result  # noqa: E402
from bench_real import link_site_files  # noqa: E402
from bench_segmentation import _bootstrap, centralised, simulate_once  # noqa: E402


def import_sites(k: int, work: Path) -> Path:
    out = work / "base" / f"ddti-K{k}"
    if not (out / "import.json").is_file():
        if out.exists():
            shutil.rmtree(out)
        subprocess.run([str(BIN / "llnm-site"), "import", "ddti", str(SOURCE), "--out", str(out), "--sites", str(k),
                        "--seed", "0"], check=True, stdout=subprocess.DEVNULL)
    return out


def case_split(base: Path, seed: int) -> dict[str, str]:
    """patient id -> train / val / test: cases shuffled under `seed`, 60/20/20."""
    ids = sorted({row["patient_id"] for site in base.iterdir() if (site / "patients.csv").is_file()
                  for row in csv.DictReader((site / "patients.csv").open(encoding="utf-8"))})
    order = np.random.default_rng(seed).permutation(len(ids))
    n_test, n_val = round(0.2 * len(ids)), round(0.2 * len(ids))
    split = {}
    for rank, index in enumerate(order):
        split[ids[index]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return split


def write_split(base: Path, target: Path, split: dict[str, str]) -> Path:
    """The base sites with `split`'s splits, every row kept; files hard-linked, never rewritten."""
    if (target / "done").is_file():
        return target
    if target.exists():
        shutil.rmtree(target)
    for site in sorted(p for p in base.iterdir() if (p / "patients.csv").is_file()):
        dest = link_site_files(site, target / site.name, skip=("patients.csv",))
        with (site / "patients.csv").open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns, rows = list(reader.fieldnames or []), list(reader)
        for row in rows:
            row["split"] = split[row["patient_id"]]
        with (dest / "patients.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
    (target / "done").write_text("ok\n")
    return target


def outlined_test_views(site: Path, exp: Any) -> list[Any]:
    from shared_model.sitedata.contract import load_site
    from shared_model.sitedata.segmentation_inputs import load_segmentation_inputs

    loaded = load_site(site)
    patients = [p for p in loaded.patients if p.split == "test"]
    inputs = load_segmentation_inputs(site, exp.segmenter_architecture().image_size, exp.preprocess, site=loaded,
                                      patients=patients, for_prediction=True)
    return [v for v in inputs.views if "nodule" in v.frame_masks]


def nodule_scores(model: Any, views: list[Any], n_boot: int) -> dict[str, Any]:
    from shared_model.model.segmenter_training import predict_frames
    from shared_model.sitedata.segmentation_inputs import score_view

    dice: dict[str, list[float]] = {}
    iou: dict[str, list[float]] = {}
    for probs, view in zip(predict_frames(model, views), views, strict=True):
        s = score_view(probs, view)["nodule"]
        dice.setdefault(view.patient_id, []).append(float(s["dice"]))
        iou.setdefault(view.patient_id, []).append(float(s["iou"]))
    flat = [d for v in dice.values() for d in v]
    return {"dice": _bootstrap(dice, n_boot), "iou": _bootstrap(iou, n_boot),
            "dice_median": round(float(np.median(flat)), 4) if flat else None,
            "share_below_0_5": round(float(np.mean([d < 0.5 for d in flat])), 4) if flat else None}


def federated(data: Path, config: str, out: Path, k: int, sets: list[str]) -> tuple[Any, dict[str, Any]]:
    from shared_model.model.checkpoint import resolve_checkpoint, segmenter_from_checkpoint

    started = time.perf_counter()
    simulate_once(config, data, out, [f"federation.min_sites={k}", *sets])
    model, _ = segmenter_from_checkpoint(resolve_checkpoint(out))
    metrics = json.loads((out / "metrics.json").read_text())
    return model, {"run_dir": str(out), "best_round": metrics.get("best_round"),
                   "seconds": round(time.perf_counter() - started, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ks", default="3,7")
    ap.add_argument("--seed", type=int, default=0, help="the case split's seed")
    ap.add_argument("--config", default=str(ROOT / "configs" / "segment.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-segmentation-ddti")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "segmentation_ddti.json"))
    args = ap.parse_args(argv)
    made = provenance(argv)
    if not SOURCE.is_dir():
        print(f"bench_segmentation_ddti.py: {SOURCE} is absent (../shared/data/ddti); nothing measured",
              file=sys.stderr)
        return 2
    from fl_research.simulation import discover_sites
    from fl_server.config import load_config, parse_set_options

    exp = load_config(args.config, parse_set_options(args.set))
    passes = exp.federation.rounds * exp.train.local_epochs
    ks = [int(k) for k in args.ks.split(",")]
    bases = {k: import_sites(k, args.work) for k in ks}
    split = case_split(bases[ks[0]], args.seed)
    folders = {k: write_split(bases[k], args.work / f"K{k}", split) for k in ks}
    sites = {k: discover_sites(folders[k]) for k in ks}
    views = {k: {s.name: outlined_test_views(s, exp) for s in sites[k]} for k in ks}
    every = [v for vs in views[ks[0]].values() for v in vs]
    methods: dict[str, Any] = {}
    pooled, info = centralised(sites[ks[0]], exp, passes)
    methods["pooled"] = {**info, **nodule_scores(pooled, every, args.bootstrap)}
    for k in ks:
        model, info = federated(folders[k], args.config, args.work / "runs" / f"federated-K{k}", k, args.set)
        methods[f"federated-K{k}"] = {**info, **nodule_scores(model, every, args.bootstrap)}
        local_views, local_dice = [], {}
        for site in sites[k]:
            model, _ = centralised([site], exp, passes)
            local_views.append((model, views[k][site.name]))
            local_dice[site.name] = nodule_scores(model, views[k][site.name], args.bootstrap)["dice"]["mean"]
        # Each test case scored by its own site's model, then pooled over the sites.
        from shared_model.model.segmenter_training import predict_frames
        from shared_model.sitedata.segmentation_inputs import score_view

        dice: dict[str, list[float]] = {}
        for model, vs in local_views:
            for probs, view in zip(predict_frames(model, vs), vs, strict=True):
                dice.setdefault(view.patient_id, []).append(float(score_view(probs, view)["nodule"]["dice"]))
        methods[f"local-only-K{k}"] = {"dice": _bootstrap(dice, args.bootstrap), "sites": local_dice}
    result = {
        "split": {"seed": args.seed, "cases": {s: sum(1 for v in split.values() if v == s)
                                              for s in ("train", "val", "test")},
                  "test_images_outlined": len(every)},
        "config": args.config, "passes": passes, "methods": methods,
        "references": {"pooled_floor_from_the_issue": 0.708, "trivial_baselines": [0.42, 0.46],
                       "published_range": [0.76, 0.84], "aim_pooled": 0.80, "aim_federated_gap": 0.02}}
    write_result(args.out, result, made)
    print(json.dumps({m: v["dice"]["mean"] for m, v in methods.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
