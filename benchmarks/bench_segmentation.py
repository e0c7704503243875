"""Federated nodule and thyroid segmentation on consortia where few masks are drawn, and LLNM-Net on its predicted
masks (issue 28). Writes benchmarks/results/segmentation.json.

Per evaluation seed (a `llnm-synth --profile paper-calibrated` consortium of --patients over 7 sites; only
--drawn-masks of the patients at --drawn-masks-sites keep their drawn masks, the rest are in the consortium's
truth folder):

* **federated**: `llnm-server simulate --config configs/segment.yaml` (the shipped settings), its best round;
* **pooled**: the same segmenter trained on every drawn training view of the consortium in one place, for as many
  passes (rounds x local epochs) with the same learning-rate schedule and an optimiser reset per pass, as a
  federated round resets it; the pass with the best validation Dice is kept, as the federation keeps its best round;
* **local-only**: the same at each site with drawn masks, on its own views (a site without any has no model);

each scored at every site on its held-out test patients against the generator's true masks (drawn or withheld):
mean Dice and IoU per structure with a 95% bootstrap interval over patients, the HD95 in mm and the error of the
capsule distance measured on predicted masks, in mm.

With --end-to-end, the federated segmenter then predicts every site's masks (`llnm-site segment`'s code, into the
run's own cache folder), and LLNM-Net is trained with `configs/demo.yaml` twice: on the partial consortium with
`preprocess.masks: drawn-else-predicted`, and on its fully drawn twin (the same seed: the same patients and
images). The pooled test AUCs are compared per seed, with a paired bootstrap interval of the difference.

Pass rules, fixed before any run: federated Dice >= 0.90 for both structures at every site; |AUC on predicted masks
- AUC on drawn masks| <= 0.01 on each evaluation seed.

    python benchmarks/bench_segmentation.py --evaluation-seeds 301,302 [--end-to-end]
"""

from __future__ import annotations

import argparse
import json
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

from _provenance import provenance, write_result  # noqa: E402
from _seeds import add_seed_arguments, consortium_for_seed, seeds_from_arguments  # noqa: E402

STRUCTURES = ("thyroid", "nodule")
DICE_TARGET = 0.90
AUC_TOLERANCE = 0.01


def partial_consortium(pattern: str, profile: str, patients: int, seed: int, fraction: float, sites: str) -> Path:
    """The seed's consortium with masks drawn for `fraction` of the patients at `sites` (generated when absent)."""
    data = Path(pattern.format(profile=profile, patients=patients, seed=seed, fraction=fraction)).resolve()
    if not (data / "consortium.json").is_file():
        print(f"[bench] generating {data} ...", flush=True)
        subprocess.run([str(BIN / "llnm-synth"), "--out", str(data), "--sites", "7", "--profile", profile,
                        "--patients", str(patients), "--seed", str(seed), "--drawn-masks", str(fraction),
                        "--drawn-masks-sites", sites, "--quiet", *(["--overwrite"] if data.exists() else [])],
                       check=True)
    return data


# ---------------------------------------------------------------------------------------------- scoring
def test_views(site_dir: Path, truth_root: Path, size: int, pre: Any, split: str = "test") -> list[Any]:
    """The split's views with the generator's true masks (the site's drawn ones, else the withheld ones)."""
    from shared_model.sitedata.contract import load_site
    from shared_model.sitedata.imaging import read_mask
    from shared_model.sitedata.segmentation_inputs import load_segmentation_inputs

    site = load_site(site_dir)
    patients = {p.patient_id: p for p in site.patients if p.split == split}
    inputs = load_segmentation_inputs(site_dir, size, pre, site=site, patients=list(patients.values()),
                                      for_prediction=True)
    for view in inputs.views:
        files = patients[view.patient_id].views[view.view]
        masks = {}
        for structure in STRUCTURES:
            drawn = getattr(files, f"{structure}_mask")
            path = drawn or truth_root / "masks" / site.name / f"{view.patient_id}_{view.view}_{structure}.png"
            masks[structure] = read_mask(path, expected_shape=view.frame.shape)
        view.frame_masks = masks
    return inputs.views


def _bootstrap(values: dict[str, list[float]], n_boot: int, seed: int = 0) -> dict[str, float | None]:
    """Mean over views with a 95% interval from resampling patients."""
    patients = list(values)
    if not patients:
        return {"mean": None, "ci_low": None, "ci_high": None, "n_views": 0, "n_patients": 0}
    flat = [v for p in patients for v in values[p]]
    rng = np.random.default_rng(seed)
    sums = np.array([sum(values[p]) for p in patients])
    counts = np.array([len(values[p]) for p in patients])
    draws = rng.integers(0, len(patients), size=(n_boot, len(patients)))
    means = sums[draws].sum(axis=1) / np.maximum(counts[draws].sum(axis=1), 1)
    return {"mean": round(float(np.mean(flat)), 4), "ci_low": round(float(np.quantile(means, 0.025)), 4),
            "ci_high": round(float(np.quantile(means, 0.975)), 4), "n_views": len(flat), "n_patients": len(patients)}


def score(model: Any, views: list[Any], n_boot: int) -> dict[str, Any]:
    """A model's scores over views with true masks: Dice, IoU, HD95 per structure; the capsule-distance error."""
    from shared_model.model.segmenter_training import predict_frames
    from shared_model.sitedata.segmentation_inputs import score_view

    scores = [score_view(p, v) for p, v in zip(predict_frames(model, views), views, strict=True)]
    out: dict[str, Any] = {}
    for structure in STRUCTURES:
        by_patient: dict[str, dict[str, list[float]]] = {"dice": {}, "iou": {}}
        hd: list[float] = []
        for view, s in zip(views, scores, strict=True):
            if structure not in s:
                continue
            for key in ("dice", "iou"):
                by_patient[key].setdefault(view.patient_id, []).append(float(s[structure][key]))
            if s[structure]["hd95_mm"] is not None:
                hd.append(float(s[structure]["hd95_mm"]))
        out[structure] = {"dice": _bootstrap(by_patient["dice"], n_boot), "iou": _bootstrap(by_patient["iou"], n_boot),
                          "dice_median": round(float(np.median([d for v in by_patient["dice"].values() for d in v])), 4)
                          if by_patient["dice"] else None,
                          "share_below_0_5": round(float(np.mean([d < 0.5 for v in by_patient["dice"].values()
                                                                  for d in v])), 4) if by_patient["dice"] else None,
                          "hd95_mm_median": round(float(np.median(hd)), 3) if hd else None}
    errors = np.array([s["capsule_error_mm"] for s in scores if "capsule_error_mm" in s])
    out["capsule_error_mm"] = {"n": int(errors.size),
                               "mean": round(float(errors.mean()), 3) if errors.size else None,
                               "mean_abs": round(float(np.abs(errors).mean()), 3) if errors.size else None,
                               "median_abs": round(float(np.median(np.abs(errors))), 3) if errors.size else None,
                               "within_1mm": round(float((np.abs(errors) <= 1).mean()), 4) if errors.size else None}
    return out


# --------------------------------------------------------------------------------------------- training
def drawn_training_views(site_dir: Path, size: int, pre: Any, seed: int) -> list[Any]:
    from shared_model.sitedata.contract import load_site
    from shared_model.sitedata.segmentation_inputs import has_drawn_mask, load_segmentation_inputs

    site = load_site(site_dir)
    patients = [p for p in site.patients if p.split == "train" and has_drawn_mask(p)]
    return load_segmentation_inputs(site_dir, size, pre, site=site, patients=patients, seed=seed).views


def drawn_val_views(site_dir: Path, size: int, pre: Any) -> list[Any]:
    from shared_model.sitedata.contract import load_site
    from shared_model.sitedata.segmentation_inputs import load_segmentation_inputs

    site = load_site(site_dir)
    patients = [p for p in site.patients if p.split == "val"]
    return [v for v in load_segmentation_inputs(site_dir, size, pre, site=site, patients=patients).views
            if v.frame_masks]


def centralised(sites: list[Path], exp: Any, passes: int) -> tuple[Any, dict[str, Any]]:
    """The segmenter trained on `sites`' drawn views in one place (best pass on their drawn validation views)."""
    import torch

    from shared_model.evaluation.segmentation import summarise
    from shared_model.model.segmenter import build_segmenter
    from shared_model.model.segmenter_training import predict_frames, train_segmenter
    from shared_model.model.training import scheduled_lr
    from shared_model.sitedata.segmentation_inputs import score_view

    cfg = exp.segmenter_architecture()
    torch.manual_seed(exp.train.seed)
    model = build_segmenter(cfg)
    val = [v for s in sites for v in drawn_val_views(s, cfg.image_size, exp.preprocess)]
    best, best_state, history = -1.0, None, []
    started = time.perf_counter()
    for index in range(passes):
        views = [v for s in sites for v in drawn_training_views(s, cfg.image_size, exp.preprocess, seed=1000 + index)]
        train = exp.train.model_copy(update={"lr": scheduled_lr(exp.train, index, passes), "local_epochs": 1,
                                             "seed": exp.train.seed * 1000003 + index})
        train_segmenter(model, views, train)
        if (index + 1) % exp.federation.eval_every and index + 1 != passes:
            continue
        summary = summarise([score_view(p, v) for p, v in zip(predict_frames(model, val), val, strict=True)])
        dice = float(np.mean([summary[s]["dice"]["mean"] or 0.0 for s in STRUCTURES]))
        history.append({"pass": index + 1, "val_mean_dice": round(dice, 4)})
        if dice > best:
            best, best_state = dice, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    best_pass = max(history, key=lambda h: h["val_mean_dice"])["pass"]
    return model, {"passes": passes, "val": history, "best_pass": best_pass,
                   "seconds": round(time.perf_counter() - started, 1)}


def simulate_once(config: str, data: Path, out: Path, sets: list[str]) -> None:
    """`llnm-server simulate --config CONFIG --data DATA --out OUT --set ...`, unless `out` holds the completed run
    already (an interrupted one is resumed)."""
    cmd = [str(BIN / "llnm-server"), "simulate", "--config", config, "--data", str(data), "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    info = out / "run.json"
    if not info.is_file() or json.loads(info.read_text()).get("status") != "completed":
        subprocess.run(cmd + (["--resume"] if out.exists() else []), check=True)


def federated(data: Path, config: str, work: Path, sets: list[str]) -> tuple[Any, dict[str, Any]]:
    from shared_model.model.checkpoint import resolve_checkpoint, segmenter_from_checkpoint

    out = work / "federated-segmenter"
    started = time.perf_counter()
    simulate_once(config, data, out, sets)
    checkpoint = resolve_checkpoint(out)
    model, meta = segmenter_from_checkpoint(checkpoint)
    metrics = json.loads((out / "metrics.json").read_text())
    return model, {"run_dir": str(out), "checkpoint": str(checkpoint), "sha256": meta["sha256"],
                   "best_round": metrics.get("best_round"), "seconds": round(time.perf_counter() - started, 1),
                   "sites_reported": {s: {k: (m.get(k) or {}).get("dice") for k in STRUCTURES}
                                      for s, m in metrics["final"]["sites"].items()},
                   "idle": sorted({s for r in metrics["rounds"] for s in r.get("idle", [])})}


# ------------------------------------------------------------------------------------------ end to end
def end_to_end(partial: Path, drawn: Path, sha_model: tuple[str, str], work: Path, llnm_config: str,
               n_boot: int) -> dict[str, Any]:
    """LLNM-Net (the demo schedule) on predicted masks (drawn-else-predicted) and on the fully drawn twin."""
    from _scoring import auc, paired_difference, score_test_split

    from fl_client.cmd_segment import segment_site
    from fl_research.simulation import discover_sites
    from fl_server.run_dir import RunDirectory
    from shared_model.sitedata.model_inputs import load_site_inputs

    checkpoint, sha = sha_model
    cache = work / "cache"
    for site in discover_sites(partial):
        segment_site(checkpoint, str(site), cache_dir=str(cache))
    runs: dict[str, Any] = {}
    for label, data, sets in (("predicted", partial, ["preprocess.masks=drawn-else-predicted",
                                                      f"preprocess.segmenter_sha256={sha}"]),
                              ("drawn", drawn, [])):
        out = work / f"llnm-{label}"
        started = time.perf_counter()
        simulate_once(llnm_config, data, out, [f"data.cache_dir={cache}", *sets])
        rd = RunDirectory(out)
        metrics = json.loads(rd.metrics_path.read_text())
        exp = rd.load_config()
        sites = discover_sites(data)
        inputs = [load_site_inputs(s, exp.preprocess, exp.architecture(), cache_dir=exp.data.cache_dir) for s in sites]
        runs[label] = {"scores": score_test_split(exp, rd, metrics, sites, inputs), "run_dir": str(out),
                       "seconds": round(time.perf_counter() - started, 1)}
    pred, drawn_scores = runs["predicted"]["scores"], runs["drawn"]["scores"]
    assert np.array_equal(pred["ids"], drawn_scores["ids"]), "the twins' test patients differ"
    difference = paired_difference(drawn_scores["y"], drawn_scores["score"], [pred["score"]], n_boot)
    a_pred, a_drawn = auc(pred["y"], pred["score"]), auc(drawn_scores["y"], drawn_scores["score"])
    return {"auc_predicted_masks": round(a_pred, 4), "auc_drawn_masks": round(a_drawn, 4),
            "difference_drawn_minus_predicted": difference, "n_test": len(pred["y"]),
            "met": abs(a_drawn - a_pred) <= AUC_TOLERANCE,
            "runs": {k: {"run_dir": v["run_dir"], "seconds": v["seconds"], "selected_round": v["scores"]["round"]}
                     for k, v in runs.items()}}


# ------------------------------------------------------------------------------------------------- main
def one_seed(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    from fl_research.simulation import discover_sites
    from fl_server.config import load_config, parse_set_options

    data = partial_consortium(args.data_pattern, args.profile, args.patients, seed, args.drawn_masks,
                              args.drawn_masks_sites)
    work = Path(args.work) / f"s{seed}"
    work.mkdir(parents=True, exist_ok=True)
    exp = load_config(args.config, parse_set_options(args.set))
    passes = exp.federation.rounds * exp.train.local_epochs
    sites = discover_sites(data)
    size = exp.segmenter_architecture().image_size
    views = {s.name: test_views(s, data / "truth", size, exp.preprocess) for s in sites}
    annotated = [s for s in sites if s.name in args.drawn_masks_sites.split(",")]

    fed_model, fed_info = federated(data, args.config, work, args.set)
    methods: dict[str, Any] = {"federated": {**fed_info, "sites": {n: score(fed_model, v, args.bootstrap)
                                                                    for n, v in views.items()}}}
    if not args.federated_only:
        pooled_model, pooled_info = centralised(annotated, exp, passes)
        methods["pooled"] = {**pooled_info, "sites": {n: score(pooled_model, v, args.bootstrap)
                                                      for n, v in views.items()},
                             "all_sites": score(pooled_model, [v for vs in views.values() for v in vs],
                                                args.bootstrap)}
        local: dict[str, Any] = {}
        for site in sites:
            if site in annotated:
                model, info = centralised([site], exp, passes)
                local[site.name] = {**info, **score(model, views[site.name], args.bootstrap)}
            else:
                local[site.name] = {"model": None, "why": "no drawn mask at this site: nothing to train on"}
        methods["local_only"] = {"sites": local}
    pooled_views = [v for vs in views.values() for v in vs]
    methods["federated"]["all_sites"] = score(fed_model, pooled_views, args.bootstrap)
    worst = {s: min(methods["federated"]["sites"][n][s]["dice"]["mean"] for n in views) for s in STRUCTURES}
    entry: dict[str, Any] = {
        "data": str(data), "patients": args.patients, "drawn_masks": {"fraction": args.drawn_masks,
                                                                      "sites": args.drawn_masks_sites.split(",")},
        "methods": methods, "worst_site_federated_dice": worst,
        "met": {s: worst[s] >= DICE_TARGET for s in STRUCTURES}}
    if args.end_to_end:
        drawn = consortium_for_seed(args.drawn_pattern, args.profile, args.patients, seed)
        entry["end_to_end"] = end_to_end(data, drawn, (fed_info["checkpoint"], fed_info["sha256"]), work,
                                         args.llnm_config, args.bootstrap)
    return entry


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=2100)
    ap.add_argument("--profile", default="paper-calibrated")
    ap.add_argument("--drawn-masks", type=float, default=0.2)
    ap.add_argument("--drawn-masks-sites", default="site-a,site-b")
    add_seed_arguments(ap)
    ap.add_argument("--data-pattern", default=str(ROOT / "data" / "seg-{profile}-{patients}-s{seed}-drawn{fraction}"))
    ap.add_argument("--drawn-pattern", default=str(ROOT / "data" / "fid-{profile}-{patients}-s{seed}"),
                    help="the fully drawn twin consortia (--end-to-end)")
    ap.add_argument("--config", default=str(ROOT / "configs" / "segment.yaml"))
    ap.add_argument("--llnm-config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override of --config")
    ap.add_argument("--federated-only", action="store_true", help="no pooled and local-only baselines")
    ap.add_argument("--end-to-end", action="store_true", help="also LLNM-Net on predicted against drawn masks")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--summarise-only", action="store_true", help="recompute the headline of the stored runs")
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench-segmentation"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "segmentation.json"))
    args = ap.parse_args(argv)
    made = provenance(argv)
    chosen = seeds_from_arguments(args, "bench_segmentation.py", minimum=1)
    if chosen is None:
        return 2
    tuning, evaluation, protocol = chosen
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() else {}
    result.update({"targets": {"federated_dice_every_site": DICE_TARGET, "end_to_end_auc_tolerance": AUC_TOLERANCE,
                               "rule": "fixed before any run: federated Dice >= 0.90 for both structures at every "
                                       "site on its test patients (true masks, drawn or withheld); |pooled test AUC "
                                       "on predicted masks - on drawn masks| <= 0.01 per evaluation seed"},
                   "protocol": protocol})
    if args.summarise_only:
        result["headline"] = headline(result.get("runs", {}))
        write_result(out, result, None)
        print(json.dumps(result["headline"], indent=1))
        return 0
    for role, seeds in (("tuning", tuning), ("evaluation", evaluation)):
        for seed in seeds:
            print(f"[bench] seed {seed} ({role})", flush=True)
            entry = {**one_seed(args, seed), "role": role, "provenance": made}
            # Read again before writing: another run may have added its seeds meanwhile.
            result = {**(json.loads(out.read_text()) if out.is_file() else {}), **{k: result[k] for k in
                                                                                 ("targets", "protocol")}}
            result.setdefault("runs", {})[str(seed)] = entry
            result["headline"] = headline(result["runs"])
            write_result(out, result, made)
    print(json.dumps(result.get("headline"), indent=1))
    return 0


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return round(float(np.mean(kept)), 4) if kept else None


def _view_weighted(method: dict[str, Any] | None, structure: str) -> float | None:
    """A method's mean Dice over every site's test views: its site means weighted by their views."""
    if not method:
        return None
    parts = [(m[structure]["dice"]["n_views"], m[structure]["dice"]["mean"]) for m in method["sites"].values()
             if m.get(structure) and m[structure]["dice"]["mean"] is not None]
    views = sum(n for n, _ in parts)
    return sum(n * d for n, d in parts) / views if views else None


def headline(runs: dict[str, Any]) -> dict[str, Any]:
    """Means over the evaluation seeds: the worst site's federated Dice, every method's Dice over all sites' test
    views, and the end-to-end AUCs; whether each rule is met on every seed."""
    seeds = sorted(s for s, r in runs.items() if r.get("role") == "evaluation")
    if not seeds:
        return {}
    picked = [runs[s] for s in seeds]
    out: dict[str, Any] = {"seeds": [int(s) for s in seeds]}
    out["federated_worst_site_dice"] = {s: _mean([r["worst_site_federated_dice"][s] for r in picked])
                                        for s in STRUCTURES}
    for method in ("federated", "pooled"):
        out[f"{method}_all_sites_dice"] = {s: _mean([_view_weighted(r["methods"].get(method), s) for r in picked])
                                           for s in STRUCTURES}
    out["federated_capsule_error_mm_mean_abs"] = _mean([r["methods"]["federated"]["all_sites"]
                                                        ["capsule_error_mm"]["mean_abs"] for r in picked])
    out["dice_target_met_every_seed"] = all(all(r["met"].values()) for r in picked)
    e2e = [r["end_to_end"] for r in picked if r.get("end_to_end")]
    if e2e:
        out["end_to_end"] = {"auc_predicted_masks": _mean([e["auc_predicted_masks"] for e in e2e]),
                             "auc_drawn_masks": _mean([e["auc_drawn_masks"] for e in e2e]),
                             "per_seed_difference": [e["difference_drawn_minus_predicted"]["mean"] for e in e2e],
                             "met_every_seed": all(e["met"] for e in e2e), "seeds_run": len(e2e)}
    return out


if __name__ == "__main__":
    sys.exit(main())
