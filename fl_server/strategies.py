"""What the coordinator's round loop is made of: the round-0 model, the configured Flower strategy (inside
Flower's DP wrappers when site-level DP is on), the strategy state a resume needs, and each round's config.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

from fl_server.config import ExperimentConfig
from shared_model import protocol


def initial_state(exp: ExperimentConfig) -> dict[str, torch.Tensor]:
    """The round-0 global model (LLNM-Net, or the segmenter of a `task: segment` run), reproducible from the
    run's seed."""
    torch.manual_seed(exp.train.seed)
    if exp.task == "segment":
        from shared_model.model.segmenter import build_segmenter

        model = build_segmenter(exp.segmenter_architecture())
    else:
        from shared_model.model.architectures import build_model

        model = build_model(exp.architecture())
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def build_strategy(exp: ExperimentConfig, num_sites_expected: int) -> Strategy:
    """The configured Flower strategy, wrapped for site-level DP when enabled."""
    fed = exp.federation
    # Sampling: every connected site takes part in every round (fraction 1.0); quorum is checked by us.
    common: dict[str, Any] = dict(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=fed.min_sites,
        min_evaluate_nodes=fed.min_sites,
        min_available_nodes=fed.min_sites,
        weighted_by_key=protocol.NUM_EXAMPLES,
    )
    site_dp = exp.privacy.site
    if site_dp.enabled:
        # Site-level DP needs an unweighted mean (each site's clipped update has sensitivity C/K);
        # sample-weighted FedAvg would give a large hospital more influence than the noise covers.
        common["weighted_by_key"] = protocol.UNIT_WEIGHT
    strategy: Strategy
    if fed.strategy == "fedavg":
        strategy = FedAvg(**common)
    elif fed.strategy == "fedprox":
        strategy = FedProx(proximal_mu=fed.proximal_mu, **common)
    else:
        a = fed.fedadam
        strategy = FedAdam(eta=a.eta, eta_l=a.eta_l, beta_1=a.beta_1, beta_2=a.beta_2, tau=a.tau, **common)
    if site_dp.enabled:
        from fl_server.privacy import wrap_with_site_dp

        strategy = wrap_with_site_dp(strategy, exp, num_sites_expected)
    return strategy


def _inner_strategy(strategy: Strategy) -> Strategy:
    return getattr(strategy, "strategy", strategy)


def strategy_state(strategy: Strategy) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """JSON-able and array state a strategy needs to continue after a restart (FedAdam's moments)."""
    inner = _inner_strategy(strategy)
    arrays: dict[str, np.ndarray] = {}
    for attr in ("m_t", "v_t"):
        value = getattr(inner, attr, None)
        if value:
            arrays.update({f"{attr}/{k}": np.asarray(v) for k, v in value.items()})
    return {"strategy": type(inner).__name__}, arrays


def restore_strategy_state(strategy: Strategy, arrays: dict[str, np.ndarray]) -> None:
    inner = _inner_strategy(strategy)
    for attr in ("m_t", "v_t"):
        value = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(f"{attr}/")}
        if value and hasattr(inner, attr):
            setattr(inner, attr, value)


def round_config(exp: ExperimentConfig, server_round: int, *, split: str | None = None,
                 explain: bool = False, run_id: str | None = None) -> ConfigRecord:
    """What a site needs for one round, in the round's ConfigRecord; `run_id` is the run's identity at the
    sites (`RunDirectory.run_uid`; default the experiment's name)."""
    from shared_model.model.training import scheduled_lr

    total = int(exp.federation.rounds)
    train = exp.train.model_copy(update={
        "lr": scheduled_lr(exp.train, min(max(server_round, 1), total) - 1, total)})
    values: dict[str, Any] = {
        protocol.RUN_ID: run_id or exp.name,
        protocol.TASK: exp.task,
        protocol.TOTAL_ROUNDS: total,
        protocol.PREPROCESS_CONFIG: exp.preprocess.to_json(),
        protocol.TRAIN_CONFIG: train.to_json(),
        protocol.PRIVACY_CONFIG: exp.privacy.patient.to_json(),
        protocol.EVAL_SPLIT: split or exp.federation.eval_split,
        protocol.EVAL_BOOTSTRAP: int(exp.federation.eval_bootstrap),
    }
    if exp.task == "segment":
        values[protocol.SEGMENTER_CONFIG] = exp.segmenter_architecture().to_json()
    else:
        values[protocol.MODEL_CONFIG] = exp.architecture().to_json()
    if exp.federation.strategy == "fedprox":
        values[protocol.PROXIMAL_MU] = float(exp.federation.proximal_mu)
    if exp.federation.rounds_per_epoch > 1:
        values[protocol.EPOCH_PARTS] = int(exp.federation.rounds_per_epoch)
    if exp.federation.update_transport != "float32":
        values[protocol.UPDATE_TRANSPORT] = exp.federation.update_transport
    if explain:
        values[protocol.EXPLAIN] = True
        values[protocol.EXPLAIN_STEPS] = int(exp.evaluation.explain_steps)
    return ConfigRecord(values)
