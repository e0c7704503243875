"""The privacy accounting both roles compute the same way: DP-SGD's sampling plan, compositions and their epsilon.

A site plans and accounts its DP-SGD and its DP evaluation replies with these functions; the coordinator
recomputes every epsilon a site reports with the same ones (`fl_server.privacy.replies`), so a claim that does
not follow from the mechanism the site says it ran is caught. Everything here is a pure function of public
values (noise multipliers, sample rates, step counts, delta) and uses Opacus' accountants; it reads no file.

A composition ("history") is a list of Opacus accountant entries ``(noise_multiplier, sample_rate, steps)``.
A Gaussian release without sampling (one evaluation reply) is the entry ``(sigma, 1.0, 1)`` for a query of
L2 sensitivity 1 whose noise has standard deviation ``sigma``: Opacus' RDP accountant then gives the Gaussian
mechanism's own Renyi divergence, ``alpha / (2 sigma^2)``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence

HistoryEntry = tuple[float, float, int]  # Opacus accountant history: (noise_multiplier, sample_rate, steps)
ACCOUNTANTS = ("rdp", "prv")


def opacus_sampling(public_count: int, batch_size: int) -> tuple[float, int]:
    """``(sample rate, steps per epoch)`` of Poisson sampling for a public patient count and batch size.

    ``K = ceil(N / min(B, N))`` batches; Opacus' `DPDataLoader` with sample rate ``1 / K`` runs
    ``int(1 / sample_rate)`` steps (one fewer for some K because of float rounding, e.g. 93), and
    `PrivacyEngine.make_private` accounts ``q = 1 / len(dp_loader)``; so the plan takes ``q = 1 / steps``,
    the rate that is both sampled and accounted.
    """
    if public_count <= 0:
        raise ValueError(f"public patient count must be positive, got {public_count}; DP-SGD needs patients")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    batches = math.ceil(public_count / min(batch_size, public_count))
    steps = int(1 / (1 / batches))
    return 1 / steps, steps


def merge_history(entries: Iterable[Sequence[float]]) -> list[HistoryEntry]:
    """Canonical accountant history: steps of identical (noise, rate) pairs summed, first-seen order.

    Composition of Gaussian mechanisms does not depend on their order, so this is the same guarantee in
    fewer entries (Opacus itself only merges consecutive entries).
    """
    out: dict[tuple[float, float], int] = {}
    for z, q, steps in entries:
        key = (float(z), float(q))
        out[key] = out.get(key, 0) + int(steps)
    return [(z, q, n) for (z, q), n in out.items() if n > 0]


def check_history(entries: Iterable[Sequence[float]], where: str) -> list[HistoryEntry]:
    """`entries` as a history, or a ValueError naming `where` for a malformed or impossible entry."""
    try:
        out = [(float(z), float(q), int(n)) for z, q, n in entries]
    except (TypeError, ValueError):
        raise ValueError(f"{where}: not a list of (noise multiplier, sample rate, steps)") from None
    for z, q, n in out:
        if not (math.isfinite(z) and z > 0 and 0 < q <= 1 and n >= 0):
            raise ValueError(f"{where}: impossible entry ({z}, {q}, {n})")
    return out


def epsilon_for(history: Sequence[Sequence[float]], delta: float, accountant: str) -> float:
    """Epsilon at `delta` of a history, by Opacus' accountant of the given kind (0 for no history)."""
    entries = tuple(merge_history(history))
    return _epsilon_cached(entries, float(delta), accountant) if entries else 0.0


@functools.lru_cache(maxsize=256)
def _epsilon_cached(entries: tuple[HistoryEntry, ...], delta: float, accountant: str) -> float:
    # The budget check before a round and the report after it ask for the same history: compute it once.
    from opacus.accountants import create_accountant

    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant {accountant!r}: expected one of {', '.join(ACCOUNTANTS)}")
    acct = create_accountant(mechanism=accountant)
    acct.history = list(entries)
    return float(acct.get_epsilon(delta=delta))


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """Noise multiplier reaching `target_epsilon` after `steps` Poisson-sampled steps (Opacus' search)."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=steps, accountant=accountant))
    except ValueError as exc:
        raise ValueError(
            f"target_epsilon={target_epsilon} cannot be reached with delta={delta}, sample rate {sample_rate:.4g} "
            f"and {steps} steps: {exc}"
        ) from None


@functools.lru_cache(maxsize=64)
def gaussian_sigma(epsilon: float, delta: float) -> float:
    """Standard deviation of the Gaussian noise that makes one release of an L2-sensitivity-1 query
    (epsilon, delta)-DP by the RDP accountant (the entry ``(sigma, 1.0, 1)``); epsilon must be positive."""
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a positive number, got {epsilon!r}")
    return calibrate_noise(epsilon, delta, 1.0, 1, "rdp")


def reported_epsilon_problem(claimed: float, history: Sequence[Sequence[float]], delta: float, accountant: str,
                             rtol: float = 1e-6) -> str | None:
    """Why a reported epsilon does not follow from the mechanism reported with it (None when it does).

    The claim must equal the accountant's epsilon of `history` at `delta` within `rtol`: a site that reports
    less than its mechanism spends is caught, and so is one that reports more (its figures are then wrong too).
    """
    if not (isinstance(claimed, (int, float)) and math.isfinite(claimed) and claimed >= 0):
        return f"reported epsilon {claimed!r} is not a valid epsilon"
    actual = epsilon_for(history, delta, accountant)
    if not math.isclose(float(claimed), actual, rel_tol=rtol, abs_tol=1e-9):
        return (f"reported epsilon {float(claimed):.6g} does not follow from the mechanism reported with it: "
                f"{accountant.upper()} gives {actual:.6g} at delta {delta:g} for {_describe(history)}")
    return None


def _describe(history: Sequence[Sequence[float]]) -> str:
    parts = [f"{int(n)} step(s) at noise multiplier {float(z):.4g} and sample rate {float(q):.4g}"
             for z, q, n in merge_history(history)]
    return "; ".join(parts) or "no step"
