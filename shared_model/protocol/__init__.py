"""The message contract between the coordinator and the sites, defined once for both sides.

Every record name and every key of a Flower message that llnm-fl sends or reads is named here, and the
score histogram that makes pooled evaluation exact is encoded and decoded here. Both `fl_client` and
`fl_server` import this module; it never touches files, so the coordinator may import it freely.

A round's messages (Message API, one `RecordDict` each):

* coordinator -> site, `train` / `evaluate`: `arrays` (the global model) and `config` (the round
  config: the JSON dumps of the shared schemas and a few scalars);
* site -> coordinator, `train` reply: `arrays` (trainable parameters only), `metrics` (train and DP
  metrics) and `site`;
* site -> coordinator, `evaluate` reply: `metrics` (evaluation metrics and the score histogram) and `site`;
* coordinator -> site, `query`: `config` with `ask: site-name`; the reply holds the `site` record only.

The round config's `task` says what the round trains and evaluates: LLNM-Net (`llnm`, also when absent) or the
nodule and thyroid segmenter (`segment`: `segmenter-config` instead of `model-config`; the evaluate reply's metrics
are the sums of `shared_model.protocol.segmentation_metrics`; a site that trained nothing replies `num-examples` 0).

With secure aggregation (`federation.secure_aggregation`) a train round is Flower's SecAgg+ exchange on the
legacy FitIns/FitRes layout instead (four `train` messages per site; `fl_server.secure_aggregation` and
`fl_client.secure_aggregation`): the FitIns carries the global model as an ordered list of arrays and the
round config plus the `secagg-*` keys below; the FitRes carries the site's masked, scaled update (never
the update itself), weight 1, and as metrics the train metrics plus the site's name and policy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from shared_model.config import ConfigError, Schema, parse_json
from shared_model.numbers import none_if_nan

# ---- record names ----------------------------------------------------------------------------------
ARRAYS_RECORD = "arrays"
CONFIG_RECORD = "config"
METRICS_RECORD = "metrics"
SITE_RECORD = "site"

# ---- the `site` record (ConfigRecord) of every reply ------------------------------------------------
SITE_NAME = "site-name"
SITE_SPLIT = "split"  # evaluate replies: the split the site evaluated
SITE_POLICY = "site-policy"  # train and evaluate replies: the site's privacy policy (JSON of its node-config keys)
# Train replies: the run and round the reply answers, echoed from the round config (checked before aggregation).
SITE_RUN_ID = "run-id"
SITE_ROUND = "server-round"
# Train replies under `update-transport: float16`: how the arrays encode the update
# (shared_model.protocol.update_codec).
UPDATE_ENCODING = "update-encoding"

# ---- the `config` record of a query -------------------------------------------------------------------
QUERY_ASK = "ask"
ASK_SITE_NAME = "site-name"

# ---- the round config (ConfigRecord `config` of train / evaluate messages) ----------------------------
RUN_ID = "run-id"
# What the round trains and evaluates: "llnm" (LLNM-Net, the default when absent) or "segment" (the nodule and thyroid
# segmenter; its evaluate replies are `shared_model.protocol.segmentation_metrics`).
TASK = "task"
TASK_LLNM = "llnm"
TASK_SEGMENT = "segment"
SEGMENTER_CONFIG = "segmenter-config"  # task segment: JSON of shared_model.model.segmenter.SegmenterConfig
# Train messages: "float16" asks for float16 differences from the sent model (absent: float32 weights).
UPDATE_TRANSPORT = "update-transport"
SERVER_ROUND = "server-round"  # set by Flower's strategies in configure_train / configure_evaluate
TOTAL_ROUNDS = "total-rounds"
MODEL_CONFIG = "model-config"  # JSON of shared_model.config.ModelConfig
PREPROCESS_CONFIG = "preprocess-config"  # JSON of shared_model.config.PreprocessConfig
TRAIN_CONFIG = "train-config"  # JSON of shared_model.config.TrainConfig (this round's learning rate)
PRIVACY_CONFIG = "privacy-config"  # JSON of shared_model.config.PatientDPConfig
EVAL_SPLIT = "eval-split"
EVAL_BOOTSTRAP = "eval-bootstrap"
PROXIMAL_MU = "proximal-mu"  # FedProx only
# federation.rounds_per_epoch when above 1: the site trains on one of this many disjoint parts of its training
# split, chosen from the round number (shared_model.model.training.round_part).
EPOCH_PARTS = "epoch-parts"
# Final evaluation with `evaluation.explain: true` only: the site also returns its explanation aggregates
# (`shared_model.evaluation.explanation`), computed with this many integrated-gradients steps.
EXPLAIN = "explain"
EXPLAIN_STEPS = "explain-steps"
# Added by the coordinator's client-side site-DP wrappers; the site's clipping mod reads it.
SITE_DP_CLIPPING = "site-dp-clipping"
SITE_DP_CLIENT_FIXED = "client-fixed"
SITE_DP_CLIENT_ADAPTIVE = "client-adaptive"

# Secure aggregation only (FitIns config): the state-dict keys of the ordered arrays (JSON list), the train
# metric that is the site's FedAvg weight, the public constant that weight is divided by, and the bound
# on every coordinate of the scaled update (Flower's SecAgg+ clipping_range).
SECAGG_KEYS = "secagg-keys"
SECAGG_WEIGHT_KEY = "secagg-weight-key"
SECAGG_WEIGHT_SCALE = "secagg-weight-scale"
SECAGG_CLIPPING_RANGE = "secagg-clipping-range"

# ---- train reply metrics (MetricRecord `metrics`) -------------------------------------------------------
NUM_EXAMPLES = "num-examples"  # FedAvg's sample weight
UNIT_WEIGHT = "unit-weight"  # always 1: the unweighted mean that site-level DP needs
TRAIN_LOSS = "train-loss"
TRAIN_STEPS = "train-steps"
TRAIN_SECONDS = "train-seconds"
PATIENTS_PER_SECOND = "patients-per-second"
# Values outside the DP-SGD mechanism (the exact training loss; timing and step counts, which reveal the
# Poisson batch sizes): a site never sends them when the round's patient-level DP is on. Its `num-examples`
# (FedAvg's weight) is then its public patient count, a parameter of the mechanism, not its exact count.
NON_DP_TRAIN_KEYS = (TRAIN_LOSS, TRAIN_STEPS, TRAIN_SECONDS, PATIENTS_PER_SECOND)

# Patient-level DP-SGD: the exact keys every DP site adds (Flower requires identical keys across replies). They
# describe the run at this site only: the lifetime epsilon of the site's patients stays on the site.
DP_EPSILON = "dp-epsilon"
DP_DELTA = "dp-delta"
DP_NOISE_MULTIPLIER = "dp-noise-multiplier"
DP_SAMPLE_RATE = "dp-sample-rate"
DP_MAX_GRAD_NORM = "dp-max-grad-norm"
DP_STEPS_ROUND = "dp-steps-round"
DP_STEPS_TOTAL = "dp-steps-total"
DP_REPLAYED = "dp-replayed"
DP_ATTEMPTS_ROUND = "dp-attempts-round"
DP_HISTORY_SEGMENTS = "dp-history-segments"
# The run's composition at the site, one entry per (noise multiplier, sample rate): the coordinator recomputes
# dp-epsilon from it with the same accountant (shared_model.dp_accounting).
DP_HISTORY_NOISE = "dp-history-noise"
DP_HISTORY_RATE = "dp-history-rate"
DP_HISTORY_STEPS = "dp-history-steps"
DP_METRIC_KEYS = (
    DP_EPSILON,
    DP_DELTA,
    DP_NOISE_MULTIPLIER,
    DP_SAMPLE_RATE,
    DP_MAX_GRAD_NORM,
    DP_STEPS_ROUND,
    DP_STEPS_TOTAL,
    DP_REPLAYED,
    DP_ATTEMPTS_ROUND,
    DP_HISTORY_SEGMENTS,
    DP_HISTORY_NOISE,
    DP_HISTORY_RATE,
    DP_HISTORY_STEPS,
)
# Opens every refusal a site sends when a round would exceed its patient-level budget, so that the
# coordinator can recognise it inside the error text Flower wraps around it.
REFUSAL_MARKER = "patient-level privacy budget"
# Opens every refusal a site sends because a message breaks its own policy (its node config: fl_client.policy).
POLICY_REFUSAL_MARKER = "site policy"

# ---- evaluate reply metrics (MetricRecord `metrics`) -----------------------------------------------------
EVAL_N = "n"
EVAL_N_POS = "n_pos"
# A differentially private evaluate reply (the site's default): the epsilon of this reply at its delta, and the
# standard deviation of the Gaussian noise on each histogram count (sensitivity 1). Every other value of the
# reply is computed from the noisy histogram. Absent from an exact reply.
EVAL_DP_EPSILON = "eval-dp-epsilon"
EVAL_DP_DELTA = "eval-dp-delta"
EVAL_DP_SIGMA = "eval-dp-sigma"
EVAL_DP_KEYS = (EVAL_DP_EPSILON, EVAL_DP_DELTA, EVAL_DP_SIGMA)
# Always all present (NaN where undefined), so that every site's reply has the same keys.
EVAL_METRIC_KEYS = ("auc", "auc_ci_low", "auc_ci_high", "accuracy", "sensitivity", "specificity", "ppv", "npv",
                    "f1", "brier", "ece")
# The score histogram travels dense: one count per bin and class, so a reply's size depends on the number of
# bins the site allows, never on how many patients it has. (`*-bins` lists of the occupied bins were sent by
# earlier versions; they are still read.)
HIST_N_BINS = "hist-n-bins"
HIST_NEG_BINS = "hist-neg-bins"
HIST_NEG_COUNTS = "hist-neg-counts"
HIST_POS_BINS = "hist-pos-bins"
HIST_POS_COUNTS = "hist-pos-counts"
# Risk-stage head (when the model has one): labelled patients, one-vs-rest AUC per class (NaN where a class
# is absent or alone) and their macro mean over the classes where it is defined.
STAGE_N = "stage-n"
STAGE_AUC = "stage-auc"
STAGE_AUC_MACRO = "stage-auc-macro"
# Who the evaluated split holds (the model card's population): patients with each view, with a usable thyroid
# mask in each view, with a pixel spacing in each view, and with a report. Counts over the split only.
POP_VIEWS = "pop-views"
POP_THYROID_MASKS = "pop-thyroid-masks"
POP_CALIBRATED = "pop-calibrated"
POP_REPORTS = "pop-reports"
# Explanation aggregates (`shared_model.evaluation.explanation`): patients explained, one share per feature group, and
# per location bin (capsule distance, lobe third) the counts of `explanation.LOCATION_FIELDS`.
EXPLAIN_N = "explain-n"
EXPLAIN_SHARES = "explain-shares"
EXPLAIN_LOCATION = ("capsule", "third")
# In the `site` record of an evaluate reply: why a site asked to explain sent no explanation (its policy).
EXPLAIN_WITHHELD = "explain-withheld"
# In the `site` record of an evaluate reply: what a DP reply leaves out (risk-stage metrics, population counts).
EVAL_WITHHELD = "eval-withheld"
# Explanation cells over fewer patients than the site's min-cell-count: sent as this count, never as a value.
SUPPRESSED_CELL = -1
# A DP explanation's noise: its epsilon and the standard deviation on each of its sums (sensitivity 1 each
# block, see fl_client.privacy.evaluation).
EXPLAIN_DP_EPSILON = "explain-dp-epsilon"
EXPLAIN_DP_SIGMA = "explain-dp-sigma"


class ProtocolError(ValueError):
    """A message that does not follow this contract; the text names the record and key."""


def encode_eval_metrics(metrics: Mapping[str, Any], *, n: int, n_pos: int,
                        histogram: Mapping[str, Any]) -> dict[str, Any]:
    """An evaluate reply's MetricRecord values: counts, every `EVAL_METRIC_KEYS` value (NaN where
    undefined) and the score histogram of `shared_model.evaluation.metrics.score_histogram`, dense (see HIST_N_BINS)."""
    out: dict[str, Any] = {NUM_EXAMPLES: int(n), EVAL_N: int(n), EVAL_N_POS: int(n_pos)}
    for key in EVAL_METRIC_KEYS:
        value = metrics.get(key)
        out[key] = float(value) if value is not None else math.nan
    n_bins = int(histogram["n_bins"])
    out[HIST_N_BINS] = n_bins
    for name, key in (("neg", HIST_NEG_COUNTS), ("pos", HIST_POS_COUNTS)):
        dense = [0] * n_bins
        for b, c in zip(histogram[f"{name}_bins"], histogram[f"{name}_counts"], strict=True):
            dense[int(b)] = int(c)
        out[key] = dense
    return out


def decode_eval_metrics(record: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Inverse of :func:`encode_eval_metrics`: (per-site metrics with None for NaN, the histogram).

    A DP reply's metrics carry ``dp``: its epsilon, delta and noise standard deviation."""
    try:
        site = {k: none_if_nan(record[k]) for k in EVAL_METRIC_KEYS if k in record}
        site[EVAL_N] = int(record[EVAL_N])
        site[EVAL_N_POS] = int(record[EVAL_N_POS])
        if EVAL_DP_SIGMA in record:
            site["dp"] = {"epsilon": float(record[EVAL_DP_EPSILON]), "delta": float(record[EVAL_DP_DELTA]),
                          "sigma": float(record[EVAL_DP_SIGMA])}
        histogram: dict[str, Any] = {"n_bins": int(record[HIST_N_BINS])}
        for name, bins_key, counts_key in (("neg", HIST_NEG_BINS, HIST_NEG_COUNTS),
                                           ("pos", HIST_POS_BINS, HIST_POS_COUNTS)):
            counts = list(record[counts_key])
            if bins_key in record:  # sparse, from an earlier version
                histogram[f"{name}_bins"], histogram[f"{name}_counts"] = list(record[bins_key]), counts
            elif len(counts) != histogram["n_bins"]:
                raise ProtocolError(f"evaluate reply: {counts_key} has {len(counts)} counts for "
                                    f"{histogram['n_bins']} bins")
            else:
                occupied = [i for i, c in enumerate(counts) if c]
                histogram[f"{name}_bins"], histogram[f"{name}_counts"] = occupied, [counts[i] for i in occupied]
        if EVAL_DP_SIGMA in record:
            # Noisy counts, negative ones included (shared_model.evaluation.metrics.dense_counts).
            histogram["noisy"] = True
    except KeyError as exc:
        raise ProtocolError(f"evaluate reply: metrics record lacks {exc.args[0]!r}") from None
    return site, histogram


def explain_key(location: str, field: str) -> str:
    """The metrics key of one location count list, e.g. ``explain-capsule-observed``."""
    return f"explain-{location}-{field}"


def encode_explanation(explanation: Mapping[str, Any]) -> dict[str, Any]:
    """An evaluate reply's explanation values: the patient count, the group shares and the location counts
    (`fl_client.explain.site_explanation`'s result). Only lists of fixed length (groups, bins) are sent."""
    from shared_model.evaluation.explanation import LOCATION_FIELDS

    out: dict[str, Any] = {EXPLAIN_N: int(explanation["n"]),
                           EXPLAIN_SHARES: [float(x) for x in explanation["shares"]]}
    for location in EXPLAIN_LOCATION:
        counts = explanation.get(location)
        if counts is None:
            continue
        for field in LOCATION_FIELDS:
            kind = float if field == "expected" else int
            out[explain_key(location, field)] = [kind(x) for x in counts[field]]
    return out


def decode_explanation(record: Mapping[str, Any]) -> dict[str, Any] | None:
    """Inverse of :func:`encode_explanation` (None when the reply carries no explanation)."""
    from shared_model.evaluation.explanation import LOCATION_FIELDS

    if EXPLAIN_N not in record:
        return None
    try:
        out: dict[str, Any] = {"n": int(record[EXPLAIN_N]), "shares": [float(x) for x in record[EXPLAIN_SHARES]]}
        for location in EXPLAIN_LOCATION:
            if explain_key(location, "n") in record:
                out[location] = {f: [none_if_nan(x) for x in record[explain_key(location, f)]]
                                 for f in LOCATION_FIELDS}
    except KeyError as exc:
        raise ProtocolError(f"evaluate reply: explanation lacks {exc.args[0]!r}") from None
    return out


def decode_population(record: Mapping[str, Any]) -> dict[str, Any] | None:
    """The population counts of an evaluate reply (None when it has none, e.g. the feature head's inputs)."""
    if POP_VIEWS not in record:
        return None
    return {"views": [int(x) for x in record[POP_VIEWS]],
            "thyroid_masks": [int(x) for x in record[POP_THYROID_MASKS]],
            "calibrated": [int(x) for x in record[POP_CALIBRATED]], "reports": int(record[POP_REPORTS])}


def encode_stage_metrics(stage: Mapping[str, Any]) -> dict[str, Any]:
    """Risk-stage values of an evaluate reply (`shared_model.evaluation.metrics.stage_metrics`' result)."""
    return {STAGE_N: int(stage["n"]),
            STAGE_AUC: [math.nan if v is None else float(v) for v in stage["auc"]],
            STAGE_AUC_MACRO: math.nan if stage["auc_macro"] is None else float(stage["auc_macro"])}


def decode_stage_metrics(record: Mapping[str, Any]) -> dict[str, Any] | None:
    """Inverse of :func:`encode_stage_metrics` (None without a risk-stage head)."""
    if STAGE_N not in record:
        return None
    return {"n": int(record[STAGE_N]), "auc": [none_if_nan(float(v)) for v in record[STAGE_AUC]],
            "auc_macro": none_if_nan(float(record[STAGE_AUC_MACRO]))}


SchemaT = TypeVar("SchemaT", bound=Schema)


def read_schema(config: Mapping[str, Any], key: str, schema: type[SchemaT]) -> SchemaT:
    """Validate the JSON dump that the round config carries under `key` with the shared schema."""
    if key not in config:
        raise ProtocolError(f"round config: no {key!r}")
    try:
        return parse_json(schema, str(config[key]), source=f"round config {key!r}")
    except ConfigError as exc:
        raise ProtocolError(str(exc)) from None


def check_keys(values: Mapping[str, Any], keys: Sequence[str], what: str) -> None:
    """Raise naming the first of `keys` missing from `values` (a reply from another software version)."""
    missing = [k for k in keys if k not in values]
    if missing:
        raise ProtocolError(f"{what}: missing {', '.join(missing)}")
