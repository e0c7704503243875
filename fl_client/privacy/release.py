"""A DP-SGD release and its replay: what makes a round's release the same release, and what it sends.

A round retried with identical inputs (a coordinator resuming after a crash) re-runs with the same site-secret
noise and sampling seeds and must reproduce the release already accounted bit for bit: it then costs nothing
more. `release_fingerprint` is the digest of every input that determines a release except those seeds;
`state_digest` is the digest of what it produced. A replay that does not reproduce its release is withheld
(`withheld_message`): it was made with noise already used, so sending it would reveal the difference of two
releases that share their noise, which no accountant covers. `release_metrics` is what a train reply says about
its release, so that the coordinator can recompute the run's epsilon.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from fl_client.privacy.plan import DPPlan, HistoryEntry
from shared_model import protocol

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from torch import nn
    from torch.utils.data import DataLoader

__all__ = ["Release", "ReleaseWithheld", "device_of", "history_minus", "release_fingerprint", "release_metrics",
           "state_digest", "withheld_message"]


class ReleaseWithheld(RuntimeError):
    """A replayed round did not reproduce its accounted release; the result is never sent."""


@dataclass
class Release:
    """The release being made in this process."""

    attempt: int
    replay_of: dict[str, Any] | None
    prior: list[HistoryEntry]
    fingerprint: str


def release_fingerprint(plan: DPPlan, round_config: Mapping[str, Any], model: nn.Module,
                        optimizer: torch.optim.Optimizer, loader: DataLoader) -> str:
    """Digest of everything that determines this round's release except the site-secret seeds."""
    import torch

    h = hashlib.blake2b(digest_size=32)
    h.update(json.dumps(asdict(plan), sort_keys=True).encode())
    # Everything the coordinator sent: every model, training and loss setting, dropout, the FedProx term,
    # the rounds per pass, the transport; whatever a later version adds to the round config.
    h.update(json.dumps(dict(round_config), sort_keys=True, default=repr).encode())
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    h.update(json.dumps(groups, sort_keys=True, default=str).encode())
    h.update(f"seed={torch.initial_seed()};batch={loader.batch_size};device={device_of(model)};"
             f"threads={torch.get_num_threads()};train={model.training}".encode())
    # Which parameters DP-SGD trains (privacy.patient.trainable): the rest keep the global model's values.
    h.update(json.dumps([name for name, p in model.named_parameters() if p.requires_grad]).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        _update_tensor(h, tensor)
    dataset = loader.dataset
    h.update(f"n={len(dataset)}".encode())  # type: ignore[arg-type]
    for i in range(len(dataset)):  # type: ignore[arg-type]
        for tensor in dataset[i]:
            _update_tensor(h, tensor)
    return h.hexdigest()


def withheld_message(site_name: str, run_id: str, server_round: int) -> str:
    return (f"{protocol.POLICY_REFUSAL_MARKER}: site {site_name!r} withholds round {server_round} "
            f"of run {run_id!r}: a retry with the inputs of an accounted release reused that release's "
            "noise but did not reproduce it bit for bit (the computation is not deterministic here, or an "
            "input the site does not fingerprint changed), so sending it would reveal more than the release "
            "already counted. Nothing was sent or charged. The coordinator can start a new run; the site "
            "operator can keep the CPU threads and device of the SuperNode fixed between retries.")


def release_metrics(plan: DPPlan, run_epsilon: float, steps_round: int, run_history: list[HistoryEntry],
                    replayed: bool, attempts: int) -> dict[str, Any]:
    """The ``dp-*`` metrics of a train reply: the run's epsilon and the mechanism that produced it (the run's
    composition at this site, so the coordinator can recompute the epsilon); never the lifetime figure."""
    metrics = {
        protocol.DP_EPSILON: float(run_epsilon),
        protocol.DP_DELTA: float(plan.delta),
        protocol.DP_NOISE_MULTIPLIER: float(plan.noise_multiplier),
        protocol.DP_SAMPLE_RATE: float(plan.sample_rate),
        protocol.DP_MAX_GRAD_NORM: float(plan.max_grad_norm),
        protocol.DP_STEPS_ROUND: int(steps_round),
        protocol.DP_STEPS_TOTAL: int(sum(n for _, _, n in run_history)),
        protocol.DP_REPLAYED: int(replayed),
        protocol.DP_ATTEMPTS_ROUND: int(attempts),
        protocol.DP_HISTORY_SEGMENTS: len(run_history),
        protocol.DP_HISTORY_NOISE: [float(z) for z, _, _ in run_history],
        protocol.DP_HISTORY_RATE: [float(q) for _, q, _ in run_history],
        protocol.DP_HISTORY_STEPS: [int(n) for _, _, n in run_history],
    }
    assert tuple(metrics) == protocol.DP_METRIC_KEYS
    return metrics


def device_of(model: nn.Module) -> Any:
    import torch

    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def _update_tensor(h: Any, tensor: Any) -> None:
    import torch

    if isinstance(tensor, torch.Tensor):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    else:
        h.update(repr(tensor).encode())


def state_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        _update_tensor(h, tensor)
    return h.hexdigest()


def history_minus(after: list[HistoryEntry], before: list[HistoryEntry]) -> list[HistoryEntry]:
    """Entries `after` has beyond `before` (both canonical); raises if `before` is not contained in `after`."""
    remaining = {(z, q): n for z, q, n in before}
    out: list[HistoryEntry] = []
    for z, q, n in after:
        extra = n - remaining.pop((z, q), 0)
        if extra < 0:
            raise RuntimeError("the accountant history shrank during training")
        if extra:
            out.append((z, q, extra))
    if any(n > 0 for n in remaining.values()):
        raise RuntimeError("the accountant lost part of the restored history during training")
    return out

