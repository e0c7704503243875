"""A train round under Flower's SecAgg+: the coordinator learns only the sum of the sites' updates.

Flower 1.42 offers secure aggregation only through its legacy workflow API (`SecAggPlusWorkflow`, which
needs a `LegacyContext` with a legacy strategy and FitIns/FitRes messages); the Message-API strategies have
no hook for it. So a secure round runs that workflow with a small legacy strategy of ours (`_OneRound`)
and hands its result back to the round loop as if each site had replied with the aggregate:

1. The configured Message-API strategy (FedAvg/FedProx/FedAdam, inside Flower's client-side DP wrapper
   when site DP is on) builds the round's train messages as usual; their model and config become the
   FitIns, plus the state-dict key order and the weighting constants (`protocol.SECAGG_*`).
2. Each site trains, takes its update u = local - global (clipped by Flower's `fixedclipping_mod` first
   under site DP), multiplies it by weight/weight_scale and masks it (`fl_client.secure_aggregation`).
3. After unmasking, Flower's workflow gives `_OneRound.aggregate_fit` the mean of the scaled updates over
   the sites that completed, with each site's FitRes metrics (but every FitRes's parameters replaced by
   that mean: no site's own update ever reaches the coordinator's code). The sample-weighted FedAvg update
   is that mean times K / sum(weight/weight_scale).
4. The round loop then gets one synthetic reply per completed site, every one carrying the same new model
   and that site's metrics, so the strategy, the DP wrapper (noise on the unmasked mean, and its
   accountant), the privacy ledger and the per-site bookkeeping run unchanged. A FedAvg of identical
   models is that model.

Dropouts: a site that fails after the key exchange is left out of the sum and its masks are removed with
the other sites' shares, as long as `reconstruction_threshold` of them answer (Flower's protocol).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import FitIns, FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

from fl_server.config import ExperimentConfig
from shared_model import protocol


class _OneRound(LegacyStrategy):
    """The legacy strategy SecAggPlusWorkflow drives for one round: our FitIns out, the unmasked mean in."""

    def __init__(self, fitins: dict[int, FitIns], proxies: dict[int, ClientProxy]) -> None:
        self.fitins = fitins
        self.proxies = proxies
        self.results: list[tuple[ClientProxy, FitRes]] = []
        self.failures: list[Any] = []

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any
                      ) -> list[tuple[ClientProxy, FitIns]]:
        return [(self.proxies[n], ins) for n, ins in self.fitins.items()]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list[Any]
                      ) -> tuple[Parameters | None, dict[str, Any]]:
        self.results = list(results)
        self.failures = list(failures)
        return None, {}

    # The evaluation half of the legacy API is not used: evaluation stays on the Message API.
    def initialize_parameters(self, client_manager: Any) -> Parameters | None:
        return None

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: Any) -> list[Any]:
        return []

    def aggregate_evaluate(self, server_round: int, results: list[Any], failures: list[Any]
                           ) -> tuple[float | None, dict[str, Any]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Any]] | None:
        return None


@dataclass
class SecureRound:
    """What one secure round produced: the synthetic replies for the round loop, and its bookkeeping."""

    replies: list[Message]
    failures: list[dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)


class _ErrorWatchingGrid:
    """The Grid, recording each node's error reply (Flower's workflow keeps errors without their node ids)."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.errors: dict[int, str] = {}

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        answered = set()
        for r in replies:
            answered.add(r.metadata.src_node_id)
            if r.has_error():
                self.errors.setdefault(r.metadata.src_node_id, str(r.error.reason))
        for m in messages:
            if m.metadata.dst_node_id not in answered:
                self.errors.setdefault(m.metadata.dst_node_id, f"no reply within {timeout} s")
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def _failure_reason(error: str | None, default: str) -> str:
    from fl_server.privacy.replies import refusal_text

    if not error:
        return default
    policy = refusal_text(error, protocol.POLICY_REFUSAL_MARKER) or refusal_text(error, protocol.REFUSAL_MARKER)
    return policy or f"{default} (error: {error[-500:]})"


def _weighting(exp: ExperimentConfig) -> tuple[str, float]:
    """Which train metric weights a site and the public constant it is divided by (unit weights under site DP,
    whose noise is calibrated for an unweighted mean)."""
    if exp.privacy.site.enabled:
        return protocol.UNIT_WEIGHT, 1.0
    return protocol.NUM_EXAMPLES, float(exp.federation.secagg.weight_scale)


def run_secure_round(grid: Grid, exp: ExperimentConfig, rnd: int, messages: list[Message],
                     name_of: Any) -> SecureRound:
    """Run SecAgg+ over the sites that `messages` (the strategy's train messages) address."""
    sa = exp.federation.secagg
    started = time.perf_counter()
    weight_key, weight_scale = _weighting(exp)
    if not messages:
        return SecureRound([], [], {})
    keys = list(messages[0].content[protocol.ARRAYS_RECORD].keys())
    global_state = {k: np.asarray(v.numpy()) for k, v in messages[0].content[protocol.ARRAYS_RECORD].items()}
    run_id = int(getattr(getattr(grid, "run", None), "run_id", 0) or 0)
    fitins: dict[int, FitIns] = {}
    proxies: dict[int, ClientProxy] = {}
    by_node = {m.metadata.dst_node_id: m for m in messages}
    # Every train message carries the same global model: serialise it once.
    parameters = ndarrays_to_parameters([global_state[k] for k in keys])
    for node, msg in by_node.items():
        config = dict(msg.content[protocol.CONFIG_RECORD])
        config.update({protocol.SERVER_ROUND: rnd, protocol.SECAGG_KEYS: json.dumps(keys),
                       protocol.SECAGG_WEIGHT_KEY: weight_key, protocol.SECAGG_WEIGHT_SCALE: weight_scale,
                       protocol.SECAGG_CLIPPING_RANGE: float(sa.clipping_range)})
        fitins[node] = FitIns(parameters, config)
        proxies[node] = GridClientProxy(node, grid, run_id)
    strategy = _OneRound(fitins, proxies)
    manager = SimpleClientManager()
    for proxy in proxies.values():
        manager.register(proxy)
    context = LegacyContext(Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            config=ServerConfig(num_rounds=1, round_timeout=exp.federation.round_timeout_s),
                            strategy=strategy, client_manager=manager)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: rnd})
    context.state.array_records[MAIN_PARAMS_RECORD] = _array_record({k: global_state[k] for k in keys})
    workflow = SecAggPlusWorkflow(num_shares=sa.num_shares, reconstruction_threshold=sa.reconstruction_threshold,
                                  max_weight=1.0, clipping_range=float(sa.clipping_range),
                                  quantization_range=int(sa.quantization_range), modulus_range=int(sa.modulus_range),
                                  timeout=exp.federation.round_timeout_s)
    watched = _ErrorWatchingGrid(grid)
    workflow(watched, context)

    completed = {int(p.node_id): res for p, res in strategy.results}
    dropped = ("dropped out of secure aggregation; its masks were removed with the other sites' shares"
               if strategy.results else
               "secure aggregation halted: fewer sites than the reconstruction threshold completed")
    failures = [{"site": name_of(n), "node_id": n, "phase": "train",
                 "reason": _failure_reason(watched.errors.get(n), dropped)}
                for n in by_node if n not in completed]
    info = {"protocol": "SecAgg+ (Flower legacy SecAggPlusWorkflow)", "sampled": len(by_node),
            "completed": len(completed), "weight_key": weight_key, "weight_scale": weight_scale,
            "seconds": round(time.perf_counter() - started, 3)}
    if not completed:
        return SecureRound([], failures, info)

    mean = parameters_to_ndarrays(next(iter(completed.values())).parameters)
    weights = {n: float(res.metrics.get(weight_key, 0)) / weight_scale for n, res in completed.items()}
    total = sum(weights.values())
    if total <= 0:
        raise RuntimeError(f"round {rnd}: the completed sites' {weight_key} sum to {total}; nothing to average")
    factor = len(completed) / total
    new_state = {k: (global_state[k].astype(np.float64) + factor * np.asarray(m, dtype=np.float64))
                 .astype(global_state[k].dtype) for k, m in zip(keys, mean, strict=True)}
    replies = [_synthetic_reply(by_node[n], res, new_state) for n, res in completed.items()]
    info["aggregate_only"] = all(
        all(np.array_equal(a, b) for a, b in zip(parameters_to_ndarrays(res.parameters), mean, strict=True))
        for res in completed.values())
    return SecureRound(replies, failures, info)


def _array_record(state: dict[str, np.ndarray]) -> ArrayRecord:
    import torch

    return ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()})


def _synthetic_reply(instruction: Message, res: FitRes, new_state: dict[str, np.ndarray]) -> Message:
    """A train reply as the round loop knows them: the new global model, the site's metrics and site record."""
    metrics = {k: v for k, v in res.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    site = {k: str(res.metrics[k]) for k in (protocol.SITE_NAME, protocol.SITE_POLICY) if k in res.metrics}
    content = RecordDict({protocol.ARRAYS_RECORD: _array_record(new_state),
                          protocol.METRICS_RECORD: MetricRecord(metrics),
                          protocol.SITE_RECORD: ConfigRecord(site)})
    return Message(content, reply_to=instruction)
