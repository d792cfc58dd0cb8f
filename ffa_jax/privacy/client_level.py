"""Host-side accounting of client-level DP (DP-FedAvg): one event per round, composed over rounds.

Each round the server draws the participating clients (from the run's secret, independently
of the data), clips every participant's whole update to L2 norm S, adds ``N(0, (z S)^2 I)`` to the sum
and divides by the fixed expected number of participants. The round's DpEvent depends on how
the clients are drawn (``federated.client_sampling``):

* all clients every round (M = N): ``GaussianDpEvent(z)``; add/remove one client.
* ``poisson`` (each client independently with probability q = M / N):
  ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``; add/remove one client. When the round's
  client axis holds fewer than N slots (``max_clients`` P, padded with masked dummies), an
  overflowing sample is cut to a uniformly random subset of P clients, and the PLD accountant
  accounts for exactly that with ``TruncatedSubsampledGaussianDpEvent(N, q, P, z)``. RDP
  composes the untruncated event and the truncation is added to delta (:func:`delta_curve`),
  as for sample-level DP.
* ``fixed`` (exactly M of N uniformly without replacement):
  ``SampledWithoutReplacementDpEvent(N, M, GaussianDpEvent(z / 2))`` under the *replace-one*
  relation (N is public; one client's data is replaced by another's). Replacing one clipped
  update moves the sum by up to 2 S, so the Gaussian's multiplier relative to that sensitivity
  is z / 2. Only dp-accounting's RDP accountant (Wang, Balle, Kasiviswanathan 2019) supports
  this event; the PLD accountant does not, and asking for it raises ConfigError.

The run's event is ``SelfComposedDpEvent(round_event, T)``. Like :mod:`accounting`, nothing
here runs under jit; functions take and return Python numbers / NumPy arrays.

**Cyclic Poisson sampling** (``cycle_length`` b > 1, used by ``privacy.mechanism=banded_mf``):
the clients are split into b fixed, public groups (client k is in group k mod b; the last
``N mod b`` clients are left out) and round t samples each client of group t mod b with
probability q = M / (N // b). A client can then take part only every b-th round, so a
column-normalised b-banded strategy matrix has sensitivity 1 per participation, and the
amplified BandMF analysis (Choquette-Choo et al., "(Amplified) Banded Matrix Factorization",
NeurIPS 2023, Theorem 4; implemented by ``jax_privacy.accounting.DpsgdTrainingAccountant``
with ``cycle_length``) reduces the run to ``ceil(T / b)`` compositions of the Poisson(q)
sampled Gaussian on one group of N // b clients. Every function here applies that
reduction when ``cycle_length > 1``; with b = 1 nothing changes.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import dp_accounting
import numpy as np
from dp_accounting.rdp import rdp_privacy_accountant

from ffa_jax.config import CLIENT_SAMPLINGS
from ffa_jax.errors import ConfigError
from ffa_jax.privacy import accounting

NeighborRel = dp_accounting.NeighboringRelation


class ClientSampling(NamedTuple):
    """How the participants of a round are drawn: M of N clients, ``poisson`` or ``fixed``,
    in a client axis of ``max_clients`` slots (P; = the group size when no truncation can
    happen), from one of ``cycle_length`` groups (cyclic Poisson; 1 = all clients)."""

    num_clients: int
    clients_per_round: int
    sampling: str
    max_clients: int
    cycle_length: int = 1

    @property
    def group_size(self) -> int:
        """N // b: the clients a round samples from (N when ``cycle_length`` is 1)."""
        return self.num_clients // self.cycle_length

    @property
    def rate(self) -> float:
        """q = M / (N // b)."""
        return self.clients_per_round / self.group_size

    @property
    def full(self) -> bool:
        return self.clients_per_round == self.group_size

    def compositions(self, rounds: int) -> int:
        """How many times a client's group is sampled in ``rounds`` rounds: ceil(T / b)."""
        return -(-int(rounds) // self.cycle_length)

    @property
    def relation(self) -> NeighborRel:
        """The neighbouring relation the accounting of this sampling uses."""
        if self.sampling == "fixed" and not self.full:
            return NeighborRel.REPLACE_ONE
        return NeighborRel.ADD_OR_REMOVE_ONE

    @property
    def relation_text(self) -> str:
        if self.relation == NeighborRel.REPLACE_ONE:
            return "replace one client's data (N public)"
        return "add/remove one client's data"


def check_sampling(s: ClientSampling) -> ClientSampling:
    n, m, p, b = s.num_clients, s.clients_per_round, s.max_clients, s.cycle_length
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (n, m, p, b)):
        raise ConfigError(f"client sampling {s!r}: counts must be integers.")
    if b != 1:
        if b < 1 or s.sampling != "poisson" or m * b > n:
            raise ConfigError(
                f"privacy.bands={b}: cyclic Poisson client sampling needs bands >= 1, "
                f"federated.client_sampling=poisson (got {s.sampling!r}) and "
                f"federated.clients_per_round x bands <= federated.clients ({m} x {b} vs {n})."
            )
        n = n // b
    if not 1 <= m <= n:
        raise ConfigError(
            f"federated.clients_per_round={m} must be in [1, federated.clients={n}]: client-level "
            "DP needs at least one sampled client per round."
        )
    if s.sampling not in CLIENT_SAMPLINGS:
        raise ConfigError(
            f"federated.client_sampling={s.sampling!r}: use one of {CLIENT_SAMPLINGS}."
        )
    if not (min(m, n) <= p <= n):
        raise ConfigError(f"max_clients={p} must be in [{m}, {n}].")
    return ClientSampling(int(s.num_clients), int(m), s.sampling, int(p), int(b))


def _check_supported(s: ClientSampling, accountant: str) -> None:
    if s.relation == NeighborRel.REPLACE_ONE and accountant == "pld":
        raise ConfigError(
            "privacy.accountant='pld' cannot account client-level DP with "
            "federated.client_sampling=fixed (dp-accounting's PLD accountant has no "
            "sampling-without-replacement event); use privacy.accountant=rdp or "
            "federated.client_sampling=poisson."
        )


def round_event(z: float, s: ClientSampling, accountant: str = "pld") -> dp_accounting.DpEvent:
    """The DpEvent of one round of DP-FedAvg with noise multiplier ``z`` (std ``z S``).

    Formal guarantee:
      One round releases ``sum_{k sampled} clip_S(delta_k) + N(0, (z S)^2 I)``; under the
      relation ``s.relation`` this is the event returned (see the module docstring).
    """
    s = check_sampling(s)
    _check_supported(s, accountant)
    z = float(z)
    if s.full:
        return dp_accounting.GaussianDpEvent(z)
    if s.sampling == "fixed":
        return dp_accounting.SampledWithoutReplacementDpEvent(
            s.num_clients, s.clients_per_round, dp_accounting.GaussianDpEvent(z / 2.0)
        )
    if accountant == "pld" and s.max_clients < s.group_size:
        return dp_accounting.TruncatedSubsampledGaussianDpEvent(
            dataset_size=s.group_size,
            sampling_probability=s.rate,
            truncated_batch_size=s.max_clients,
            noise_multiplier=z,
        )
    return dp_accounting.PoissonSampledDpEvent(s.rate, dp_accounting.GaussianDpEvent(z))


def run_event(z: float, s: ClientSampling, rounds: int, accountant: str = "pld"):
    """``SelfComposedDpEvent(round_event(z, s), ceil(rounds / b))``: the run's client-level
    event (b = ``s.cycle_length``; b = 1: one composition per round)."""
    return dp_accounting.SelfComposedDpEvent(round_event(z, s, accountant), s.compositions(rounds))


def _truncation(s: ClientSampling, accountant: str) -> accounting.Truncation | None:
    if accountant == "pld" and s.max_clients < s.group_size:
        return accounting.Truncation(s.group_size, s.max_clients)
    return None


def _expand(curve: np.ndarray, s: ClientSampling, rounds: int) -> np.ndarray:
    """A curve over ``ceil(rounds / b)`` compositions as a ``[rounds]`` per-round curve
    (round r, 0-based, has had ``ceil((r + 1) / b)`` compositions)."""
    if s.cycle_length == 1:
        return curve
    idx = (np.arange(int(rounds)) // s.cycle_length).astype(np.int64)
    out = np.asarray(curve)[idx]
    out.flags.writeable = False
    return out


def _compress(curve: np.ndarray, s: ClientSampling) -> np.ndarray:
    """Inverse of :func:`_expand`: the value after each composition."""
    return np.asarray(curve)[:: s.cycle_length] if s.cycle_length > 1 else curve


def epsilon_spent(z: float, s: ClientSampling, rounds: int, delta: float, accountant="pld"):
    """Client-level epsilon after ``rounds`` rounds (0 for 0 rounds, inf for z = 0).

    Formal guarantee:
      The sequence of released noisy aggregates is (epsilon, delta)-DP under ``s.relation``
      (one whole client), given that the participants are drawn as ``s`` says and the draw
      is not revealed (amplification by sampling needs a secret seed).
    """
    s = check_sampling(s)
    _check_supported(s, accountant)
    if rounds == 0:
        return 0.0
    if z == 0:
        return math.inf
    with accounting.quiet_rdp():
        acc = accounting.make_accountant(accountant, s.relation)
        acc.compose(run_event(z, s, rounds, accountant))
        return float(acc.get_epsilon(delta))


@functools.lru_cache(maxsize=64)
def epsilon_curve(
    z: float, s: ClientSampling, rounds: int, delta: float, accountant: str = "pld"
) -> np.ndarray:
    """``[rounds]`` client-level epsilon after each round (cached, read-only)."""
    s = check_sampling(s)
    _check_supported(s, accountant)
    if z == 0:
        return np.full(rounds, np.inf)
    if s.cycle_length > 1:
        group = s._replace(cycle_length=1, num_clients=s.group_size)
        compressed = epsilon_curve(z, group, s.compositions(rounds), delta, accountant)
        return _expand(compressed, s, rounds)
    if s.relation == NeighborRel.ADD_OR_REMOVE_ONE:
        # One round is one step of the Poisson (q = M/N) subsampled Gaussian: the DP-SGD curve.
        return accounting.epsilon_curve(
            float(z), s.rate, 1, int(rounds), float(delta), accountant, _truncation(s, accountant)
        )
    with accounting.quiet_rdp():
        acc = accounting.make_accountant("rdp", s.relation).compose(round_event(z, s, "rdp"))
    rdp = getattr(acc, "_rdp", None)
    if rdp is None:  # private RDP vector moved in a dp-accounting release: pay more
        eps = [epsilon_spent(z, s, r + 1, delta, "rdp") for r in range(rounds)]
    else:
        orders = np.asarray(accounting.RDP_ORDERS)
        eps = [
            rdp_privacy_accountant.compute_epsilon(orders, (r + 1) * rdp, delta)[0]
            for r in range(rounds)
        ]
    out = np.maximum.accumulate(np.asarray(eps, np.float64))
    out.flags.writeable = False
    return out


def delta_curve(
    epsilon_curve: np.ndarray, s: ClientSampling, delta: float, accountant: str = "pld"
) -> np.ndarray:
    """``[rounds]`` delta that really holds with ``epsilon_curve`` (from
    :func:`epsilon_curve` with the same accountant). PLD accounts the truncation of the
    Poisson client sample to P slots exactly (the target ``delta``); RDP composes the
    untruncated event, so the truncation's term is added to delta
    (:func:`ffa_jax.privacy.accounting.rdp_delta_curve`, one draw per round, N + 1 clients).
    Full participation and fixed-size sampling never truncate.

    Formal guarantee: after round r the released aggregates are
    ``(epsilon_curve[r], result[r])``-DP under ``s.relation``.
    """
    s = check_sampling(s)
    if s.cycle_length > 1:
        group = s._replace(cycle_length=1, num_clients=s.group_size)
        compressed = delta_curve(_compress(epsilon_curve, s), group, delta, accountant)
        return _expand(compressed, s, len(epsilon_curve))
    trunc = None
    if accountant == "rdp" and s.sampling == "poisson" and s.max_clients < s.num_clients:
        trunc = accounting.Truncation(s.num_clients, s.max_clients)
    return accounting.rdp_delta_curve(epsilon_curve, s.rate, 1, delta, trunc)


@functools.lru_cache(maxsize=64)
def calibrate(
    target_epsilon: float, delta: float, s: ClientSampling, rounds: int, accountant: str = "pld"
) -> float:
    """Smallest server noise multiplier z whose client-level epsilon after ``rounds`` rounds is
    at most ``target_epsilon`` (and at least ``(1 - CALIBRATION_RTOL)`` of it).

    Formal guarantee:
      DP-FedAvg with this z, clip norm S and the sampling ``s`` is client-level
      (target_epsilon, delta)-DP under ``s.relation`` after ``rounds`` rounds.
    """
    s = check_sampling(s)
    _check_supported(s, accountant)
    if s.relation == NeighborRel.ADD_OR_REMOVE_ONE:
        return accounting.calibrate_noise_multiplier(
            target_epsilon,
            delta,
            s.rate,
            s.compositions(rounds),
            accountant,
            _truncation(s, accountant),
        )
    eps = accounting.check_epsilon(target_epsilon)
    lo, hi = 0.0, 1.0
    while epsilon_spent(hi, s, rounds, delta, "rdp") > eps:
        lo, hi = hi, hi * 2.0
        if hi > 2.0**30:
            raise ConfigError(
                f"privacy.epsilon={eps} cannot be reached with z <= 2^30 for delta={delta}; "
                "raise epsilon or delta."
            )
    with accounting.quiet_rdp():
        z = float(
            dp_accounting.calibrate_dp_mechanism(
                lambda: accounting.make_accountant("rdp", s.relation),
                lambda v: run_event(v, s, rounds, "rdp"),
                eps,
                delta,
                bracket_interval=dp_accounting.ExplicitBracketInterval(max(lo, 1e-3), hi),
                tol=1e-5 * hi,
            )
        )
    return z
