"""Privacy planning: noise multipliers, sampling rates and the epsilon curve of a run config.

Used by ``ffa-jax privacy`` (no training) and by the training loop, so the numbers printed
before a run are exactly the ones the run uses.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ffa_jax.config import RunConfig
from ffa_jax.errors import ConfigError
from ffa_jax.federated import participation as participation_lib
from ffa_jax.privacy import accounting, client_level, correlated
from ffa_jax.privacy import secret as secret_lib
from ffa_jax.privacy.ledger import PrivacyLedger


@dataclasses.dataclass(frozen=True)
class PrivacyPlan:
    """The privacy plan of a run, for either privacy unit (``privacy.unit``).

    Attributes:
      unit: ``sample`` (DP-SGD in every client) or ``client`` (DP-FedAvg at the server).
      noise_multipliers: ``[K]`` sigma_k of the clients' DP-SGD (0 under ``client`` or when
        the run is not private).
      sampling_rates: ``[K]`` q_k = batch_size / n_k.
      client_sizes: ``[K]`` n_k.
      max_batch_size: B_max, the fixed physical batch (Poisson batches are padded to it).
      local_steps: local steps per participating client per round.
      participation: ``[rounds, K]`` bool, who takes part in each round (drawn from the run's
        secret, see :func:`make_plan`).
      sampling: the client sampling (M of N, poisson/fixed, P slots).
      client_noise_multiplier: z, the server's noise multiplier under ``client`` (else 0).
      curves: accountant -> ``[rounds]`` epsilon spent after each round (max over units), or
        None where dp-accounting has no such accountant for the events.
      client_epsilon: ``[K]`` final epsilon of each client (all equal under ``client``).
      overflow_probability: ``[K]`` per-step probability that a Poisson batch exceeds B_max.
      delta, accountant: as configured (``delta`` is the target).
      deltas: accountant -> ``[rounds]`` delta that really holds with that accountant's
        epsilon after each round (max over units): the target under PLD, which accounts the
        truncation of Poisson batches (or of the client sample) exactly; under RDP the target
        plus the truncation's term (:func:`ffa_jax.privacy.accounting.rdp_delta_curve`).
      mechanism, bands: ``privacy.mechanism`` / ``privacy.bands`` (the server's noise under
        ``client``; each client's DP-SGD noise under ``sample``, where ``sampling_rates``
        are then the per-group rates B / (n_k // bands) of cyclic Poisson sampling).
      noise_comparison: mechanism -> noise multiplier and expected error of the summed noise
        (:func:`noise_comparison`, :func:`sample_noise_comparison`), both mechanisms side by
        side at this plan's epsilon when ``mechanism=banded_mf``; empty otherwise.
    """

    unit: str
    noise_multipliers: np.ndarray
    sampling_rates: np.ndarray
    client_sizes: np.ndarray
    max_batch_size: int
    local_steps: int
    participation: np.ndarray
    sampling: client_level.ClientSampling
    client_noise_multiplier: float
    curves: dict[str, np.ndarray | None]
    client_epsilon: np.ndarray
    overflow_probability: np.ndarray
    delta: float
    accountant: str
    private: bool
    deltas: dict[str, np.ndarray | None] = dataclasses.field(default_factory=dict)
    mechanism: str = "gaussian"
    bands: int = 1
    noise_comparison: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)

    @property
    def epsilon_curve(self) -> np.ndarray:
        """``[rounds]`` epsilon after each round with the configured accountant."""
        return self.curves[self.accountant]

    @property
    def epsilon(self) -> float:
        return float(self.epsilon_curve[-1])

    @property
    def rounds(self) -> int:
        return int(self.participation.shape[0])

    @property
    def rounds_participated(self) -> np.ndarray:
        """``[K]`` rounds each client takes part in."""
        return self.participation.sum(axis=0)

    @property
    def steps(self) -> int:
        """Composed steps of the binding unit: local DP-SGD steps of the busiest client
        (``sample``), or rounds (``client``)."""
        if self.unit == "client":
            return self.rounds
        return int(self.rounds_participated.max()) * self.local_steps

    def epsilon_after(self, rounds_done: int, accountant: str | None = None) -> float | None:
        """Epsilon after ``rounds_done`` rounds (0 for 0 rounds; None: accountant n/a)."""
        curve = self.curves.get(accountant or self.accountant)
        if curve is None:
            return None
        return 0.0 if rounds_done == 0 else float(curve[rounds_done - 1])

    def delta_after(self, rounds_done: int, accountant: str | None = None) -> float | None:
        """The delta that holds with :meth:`epsilon_after` (the target before any round; None:
        accountant n/a)."""
        acc = accountant or self.accountant
        if self.curves.get(acc) is None:
            return None
        curve = self.deltas.get(acc)
        if curve is None or rounds_done == 0:
            return float(self.delta)
        return float(curve[rounds_done - 1])

    def ledger(self, rounds_done: int) -> PrivacyLedger:
        """The ledger after ``rounds_done`` rounds of this plan."""

        def eps(acc):
            e = self.epsilon_after(rounds_done, acc)
            return e if (e is not None and self.private) else None

        return PrivacyLedger(
            private=self.private,
            unit=self.unit,
            accountant=self.accountant,
            delta=self.delta,
            noise_multipliers=tuple(float(s) for s in self.noise_multipliers),
            sampling_rates=tuple(float(q) for q in self.sampling_rates),
            client_sizes=tuple(int(n) for n in self.client_sizes),
            max_batch_size=int(self.max_batch_size),
            steps_per_round=int(self.local_steps),
            rounds_done=int(rounds_done),
            rounds_participated=tuple(int(c) for c in self.participation[:rounds_done].sum(0)),
            clients_per_round=int(self.sampling.clients_per_round),
            client_sampling=self.sampling.sampling,
            max_clients_per_round=int(self.sampling.max_clients),
            client_noise_multiplier=float(self.client_noise_multiplier),
            cycle_length=int(self.sampling.cycle_length),
            bands=int(self.bands) if self.unit == "sample" else 1,
            epsilon_spent=(self.epsilon_after(rounds_done) if self.private else math.inf),
            epsilon_pld=eps("pld"),
            epsilon_rdp=eps("rdp"),
            delta_spent=self.delta_after(rounds_done) if self.private else None,
            delta_rdp=self.delta_after(rounds_done, "rdp") if self.private else None,
        )

    def to_json(self) -> dict[str, Any]:
        def num(x):
            return None if x is None or not math.isfinite(float(x)) else float(x)

        out = {
            "private": self.private,
            "unit": self.unit,
            "neighbouring_relation": _relation_text(self),
            "accountant": self.accountant,
            "delta": self.delta if self.private else None,
            "epsilon": num(self.epsilon),
            "epsilon_pld": num(self.epsilon_after(self.rounds, "pld")) if self.private else None,
            "epsilon_rdp": num(self.epsilon_after(self.rounds, "rdp")) if self.private else None,
            # The delta that really holds with each epsilon (RDP: truncation added).
            "delta_spent": self.delta_after(self.rounds) if self.private else None,
            "delta_pld": self.delta_after(self.rounds, "pld") if self.private else None,
            "delta_rdp": self.delta_after(self.rounds, "rdp") if self.private else None,
            "steps": self.steps,
            "rounds": self.rounds,
            "clients": int(self.sampling.num_clients),
            "clients_per_round": int(self.sampling.clients_per_round),
            "client_sampling": self.sampling.sampling
            if self.sampling.clients_per_round < self.sampling.num_clients
            else "all",
            "client_sampling_rate": self.sampling.rate,
            "client_slots": int(self.sampling.max_clients),
            "rounds_participated": [int(c) for c in self.rounds_participated],
            "epsilon_curve": [num(e) for e in self.epsilon_curve],
            "client_sizes": [int(n) for n in self.client_sizes],
        }
        if self.unit == "client":
            out["noise_multiplier"] = float(self.client_noise_multiplier)
            out["sampling_rate"] = self.sampling.rate
            out["mechanism"] = self.mechanism
            out["bands"] = int(self.bands)
            out["noise_comparison"] = self.noise_comparison
        else:
            out["noise_multiplier"] = [float(s) for s in self.noise_multipliers]
            out["sampling_rate"] = [float(q) for q in self.sampling_rates]
            out["max_batch_size"] = self.max_batch_size
            out["client_epsilon"] = [num(e) for e in self.client_epsilon]
            out["overflow_probability_per_step"] = [float(p) for p in self.overflow_probability]
            out["mechanism"] = self.mechanism
            out["bands"] = int(self.bands)
            if self.noise_comparison:
                out["noise_comparison"] = self.noise_comparison
        return out


def _relation_text(plan: PrivacyPlan) -> str:
    if not plan.private:
        return "none"
    if plan.unit == "client":
        return plan.sampling.relation_text
    if plan.bands > 1:
        return "zero-out one example of one client (sample-level BandMF, n_k public)"
    return "add/remove one example of one client"


def _full_sampling(k: int) -> client_level.ClientSampling:
    return client_level.ClientSampling(k, k, "poisson", k)


def _lookup(curve: np.ndarray, participation: np.ndarray, before: float = 0.0) -> np.ndarray:
    """Per-round value of a client from its curve over its own rounds (``curve[c - 1]``
    after its c-th participation; ``before`` before the first)."""
    cum = np.cumsum(participation.astype(np.int64))
    return np.where(cum > 0, np.asarray(curve)[np.maximum(cum - 1, 0)], before)


def sample_level_plan(
    *,
    client_sizes: Sequence[int],
    batch_size: int,
    max_batch_size: int,
    rounds: int,
    local_steps: int,
    epsilon: float,
    delta: float,
    accountant: str = "pld",
    noise_multiplier: float | None = None,
    participation: np.ndarray | None = None,
    sampling: client_level.ClientSampling | None = None,
    noise_multipliers: Sequence[float] | None = None,
    bands: int = 1,
    mechanism: str = "gaussian",
    compare: bool = True,
) -> PrivacyPlan:
    """Calibrates sigma_k for every client so that each spends exactly ``epsilon`` over the
    rounds it takes part in (or, with a fixed ``noise_multiplier`` / ``noise_multipliers``,
    reports what it spends).

    ``mechanism="banded_mf"`` with ``bands`` b > 1 (sample-level BandMF, every client in
    every round): client k's steps use cyclic Poisson batches from b groups of n_k // b at
    the per-group rate p_k = B / (n_k // b), and its epsilon is jax-privacy's amplified BandMF
    event's (ceil(steps / b) compositions, :func:`ffa_jax.privacy.correlated.sample_event`;
    zero-out relation). With b = 1 everything equals the Gaussian plan. ``compare``: also
    fill ``noise_comparison`` (BandMF only; costs one more calibration, of the Gaussian
    sigma of the binding client).

    Each client has its own sampling rate ``q_k = batch_size / n_k`` and its own number of
    rounds ``c_k`` (``participation``, default: every round), hence its own sigma_k: every
    client meets the target, none is over-noised. The accounting covers the fixed-size padding
    exactly with PLD (truncated Poisson sampling, see :mod:`ffa_jax.privacy.accounting`).

    Formal guarantee:
      With these sigma_k, client k's local training over its ``c_k x local_steps`` DP-SGD
      steps is (epsilon_k, delta)-DP with respect to adding or removing one of its examples;
      rounds it sits out release nothing about its data (participants are drawn from the
      run's secret, independently of the data); the reported epsilon is ``max_k epsilon_k``.
    """
    sizes = np.asarray(client_sizes, dtype=np.int64)
    k = len(sizes)
    if participation is None:
        participation = np.ones((rounds, k), dtype=bool)
    participation = np.asarray(participation, dtype=bool)
    sampling = sampling or _full_sampling(k)
    bands = int(bands)
    if bands > 1:
        correlated.check_sample_bands(batch_size, sizes, bands, rounds * local_steps)
    # Accounting's dataset per step: the client (b = 1) or one of its b groups.
    groups = np.array([correlated.group_size(int(n), bands) for n in sizes], np.int64)
    q = batch_size / groups
    private = (
        math.isfinite(epsilon) or noise_multiplier is not None or noise_multipliers is not None
    )
    overflow = np.array(
        [
            accounting.overflow_probability(int(n), float(qk), max_batch_size)
            for n, qk in zip(groups, q, strict=True)
        ]
    )
    common = dict(
        unit="sample",
        sampling_rates=q,
        client_sizes=sizes,
        max_batch_size=max_batch_size,
        local_steps=local_steps,
        participation=participation,
        sampling=sampling,
        client_noise_multiplier=0.0,
        overflow_probability=overflow,
        delta=delta,
        accountant=accountant,
        mechanism=mechanism,
        bands=bands,
    )
    if not private:
        inf = np.full(rounds, math.inf)
        return PrivacyPlan(
            noise_multipliers=np.zeros(k),
            curves={"pld": inf, "rdp": inf},
            client_epsilon=np.full(k, math.inf),
            private=False,
            **common,
        )
    counts = np.maximum(participation.sum(axis=0), 1)  # a client that never takes part: 1
    truncs = [accounting.Truncation(int(n), int(max_batch_size)) for n in groups]
    # Under RDP the truncation is paid in delta: a run calibrated to an epsilon target reads
    # its RDP epsilon at delta minus the truncation's term, so that (epsilon, delta) holds.
    # (Also when a resumed run passes its calibrated sigmas: it read them the same way.)
    calibrated = noise_multiplier is None and math.isfinite(epsilon)
    rdp_deltas = [
        accounting.rdp_calibration_delta(epsilon, delta, float(qk), int(c) * local_steps, t)
        if calibrated
        else float(delta)
        for qk, c, t in zip(q, counts, truncs, strict=True)
    ]
    if noise_multipliers is not None:
        sigmas = np.asarray(noise_multipliers, np.float64)
    elif noise_multiplier is not None:
        sigmas = np.full(k, float(noise_multiplier))
    else:
        sigmas = np.array(
            [
                accounting.calibrate_noise_multiplier(
                    epsilon,
                    d_rdp if accountant == "rdp" else delta,
                    float(qk),
                    correlated.compositions(int(c) * local_steps, bands),
                    accountant,
                    truncation=t,
                )
                for qk, c, t, d_rdp in zip(q, counts, truncs, rdp_deltas, strict=True)
            ]
        )
    curves, deltas = {}, {}
    for acc in accounting.ACCOUNTANTS:
        eps_rows, delta_rows = [], []
        for i, (s, qk, c, t) in enumerate(zip(sigmas, q, counts, truncs, strict=True)):
            # PLD accounts the truncation in epsilon; RDP in delta.
            d = rdp_deltas[i] if acc == "rdp" else float(delta)
            own = _own_curve(float(s), float(qk), local_steps, int(c), d, acc, t, bands)
            own_delta = (
                accounting.rdp_delta_curve(own, float(qk), local_steps, d, t)
                if acc == "rdp"
                else np.full(len(own), float(delta))
            )
            eps_rows.append(_lookup(own, participation[:, i]))
            delta_rows.append(_lookup(own_delta, participation[:, i], before=delta))
        per_client = np.stack(eps_rows)
        curves[acc] = per_client.max(axis=0)
        deltas[acc] = np.stack(delta_rows).max(axis=0)
        if acc == accountant:
            client_eps = per_client[:, -1]
    comparison = {}
    if mechanism == "banded_mf" and compare:
        bind = int(np.argmax(client_eps))
        comparison = sample_noise_comparison(
            float(client_eps[bind]),
            delta,
            client_size=int(sizes[bind]),
            batch_size=batch_size,
            max_batch_size=max_batch_size,
            steps=int(counts[bind]) * local_steps,
            bands=bands,
            accountant=accountant,
            z_banded=float(sigmas[bind]),
        )
    return PrivacyPlan(
        noise_multipliers=sigmas,
        curves=curves,
        client_epsilon=client_eps,
        private=True,
        deltas=deltas,
        noise_comparison=comparison,
        **common,
    )


def _own_curve(sigma, q, local_steps, rounds, delta, acc, trunc, bands) -> np.ndarray:
    """``[rounds]`` epsilon of one client after each of its rounds: the DP-SGD curve
    (b = 1), or, under sample-level BandMF, the curve over ceil(steps / b) compositions
    read at ceil(r x local_steps / b) after round r."""
    if bands == 1:
        return accounting.epsilon_curve(sigma, q, local_steps, rounds, delta, acc, truncation=trunc)
    total = correlated.compositions(rounds * local_steps, bands)
    per_comp = accounting.epsilon_curve(sigma, q, 1, total, delta, acc, truncation=trunc)
    idx = [correlated.compositions((r + 1) * local_steps, bands) - 1 for r in range(rounds)]
    return np.asarray(per_comp)[idx]


def sample_noise_comparison(
    epsilon: float,
    delta: float,
    *,
    client_size: int,
    batch_size: float,
    max_batch_size: int,
    steps: int,
    bands: int,
    accountant: str,
    z_banded: float,
) -> dict[str, dict[str, float]]:
    """Sample level, one client (the binding one): both mechanisms at the same (epsilon,
    delta) over its ``steps`` local steps: ``gaussian`` (independent noise, Poisson batches
    at q = B / n, sigma calibrated here) and ``banded_mf`` (``z_banded``, cyclic Poisson over
    ``bands`` groups). Same keys as :func:`noise_comparison`; the stds are per coordinate of
    the SUM of the clipped gradient sums over the steps, in units of privacy.clip_norm C
    (divide by the expected batch size for the sum of the noisy gradients)."""
    z_gauss = (
        z_banded
        if bands == 1
        else accounting.calibrate_noise_multiplier(
            epsilon,
            delta,
            batch_size / client_size,
            steps,
            accountant,
            truncation=accounting.Truncation(int(client_size), int(max_batch_size)),
        )
    )
    return mechanism_rows(z_gauss, z_banded, bands, steps)


def client_level_plan(
    *,
    client_sizes: Sequence[int],
    batch_size: int,
    max_batch_size: int,
    rounds: int,
    local_steps: int,
    epsilon: float,
    delta: float,
    accountant: str,
    participation: np.ndarray,
    sampling: client_level.ClientSampling,
    noise_multiplier: float | None = None,
    mechanism: str = "gaussian",
) -> PrivacyPlan:
    """Calibrates the server's noise multiplier z of DP-FedAvg so that T = ``rounds`` rounds
    of client sampling ``sampling`` spend exactly ``epsilon`` (or reports what a fixed z
    spends).

    Formal guarantee:
      Clipping every participant's update to S and adding ``N(0, (z S)^2 I)`` to their sum
      each round makes the released aggregates client-level (epsilon, delta)-DP under
      ``sampling.relation`` (add/remove one client; replace one for fixed-size sampling),
      provided the sampled set stays secret; the server is trusted with the clipped updates.
    """
    sizes = np.asarray(client_sizes, dtype=np.int64)
    k = len(sizes)
    q = batch_size / sizes
    if noise_multiplier is not None:
        z = float(noise_multiplier)
    else:
        z = client_level.calibrate(epsilon, delta, sampling, rounds, accountant)
    curves: dict[str, np.ndarray | None] = {}
    deltas: dict[str, np.ndarray | None] = {}
    for acc in accounting.ACCOUNTANTS:
        try:
            curves[acc] = client_level.epsilon_curve(z, sampling, rounds, delta, acc)
        except ConfigError:
            curves[acc] = None  # PLD with fixed-size sampling: no such event
            deltas[acc] = None
            continue
        deltas[acc] = client_level.delta_curve(curves[acc], sampling, delta, acc)
    comparison = {}
    if mechanism == "banded_mf":
        comparison = noise_comparison(
            float(curves[accountant][-1]), delta, sampling, rounds, accountant, z
        )
    return PrivacyPlan(
        mechanism=mechanism,
        bands=int(sampling.cycle_length),
        noise_comparison=comparison,
        unit="client",
        noise_multipliers=np.zeros(k),
        sampling_rates=q,
        client_sizes=sizes,
        max_batch_size=max_batch_size,
        local_steps=local_steps,
        participation=np.asarray(participation, dtype=bool),
        sampling=sampling,
        client_noise_multiplier=z,
        curves=curves,
        client_epsilon=np.full(k, float(curves[accountant][-1])),
        overflow_probability=np.zeros(k),
        delta=delta,
        accountant=accountant,
        private=True,
        deltas=deltas,
    )


def noise_comparison(
    epsilon: float,
    delta: float,
    sampling: client_level.ClientSampling,
    rounds: int,
    accountant: str,
    z_banded: float,
) -> dict[str, dict[str, float]]:
    """Both client-level mechanisms at the same (epsilon, delta): ``gaussian`` (independent
    noise, Poisson sampling of M of N clients every round, z calibrated here) and
    ``banded_mf`` (``z_banded`` with cyclic Poisson sampling of cycle ``sampling.cycle_length``).

    Returns mechanism -> ``{"noise_multiplier", "bands", "summed_noise_std_final",
    "summed_noise_std_rms", "per_round_noise_std"}``; the stds are per coordinate of the SUM
    of clipped updates, in units of the clip norm S (:func:`correlated.summed_noise_std`)."""
    plain = sampling._replace(
        cycle_length=1,
        max_clients=participation_lib.slot_count(
            sampling.num_clients, sampling.clients_per_round, sampling.sampling
        ),
    )
    # bands = 1 is the Gaussian mechanism itself: the same z, not a second calibration.
    z_gauss = (
        z_banded
        if sampling.cycle_length == 1
        else client_level.calibrate(epsilon, delta, plain, rounds, accountant)
    )
    return mechanism_rows(z_gauss, z_banded, sampling.cycle_length, rounds)


def mechanism_rows(
    z_gauss: float, z_banded: float, bands: int, steps: int
) -> dict[str, dict[str, float]]:
    """The side-by-side rows of :func:`noise_comparison` and its sample-level twin: each
    mechanism's noise multiplier, bands and the std of its noise summed over ``steps``
    (:func:`correlated.summed_noise_std`)."""
    out = {}
    for name, z, b in (("gaussian", z_gauss, 1), ("banded_mf", z_banded, bands)):
        err = correlated.summed_noise_std(z, steps, b)
        out[name] = {
            "noise_multiplier": float(z),
            "bands": int(b),
            "summed_noise_std_final": err["final"],
            "summed_noise_std_rms": err["rms"],
            "per_round_noise_std": err["per_round"],
        }
    return out


def client_sampling(cfg: RunConfig) -> client_level.ClientSampling:
    """The run's client sampling: M of N, poisson/fixed, the slot count P, and the cycle
    length b (``privacy.bands`` under ``privacy.mechanism=banded_mf``, else 1)."""
    fed = cfg.federated
    m = fed.participants
    # Cyclic client sampling under client-level BandMF only (sample-level cycles examples).
    banded_clients = cfg.privacy.mechanism == "banded_mf" and cfg.privacy.unit == "client"
    b = cfg.privacy.bands if banded_clients else 1
    return client_level.ClientSampling(
        fed.clients,
        m,
        fed.client_sampling,
        participation_lib.slot_count(fed.clients // b, m, fed.client_sampling),
        b,
    )


def make_plan(
    cfg: RunConfig,
    client_sizes: Sequence[int],
    max_batch_size: int,
    *,
    ledger: PrivacyLedger | None = None,
    secret: int | None = None,
) -> PrivacyPlan:
    """The privacy plan of the run ``cfg`` (what ``ffa-jax privacy`` prints, what ``train``
    uses). With ``ledger`` (a resumed run) the noise multipliers are the ledger's, and the
    epsilon of those is accounted instead of calibrating new ones.

    ``secret``: the run's secret (:mod:`ffa_jax.privacy.secret`), from which the participants
    of every round are drawn; None: ``privacy.noise_seed`` when set, else a fresh draw (then,
    under partial participation, the plan shows one possible schedule, not the run's).

    What the epsilon depends on: under ``client`` the accounting is of the sampling *rate*
    (M / N over T rounds), the same for every draw, so the reported epsilon reveals nothing
    about the secret schedule. Under ``sample`` each client is accounted for the rounds it
    actually takes part in (its realised count c_k, exact for the realised schedule). That
    count is a function of the secret alone, independent of the data, and sample-level DP
    does not rely on it staying hidden (no amplification by client sampling is claimed), so
    the sigma_k and epsilon curve that reveal c_k leak nothing about any example."""
    fed, priv = cfg.federated, cfg.privacy
    sampling = client_sampling(cfg)
    if secret is None:
        secret = secret_lib.resolve(priv.noise_seed)
    participation = participation_lib.schedule(
        secret,
        fed.rounds,
        fed.clients,
        sampling.clients_per_round,
        fed.client_sampling,
        sampling.cycle_length,
    )
    common = dict(
        client_sizes=list(client_sizes),
        batch_size=cfg.client.batch_size,
        max_batch_size=max_batch_size,
        rounds=fed.rounds,
        local_steps=fed.local_steps,
        epsilon=priv.epsilon,
        delta=priv.delta,
        accountant=priv.accountant,
        participation=participation,
        sampling=sampling,
    )
    fixed = ledger is not None and ledger.private and priv.enabled
    if priv.enabled and priv.unit == "client":
        z = ledger.client_noise_multiplier if fixed else priv.noise_multiplier
        return client_level_plan(noise_multiplier=z, mechanism=priv.mechanism, **common)
    return sample_level_plan(
        noise_multiplier=priv.noise_multiplier,
        noise_multipliers=ledger.noise_multipliers if fixed else None,
        bands=priv.bands if priv.enabled else 1,
        mechanism=priv.mechanism if priv.enabled else "gaussian",
        **common,
    )


def alternatives(
    plan: PrivacyPlan,
    *,
    batch_size: int,
    rounds: int,
    local_steps: int,
    epsilon: float,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """What-if table: for other (rounds, local steps, batch size, clients per round) choices,
    the noise multiplier needed to keep the target epsilon and the epsilon the current one
    would spend.

    Sample-level rows follow the binding client (the one spending the most) with its exact
    participation for the changed schedule, and use untruncated Poisson accounting (fast;
    fixed-size truncation changes these numbers by well under 1%). Client-level rows use the
    same client-level events as the run.
    """
    if not plan.private:
        return []
    smp = plan.sampling
    n_clients, m = smp.num_clients, smp.clients_per_round
    changes = [
        ("as configured", rounds, local_steps, batch_size, m),
        ("rounds x 2", rounds * 2, local_steps, batch_size, m),
        ("rounds / 2", max(1, rounds // 2), local_steps, batch_size, m),
    ]
    if m < n_clients:
        changes.append(
            ("clients/round x 2", rounds, local_steps, batch_size, min(n_clients, 2 * m))
        )
    if m > 1:
        changes.append(("clients/round / 2", rounds, local_steps, batch_size, max(1, m // 2)))
    if plan.unit == "sample":
        changes += [
            ("local_steps x 2", rounds, local_steps * 2, batch_size, m),
            ("batch_size x 2", rounds, local_steps, batch_size * 2, m),
            ("batch_size / 2", rounds, local_steps, max(1, batch_size // 2), m),
        ]
    rows = []
    if plan.unit == "client":
        z_now = plan.client_noise_multiplier
    else:
        k = int(np.argmax(plan.client_epsilon))  # the binding client
        n = int(plan.client_sizes[k])
        sigma_now = float(plan.noise_multipliers[k])
    cycle = smp.cycle_length  # BandMF's cyclic Poisson groups (1: plain Poisson)
    for name, r, s, b, mm in changes:
        row = {"change": name, "rounds": r, "local_steps": s, "batch_size": b}
        row["clients_per_round"] = mm
        if plan.unit == "client":
            if cycle > 1 and mm * cycle > n_clients:
                continue  # cyclic Poisson cannot sample that many clients per round
            alt = client_level.ClientSampling(
                n_clients,
                mm,
                smp.sampling,
                participation_lib.slot_count(n_clients // cycle, mm, smp.sampling),
                cycle,
            )
            row["sampling_rate"] = alt.rate
            row["epsilon_at_current_sigma"] = client_level.epsilon_spent(
                z_now, alt, r, plan.delta, plan.accountant
            )
            if math.isfinite(epsilon):
                row["sigma_for_target"] = client_level.calibrate(
                    epsilon, plan.delta, alt, r, plan.accountant
                )
        else:
            if plan.bands > 1 and mm < n_clients:
                continue  # sample-level BandMF needs every client in every round
            # Sample-level BandMF: one of the client's `bands` groups per step (bands = 1:
            # the whole client), ceil(steps / bands) compositions.
            q = min(1.0, b / correlated.group_size(n, plan.bands))
            part = participation_lib.schedule(seed, r, n_clients, mm, smp.sampling)[:, k]
            steps = max(int(part.sum()), 1) * s
            row.update(sampling_rate=q, steps=steps)
            composed = correlated.compositions(steps, plan.bands)
            row["epsilon_at_current_sigma"] = accounting.epsilon_spent(
                sigma_now, q, composed, plan.delta, plan.accountant
            )
            if math.isfinite(epsilon):
                row["sigma_for_target"] = accounting.calibrate_noise_multiplier(
                    epsilon, plan.delta, q, composed, plan.accountant
                )
        rows.append(row)
    return rows


def format_plan(plan: PrivacyPlan, alt: list[dict[str, Any]], every: int | None = None) -> str:
    """Human-readable tables of a plan."""
    if not plan.private:
        return "privacy.epsilon = inf: no clipping, no noise, no privacy guarantee."
    smp = plan.sampling
    who = (
        f"all {smp.num_clients} clients every round"
        if smp.full
        else f"{smp.clients_per_round} of {smp.num_clients} clients per round ({smp.sampling}, "
        f"q={smp.rate:.4g}, {smp.max_clients} slots)"
    )
    other = "rdp" if plan.accountant == "pld" else "pld"
    other_eps = plan.epsilon_after(plan.rounds, other)
    other_txt = f"{other_eps:.4f}" if other_eps is not None else "n/a for this sampling"
    if other_eps is not None:
        other_txt += f" at delta={plan.delta_after(plan.rounds, other):.3g}"
    holds = plan.delta_after(plan.rounds)
    if plan.unit == "client":
        if smp.cycle_length > 1:
            who = (
                f"{smp.clients_per_round} clients per round by cyclic Poisson sampling from "
                f"{smp.cycle_length} groups of {smp.group_size} (q={smp.rate:.4g}, "
                f"{smp.max_clients} slots)"
            )
        lines = [
            f"Client-level DP (DP-FedAvg; neighbours: {smp.relation_text}), "
            f"{plan.accountant.upper()} accountant, delta={plan.delta:g}",
            f"{who}, {plan.rounds} rounds",
            f"server noise multiplier z = {plan.client_noise_multiplier:.4f} (noise std z x "
            "privacy.client_clip_norm on the sum of clipped updates)",
            f"epsilon = {plan.epsilon:.4f} at delta = {holds:.3g} ({plan.accountant}); "
            f"{other}: {other_txt}",
        ]
        lines += _comparison_lines(plan, "summed server noise, x privacy.client_clip_norm")
    else:
        lines = [
            f"Sample-level DP per client ({plan.accountant.upper()} accountant, delta={plan.delta:g}), "
            f"{who}, physical batch B_max={plan.max_batch_size}",
            f"epsilon = {plan.epsilon:.4f} at delta = {holds:.3g} ({plan.accountant}); "
            f"{other}: {other_txt}",
            "",
            "client      n   rounds   sampling rate q   noise multiplier   overflow/step   final epsilon",
        ]
        parts = plan.rounds_participated
        for i in range(len(plan.client_sizes)):
            lines.append(
                f"{i:6d} {plan.client_sizes[i]:6d} {parts[i]:8d} {plan.sampling_rates[i]:17.5f}"
                f" {plan.noise_multipliers[i]:18.4f} {plan.overflow_probability[i]:15.2e}"
                f" {plan.client_epsilon[i]:15.4f}"
            )
        if plan.bands > 1:
            lines[1:1] = [
                f"sample-level BandMF: {plan.bands} bands, cyclic Poisson batches from "
                f"{plan.bands} groups of n // {plan.bands} examples per client (q = the rate "
                "within a group); neighbours: zero-out one example"
            ]
        lines += _comparison_lines(
            plan, "noise summed over the binding client's steps, x privacy.clip_norm"
        )
    if holds is not None and holds > plan.delta * (1 + 1e-9):
        lines += [
            "",
            f"note: RDP does not account the truncation of Poisson samples at their fixed size; "
            f"it is added to delta: the guarantee that holds is (epsilon, {holds:.3g}), not "
            f"delta={plan.delta:g}. privacy.accountant=pld accounts it exactly in epsilon.",
        ]
    rounds = plan.rounds
    every = every or max(1, rounds // 10)
    unit = "max over clients" if plan.unit == "sample" else "client-level"
    lines += ["", f"round   epsilon spent ({unit})"]
    for r in range(rounds):
        if (r + 1) % every == 0 or r == 0 or r + 1 == rounds:
            lines.append(f"{r + 1:5d}   {plan.epsilon_curve[r]:.4f}")
    if alt:
        binding = "binding = busiest client" if plan.unit == "sample" else "client-level"
        lines += [
            "",
            f"alternatives ({binding})" + " " * 33 + "sigma for target   epsilon at current sigma",
        ]
        for row in alt:
            sig = row.get("sigma_for_target")
            lines.append(
                f"  {row['change']:<18} rounds={row['rounds']:<5} steps={row['local_steps']:<3}"
                f" batch={row['batch_size']:<5} clients/round={row['clients_per_round']:<4}"
                f" {sig if sig is None else f'{sig:10.4f}':>12}"
                f" {row['epsilon_at_current_sigma']:22.4f}"
            )
    return "\n".join(lines)


def _comparison_lines(plan: PrivacyPlan, what: str) -> list[str]:
    """The side-by-side table of :attr:`PrivacyPlan.noise_comparison` (none if empty)."""
    if not plan.noise_comparison:
        return []
    one, all_ = ("one round", "rounds") if plan.unit == "client" else (" one step", "steps ")
    lines = [
        "",
        f"noise mechanisms at epsilon = {plan.epsilon:.4f} (std per coordinate of the {what}):",
        f"mechanism   bands   noise multiplier   {one}   sum over all {all_}"
        "   RMS over prefix sums",
    ]
    for name, row in plan.noise_comparison.items():
        lines.append(
            f"{name:<11} {row['bands']:5d} {row['noise_multiplier']:18.4f}"
            f" {row['per_round_noise_std']:11.3f} {row['summed_noise_std_final']:21.3f}"
            f" {row['summed_noise_std_rms']:22.3f}"
        )
    return lines


def plot_curve(plan: PrivacyPlan, path) -> None:
    """PNG of epsilon spent vs round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot(np.arange(1, len(plan.epsilon_curve) + 1), plan.epsilon_curve, marker="o", ms=3)
    ax.set(
        xlabel="round",
        ylabel="epsilon spent",
        title=f"{plan.unit}-level privacy spent ({plan.accountant}, delta={plan.delta:g})",
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
