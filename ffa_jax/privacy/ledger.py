"""The privacy budget ledger of a run: what happened, as dp-accounting DpEvents.

One ledger per run, saved with every checkpoint (``meta["privacy"]``) and shown in the metrics
and the summary. It records everything the accountant needs, and :meth:`PrivacyLedger.events`
rebuilds one composed DpEvent per privacy unit from it:

* ``unit="sample"``: one event per client k, covering every local DP-SGD step of the rounds in
  which k actually took part: ``SelfComposedDpEvent(step_k, rounds_participated[k] x S)`` with
  ``step_k = PoissonSampledDpEvent(q_k, GaussianDpEvent(sigma_k))`` (under PLD the exact
  truncated-Poisson event of the fixed physical batch, see :mod:`accounting`). Rounds a
  client sat out cost it nothing: the participants are drawn from the run's secret,
  independently of the data.
  With sample-level BandMF (``bands`` b > 1) the event is jax-privacy's amplified BandMF
  event of those steps (:func:`ffa_jax.privacy.correlated.sample_event`: ceil(steps / b)
  compositions on a group of n_k // b at the per-group rate, stored in ``sampling_rates``),
  under the zero-out relation (see :mod:`ffa_jax.privacy.correlated`).
* ``unit="client"``: one event for "any client",
  ``SelfComposedDpEvent(round_event, rounds_done)`` with the round event of
  :mod:`client_level` (Poisson / fixed-size / full participation).

``epsilon_spent`` is the maximum over units with the configured accountant; ``epsilon_pld``
and ``epsilon_rdp`` report both accountants (``None`` where dp-accounting has no such
accountant for the event: PLD with fixed-size client sampling). The stored values come from the
run's precomputed epsilon curves; :func:`account` recomputes them from :meth:`events` with a
fresh dp-accounting accountant (the tests check that both agree).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import dp_accounting

from ffa_jax.errors import ConfigError
from ffa_jax.privacy import accounting, client_level, correlated


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrivacyLedger:
    """What the accountant needs to continue a run, and what it has spent so far.

    Attributes:
      private: DP on (False: no clipping, no noise, epsilon = inf).
      unit: ``sample`` or ``client`` (``privacy.unit``).
      accountant, delta: as configured.
      noise_multipliers: ``[K]`` sigma_k of every client's DP-SGD (0 under ``client``).
      sampling_rates: ``[K]`` q_k = batch_size / n_k.
      client_sizes: ``[K]`` n_k.
      max_batch_size: the fixed physical batch B_max (truncated Poisson accounting).
      steps_per_round: local steps per participating client per round.
      rounds_done: rounds completed.
      rounds_participated: ``[K]`` rounds each client took part in so far.
      clients_per_round, client_sampling, max_clients_per_round: M, ``poisson``/``fixed``
        and the slot count P of the round's client axis.
      client_noise_multiplier: z of the server's noise (``client``; 0 under ``sample``).
      cycle_length: b of cyclic Poisson client sampling (``privacy.mechanism=banded_mf`` with
        ``privacy.bands`` = b; 1 otherwise): each client's group is sampled once every b
        rounds and the amplified BandMF accounting composes ceil(rounds / b) events.
      bands: b of sample-level BandMF (``privacy.mechanism=banded_mf`` with
        ``privacy.unit=sample``; 1 otherwise): each client's examples are split into b
        groups, ``sampling_rates`` are then the per-group rates p_k = B / (n_k // b), and
        each client's event is jax-privacy's amplified BandMF event.
      epsilon_spent: max over units of epsilon after ``rounds_done`` rounds, with
        ``accountant`` (inf if not private).
      epsilon_pld, epsilon_rdp: the same with each accountant (None: not private, or not
        available for these events).
      delta_spent, delta_rdp: the delta that really holds with ``epsilon_spent`` and with
        ``epsilon_rdp`` (RDP adds the truncation of Poisson samples to delta, see
        :func:`ffa_jax.privacy.accounting.rdp_delta_curve`; PLD accounts it in epsilon, so
        its delta is the target). None: not private, or written by an older ffa_jax.
    """

    private: bool
    accountant: str
    delta: float
    noise_multipliers: tuple[float, ...]
    sampling_rates: tuple[float, ...]
    client_sizes: tuple[int, ...]
    max_batch_size: int
    steps_per_round: int
    rounds_done: int
    rounds_participated: tuple[int, ...]
    epsilon_spent: float
    unit: str = "sample"
    clients_per_round: int = 0
    client_sampling: str = "poisson"
    max_clients_per_round: int = 0
    client_noise_multiplier: float = 0.0
    cycle_length: int = 1
    bands: int = 1
    epsilon_pld: float | None = None
    epsilon_rdp: float | None = None
    delta_spent: float | None = None
    delta_rdp: float | None = None

    @property
    def num_clients(self) -> int:
        return len(self.client_sizes)

    @property
    def sampling(self) -> client_level.ClientSampling:
        m = self.clients_per_round or self.num_clients
        return client_level.ClientSampling(
            self.num_clients,
            m,
            self.client_sampling,
            self.max_clients_per_round or m,
            self.cycle_length,
        )

    @property
    def neighboring_relation(self) -> dp_accounting.NeighboringRelation:
        if self.unit == "client":
            return self.sampling.relation
        if self.bands > 1:  # equal-size cyclic groups: zero-out (see privacy.correlated)
            return dp_accounting.NeighboringRelation.REPLACE_SPECIAL
        return dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE

    def events(self, accountant: str | None = None) -> list[dp_accounting.DpEvent]:
        """One composed DpEvent per privacy unit (``[K]`` clients, or one for ``client``).

        Args:
          accountant: the accountant the events are meant for (default: the ledger's); under
            PLD the sample-level step event is the exact truncated-Poisson one.

        Formal guarantee:
          Under :attr:`neighboring_relation`, unit u's released values are
          (epsilon, delta)-DP with epsilon = the accountant's epsilon of ``events()[u]``.
        """
        accountant = accountant or self.accountant
        if not self.private:
            return [dp_accounting.NonPrivateDpEvent()]
        if self.unit == "client":
            return [
                client_level.run_event(
                    self.client_noise_multiplier, self.sampling, self.rounds_done, accountant
                )
            ]
        out = []
        for sigma, q, n, r in zip(
            self.noise_multipliers,
            self.sampling_rates,
            self.client_sizes,
            self.rounds_participated,
            strict=True,
        ):
            if r == 0:  # never took part: nothing about its data was released
                out.append(dp_accounting.NoOpDpEvent())
                continue
            if self.bands > 1:
                out.append(
                    correlated.sample_event(
                        float(sigma),
                        int(r) * self.steps_per_round,
                        bands=self.bands,
                        rate=float(q),
                        group=correlated.group_size(int(n), self.bands),
                        max_batch_size=int(self.max_batch_size),
                        accountant=accountant,
                    )
                )
                continue
            trunc = accounting.Truncation(int(n), int(self.max_batch_size))
            step = accounting.step_event(float(sigma), float(q), trunc, accountant)
            out.append(dp_accounting.SelfComposedDpEvent(step, int(r) * self.steps_per_round))
        return out

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("epsilon_spent", "epsilon_pld", "epsilon_rdp"):
            d[k] = _finite_or_none(d[k])
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> PrivacyLedger:
        d = dict(d)
        if "steps_done" in d:  # written before partial participation: every client, every round
            steps = d.pop("steps_done")
            d["rounds_done"] = steps // max(int(d["steps_per_round"]), 1)
            d["rounds_participated"] = [d["rounds_done"]] * len(d["client_sizes"])
        d["epsilon_spent"] = math.inf if d.get("epsilon_spent") is None else d["epsilon_spent"]
        for k in ("noise_multipliers", "sampling_rates", "client_sizes", "rounds_participated"):
            d[k] = tuple(d[k])
        return cls(**d)


def _finite_or_none(x: Any) -> Any:
    return None if isinstance(x, float) and not math.isfinite(x) else x


def account(ledger: PrivacyLedger, accountant: str) -> float:
    """Epsilon of the ledger recomputed from :meth:`PrivacyLedger.events` with a fresh
    dp-accounting accountant: the maximum over privacy units.

    Raises:
      ConfigError: the accountant cannot account these events (PLD with fixed-size client
        sampling).
    """
    if not ledger.private:
        return math.inf
    if ledger.rounds_done == 0:
        return 0.0
    if (
        ledger.unit == "client"
        and accountant == "pld"
        and ledger.neighboring_relation == dp_accounting.NeighboringRelation.REPLACE_ONE
    ):
        raise ConfigError(
            "the PLD accountant cannot account fixed-size client sampling; use 'rdp'."
        )
    worst = 0.0
    for event in ledger.events(accountant):
        with accounting.quiet_rdp():
            acc = accounting.make_accountant(accountant, ledger.neighboring_relation)
            acc.compose(event)
            worst = max(worst, float(acc.get_epsilon(ledger.delta)))
    return worst
