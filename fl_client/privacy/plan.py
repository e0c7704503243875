"""The DP-SGD plan of a round: the sampling rate and step counts exactly as Opacus runs them, and the noise.

Every parameter of the mechanism depends only on values that are public: the coordinator's settings and the
site's *public* patient count N (declared by the site, `fl_client.settings.declared_patient_count`), never
on its exact number of patients. With ``K = ceil(N / B)`` steps per epoch, Opacus' `DPDataLoader` samples
every patient independently with probability ``q = 1 / K`` and yields ``K`` batches per epoch, the noisy
sum of clipped per-patient gradients is divided by the public expected batch size ``N / K``, the accountant
is told ``q``, and the round's FedAvg weight is N. So adding or removing one patient changes nothing but
that patient's own inclusion: the add/remove-one-patient guarantee holds exactly as accounted. The noise
multiplier is calibrated once per run by Opacus' `get_noise_multiplier` for the coordinator's target
epsilon over every local step planned for the run (rounds x local epochs x steps per epoch), or taken from
the configuration.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared_model import protocol
from shared_model.config import PatientDPConfig
from shared_model.dp_accounting import (
    HistoryEntry,
    calibrate_noise,
    epsilon_for,
    merge_history,
    opacus_sampling,
)

__all__ = ["DPPlan", "HistoryEntry", "calibrate_noise", "epsilon_for", "make_plan", "merge_history",
           "opacus_sampling", "patient_dp_config"]


def patient_dp_config(privacy_cfg: PatientDPConfig | Mapping[str, Any]) -> PatientDPConfig:
    """`privacy_cfg` as the shared schema: a `PatientDPConfig` as is, a mapping validated by it.

    Also requires exactly one of target_epsilon and noise_multiplier, which the schema checks only when
    ``enabled`` is set: a plan always needs a source for its noise.
    """
    cfg = (privacy_cfg if isinstance(privacy_cfg, PatientDPConfig)
           else PatientDPConfig.from_dict(dict(privacy_cfg), source=protocol.PRIVACY_CONFIG))
    if (cfg.target_epsilon is None) == (cfg.noise_multiplier is None):
        raise ValueError(f"{protocol.PRIVACY_CONFIG}: exactly one of target_epsilon or noise_multiplier must be set")
    return cfg


@dataclass(frozen=True)
class DPPlan:
    """What DP-SGD will do at this site in this round, and what was planned for the whole run."""

    public_count: int
    count_source: str
    batch_size: int
    local_epochs: int
    total_rounds: int
    sample_rate: float
    steps_per_epoch: int
    steps_round: int
    steps_planned: int
    noise_multiplier: float
    max_grad_norm: float
    delta: float
    accountant: str
    target_epsilon: float | None

    def entry(self) -> HistoryEntry:
        return (self.noise_multiplier, self.sample_rate, self.steps_round)

    @property
    def expected_batch_size(self) -> float:
        """The public divisor of the noisy gradient sum: N / K, never the exact batch or patient count."""
        return self.public_count / self.steps_per_epoch


def make_plan(privacy_cfg: PatientDPConfig | Mapping[str, Any], *, public_count: int, batch_size: int,
              local_epochs: int, total_rounds: int, calibrated: dict[str, float] | None = None,
              count_source: str = "declared") -> DPPlan:
    """The round's DP-SGD plan from the coordinator's `privacy.patient` section and the site's public count.

    `privacy_cfg` is a `PatientDPConfig` (a plain mapping is validated with it). `calibrated` caches noise
    multipliers already searched for (the search costs seconds); it is updated.
    """
    cfg = patient_dp_config(privacy_cfg)
    accountant, delta = cfg.accountant, float(cfg.delta)
    target = float(cfg.target_epsilon) if cfg.target_epsilon is not None else None
    noise = float(cfg.noise_multiplier) if cfg.noise_multiplier is not None else None
    if local_epochs < 1 or total_rounds < 1:
        raise ValueError(f"local_epochs ({local_epochs}) and total_rounds ({total_rounds}) must be >= 1")
    q, steps_epoch = opacus_sampling(public_count, batch_size)
    steps_round = local_epochs * steps_epoch
    steps_planned = total_rounds * steps_round
    if noise is None:
        assert target is not None
        key = json.dumps([target, delta, q, steps_planned, accountant])
        if calibrated is not None and key in calibrated:
            noise = float(calibrated[key])
        else:
            try:
                noise = calibrate_noise(target, delta, q, steps_planned, accountant)
            except ValueError as exc:
                raise ValueError(f"privacy.patient.{exc}") from None
            if calibrated is not None:
                calibrated[key] = noise
    return DPPlan(public_count=int(public_count), count_source=count_source,
                  batch_size=batch_size, local_epochs=local_epochs, total_rounds=total_rounds,
                  sample_rate=q, steps_per_epoch=steps_epoch, steps_round=steps_round, steps_planned=steps_planned,
                  noise_multiplier=float(noise), max_grad_norm=float(cfg.max_grad_norm), delta=delta,
                  accountant=accountant, target_epsilon=target)
