"""The hospital's Flower ClientApp (Message API).

Each round a SuperNode starts a fresh ClientApp process, so everything expensive lives on the site's
disk: the preprocessed tensors (DICOM decoded, masks turned into feature channels, reports through the
frozen text encoder) are cached by `shared_model.sitedata.cache.build_site_tensors`, the frozen public features of
the DP design by `shared_model.sitedata.public_features`, and the site's lifetime privacy ledger by `fl_client.privacy`.
What leaves the site: the updated model parameters (the frozen text encoder never travels), aggregate metrics
(counts, losses, metrics, and a score histogram of at most the site's `max-histogram-bins` bins for pooled
evaluation; with `evaluation.explain`, in the final evaluation, the explanation aggregates of
`shared_model.evaluation.explanation` unless the site's `share-explanations` is false) and the site's privacy policy.
Under patient-level DP a train reply carries only the update, the
DP parameters and the run's epsilon, and the site's public patient count as FedAvg weight. An evaluate reply is
differentially private unless the site answers exactly (`fl_client.privacy.evaluation`). No patient identifier,
pixel, report text or per-patient score is sent. Every message is checked against the site's own policy first
(`fl_client.policy`), and a refusal goes back as an error reply in the site's words.

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

from fl_client.policy import SitePolicyRefusal, check_eval_policy, check_train_policy, refusal_reply
from fl_client.settings import SHARE_EXPLANATIONS, SiteSettings, site_name
from shared_model import protocol
from shared_model.config import PatientDPConfig, PreprocessConfig, TrainConfig
from shared_model.model.configuration import ModelConfig

log = logging.getLogger("llnm.client")

__all__ = ["SitePolicyRefusal", "app", "make_client_app"]


def _site_record(settings: SiteSettings, name: str, **extra: str) -> ConfigRecord:
    """The reply's site record: the site's name and its privacy policy (what the coordinator may show)."""
    import json

    policy = json.dumps(settings.policy(), sort_keys=True)
    return ConfigRecord({protocol.SITE_NAME: name, protocol.SITE_POLICY: policy, **extra})


def _load_round_inputs(msg: Message, settings: SiteSettings):
    """Model, the site's inputs (tensors, or public features for the feature head) and the round's config."""
    from shared_model.model.architectures import build_model
    from shared_model.sitedata.model_inputs import load_site_inputs

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
    from fl_client.secure_aggregation import inside_secure_round
    from shared_model.model.architectures import restrict_trainable
    from shared_model.model.training import round_part, train_local, trainable_state
    from shared_model.sitedata.model_inputs import make_dataset

    settings = SiteSettings.from_context(context, site_dirs, defaults)
    settings.apply_threads()
    name = site_name(settings)
    started = time.perf_counter()
    config = msg.content[protocol.CONFIG_RECORD]
    server_round = int(config[protocol.SERVER_ROUND])
    privacy_cfg = (protocol.read_schema(config, protocol.PRIVACY_CONFIG, PatientDPConfig)
                   if protocol.PRIVACY_CONFIG in config else PatientDPConfig())
    check_train_policy(settings, name, server_round, privacy_cfg, secure_round=inside_secure_round())
    parts = int(config.get(protocol.EPOCH_PARTS, 1))
    if parts > 1 and privacy_cfg.enabled:
        # The DP-SGD plan and accountant assume Poisson sampling from the whole training split.
        raise SitePolicyRefusal(
            f"{protocol.POLICY_REFUSAL_MARKER}: site {name!r} refuses round {server_round} training: the round "
            f"config splits each pass over the data across {protocol.EPOCH_PARTS}={parts} rounds, which "
            "patient-level DP-SGD does not account; the coordinator can set federation.rounds_per_epoch: 1")
    task = _round_task(config)
    if task == protocol.TASK_SEGMENT and privacy_cfg.enabled:
        raise SitePolicyRefusal(
            f"{protocol.POLICY_REFUSAL_MARKER}: site {name!r} refuses round {server_round} training: the round asks "
            "for patient-level DP-SGD of the segmenter, which this site's software does not provide (a patient "
            "contributes several samples the DP-SGD plan does not account); it will not train it without the "
            "guarantee asked for")
    train_cfg = protocol.read_schema(config, protocol.TRAIN_CONFIG, TrainConfig)
    run_seed = int(train_cfg.seed)
    run_id = str(config.get(protocol.RUN_ID, context.run_id))
    train_cfg = train_cfg.model_copy(update={
        "device": settings.device if settings.device != "auto" else train_cfg.device,
        # A different seed every round and site, reproducible from the run's seed.
        "seed": run_seed * 1000003 + server_round * 101 + sum(map(ord, name)),
    })
    echo = {protocol.SITE_RUN_ID: str(config.get(protocol.RUN_ID, "")), protocol.SITE_ROUND: str(server_round)}
    if task == protocol.TASK_SEGMENT:
        from fl_client.segment_task import train_segmenter_round

        return train_segmenter_round(msg, settings, name, train_cfg=train_cfg, server_round=server_round,
                                     run_id=run_id, parts=parts, run_seed=run_seed,
                                     site_record=_site_record(settings, name, **echo))
    model, tensors, global_state, config = _load_round_inputs(msg, settings)
    proximal_mu = float(config.get(protocol.PROXIMAL_MU, 0.0))
    train_tensors = tensors.subset("train")
    train_set = make_dataset(train_tensors)
    if parts > 1:
        from torch.utils.data import Subset

        # The run's seed (not the per-round one above): the parts of one pass must come from one permutation.
        train_set = Subset(train_set, round_part(len(train_set), parts, server_round, run_seed, name))

    dp_metrics: dict[str, Any] = {}
    hooks = None
    session = None
    if privacy_cfg.enabled:
        from fl_client.privacy import PatientDPSession

        # What DP-SGD trains (privacy.patient.trainable); the rest keeps the global model's values.
        restrict_trainable(model, privacy_cfg.trainable)
        session = PatientDPSession.open(
            site_name=name,
            run_id=run_id,
            settings=settings,
            privacy_cfg=privacy_cfg,
            train_patient_ids=list(train_tensors.patient_ids),
            batch_size=train_cfg.batch_size,
            local_epochs=train_cfg.local_epochs,
            total_rounds=int(config[protocol.TOTAL_ROUNDS]),
            server_round=server_round,
            round_config=dict(config),
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
    if session is None:
        from fl_client.privacy.history import data_id, patient_digests
        from fl_client.privacy.site_record import note_unprotected_round

        # Recorded before the reply leaves: these patients are not protected by this run.
        # The whole training split: with rounds per pass a round trains a part, and over a pass every patient.
        note_unprotected_round(settings, name, run_id, server_round, len(train_tensors.patient_ids),
                               data_id(patient_digests(train_tensors.patient_ids)))

    metrics: dict[str, Any] = {
        protocol.NUM_EXAMPLES: int(result.num_examples),
        protocol.UNIT_WEIGHT: 1,
        protocol.TRAIN_LOSS: float(result.loss),
        protocol.TRAIN_STEPS: int(result.steps),
        protocol.TRAIN_SECONDS: float(time.perf_counter() - started),
        protocol.PATIENTS_PER_SECOND: float(result.patients_per_second),
    }
    if session is not None:
        # Only what the DP-SGD guarantee covers leaves the site: the update, the DP parameters and the run's
        # epsilon, and as FedAvg weight the site's public patient count (the mechanism's own parameter), never
        # the exact count.
        for key in protocol.NON_DP_TRAIN_KEYS:
            metrics.pop(key, None)
        metrics[protocol.NUM_EXAMPLES] = int(session.plan.public_count)
    metrics.update(dp_metrics)
    content = RecordDict({
        protocol.ARRAYS_RECORD: ArrayRecord(trainable_state(model)),
        protocol.METRICS_RECORD: MetricRecord(metrics),
        protocol.SITE_RECORD: _site_record(settings, name, **echo),
    })
    return Message(content, reply_to=msg)


def _round_task(config: Any) -> str:
    """What the round trains or evaluates (`protocol.TASK`; LLNM-Net when absent)."""
    task = str(config.get(protocol.TASK, protocol.TASK_LLNM))
    if task not in (protocol.TASK_LLNM, protocol.TASK_SEGMENT):
        raise protocol.ProtocolError(f"round config: {protocol.TASK}={task!r} is not a task this site knows "
                                     f"({protocol.TASK_LLNM}, {protocol.TASK_SEGMENT})")
    return task


def _handle_evaluate(msg: Message, context: Context, site_dirs: list[str] | None,
                     defaults: dict[str, Any] | None = None) -> Message:
    from shared_model.model.training import predict
    from shared_model.sitedata.model_inputs import make_dataset

    settings = SiteSettings.from_context(context, site_dirs, defaults)
    settings.apply_threads()
    name = site_name(settings)
    config = msg.content[protocol.CONFIG_RECORD]
    protocol.check_keys(config, (protocol.EVAL_SPLIT, protocol.EVAL_BOOTSTRAP), "evaluate message's round config")
    split = str(config[protocol.EVAL_SPLIT])
    server_round = int(config.get(protocol.SERVER_ROUND, 0))
    run_id = str(config.get(protocol.RUN_ID, context.run_id))
    check_eval_policy(settings, name, server_round, split)
    extra = {protocol.SITE_SPLIT: split}
    if _round_task(config) == protocol.TASK_SEGMENT:
        from fl_client.segment_task import evaluate_segmenter

        metrics, seg_extra = evaluate_segmenter(msg, settings, name, split=split, server_round=server_round,
                                                run_id=run_id)
        return Message(RecordDict({protocol.METRICS_RECORD: MetricRecord(metrics),
                                   protocol.SITE_RECORD: _site_record(settings, name, **extra, **seg_extra)}),
                       reply_to=msg)
    explain_asked = bool(config.get(protocol.EXPLAIN, False))
    withheld = _explanation_withheld(settings, name, run_id, server_round, config) if explain_asked else None
    explain = explain_asked and withheld is None
    sigma = 0.0
    dp: dict[str, float] = {}
    if not settings.exact_evaluation:
        from fl_client.privacy.evaluation import reserve_releases

        # Charged before anything about the patients is computed: which reply is refused depends only on how
        # many replies came before.
        sigma, granted, dp = reserve_releases(settings, name, run_id, server_round, split,
                                              ["histogram", "explanation"] if explain else ["histogram"])
        if explain and "explanation" not in granted:
            explain, withheld = False, (f"{protocol.POLICY_REFUSAL_MARKER}: the site's lifetime evaluation budget "
                                        "(max-eval-epsilon) cannot pay for the explanation as well")
    if withheld:
        extra[protocol.EXPLAIN_WITHHELD] = withheld
    model, tensors, _, config = _load_round_inputs(msg, settings)
    subset = tensors.subset(split)
    preds = predict(model, make_dataset(subset), device=settings.device)
    labelled = preds["llnm"] >= 0
    y = preds["llnm"][labelled].astype(int)
    s = preds["score"][labelled]
    if settings.exact_evaluation:
        metrics = _exact_metrics(settings, preds, subset, y, s, int(config[protocol.EVAL_BOOTSTRAP]), server_round)
        from fl_client.privacy.site_record import note_exact_evaluation

        note_exact_evaluation(settings, name, run_id, server_round, split, len(preds["llnm"]))
    else:
        metrics = _dp_metrics(settings, y, s, sigma, dp)
        extra[protocol.EVAL_WITHHELD] = ("differentially private reply: only the noisy score histogram and what "
                                         "follows from it (no risk-stage metrics, no population counts)")
    if explain:
        from fl_client.explain import site_explanation

        pre_cfg = protocol.read_schema(config, protocol.PREPROCESS_CONFIG, PreprocessConfig)
        explanation = site_explanation(model, subset, pre_cfg.inputs, preds["llnm"].astype(int), preds["score"],
                                       steps=int(config.get(protocol.EXPLAIN_STEPS, 32)), sigma=sigma,
                                       min_cell=settings.min_cell_count)
        metrics.update(protocol.encode_explanation(explanation))
        if sigma > 0:
            from fl_client.privacy.evaluation import EXPLANATION_SENSITIVITY

            metrics[protocol.EXPLAIN_DP_EPSILON] = float(dp["epsilon"])
            metrics[protocol.EXPLAIN_DP_SIGMA] = float(sigma * EXPLANATION_SENSITIVITY)
        if not explanation["shares"]:
            extra[protocol.EXPLAIN_WITHHELD] = (f"feature-group shares withheld: fewer labelled patients than the "
                                                f"site's min-cell-count {settings.min_cell_count}")
    content = RecordDict({
        protocol.METRICS_RECORD: MetricRecord(metrics),
        protocol.SITE_RECORD: _site_record(settings, name, **extra),
    })
    return Message(content, reply_to=msg)


def _exact_metrics(settings: SiteSettings, preds: dict[str, Any], subset: Any, y: Any, s: Any, n_boot: int,
                   server_round: int) -> dict[str, Any]:
    """An exact reply (the site's exact-evaluation): metrics, histogram, population and risk-stage values."""
    from shared_model.evaluation.metrics import binary_metrics, score_histogram

    m = binary_metrics(y, s, n_bootstrap=n_boot, seed=server_round)
    # The score histogram at the resolution the site's policy allows (max-histogram-bins, default 100).
    histogram = score_histogram(y, s, n_bins=settings.max_histogram_bins)
    metrics = protocol.encode_eval_metrics(m, n=len(y), n_pos=int(y.sum()), histogram=histogram)
    metrics.update(_population(subset))
    if "stage_prob" in preds:
        from shared_model.evaluation.stage import stage_metrics

        metrics.update(protocol.encode_stage_metrics(stage_metrics(preds["stage"], preds["stage_prob"])))
    return metrics


def _dp_metrics(settings: SiteSettings, y: Any, s: Any, sigma: float, dp: dict[str, float]) -> dict[str, Any]:
    """A differentially private reply: the noisy histogram and what follows from it (fl_client.privacy.evaluation)."""
    from fl_client.privacy.evaluation import (
        DP_EVAL_BINS,
        as_histogram,
        dense_histogram,
        histogram_metrics,
        noisy_counts,
    )

    n_bins = min(DP_EVAL_BINS, settings.max_histogram_bins)
    neg, pos = dense_histogram(y, s, n_bins)
    neg, pos = noisy_counts(neg, sigma), noisy_counts(pos, sigma)
    m = histogram_metrics(neg, pos, sigma=sigma)
    # The counts sent are the noisy class totals (clipped at zero); the histogram keeps its noisy cells as they are.
    metrics = protocol.encode_eval_metrics(m, n=max(int(neg.sum()), 0) + max(int(pos.sum()), 0),
                                           n_pos=max(int(pos.sum()), 0), histogram=as_histogram(neg, pos))
    metrics.update({protocol.EVAL_DP_EPSILON: float(dp["epsilon"]), protocol.EVAL_DP_DELTA: settings.patient_delta,
                    protocol.EVAL_DP_SIGMA: float(sigma)})
    return metrics


def _population(subset: Any) -> dict[str, Any]:
    """Counts over the evaluated split for the model card: views, thyroid masks, calibrations and reports."""
    extras = getattr(subset, "extras", None)
    if not extras or "location_present" not in extras:
        return {}  # public features (feature head, public tokens) carry no per-view files
    present = subset.view_mask > 0.5
    return {
        protocol.POP_VIEWS: [int(x) for x in present.sum(dim=0)],
        protocol.POP_THYROID_MASKS: [int(x) for x in (extras["location_present"].bool() & present).sum(dim=0)],
        protocol.POP_CALIBRATED: [int(x) for x in (extras["calibrated"].bool() & present).sum(dim=0)],
        protocol.POP_REPORTS: int(extras["report_present"].sum()),
    }


def _explanation_withheld(settings: SiteSettings, name: str, run_id: str, server_round: int,
                          config: Any) -> str | None:
    """Why this site sends no explanation aggregates for this message (None when it sends them: the run's one
    explanation is then claimed).

    A site explains a run's final model once: only on the last round's evaluation, and never twice in a run,
    so a coordinator cannot collect explanations of models of its choosing."""
    from fl_client.privacy.site_record import claim_explanation

    model_cfg = protocol.read_schema(config, protocol.MODEL_CONFIG, ModelConfig)
    if not settings.share_explanations:
        return f"{protocol.POLICY_REFUSAL_MARKER}: {SHARE_EXPLANATIONS}=false"
    if model_cfg.architecture != "llnm-net" or model_cfg.image_features != "maps":
        return "explanations need the LLNM-Net transformer on the image feature maps"
    total = int(config.get(protocol.TOTAL_ROUNDS, 0))
    if server_round < total:
        return (f"{protocol.POLICY_REFUSAL_MARKER}: the site explains only the run's final model (round {total}), "
                f"not round {server_round}")
    if claim_explanation(settings, name, run_id):
        return f"{protocol.POLICY_REFUSAL_MARKER}: the site has already explained run {run_id!r}'s final model"
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

    # Outermost: a refusal (the site's policy, its budgets, a withheld release) becomes the error reply, logged
    # as a refusal. Then the float16 update encoding when the round asks for it (never with secure aggregation),
    # Flower's SecAgg+ for secure rounds only, and Flower's client-side clipping mods, applied only when the
    # coordinator's site-DP wrapper asks for them (so a site clips before it masks or encodes).
    @client_app.train(mods=[refusal_mod, update_transport_mod, secure_aggregation_mod, site_dp_clipping_mod])
    def train(msg: Message, context: Context) -> Message:
        _quiet_logs()
        return _handle_train(msg, context, site_dirs, defaults)

    @client_app.evaluate(mods=[refusal_mod])
    def evaluate(msg: Message, context: Context) -> Message:
        _quiet_logs()
        return _handle_evaluate(msg, context, site_dirs, defaults)

    @client_app.query()
    def query(msg: Message, context: Context) -> Message:
        return _handle_query(msg, context, site_dirs, defaults)

    return client_app


def refusal_mod(msg: Message, context: Context, call_next: Any) -> Message:
    """Turn the site's refusals into error replies in the site's words (no traceback, no local path)."""
    from fl_client.privacy import PatientBudgetExceeded, ReleaseWithheld
    from fl_client.privacy.evaluation import EvaluationBudgetSpent
    from fl_client.secure_aggregation import SecureAggregationRefusal

    try:
        return call_next(msg, context)
    except (SitePolicyRefusal, PatientBudgetExceeded, ReleaseWithheld, EvaluationBudgetSpent,
            SecureAggregationRefusal) as exc:
        return refusal_reply(msg, str(exc), f"a {msg.metadata.message_type} message")


def _quiet_logs() -> None:
    # Opacus raises flwr's logger to DEBUG when imported; keep the site's console readable.
    logging.getLogger("flwr").setLevel(logging.INFO)


# Deployment entry point (`[tool.flwr.app.components] clientapp = "fl_client.client_app:app"`).
app = make_client_app()
