"""Host-side privacy accounting for DP-SGD run inside each federated client.

Accounting is event based and stateless: the privacy spent by a client after ``t`` local DP-SGD
steps is a pure function of ``(noise_multiplier, sampling_rate, t, delta)``, computed by
``jax_privacy.accounting.DpsgdTrainingAccountant`` (on ``dp_accounting``) from the event

    SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), t).

When batches are padded to a fixed physical size ``B_max`` (as ffa_jax does, so the round never
recompiles), an overflowing Poisson sample is cut to a uniformly random subset of ``B_max``
examples. Pass ``truncation=Truncation(dataset_size=n_k, max_batch_size=B_max)`` to account
for exactly that mechanism: with the PLD accountant the event is
``TruncatedSubsampledGaussianDpEvent(n_k, q, B_max, sigma)`` (truncated Poisson sampling,
arXiv:2508.15089). The RDP accountant does not support it; there the untruncated Poisson event
is composed and the truncation is accounted in delta instead (:func:`rdp_delta_curve`): the
truncated and the untruncated mechanisms coincide unless some step overflows, so if the
untruncated one is (epsilon, delta)-DP, the truncated one is (epsilon, delta')-DP with

    delta' = delta + (1 + e^epsilon) * P_overflow,

where P_overflow bounds the probability that any of the composed steps overflows on either
neighbouring dataset (:func:`total_overflow`; the larger neighbour, n + 1 examples). (Coupling
argument: P[M(D) in S] <= P[M'(D) in S] + P_D <= e^eps P[M'(D') in S] + delta + P_D <=
e^eps P[M(D') in S] + e^eps P_D' + delta + P_D.) The plan, the ledger and every metrics line
report this delta' next to the RDP epsilon: the delta that really holds.

So that an RDP run still holds the delta it was asked for, ``ffa-jax train`` sizes B_max under
RDP for a per-step overflow of at most :func:`rdp_overflow_target` (1% of delta over all steps
at the target epsilon), and the planner calibrates the RDP epsilon at
:func:`rdp_calibration_delta`, delta minus the truncation's term, so that delta' <= delta.

Because the composition is always over *all* steps taken so far (rounds x local steps), a run
cannot forget earlier rounds (the bug of re-creating a privacy engine every round), and a
checkpoint only needs the step count to restore the accountant.

Nothing here may run inside ``jax.jit``: every function takes Python numbers and returns Python
numbers or NumPy arrays.

Measured costs (2 CPU cores, dp-accounting 0.6.0, q = 0.05, delta = 1e-5):

* ``epsilon_spent``: RDP 13-55 ms (independent of ``steps``; slower for small sigma); PLD with
  ``PLD_VALUE_DISCRETIZATION = 1e-3``: 8-90 ms for 50-10,000 steps (the dp-accounting default
  of 1e-4 costs 0.02-1.2 s and changes epsilon by at most 0.1% in this range).
* ``epsilon_curve``: RDP pays one accountant call, then ~0.2 ms per round; PLD composes the
  per-round PLD incrementally, ~5-10 ms per round (100 rounds ~1 s); with truncation the
  round's truncated PLD is built once (the quickstart's 10-round curve: 3.4 -> 0.6 CPU-s).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import math
import numbers
import pathlib
import warnings
from typing import NamedTuple

import dp_accounting
import numpy as np
import scipy.stats
from dp_accounting.pld import privacy_loss_distribution
from dp_accounting.rdp import rdp_privacy_accountant
from jax_privacy import accounting as jp_accounting

from ffa_jax.errors import ConfigError
from ffa_jax.privacy import sigma_cache

ACCOUNTANTS = ("pld", "rdp")

# PLD discretisation of the privacy-loss axis. 1e-3 is ~10x cheaper than the dp-accounting
# default (1e-4) and, being pessimistic, only over-reports epsilon, by <= 0.1% measured for
# q = 0.05, 50..10,000 steps, sigma 0.8..5 (3e-3 already over-reports by ~1% at 10k steps).
PLD_VALUE_DISCRETIZATION = 1e-3

# dp-accounting's default grid (1.1..10.9 step 0.1, 11..63, 128..1024) plus the gaps above 64,
# which hold the optimal order when epsilon < ~0.3. A denser low-order grid was measured to
# tighten epsilon by < 0.1% at twice the cost, so it is not used.
RDP_ORDERS = tuple(
    sorted(set(rdp_privacy_accountant.DEFAULT_RDP_ORDERS) | {80, 96, 160, 192, 384, 768, 2048})
)

# Calibration promise: the returned sigma spends epsilon in [(1 - rtol) * target, target].
CALIBRATION_RTOL = 0.01


class _DropRdpConvergenceWarnings(logging.Filter):
    """Drops dp-accounting's per-order convergence warnings at small sigma.

    Orders whose series does not converge are excluded from the minimum over orders, so the
    epsilon is still a valid upper bound; the warning repeats for every bisection step of a
    calibration and would drown the run's log.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


@contextlib.contextmanager
def quiet_rdp():
    logger = logging.getLogger("absl")
    flt = _DropRdpConvergenceWarnings()
    logger.addFilter(flt)
    try:
        yield
    finally:
        logger.removeFilter(flt)


# ----------------------------------------------------------------------------- validation


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ConfigError(
            f"privacy.accountant={accountant!r} is not supported; use one of {ACCOUNTANTS}."
        )


def _check_noise_multiplier(noise_multiplier: float) -> float:
    if (
        not isinstance(noise_multiplier, numbers.Real)
        or not math.isfinite(noise_multiplier)
        or noise_multiplier < 0
    ):
        raise ConfigError(
            f"privacy.noise_multiplier={noise_multiplier!r} must be a finite number >= 0 "
            "(0 means no noise, i.e. no privacy); set privacy.epsilon to calibrate it instead."
        )
    return float(noise_multiplier)


def _check_sampling_rate(sampling_rate: float) -> float:
    if (
        not isinstance(sampling_rate, numbers.Real)
        or not math.isfinite(sampling_rate)
        or not 0 < sampling_rate <= 1
    ):
        raise ConfigError(
            f"sampling_rate={sampling_rate!r} must be in (0, 1]; it is the client batch size "
            "divided by the client's number of examples, so check the client batch size and "
            "the data partition (a client with fewer examples than the batch size gives q > 1)."
        )
    return float(sampling_rate)


def _check_steps(steps: int, *, minimum: int, field: str = "steps") -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < minimum:
        raise ConfigError(
            f"{field}={steps!r} must be an integer >= {minimum}; it is the total number of "
            "local DP-SGD steps of one client (rounds x local steps)."
        )
    return int(steps)


def _check_delta(delta: float) -> float:
    if not isinstance(delta, numbers.Real) or not 0 < delta < 1:
        raise ConfigError(
            f"privacy.delta={delta!r} must be in (0, 1); the usual choice is 1e-5, or below "
            "1 / (number of examples of the largest client)."
        )
    return float(delta)


def check_epsilon(epsilon: float) -> float:
    if not isinstance(epsilon, numbers.Real) or not (epsilon > 0 and math.isfinite(epsilon)):
        raise ConfigError(
            f"privacy.epsilon={epsilon!r} must be a finite number > 0 (e.g. 1, 3 or 6); "
            "to train without privacy, disable privacy instead of setting epsilon."
        )
    return float(epsilon)


# ----------------------------------------------------------------------------- events


class Truncation(NamedTuple):
    """Fixed-size padding of Poisson batches: at most ``max_batch_size`` of a client's
    ``dataset_size`` examples enter a step (a uniformly random subset when more are sampled)."""

    dataset_size: int
    max_batch_size: int


def _check_truncation(truncation: Truncation | None, q: float) -> Truncation | None:
    if truncation is None:
        return None
    n, b = truncation
    for name, v in (("dataset_size", n), ("max_batch_size", b)):
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"truncation.{name}={v!r} is invalid: must be a positive integer.")
    return Truncation(int(n), int(b))


def overflow_probability(dataset_size: int, sampling_rate: float, max_batch_size: int) -> float:
    """P(Binomial(dataset_size, q) > max_batch_size): one step's chance of truncation."""
    n, q, b = int(dataset_size), float(sampling_rate), int(max_batch_size)
    return 0.0 if b >= n else float(scipy.stats.binom.sf(b, n, q))


def total_overflow(truncation: Truncation, sampling_rate: float, steps: int) -> float:
    """P(at least one of ``steps`` independent Poisson draws at rate q overflows B_max), for
    the larger of two add/remove neighbours (``dataset_size + 1`` examples): the probability
    that the truncated mechanism departs from the untruncated one at all."""
    n, b = truncation
    p = overflow_probability(int(n) + 1, float(sampling_rate), int(b))
    if steps <= 0 or p == 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    return float(-math.expm1(int(steps) * math.log1p(-p)))


def truncation_delta(epsilon: float, overflow: float) -> float:
    """The delta the truncation adds to an (epsilon, delta) guarantee of the untruncated
    mechanism: ``(1 + e^epsilon) * overflow`` (capped at 1; see the module docstring)."""
    if overflow <= 0.0:
        return 0.0
    if not math.isfinite(epsilon) or epsilon > 700:
        return 1.0
    return float(min(1.0, (1.0 + math.exp(epsilon)) * overflow))


# Under RDP, the share of delta that B_max leaves to the truncation (rdp_overflow_target).
RDP_TRUNCATION_SHARE = 0.01


def rdp_overflow_target(epsilon: float, delta: float, steps: int) -> float:
    """The per-step overflow probability p for which the truncation costs at most
    ``RDP_TRUNCATION_SHARE x delta`` under RDP after ``steps`` steps at ``epsilon``:
    ``(1 + e^epsilon) x steps x p = share x delta`` (the union bound over the steps is at least
    :func:`total_overflow`). Used to size B_max (``ffa_jax.perf.batch_overflow_probability``);
    0.0 when epsilon is not finite."""
    if not math.isfinite(epsilon) or epsilon > 700 or steps <= 0:
        return 0.0
    return RDP_TRUNCATION_SHARE * float(delta) / ((1.0 + math.exp(epsilon)) * int(steps))


def rdp_calibration_delta(
    epsilon: float, delta: float, sampling_rate: float, steps: int, truncation: Truncation | None
) -> float:
    """The delta at which to calibrate (and read) the RDP epsilon of ``steps`` truncated
    steps so that, with the truncation's term added (:func:`rdp_delta_curve`), the guarantee
    is ``(epsilon, delta)``: ``delta - (1 + e^epsilon) x total_overflow``. Returns ``delta``
    itself when there is no truncation, or when the term is not below ``delta`` (B_max too
    small for this delta: the run then reports the larger delta' that holds).

    Formal guarantee: an RDP epsilon <= ``epsilon`` at the returned delta_r gives a truncated
    mechanism that is ``(epsilon, delta_r + (1 + e^epsilon) P_overflow) = (epsilon, delta)``-DP.
    """
    if truncation is None:
        return float(delta)
    trunc = _check_truncation(truncation, sampling_rate)
    term = truncation_delta(epsilon, total_overflow(trunc, sampling_rate, steps))
    return float(delta) - term if term < float(delta) else float(delta)


def rdp_delta_curve(
    epsilon_curve: np.ndarray,
    sampling_rate: float,
    steps_per_round: int,
    delta: float,
    truncation: Truncation | None,
) -> np.ndarray:
    """``[rounds]`` delta that really holds with the RDP ``epsilon_curve`` (from
    :func:`epsilon_curve` with ``accountant="rdp"``) when batches are truncated:
    ``delta + (1 + e^eps_r) * total_overflow(steps after round r)``. Without truncation,
    ``delta`` every round.

    Formal guarantee: after round r, the truncated mechanism is
    ``(epsilon_curve[r], result[r])``-DP (add/remove one example, or one client when
    ``truncation`` describes client sampling).
    """
    eps = np.asarray(epsilon_curve, np.float64)
    if truncation is None:
        return np.full(len(eps), float(delta))
    trunc = _check_truncation(truncation, sampling_rate)
    out = [
        min(
            1.0,
            float(delta)
            + truncation_delta(
                float(e), total_overflow(trunc, sampling_rate, steps_per_round * (r + 1))
            ),
        )
        for r, e in enumerate(eps)
    ]
    return np.maximum.accumulate(np.asarray(out, np.float64))


def step_event(sigma: float, q: float, truncation: Truncation | None, accountant: str):
    """One DP-SGD step's DpEvent: dp-accounting's truncated subsampled Gaussian (PLD with a
    ``truncation``) or the Poisson-subsampled Gaussian (RDP, which puts truncation into delta)."""
    if truncation is not None and accountant == "pld":
        return dp_accounting.TruncatedSubsampledGaussianDpEvent(
            dataset_size=truncation.dataset_size,
            sampling_probability=q,
            truncated_batch_size=truncation.max_batch_size,
            noise_multiplier=sigma,
        )
    return dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))


def dp_sgd_event(
    noise_multiplier: float, sampling_rate: float, steps: int
) -> dp_accounting.DpEvent:
    """The DpEvent of ``steps`` DP-SGD steps with Poisson sampling and the Gaussian mechanism.

    Args:
        noise_multiplier: sigma, the noise std divided by the clipping norm; >= 0.
        sampling_rate: q, the probability that each example of the client is in a batch.
        steps: number of steps composed; >= 0.

    Returns:
        ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps)``.

    Raises:
        ConfigError: on an out-of-range argument.

    Formal guarantee:
        The event describes sample-level DP of one client's local training under
        add/remove-one-example neighbouring datasets, given that each step releases the sum of
        per-example gradients clipped to norm C plus N(0, (sigma C)^2 I) and that the batch is
        a Poisson sample with rate q. The server adds no noise.
    """
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            _check_sampling_rate(sampling_rate),
            dp_accounting.GaussianDpEvent(_check_noise_multiplier(noise_multiplier)),
        ),
        _check_steps(steps, minimum=0),
    )


def accountant_config(accountant: str = "pld") -> jp_accounting.DpAccountantConfig:
    """jax-privacy's accountant configuration as ffa_jax uses it: PLD with discretisation
    ``PLD_VALUE_DISCRETIZATION`` (tight) or RDP at ``RDP_ORDERS`` (an upper bound of PLD's
    epsilon), both under add/remove one unit."""
    _check_accountant(accountant)
    if accountant == "pld":
        return jp_accounting.PldAccountantConfig(
            value_discretization_interval=PLD_VALUE_DISCRETIZATION
        )
    return jp_accounting.RdpAccountantConfig(orders=RDP_ORDERS)


def make_accountant(
    accountant: str = "pld",
    neighboring_relation: dp_accounting.NeighboringRelation = (
        dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    ),
) -> dp_accounting.PrivacyAccountant:
    """A fresh dp-accounting accountant: :func:`accountant_config`'s under add/remove one
    unit; under another relation (jax-privacy's configurations are add/remove only) the same
    accountant built directly: PLD with ``PLD_VALUE_DISCRETIZATION`` (``REPLACE_SPECIAL``:
    zero-out, sample-level BandMF's amplified events) or RDP at ``RDP_ORDERS`` (``REPLACE_ONE``:
    fixed-size client sampling, which dp-accounting's PLD cannot account; refused by the
    callers)."""
    if neighboring_relation == dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE:
        return accountant_config(accountant).create_accountant()
    _check_accountant(accountant)
    if accountant == "pld":
        return dp_accounting.pld.PLDAccountant(
            neighboring_relation, value_discretization_interval=PLD_VALUE_DISCRETIZATION
        )
    return dp_accounting.rdp.RdpAccountant(RDP_ORDERS, neighboring_relation)


def dp_params(
    sigma: float, q: float, delta: float, truncation: Truncation | None, accountant: str
) -> jp_accounting.DpParams:
    """jax-privacy's ``DpParams`` of DP-SGD: Poisson rate q, noise multiplier ``sigma`` and,
    under PLD only (RDP puts truncation into delta), truncation to ``max_batch_size``.

    The library takes q as ``batch_size / num_samples`` (integers): with a truncation, the
    client's n and q = b / n (to 1e-9, callers may round q); without one only the ratio
    enters, and ``q.as_integer_ratio()`` gives the same q bit for bit.
    """
    if truncation is None:
        batch, n = float(q).as_integer_ratio()
    else:
        n = truncation.dataset_size
        batch = round(q * n)
        if not math.isclose(batch / n, q, rel_tol=1e-9):
            raise ConfigError(
                f"sampling_rate={q!r} is not a batch size over the client's "
                f"{n} examples (truncation.dataset_size): truncated Poisson sampling "
                "accounts q = b / n."
            )
    return jp_accounting.DpParams(
        noise_multipliers=sigma,
        num_samples=n,
        delta=delta,
        batch_size=batch,
        truncated_batch_size=(
            truncation.max_batch_size if truncation is not None and accountant == "pld" else None
        ),
    )


def _epsilon(
    sigma: float, q: float, steps: int, delta: float, accountant: str, truncation=None
) -> float:
    """Epsilon of ``steps`` DP-SGD steps from ``jax_privacy.accounting.DpsgdTrainingAccountant``
    (which composes dp-accounting's Poisson-sampled, or truncated, Gaussian event)."""
    if steps == 0:
        return 0.0
    if sigma == 0.0:
        return math.inf
    with quiet_rdp():
        acc = jp_accounting.DpsgdTrainingAccountant(accountant_config(accountant))
        return float(acc.compute_epsilon(steps, dp_params(sigma, q, delta, truncation, accountant)))


def epsilon_spent(
    noise_multiplier: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    accountant: str = "pld",
    truncation: Truncation | None = None,
) -> float:
    """Epsilon spent by one client after ``steps`` DP-SGD steps, at the given delta.

    Args:
        noise_multiplier: sigma (noise std / clipping norm), >= 0.
        sampling_rate: q = client batch size / client examples, in (0, 1].
        steps: total local steps of the client so far (rounds x local steps), >= 0.
        delta: target delta, in (0, 1).
        accountant: one of ``ACCOUNTANTS``.
        truncation: the fixed physical batch size, when batches are padded/truncated (see
            the module docstring); PLD accounts for it exactly in epsilon; with RDP the
            epsilon is the untruncated event's and the truncation goes into delta
            (:func:`rdp_delta_curve` gives the delta that then holds).

    Returns:
        epsilon as a Python float: 0.0 if ``steps == 0``; ``math.inf`` if sigma is 0 and
        ``steps > 0``.

    Raises:
        ConfigError: on an out-of-range argument.

    Formal guarantee:
        The client's released noisy gradient sums are (epsilon, delta)-DP with respect to
        adding or removing one of its examples (sample-level DP per client); the server adds
        no noise, and every later use of the released values (averaging, server optimiser)
        is post-processing.
    """
    sigma = _check_noise_multiplier(noise_multiplier)
    q = _check_sampling_rate(sampling_rate)
    steps = _check_steps(steps, minimum=0)
    delta = _check_delta(delta)
    _check_accountant(accountant)
    return _epsilon(sigma, q, steps, delta, accountant, _check_truncation(truncation, q))


@functools.lru_cache(maxsize=64)
def epsilon_curve(
    noise_multiplier: float,
    sampling_rate: float,
    steps_per_round: int,
    rounds: int,
    delta: float,
    accountant: str = "pld",
    truncation: Truncation | None = None,
) -> np.ndarray:
    """Epsilon spent by one client after each round (cached; the array is read-only).

    RDP composes linearly, so the RDP vector of one step is computed once and scaled per
    round (~0.2 ms a round). PLD composes the per-round PLD incrementally (~5-10 ms a round);
    the last value equals ``epsilon_spent(..., steps_per_round * rounds, ...)`` up to float
    rounding of the convolutions (relative 1e-8 measured).

    Args:
        noise_multiplier: sigma, >= 0.
        sampling_rate: q, in (0, 1].
        steps_per_round: local DP-SGD steps a client takes each round, >= 1.
        rounds: number of rounds, >= 1.
        delta: target delta, in (0, 1).
        accountant: one of ``ACCOUNTANTS``.

    Returns:
        float64 array of shape ``[rounds]``: entry ``r`` is epsilon after rounds ``0..r``.
        Monotone non-decreasing (a running maximum guards the discretised composition, which
        keeps every entry a valid upper bound); all ``inf`` if sigma is 0.

    Raises:
        ConfigError: on an out-of-range argument.

    Formal guarantee:
        As ``epsilon_spent``: sample-level (epsilon, delta)-DP per client after each round.
    """
    sigma = _check_noise_multiplier(noise_multiplier)
    q = _check_sampling_rate(sampling_rate)
    spr = _check_steps(steps_per_round, minimum=1, field="steps_per_round")
    rounds = _check_steps(rounds, minimum=1, field="rounds")
    delta = _check_delta(delta)
    _check_accountant(accountant)
    truncation = _check_truncation(truncation, q)
    if sigma == 0.0:
        return np.full(rounds, np.inf)

    if truncation is not None and accountant == "pld":
        # What dp-accounting's PLDAccountant does when it composes the truncated round event
        # (identity, then compose the event's PLD self-composed spr times), except that the
        # round's PLD is built once, not once per round: building a truncated subsampled
        # Gaussian PLD is the costly part (3.4 of the quickstart's 7 CPU-seconds of privacy
        # planning). Bit-identical to composing the event round by round (tested).
        round_pld = privacy_loss_distribution.from_truncated_subsampled_gaussian_mechanism(
            dataset_size=truncation.dataset_size,
            sampling_probability=q,
            truncated_batch_size=truncation.max_batch_size,
            noise_multiplier=sigma,
            value_discretization_interval=PLD_VALUE_DISCRETIZATION,
            neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
        ).self_compose(spr)
        total = privacy_loss_distribution.identity(
            value_discretization_interval=PLD_VALUE_DISCRETIZATION
        )
        eps = []
        for _ in range(rounds):
            total = total.compose(round_pld)
            eps.append(total.get_epsilon_for_delta(delta))
    elif accountant == "rdp":
        with quiet_rdp():
            acc = make_accountant("rdp").compose(dp_sgd_event(sigma, q, 1))
        rdp_step = getattr(acc, "_rdp", None)
        if rdp_step is None:
            # The private RDP vector moved in a dp-accounting release: stay correct, pay more.
            eps = [_epsilon(sigma, q, spr * (r + 1), delta, "rdp") for r in range(rounds)]
        else:
            orders = np.asarray(RDP_ORDERS)
            # The same product the accountant forms for count = total steps, so the last
            # entry equals epsilon_spent bit for bit.
            eps = [
                rdp_privacy_accountant.compute_epsilon(orders, (spr * (r + 1)) * rdp_step, delta)[0]
                for r in range(rounds)
            ]
    else:
        one_round = privacy_loss_distribution.from_gaussian_mechanism(
            standard_deviation=sigma,
            sampling_prob=q,
            value_discretization_interval=PLD_VALUE_DISCRETIZATION,
        ).self_compose(spr)
        total = one_round
        eps = [total.get_epsilon_for_delta(delta)]
        for _ in range(rounds - 1):
            total = total.compose(one_round)
            eps.append(total.get_epsilon_for_delta(delta))
    out = np.maximum.accumulate(np.asarray(eps, dtype=np.float64))
    out.flags.writeable = False  # shared by the cache
    return out


# ----------------------------------------------------------------------------- calibration


def _sig(x: float, digits: int = 12) -> float:
    """Rounds to significant digits so that float noise in the arguments hits the cache."""
    return float(f"{x:.{digits}g}")


class _MemoAccountant(jp_accounting.DpsgdTrainingAccountant):
    """jax-privacy's DP-SGD accountant remembering each sigma's epsilon: the bracket search
    and the library's root finder share the costly PLD evaluations."""

    def __init__(self, config: jp_accounting.DpAccountantConfig):
        super().__init__(config)
        self.seen: dict[float, float] = {}

    def _compute_epsilon(self, num_updates, dp_params):
        sigma = float(dp_params.noise_multipliers)
        if sigma not in self.seen:
            self.seen[sigma] = float(super()._compute_epsilon(num_updates, dp_params))
        return self.seen[sigma]


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sampling_rate: float,
    steps: int,
    accountant: str = "pld",
    truncation: Truncation | None = None,
) -> float:
    """Smallest noise multiplier whose epsilon after ``steps`` steps is at most the target.

    ``jax_privacy.accounting.calibrate_noise_multiplier`` (Brent's method, returning a sigma
    whose epsilon is at most the target) runs on a bracket found here, with a tolerance of
    1e-4 x its lower end: RDP doubles/halves from 1; PLD starts from the RDP sigma (RDP's
    conversion is looser than PLD's: checked, not assumed) and PLD with truncation from the
    untruncated PLD sigma (truncation only adds epsilon), so few costly PLD evaluations are
    needed. Results are cached on the arguments rounded to 12 significant digits, in the
    process and on disk (:mod:`ffa_jax.privacy.sigma_cache`: a remembered sigma is re-checked
    with this accountant, one evaluation, and used only if it keeps the promise below).

    Args:
        target_epsilon: privacy budget epsilon, > 0.
        delta: target delta, in (0, 1).
        sampling_rate: q = client batch size / client examples, in (0, 1].
        steps: total local steps of one client over the whole run, >= 1.
        accountant: one of ``ACCOUNTANTS``; use the same one for ``epsilon_spent``.
        truncation: as for :func:`epsilon_spent` (PLD calibrates the truncated event).

    Returns:
        sigma as a Python float, with
        ``(1 - CALIBRATION_RTOL) * target_epsilon <= epsilon_spent(sigma, ...) <= target``
        for the same accountant.

    Raises:
        ConfigError: on an out-of-range argument, or if no sigma in reach meets the target.

    Warns:
        UserWarning: when the target is met by every sigma the search can reach (only if the
            probability that an example is ever sampled, ~q x steps, is about delta or
            less); the smallest sigma tried is returned, and the 1% promise does not hold.

    Formal guarantee:
        Training a client for ``steps`` DP-SGD steps with this sigma (clipping norm C, noise
        N(0, (sigma C)^2) on the clipped sum, Poisson rate q, truncated as ``truncation``
        says) is sample-level (target_epsilon, delta)-DP per client under add/remove-one
        neighbouring datasets.
    """
    eps = check_epsilon(target_epsilon)
    delta = _check_delta(delta)
    q = _check_sampling_rate(sampling_rate)
    steps = _check_steps(steps, minimum=1)
    _check_accountant(accountant)
    truncation = _check_truncation(truncation, q)
    if accountant != "pld":
        truncation = None  # RDP accounts the truncation in delta, not in sigma
    return _calibrate_cached(_sig(eps), _sig(delta), _sig(q), steps, accountant, truncation)


@functools.cache
def _source_hash() -> str:
    """A hash of this module's source (the calibration's code), for the sigma memo's keys."""
    return hashlib.sha256(pathlib.Path(__file__).read_bytes()).hexdigest()[:16]


@functools.lru_cache(maxsize=256)
def _calibrate_cached(
    eps: float,
    delta: float,
    q: float,
    steps: int,
    accountant: str,
    truncation: Truncation | None = None,
) -> float:
    config = accountant_config(accountant)
    acc = _MemoAccountant(config)
    params = dp_params(1.0, q, delta, truncation, accountant)

    def eps_at(sigma: float) -> float:
        if sigma == 0.0:
            return math.inf
        with quiet_rdp():
            return acc.compute_epsilon(
                steps, dataclasses.replace(params, noise_multipliers=float(sigma))
            )

    # A sigma remembered on disk by an earlier process is a hint: it is used only if this
    # accountant confirms the promise a fresh search makes (epsilon within 1% below the
    # target), so a stale or edited file cannot weaken the guarantee.
    memo_key = {
        "epsilon": eps,
        "delta": delta,
        "q": q,
        "steps": steps,
        "accountant": accountant,
        "truncation": None if truncation is None else list(truncation),
        "accountant_config": hashlib.sha256(repr(config).encode()).hexdigest()[:16],
        # Another search (an edit of this file) may return another sigma within the promise:
        # the memo answers only the code that wrote it, so a run's sigma is a function of its
        # code and parameters.
        "code": _source_hash(),
    }
    remembered = sigma_cache.lookup(memo_key)
    if remembered is not None and (1 - CALIBRATION_RTOL) * eps <= eps_at(remembered) <= eps:
        return remembered

    # (start, factor up, steps up, factor down, lowest sigma tried) of the bracket search.
    if accountant == "rdp":
        start, up, n_up, down, floor = 1.0, 2.0, 30, 0.5, 2.0**-20
    else:
        # Truncation only adds epsilon, so the untruncated sigma is a lower start.
        start = _calibrate_cached(eps, delta, q, steps, "pld" if truncation else "rdp")
        up, n_up, down, floor = 1.1, 50, 0.8, start / 16
    if truncation is not None and eps_at(start) <= eps:
        # Truncation only adds epsilon: every sigma below the untruncated answer overspends
        # (beyond the search tolerance) and this one meets the target, so it is the answer
        # within the same tolerance. The down-walk it skips evaluated the truncated PLD at
        # smaller sigmas, ~0.6-0.8 s each (quickstart: 3.65 s -> 1.87 s on 2 idle cores).
        sigma = start
    else:
        lo = hi = start
        for _ in range(n_up):
            if eps_at(hi) <= eps:
                break
            lo, hi = hi, hi * up
        else:
            raise ConfigError(
                f"privacy.epsilon={eps} cannot be reached with sigma <= {hi:.3g} for "
                f"delta={delta}, q={q}, steps={steps} ({accountant}, truncation={truncation}); "
                "raise epsilon or delta, or the physical batch size."
            )
        # Walk down to a sigma that overspends. The walk is bounded because PLD construction cost
        # grows like 1/sigma^2; the bound is only reached when the chance that an example is ever
        # sampled is ~delta or less, where every sigma in reach meets the target.
        while eps_at(lo) <= eps:
            if lo <= floor:
                warnings.warn(
                    f"privacy.epsilon={eps} is met by every noise multiplier down to {lo:.3g} "
                    f"(delta={delta}, q={q}, steps={steps}: sampling is too rare to leak); "
                    f"returning {lo:.3g}, whose epsilon may be far below the target.",
                    stacklevel=3,
                )
                return lo
            hi = lo
            # epsilon == 0 means delta alone covers the mechanism: skip the costly walk.
            lo = floor if eps_at(lo) == 0.0 else max(lo * down, floor)
        with quiet_rdp():
            sigma = jp_accounting.calibrate_noise_multiplier(
                target_epsilon=eps,
                accountant=acc,
                batch_sizes=params.batch_size,
                num_updates=steps,
                num_samples=params.num_samples,
                target_delta=delta,
                truncated_batch_size=params.truncated_batch_size,
                initial_max_noise=hi,
                initial_min_noise=lo,
                tol=1e-4 * lo,
            )
    if eps_at(sigma) < (1 - CALIBRATION_RTOL) * eps:
        # Never seen in the measured grid; the sigma is still valid (epsilon <= target).
        warnings.warn(
            f"calibrated sigma={sigma:.6g} spends epsilon={eps_at(sigma):.6g}, more than "
            f"{CALIBRATION_RTOL:.0%} below privacy.epsilon={eps}; training is over-noised.",
            stacklevel=3,
        )
    else:
        sigma_cache.remember(memo_key, float(sigma))
    return float(sigma)
