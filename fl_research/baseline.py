"""Pooled and local-only reference training: how every federated result is judged.

- pooled: one model trained on the union of all sites' training splits. The upper reference a
  federation cannot normally have (it needs all patients in one place).
- local: one model per site, trained on that site's training split only: what a hospital gets alone.

Both evaluate on every site's test split and write `metrics.json` in the same shape as a federated run's
final evaluation ("sites" keyed by site name, plus "pooled" over all sites' test patients together).
This reads every site folder on one machine: it is for synthetic or otherwise shareable data.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from fl_research.simulation import discover_sites
from fl_server.config import ExperimentConfig
from fl_server.run_dir import RunDirectory
from shared_model.fileio import atomic_write_json, atomic_write_text

log = logging.getLogger("llnm.baseline")


def _load_all(exp: ExperimentConfig, sites: list[Path], progress: bool = True):
    from shared_model.sitedata.model_inputs import load_site_inputs

    pre, arch = exp.preprocess, exp.architecture()
    return {p.name: load_site_inputs(p, pre, arch, cache_dir=exp.data.cache_dir, progress=progress) for p in sites}


def _scores(model, tensors, split: str, device: str) -> tuple[np.ndarray, np.ndarray]:
    from shared_model.model.training import predict
    from shared_model.sitedata.model_inputs import make_dataset

    preds = predict(model, make_dataset(tensors.subset(split)), device=device)
    keep = preds["llnm"] >= 0
    return preds["llnm"][keep].astype(int), preds["score"][keep]


def train_reference(exp: ExperimentConfig, train_sets: list, val_sets: list, epochs: int, label: str,
                    progress: bool = True) -> tuple[Any, dict[str, Any]]:
    """Train a fresh model of `exp` on `train_sets` (SiteTensors) for `epochs` epochs, the learning rate
    following `exp.train.lr_schedule` over the epochs; with `baseline.select_on_val`, return it at the epoch
    with the best AUC on `val_sets`. Logs one line per epoch. Returns the model and a record of the run:
    per-epoch loss and validation AUC, the selected epoch, wall and training seconds, and training throughput
    (patients per second of training, validation passes excluded)."""
    import torch
    from torch.utils.data import ConcatDataset

    from shared_model.evaluation.metrics import binary_metrics
    from shared_model.model.architectures import build_model
    from shared_model.model.training import predict, scheduled_lr, train_local
    from shared_model.sitedata.model_inputs import make_dataset

    torch.manual_seed(exp.train.seed)
    model = build_model(exp.architecture())
    base = exp.train.model_copy(update={"local_epochs": 1})
    train = ConcatDataset([make_dataset(t) for t in train_sets])
    val = ConcatDataset([make_dataset(t) for t in val_sets]) if val_sets else None
    best_auc, best_state, best_epoch = -1.0, None, epochs
    history: list[dict[str, Any]] = []
    started = time.perf_counter()
    seen = 0
    train_seconds = 0.0
    for epoch in range(1, epochs + 1):
        cfg = base.model_copy(update={"seed": exp.train.seed * 1000 + epoch,
                                      "lr": scheduled_lr(base, epoch - 1, epochs)})
        res = train_local(model, train, cfg, progress=progress, description=f"{label} {epoch}/{epochs}")
        seen += res.num_examples
        train_seconds += res.seconds
        rec: dict[str, Any] = {"epoch": epoch, "loss": res.loss, "lr": cfg.lr}
        if exp.baseline.select_on_val and val is not None and len(val) > 0:
            preds = predict(model, val, device=exp.train.device)
            keep = preds["llnm"] >= 0
            auc = binary_metrics(preds["llnm"][keep].astype(int), preds["score"][keep], n_bootstrap=0)["auc"]
            rec["val_auc"] = auc
            if auc is not None and auc > best_auc:
                best_auc, best_state, best_epoch = auc, copy.deepcopy(model.state_dict()), epoch
        history.append(rec)
        shown = "n/a" if rec.get("val_auc") is None else f"{rec['val_auc']:.3f}"
        log.info("%s epoch %d/%d: loss %.4f, lr %.2e, val AUC %s (%.0f s)", label, epoch, epochs, res.loss,
                 cfg.lr, shown, res.seconds)
    if best_state is not None:
        model.load_state_dict(best_state)
    seconds = time.perf_counter() - started
    info = {"epochs": epochs, "selected_epoch": best_epoch, "history": history, "seconds": round(seconds, 2),
            "train_seconds": round(train_seconds, 2),
            "patients_per_second": seen / train_seconds if train_seconds else None, "n_train": len(train)}
    return model, info


def run_baseline(exp: ExperimentConfig, mode: str, run_dir: Path, data_root: str | Path | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Train the `mode` baseline ("pooled" or "local") on the sites under `data_root` (default
    `exp.data.root`), evaluate on every site's test split and write `RUN_DIR/metrics.json`,
    `RUN_DIR/config.yaml` (resolved) and `RUN_DIR/baseline.log` (one line per epoch). Returns the metrics."""
    sites = discover_sites(data_root or exp.data.root, exp.data.sites)
    root = Path(data_root or exp.data.root or "")
    exp.data.root = str(root.resolve())
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", exp.to_yaml())
    handler = RunDirectory(run_dir).attach_log(run_dir / "baseline.log")
    try:
        return _run(exp, mode, run_dir, sites, progress)
    finally:
        RunDirectory.detach_log(handler)


def _run(exp: ExperimentConfig, mode: str, run_dir: Path, sites: list[Path], progress: bool) -> dict[str, Any]:
    from shared_model.evaluation.metrics import binary_metrics

    epochs = exp.baseline.epochs or exp.data_epochs()
    tensors = _load_all(exp, sites, progress)
    names = list(tensors)
    n_boot = exp.federation.eval_bootstrap
    started = time.perf_counter()
    results: dict[str, Any] = {"mode": mode, "split": "test", "epochs": epochs, "sites": {}, "train": {}}
    all_y, all_s = [], []
    if mode == "pooled":
        model, info = train_reference(exp, [tensors[n].subset("train") for n in names],
                                 [tensors[n].subset("val") for n in names], epochs, "pooled", progress)
        results["train"]["pooled"] = info
        for n in names:
            y, s = _scores(model, tensors[n], "test", exp.train.device)
            results["sites"][n] = binary_metrics(y, s, n_bootstrap=n_boot)
            all_y.append(y)
            all_s.append(s)
    elif mode == "local":
        for n in names:
            model, info = train_reference(exp, [tensors[n].subset("train")], [tensors[n].subset("val")], epochs,
                                     f"local {n}", progress)
            results["train"][n] = info
            y, s = _scores(model, tensors[n], "test", exp.train.device)
            results["sites"][n] = binary_metrics(y, s, n_bootstrap=n_boot)
            all_y.append(y)
            all_s.append(s)
    else:
        raise ValueError(f"mode must be 'pooled' or 'local', got {mode!r}")
    results["pooled"] = binary_metrics(np.concatenate(all_y), np.concatenate(all_s), n_bootstrap=n_boot)
    results["seconds"] = round(time.perf_counter() - started, 2)
    atomic_write_json(run_dir / "metrics.json", results)
    return results

