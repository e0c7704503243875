"""Site-level DP at the coordinator: Flower's central-DP strategy wrappers, tolerant of sites dropping out.

With ``privacy.site`` on, Flower's wrappers clip each site's whole model update (on the server, or at the
site with Flower's clipping mods) and add Gaussian noise to the average, so the released global model hides
any one hospital's contribution. With fixed clipping, Flower's `RdpAccountant` (no sampling amplification,
add-or-remove-one site) accounts every release. Adaptive clipping has no accountant in Flower.

Flower's wrappers assume every sampled site replies: with an accountant they skip the round otherwise. A
hospital going offline must not stop a consortium, so the wrappers used here (thin subclasses of Flower's)
set ``num_sampled_clients`` to the number of updates actually averaged, K, just before aggregating. The noise
on the average is then ``z * C / K``, i.e. ``z * C`` on the sum of K clipped updates, which is exactly the
Gaussian mechanism Flower's accountant composes (noise multiplier z, sensitivity C): the guarantee holds for
any K, with the number of participating sites treated as public (the coordinator sees who replied anyway).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from fl_server.config import ConfigError, ExperimentConfig
from shared_model import protocol

SERVER_ACCOUNTANT = "flwr RdpAccountant (no sampling amplification, add-or-remove-one site)"


class _RoundRecords:
    """Per-round facts the ledger needs and Flower's wrappers do not keep."""

    llnm_mode: str

    def _llnm_init(self, mode: str) -> None:
        self.llnm_mode = mode
        self.llnm_rounds: dict[int, dict[str, Any]] = {}

    def _llnm_record(self, server_round: int, **values: Any) -> None:
        self.llnm_rounds.setdefault(server_round, {}).update(values)

    def _llnm_count_aggregated(self, replies: list[Message]) -> list[Message]:
        """The replies that will be averaged; when every sampled site answered, K is their number."""
        ok = [r for r in replies if not r.has_error()]
        if ok and len(ok) == len(replies):
            self.num_sampled_clients = len(ok)  # type: ignore[attr-defined]
        return ok


def rebuild_accountant(accountant: Any, population: int, compositions: Iterable[tuple[float, int, int]]) -> Any:
    """A fresh Flower RdpAccountant with `population`, composing (noise multiplier, sample size, count)."""
    from flwr.serverapp import GaussianPrivacyEvent, PrivacyConfig, RdpAccountant

    old = accountant.config
    new = RdpAccountant(PrivacyConfig(target_delta=old.target_delta, population_size=population,
                                      neighboring_relation=old.neighboring_relation,
                                      sampling_method=old.sampling_method, max_epsilon=old.max_epsilon))
    for noise, sample, count in compositions:
        new.compose(GaussianPrivacyEvent(noise_multiplier=float(noise), sample_size=min(int(sample), population),
                                         population_size=population), int(count))
    return new


def accountant_compositions(accountant: Any) -> list[tuple[float, int, int]]:
    """(noise multiplier, sample size, count) of every event a Flower RdpAccountant has composed."""
    state = accountant.state_dict()
    return [(c["event"]["noise_multiplier"], c["event"]["sample_size"], c["count"]) for c in state["compositions"]]


class _FixedMixin(_RoundRecords):
    """Flower's fixed-clipping wrappers, with K = the sites actually averaged (see the module docstring)."""

    noise_multiplier: float
    clipping_norm: float
    num_sampled_clients: int
    accountant: Any

    def _prepare_accounting(self, server_round: int, messages: Iterable[Message]) -> Iterable[Message]:
        msgs = list(messages)
        self._llnm_record(server_round, sites_sampled=len(msgs))
        if msgs:
            self.num_sampled_clients = len(msgs)
            if self.accountant is not None and len(msgs) > self.accountant.config.population_size:
                self.accountant = rebuild_accountant(self.accountant, len(msgs),
                                                     accountant_compositions(self.accountant))
        return super()._prepare_accounting(server_round, msgs)  # type: ignore[misc]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        ok = self._llnm_count_aggregated(replies)
        self._llnm_record(server_round, sites_aggregated=len(ok), clipping_norm=float(self.clipping_norm),
                          noise_multiplier=float(self.noise_multiplier),
                          noise_stddev=float(self.noise_multiplier * self.clipping_norm / max(len(ok), 1)))
        return super().aggregate_train(server_round, replies)  # type: ignore[misc]


class _AdaptiveMixin(_RoundRecords):
    """Flower's adaptive-clipping wrappers, with K = the sites actually averaged."""

    noise_multiplier: float
    clipping_norm: float
    num_sampled_clients: int

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        msgs = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
        self._llnm_record(server_round, sites_sampled=len(msgs))
        return msgs

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        ok = self._llnm_count_aggregated(replies)
        used = float(self.clipping_norm)
        out = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        # Flower adds the noise with the norm it has just adapted, so the noise scale follows that norm.
        k = max(len(ok), 1)
        self._llnm_record(server_round, sites_aggregated=len(ok), clipping_norm=used,
                          clipping_norm_next=float(self.clipping_norm),
                          noise_multiplier=float(self.noise_multiplier),
                          noise_stddev=float(self.noise_multiplier * self.clipping_norm / k),
                          effective_noise_multiplier=float(self.noise_multiplier * self.clipping_norm / used))
        return out


class _ClientSideMarker:
    """Tells the site's `site_dp_clipping_mod` which of Flower's clipping mods to apply."""

    llnm_mode: str

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        config[protocol.SITE_DP_CLIPPING] = self.llnm_mode
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]


class SiteDPServerFixed(_FixedMixin, DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping, tolerant of dropouts."""


class SiteDPClientFixed(_ClientSideMarker, _FixedMixin, DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed clipping (sites clip with `fixedclipping_mod`), tolerant of dropouts."""


class SiteDPServerAdaptive(_AdaptiveMixin, DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping, tolerant of dropouts (no accountant exists)."""


class SiteDPClientAdaptive(_ClientSideMarker, _AdaptiveMixin, DifferentialPrivacyClientSideAdaptiveClipping):
    """Flower's client-side adaptive clipping (sites clip with `adaptiveclipping_mod`), no accountant."""


_WRAPPERS: dict[str, type] = {
    "server-fixed": SiteDPServerFixed,
    protocol.SITE_DP_CLIENT_FIXED: SiteDPClientFixed,
    "server-adaptive": SiteDPServerAdaptive,
    protocol.SITE_DP_CLIENT_ADAPTIVE: SiteDPClientAdaptive,
}


def flower_wrapper_name(strategy: Strategy) -> str:
    """The Flower class a wrapper here extends (what the ledger and the guarantee name)."""
    for cls in type(strategy).__mro__:
        if cls.__module__.startswith("flwr.") and cls.__name__.startswith("DifferentialPrivacy"):
            return cls.__name__
    return type(strategy).__name__


def wrap_with_site_dp(strategy: Strategy, exp: ExperimentConfig, num_sites_expected: int) -> Strategy:
    """Wrap `strategy` in Flower's DP wrapper for ``privacy.site.clipping``, with Flower's accountant if fixed.

    The accountant uses no sampling amplification (every connected site takes part in every round) and
    add-or-remove-one site as the neighbouring relation, over a population of `num_sites_expected` sites.
    """
    site = exp.privacy.site
    cls = _WRAPPERS[site.clipping]
    num = max(int(num_sites_expected), 1)
    try:
        if site.clipping.endswith("fixed"):
            from flwr.serverapp import NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod

            accountant = RdpAccountant(PrivacyConfig(
                target_delta=site.delta, population_size=num,
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION, max_epsilon=site.max_epsilon))
            wrapped = cls(strategy, site.noise_multiplier, site.clipping_norm, num, accountant=accountant)
        else:
            wrapped = cls(strategy, site.noise_multiplier, num, initial_clipping_norm=site.clipping_norm,
                          target_clipped_quantile=site.target_clipped_quantile,
                          clipped_count_stddev=site.clipped_count_stddev)
    except ValueError as exc:
        text = str(exc)
        if "FedAvg.aggregate_train" in text:
            raise ConfigError(
                f"privacy.site.clipping={site.clipping}: Flower's accountant needs plain FedAvg aggregation, so "
                f"federation.strategy must be fedavg or fedprox (got {exp.federation.strategy}: a server "
                "optimiser changes what the noise protects)"
            ) from None
        if "clipped_count_stddev" in text:
            raise ConfigError(
                f"privacy.site.clipped_count_stddev: with {num} sites Flower's default is {num / 20:g}, too small "
                f"for noise_multiplier={site.noise_multiplier} (adaptive clipping needs noise_multiplier < "
                "2 * clipped_count_stddev); set privacy.site.clipped_count_stddev explicitly"
            ) from None
        raise ConfigError(f"privacy.site: {text}") from None
    wrapped._llnm_init(site.clipping)
    return wrapped
