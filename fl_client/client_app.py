"""The hospital's Flower ClientApp (Message API).

Each round a SuperNode starts a fresh ClientApp process, so everything expensive lives on the site's
disk: the preprocessed tensors (DICOM decoded, masks turned into feature channels, reports through the
frozen text encoder) are cached by `shared_model.site_cache.build_site_tensors`, the frozen public features of
the DP design by `shared_model.public_features`, and the site's lifetime privacy ledger by `fl_client.privacy`.
What leaves the site: the updated model parameters (the frozen text encoder never travels), aggregate metrics
(counts, losses, metrics, and a score histogram of at most the site's `max-histogram-bins` bins for pooled
evaluation; with `evaluation.explain`, in the final evaluation, the explanation aggregates of
`shared_model.explanation` unless the site's `share-explanations` is false) and the site's privacy policy.
Under patient-level DP a train reply carries only the update, the
DP parameters and epsilons, and the site's public patient count as FedAvg weight. No patient identifier, pixel,
report text or per-patient score is sent. Every message is checked against the site's own policy first
(`fl_client.settings`).

Where the site's data is: `data-path` in the SuperNode's node config (`llnm-site join` sets it). In
Flower's simulation engine the virtual SuperNode `partition-id` i is mapped to the i-th site folder
given to `make_client_app`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_client.settings import (
    EVAL_SPLITS,
    MAX_CLIPPING_NORM,
    PATIENT_DELTA,
    REQUIRE_PATIENT_DP,
    SHARE_EXPLANATIONS,
    SiteSettings,
    site_name,
)
from shared_model import protocol
from shared_model.config import ModelConfig, PatientDPConfig, PreprocessConfig, TrainConfig

log = logging.getLogger("llnm.client")


class SitePolicyRefusal(RuntimeError):
    """A message this site's own policy (its node config) forbids; Flower sends the text back as an error."""


def _check_train_policy(settings: SiteSettings, name: str, server_round: int, privacy: PatientDPConfig) -> None:
    head = f"{protocol.POLICY_REFUSAL_MARKER}: site {name!r} refuses round {server_round} training: its rule"
    if settings.require_patient_dp and not privacy.enabled:
        raise SitePolicyRefusal(
            f"{head} {REQUIRE_PATIENT_DP}=true needs patient-level DP, but the round config has "
            f"{protocol.PRIVACY_CONFIG} enabled=false. The coordinator can turn on privacy.patient in the "
            f"experiment, or the site operator can remove --{REQUIRE_PATIENT_DP} (node config {REQUIRE_PATIENT_DP})."
        )
    if not privacy.enabled:
        return
    if privacy.delta > settings.patient_delta:
        raise SitePolicyRefusal(
            f"{head} {PATIENT_DELTA}={settings.patient_delta:g} is the largest delta it accepts, but the round config "
            f"has {protocol.PRIVACY_CONFIG} delta={privacy.delta:g}. The coordinator can set privacy.patient.delta "
            f"to {settings.patient_delta:g} or less, or the site operator can raise --{PATIENT_DELTA}."
        )
    if settings.max_clipping_norm is not None and privacy.max_grad_norm > settings.max_clipping_norm:
        raise SitePolicyRefusal(
            f"{head} {MAX_CLIPPING_NORM}={settings.max_clipping_norm:g} is the largest per-patient clipping norm it "
            f"accepts, but the round config has {protocol.PRIVACY_CONFIG} max_grad_norm={privacy.max_grad_norm:g}. "
            f"The coordinator can set privacy.patient.max_grad_norm to {settings.max_clipping_norm:g} or less, or "
            f"the site operator can raise --{MAX_CLIPPING_NORM}."
        )


def _site_record(settings: SiteSettings, name: str, **extra: str) -> ConfigRecord:
    """The reply's site record: the site's name and its privacy policy (what the coordinator may show)."""
    import json

    policy = json.dumps(settings.policy(), sort_keys=True)
    return ConfigRecord({protocol.SITE_NAME: name, protocol.SITE_POLICY: policy, **extra})


def _check_eval_policy(settings: SiteSettings, name: str, server_round: object, split: str) -> None:
    if split not in settings.eval_splits:
        raise SitePolicyRefusal(
            f"{protocol.POLICY_REFUSAL_MARKER}: site {name!r} refuses round {server_round} evaluation: its rule "
            f"{EVAL_SPLITS}={','.join(settings.eval_splits)} does not include the split received, "
            f"{protocol.EVAL_SPLIT}={split}. The coordinator can evaluate on one of "
            f"{', '.join(settings.eval_splits)}, or the site operator can add {split!r} to --{EVAL_SPLITS} "
            f"(never train)."
        )


def _load_round_inputs(msg: Message, settings: SiteSettings):
    """Model, the site's inputs (tensors, or public features for the feature head) and the round's config."""
    from shared_model.architectures import build_model, load_site_inputs

    config = msg.content[protocol.CONFIG_RECORD]
    model_cfg = protocol.read_schema(config, protocol.MODEL_CONFIG, ModelConfig)
    pre_cfg = protocol.read_schema(config, protocol.PREPROCESS_CONFIG, PreprocessConfig)
    model_cfg.check_inputs(pre_cfg.inputs, f"the round's {protocol.MODEL_CONFIG}")
    inputs = load_site_inputs(settings.data_path, pre_cfg, model_cfg, cache_dir=settings.cache_dir)
    model = build_model(model_cfg)
    state = msg.content[protocol.ARRAYS_RECORD].to_torch_state_dict()
    model.load_state_dict(state, strict=True)
    return model, inputs, state, config


def _handle_train(msg: Message, context: Context, site_dirs: list[str] | None,
                  defaults: dict[str, Any] | None = None) -> Message:
    from shared_model.architectures import make_dataset, restrict_trainable
    from shared_model.training import round_part, train_local, trainable_state

    settings = SiteSettings.from_context(context, site_dirs, defaults)
    settings.apply_threads()
    name = site_name(settings)
    started = time.perf_counter()
    config = msg.content[protocol.CONFIG_RECORD]
    server_round = int(config[protocol.SERVER_ROUND])
    privacy_cfg = (protocol.read_schema(config, protocol.PRIVACY_CONFIG, PatientDPConfig)
                   if protocol.PRIVACY_CONFIG in config else PatientDPConfig())
    _check_train_policy(settings, name, server_round, privacy_cfg)
    parts = int(config.get(protocol.EPOCH_PARTS, 1))
    if parts > 1 and privacy_cfg.enabled:
        # The DP-SGD plan and accountant assume Poisson sampling from the whole training split.
        raise SitePolicyRefusal(
            f"{protocol.POLICY_REFUSAL_MARKER}: site {name!r} refuses round {server_round} training: the round "
            f"config splits each pass over the data across {protocol.EPOCH_PARTS}={parts} rounds, which "
            "patient-level DP-SGD does not account; the coordinator can set federation.rounds_per_epoch: 1")
    model, tensors, global_state, config = _load_round_inputs(msg, settings)
    train_cfg = protocol.read_schema(config, protocol.TRAIN_CONFIG, TrainConfig)
    run_seed = int(train_cfg.seed)
    train_cfg = train_cfg.model_copy(update={
        "device": settings.device if settings.device != "auto" else train_cfg.device,
        # A different seed every round and site, reproducible from the run's seed.
        "seed": run_seed * 1000003 + server_round * 101 + sum(map(ord, name)),
    })
    proximal_mu = float(config.get(protocol.PROXIMAL_MU, 0.0))
    train_tensors = tensors.subset("train")
    train_set = make_dataset(train_tensors)
    if parts > 1:
        from torch.utils.data import Subset

        # The run's seed (not the per-round one above): the parts of one pass must come from one permutation.
        train_set = Subset(train_set, round_part(len(train_set), parts, server_round, run_seed, name))

    dp_metrics: dict[str, float] = {}
    hooks = None
    session = None
    if privacy_cfg.enabled:
        from fl_client.privacy import PatientDPSession

        # What DP-SGD trains (privacy.patient.trainable); the rest keeps the global model's values.
        restrict_trainable(model, privacy_cfg.trainable)
        session = PatientDPSession.open(
            site_name=name,
            run_id=str(config.get(protocol.RUN_ID, context.run_id)),
            settings=settings,
            privacy_cfg=privacy_cfg,
            train_patient_ids=list(train_tensors.patient_ids),
            batch_size=train_cfg.batch_size,
            local_epochs=train_cfg.local_epochs,
            total_rounds=int(config[protocol.TOTAL_ROUNDS]),
            server_round=server_round,
        )
        hooks = session.hooks()

    try:
        result = train_local(model, train_set, train_cfg, global_state=global_state, proximal_mu=proximal_mu,
                             hooks=hooks, description=f"{name} round {server_round}")
        if session is not None:
            dp_metrics = session.finish(result)
    finally:
        if session is not None:
            session.close()  # releases the site's history lock on every path (idempotent after finish)

    metrics: dict[str, Any] = {
        protocol.NUM_EXAMPLES: int(result.num_examples),
        protocol.UNIT_WEIGHT: 1,
        protocol.TRAIN_LOSS: float(result.loss),
        protocol.TRAIN_STEPS: int(result.steps),
        protocol.TRAIN_SECONDS: float(time.perf_counter() - started),
        protocol.PATIENTS_PER_SECOND: float(result.patients_per_second),
    }
    if session is not None:
        # Only what the DP-SGD guarantee covers leaves the site: the update, the DP parameters and epsilons,
        # and as FedAvg weight the site's public patient count (the mechanism's own parameter), never the
        # exact count.
        for key in protocol.NON_DP_TRAIN_KEYS:
            metrics.pop(key, None)
        metrics[protocol.NUM_EXAMPLES] = int(session.plan.public_count)
    metrics.update(dp_metrics)
    content = RecordDict({
        protocol.ARRAYS_RECORD: ArrayRecord(trainable_state(model)),
        protocol.METRICS_RECORD: MetricRecord(metrics),
        protocol.SITE_RECORD: _site_record(settings, name, **{
            protocol.SITE_RUN_ID: str(config.get(protocol.RUN_ID, "")), protocol.SITE_ROUND: str(server_round)}),
    })
    return Message(content, reply_to=msg)


def _handle_evaluate(msg: Message, context: Context, site_dirs: list[str] | None,
                     defaults: dict[str, Any] | None = None) -> Message:
    from shared_model.architectures import make_dataset
    from shared_model.metrics import binary_metrics, score_histogram
    from shared_model.training import predict

    settings = SiteSettings.from_context(context, site_dirs, defaults)
    settings.apply_threads()
    name = site_name(settings)
    config = msg.content[protocol.CONFIG_RECORD]
    protocol.check_keys(config, (protocol.EVAL_SPLIT, protocol.EVAL_BOOTSTRAP), "evaluate message's round config")
    split = str(config[protocol.EVAL_SPLIT])
    _check_eval_policy(settings, name, config.get(protocol.SERVER_ROUND, "?"), split)
    model, tensors, _, config = _load_round_inputs(msg, settings)
    subset = tensors.subset(split)
    preds = predict(model, make_dataset(subset), device=settings.device)
    labelled = preds["llnm"] >= 0
    y = preds["llnm"][labelled].astype(int)
    s = preds["score"][labelled]
    n_boot = int(config[protocol.EVAL_BOOTSTRAP])
    m = binary_metrics(y, s, n_bootstrap=n_boot, seed=int(config.get(protocol.SERVER_ROUND, 0)))
    # The score histogram at the resolution the site's policy allows (max-histogram-bins, default 100).
    histogram = score_histogram(y, s, n_bins=settings.max_histogram_bins)
    metrics = protocol.encode_eval_metrics(m, n=len(y), n_pos=int(y.sum()), histogram=histogram)
    metrics.update(_population(subset))
    if "stage_prob" in preds:
        from shared_model.stage_metrics import stage_metrics

        metrics.update(protocol.encode_stage_metrics(stage_metrics(preds["stage"], preds["stage_prob"])))
    extra = {protocol.SITE_SPLIT: split}
    if bool(config.get(protocol.EXPLAIN, False)):
        withheld = _explanation_withheld(settings, model)
        if withheld:
            extra[protocol.EXPLAIN_WITHHELD] = withheld
        else:
            from fl_client.explain import site_explanation
            from shared_model.explanation import MIN_AGGREGATE_PATIENTS

            pre_cfg = protocol.read_schema(config, protocol.PREPROCESS_CONFIG, PreprocessConfig)
            # Only aggregates over the split (shares averaged over patients, counts per location bin).
            explanation = site_explanation(model, subset, pre_cfg.inputs, preds["llnm"].astype(int),
                                           preds["score"], steps=int(config.get(protocol.EXPLAIN_STEPS, 32)))
            metrics.update(protocol.encode_explanation(explanation))
            if not explanation["shares"]:
                extra[protocol.EXPLAIN_WITHHELD] = (f"feature-group shares withheld: {explanation['n']} labelled "
                                                    f"patient(s), fewer than {MIN_AGGREGATE_PATIENTS}")
    content = RecordDict({
        protocol.METRICS_RECORD: MetricRecord(metrics),
        protocol.SITE_RECORD: _site_record(settings, name, **extra),
    })
    return Message(content, reply_to=msg)


def _population(subset: Any) -> dict[str, Any]:
    """Counts over the evaluated split for the model card: views, thyroid masks, calibrations and reports."""
    extras = getattr(subset, "extras", None)
    if not extras or "location_present" not in extras:
        return {}  # the feature head's public features carry no per-view files
    present = subset.view_mask > 0.5
    return {
        protocol.POP_VIEWS: [int(x) for x in present.sum(dim=0)],
        protocol.POP_THYROID_MASKS: [int(x) for x in (extras["location_present"].bool() & present).sum(dim=0)],
        protocol.POP_CALIBRATED: [int(x) for x in (extras["calibrated"].bool() & present).sum(dim=0)],
        protocol.POP_REPORTS: int(extras["report_present"].sum()),
    }


def _explanation_withheld(settings: SiteSettings, model: Any) -> str | None:
    """Why this site sends no explanation aggregates (None when it sends them)."""
    if not settings.share_explanations:
        return f"{protocol.POLICY_REFUSAL_MARKER}: {SHARE_EXPLANATIONS}=false"
    if getattr(getattr(model, "config", None), "architecture", "") != "llnm-net":
        return "explanations need the LLNM-Net transformer"
    return None


def _handle_query(msg: Message, context: Context, site_dirs: list[str] | None,
                  defaults: dict[str, Any] | None = None) -> Message:
    settings = SiteSettings.from_context(context, site_dirs, defaults)
    site = ConfigRecord({protocol.SITE_NAME: site_name(settings)})
    return Message(RecordDict({protocol.SITE_RECORD: site}), reply_to=msg)


def make_client_app(site_dirs: list[str] | None = None, defaults: dict[str, Any] | None = None) -> ClientApp:
    """The ClientApp.

    `site_dirs` maps simulation partition ids to site folders (None in deployments); `defaults` are node
    config values used where the node config has none (e.g. the simulation's `cache-dir`).
    """
    from fl_client.privacy import site_dp_clipping_mod
    from fl_client.secure_aggregation import secure_aggregation_mod
    from fl_client.update_transport import update_transport_mod

    client_app = ClientApp()

    # Outermost: the float16 update encoding when the round asks for it (never with secure aggregation). Then
    # Flower's SecAgg+ for secure rounds only. Then Flower's client-side clipping mods, applied only when the
    # coordinator's site-DP wrapper asks for them (so a site clips before it masks or encodes).
    @client_app.train(mods=[update_transport_mod, secure_aggregation_mod, site_dp_clipping_mod])
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
