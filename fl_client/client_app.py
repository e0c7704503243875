"""The hospital's Flower ClientApp (Message API).

Each round a SuperNode starts a fresh ClientApp process, so everything expensive lives on the site's
disk: the preprocessed tensors (DICOM decoded, masks turned into feature channels, reports through the
frozen text encoder) are cached by `shared_model.data.build_site_tensors`, and the DP-SGD accountant's
history by `fl_client.privacy`. What leaves the site: the updated model parameters (LLNMNet only; the
frozen text encoder never travels) and aggregate metrics (counts, losses, metrics, and a score histogram
for exact pooled evaluation). No patient identifier, pixel, report text or per-patient score is sent.

Where the site's data is: `data-path` in the SuperNode's node config (`llnm-site join` sets it). In
Flower's simulation engine the virtual SuperNode `partition-id` i is mapped to the i-th site folder
given to `make_client_app`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

log = logging.getLogger("llnm.client")

# Metric keys of an evaluate reply, always all present (NaN where undefined), so that every site's
# reply has the same keys.
EVAL_KEYS = ("auc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "brier", "ece",
             "auc_ci_low", "auc_ci_high")


@dataclass
class SiteSettings:
    """A site's own settings, from its SuperNode's node config (never from the coordinator)."""

    data_path: Path
    name: str | None
    cache_dir: Path | None
    device: str
    max_patient_epsilon: float | None
    privacy_state_dir: Path | None
    threads: int | None = None

    @classmethod
    def from_context(cls, context: Context, site_dirs: list[str] | None,
                     defaults: dict[str, Any] | None = None) -> SiteSettings:
        cfg = {**(defaults or {}), **dict(context.node_config)}
        if "data-path" in cfg:
            data_path = Path(str(cfg["data-path"]))
        elif site_dirs is not None and "partition-id" in cfg:
            data_path = Path(site_dirs[int(cfg["partition-id"])])
        else:
            raise RuntimeError(
                "this SuperNode has no 'data-path' in its node config; start it with "
                "`llnm-site join --data SITE_DIR ...` or flower-supernode --node-config 'data-path=\"/path\"'"
            )
        if not data_path.is_dir():
            raise RuntimeError(f"data-path {data_path}: not a folder")
        # Simulation only: per-site node config (e.g. one hospital's own max-patient-epsilon), keyed by
        # site folder name, standing in for what each SuperNode's --node-config would set.
        per_site = cfg.pop("site-node-config", None) or {}
        cfg = {**cfg, **dict(per_site.get(data_path.name, {}))}

        def opt_path(key: str) -> Path | None:
            return Path(str(cfg[key])) if cfg.get(key) not in (None, "") else None

        eps = cfg.get("max-patient-epsilon")
        return cls(
            data_path=data_path,
            name=str(cfg["site-name"]) if cfg.get("site-name") else None,
            cache_dir=opt_path("cache-dir") or (Path(os.environ["LLNM_CACHE_DIR"])
                                                if os.environ.get("LLNM_CACHE_DIR") else None),
            device=str(cfg.get("device", "auto")),
            max_patient_epsilon=float(eps) if eps not in (None, "", 0, 0.0) else None,
            privacy_state_dir=opt_path("privacy-state-dir"),
            threads=int(cfg["threads"]) if cfg.get("threads") not in (None, "", 0) else None,
        )

    def apply_threads(self) -> None:
        """Use the CPU threads this site was given (oversubscribed threads make CPU training crawl)."""
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)


def _site_name(settings: SiteSettings) -> str:
    """The node config's `site-name`, else `name` in the site's site.yaml, else the folder name."""
    if settings.name:
        return settings.name
    meta = settings.data_path / "site.yaml"
    if meta.is_file():
        import yaml

        data = yaml.safe_load(meta.read_text(encoding="utf-8")) or {}
        if isinstance(data, dict) and data.get("name"):
            return str(data["name"])
    return settings.data_path.resolve().name


def _load_round_inputs(msg: Message, settings: SiteSettings):
    """Model, site tensors and settings for this round, from the round's ConfigRecord."""
    from shared_model.data import build_site_tensors, check_scalar_count
    from shared_model.modeling import LLNMNet, ModelConfig
    from shared_model.preprocessing import PreprocessConfig

    config = msg.content["config"]
    model_cfg = ModelConfig.from_dict(json.loads(str(config["model-config"])))
    check_scalar_count(model_cfg.num_clinical, "the round's model-config")
    pre_cfg = PreprocessConfig.from_dict(json.loads(str(config["preprocess-config"])))
    tensors = build_site_tensors(settings.data_path, pre_cfg, cache_dir=settings.cache_dir, progress=False)
    model = LLNMNet(model_cfg)
    state = msg.content["arrays"].to_torch_state_dict()
    model.load_state_dict(state, strict=True)
    return model, tensors, state, config


def _handle_train(msg: Message, context: Context, site_dirs: list[str] | None,
                  defaults: dict[str, Any] | None = None) -> Message:
    from shared_model.data import LLNMDataset
    from shared_model.training import TrainConfig, train_local, trainable_state

    settings = SiteSettings.from_context(context, site_dirs, defaults)
    settings.apply_threads()
    name = _site_name(settings)
    started = time.perf_counter()
    model, tensors, global_state, config = _load_round_inputs(msg, settings)
    train_cfg = TrainConfig.from_dict(json.loads(str(config["train-config"])))
    train_cfg.device = settings.device if settings.device != "auto" else train_cfg.device
    server_round = int(config["server-round"])
    # A different seed every round and site, reproducible from the run's seed.
    train_cfg.seed = int(train_cfg.seed) * 1000003 + server_round * 101 + sum(map(ord, name))
    if "proximal-mu" in config:
        train_cfg.proximal_mu = float(config["proximal-mu"])
    train_set = LLNMDataset(tensors.subset("train"))
    privacy_cfg = json.loads(str(config.get("privacy-config", "{}")) or "{}")

    dp_metrics: dict[str, float] = {}
    hooks = None
    session = None
    if privacy_cfg.get("enabled"):
        from fl_client.privacy import PatientDPSession

        session = PatientDPSession.open(
            site_name=name,
            run_id=str(config.get("run-id", context.run_id)),
            settings=settings,
            privacy_cfg=privacy_cfg,
            n_train=len(train_set),
            batch_size=train_cfg.batch_size,
            local_epochs=train_cfg.local_epochs,
            total_rounds=int(config["total-rounds"]),
            server_round=server_round,
        )
        hooks = session.hooks()

    result = train_local(model, train_set, train_cfg, global_state=global_state, hooks=hooks,
                         description=f"{name} round {server_round}")
    if session is not None:
        dp_metrics = session.finish(result)

    metrics: dict[str, Any] = {
        "num-examples": int(result.num_examples),
        "unit-weight": 1,
        "train-loss": float(result.loss),
        "train-steps": int(result.steps),
        "train-seconds": float(time.perf_counter() - started),
        "patients-per-second": float(result.patients_per_second),
    }
    metrics.update(dp_metrics)
    content = RecordDict({
        "arrays": ArrayRecord(trainable_state(model)),
        "metrics": MetricRecord(metrics),
        "site": ConfigRecord({"site-name": name}),
    })
    return Message(content, reply_to=msg)


def _handle_evaluate(msg: Message, context: Context, site_dirs: list[str] | None,
                     defaults: dict[str, Any] | None = None) -> Message:
    import math

    from shared_model.data import LLNMDataset
    from shared_model.metrics import binary_metrics, score_histogram
    from shared_model.training import predict

    settings = SiteSettings.from_context(context, site_dirs, defaults)
    settings.apply_threads()
    name = _site_name(settings)
    model, tensors, _, config = _load_round_inputs(msg, settings)
    split = str(config.get("eval-split", "val"))
    subset = tensors.subset(split)
    preds = predict(model, LLNMDataset(subset), device=settings.device)
    labelled = preds["llnm"] >= 0
    y = preds["llnm"][labelled].astype(int)
    s = preds["score"][labelled]
    n_boot = int(config.get("eval-bootstrap", 200))
    m = binary_metrics(y, s, n_bootstrap=n_boot, seed=int(config.get("server-round", 0)))
    hist = score_histogram(y, s)
    metrics: dict[str, Any] = {"num-examples": len(y), "n": len(y), "n_pos": int(y.sum())}
    for key in EVAL_KEYS:
        v = m.get(key)
        metrics[key] = float(v) if v is not None else math.nan
    metrics["hist-neg-bins"] = [int(b) for b in hist["neg_bins"]]
    metrics["hist-neg-counts"] = [int(c) for c in hist["neg_counts"]]
    metrics["hist-pos-bins"] = [int(b) for b in hist["pos_bins"]]
    metrics["hist-pos-counts"] = [int(c) for c in hist["pos_counts"]]
    metrics["hist-n-bins"] = int(hist["n_bins"])
    content = RecordDict({
        "metrics": MetricRecord(metrics),
        "site": ConfigRecord({"site-name": name, "split": split}),
    })
    return Message(content, reply_to=msg)


def _handle_query(msg: Message, context: Context, site_dirs: list[str] | None,
                  defaults: dict[str, Any] | None = None) -> Message:
    settings = SiteSettings.from_context(context, site_dirs, defaults)
    return Message(RecordDict({"site": ConfigRecord({"site-name": _site_name(settings)})}), reply_to=msg)


def make_client_app(site_dirs: list[str] | None = None, defaults: dict[str, Any] | None = None) -> ClientApp:
    """The ClientApp.

    `site_dirs` maps simulation partition ids to site folders (None in deployments); `defaults` are node
    config values used where the node config has none (e.g. the simulation's `cache-dir`).
    """
    from fl_client.privacy import site_dp_clipping_mod

    client_app = ClientApp()

    # Flower's client-side clipping mods, applied only when the coordinator's site-DP wrapper asks for them.
    @client_app.train(mods=[site_dp_clipping_mod])
    def train(msg: Message, context: Context) -> Message:
        _quiet_logs()
        return _handle_train(msg, context, site_dirs, defaults)

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        _quiet_logs()
        return _handle_evaluate(msg, context, site_dirs, defaults)

    @client_app.query()
    def query(msg: Message, context: Context) -> Message:
        return _handle_query(msg, context, site_dirs, defaults)

    return client_app


def _quiet_logs() -> None:
    # Opacus raises flwr's logger to DEBUG when imported; keep the site's console readable.
    logging.getLogger("flwr").setLevel(logging.INFO)


# Deployment entry point (`[tool.flwr.app.components] clientapp = "fl_client.client_app:app"`).
app = make_client_app()
