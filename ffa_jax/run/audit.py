"""``ffa-jax audit``: a one-run empirical privacy audit of the real federated training run.

:func:`audit_run` trains the run of a config exactly as ``ffa-jax train`` does (the same
:func:`ffa_jax.run.prepare`, Poisson batches, jitted round and server step; no files are
written) with m **gradient canaries** inserted, but with its own fresh secret
(:func:`audit_secret`): its noise keys, batches, participants and canaries are independent of
any training run's, then applies the one-run test of
Steinke, Nasr and Jagielski (NeurIPS 2023; :mod:`ffa_jax.privacy.audit`).

What is audited (``privacy.unit: sample``, the paper's setting):

* Neighbouring relation: add/remove one example of one client, the *audited client* (by
  default the client with the largest accounted epsilon).
* Canaries: m fixed random directions ``u_i`` in the trainable space (B under FFA-LoRA, A and
  B under LoRA, plus a trained head), each of L2 norm exactly C (``privacy.clip_norm``). Canary
  i is included in the audited client's data independently with probability 1/2; an included
  canary behaves like a real example under Poisson sampling: it takes part in each local step
  independently with the client's sampling rate q_k, and then its gradient ``u_i`` is added to
  the clipped per-example gradient sum *before* the noise. It is the gradient of the example
  whose loss is ``<u_i, theta>`` (already of norm C, so clipping leaves it unchanged): a
  gradient canary, not an input canary, so the audit is of the clipping-and-noise pipeline
  (sampling, noise calibration and keys, local steps, rounds), not of how much a real input
  text can be memorised.
* Adversary: white box; sees every upload (delta of the trainable tree) of the audited client
  in every round it takes part in, and knows the canary directions. Canary i's score is
  ``<u_i, -sum_rounds delta_k>`` (a sampled canary moves the client's model along ``-u_i``).
* Guesses: "in" for the r/2 highest scores, "out" for the r/2 lowest, v of r correct.

With ``privacy.unit: client`` (DP-FedAvg) the unit is one client: canaries are m fake
*clients* whose clipped update is a fixed direction of norm S (``privacy.client_clip_norm``),
each included with probability 1/2 and taking part in each round with the client sampling
rate M / N (every round under full participation); an included, sampled canary's update is
added to the server's sum of clipped updates before its noise. The adversary sees every
round's noisy aggregate (the server is trusted) and scores ``<u_i, sum_rounds mean_delta>``.
Fixed-size client sampling (replace-one relation) is refused.

Formal statement: if the implementation is (epsilon, delta)-DP for the unit above, then
``epsilon_lower_bound > epsilon`` with probability at most ``1 - confidence`` (over the
canaries' inclusion and the run's randomness). So a bound above the claimed epsilon (from the
run's budget ledger) is evidence of a privacy bug at that confidence.

Known limitation: a one-run audit cannot certify large epsilons. With r guesses, all correct,
the bound is at most about ``ln(p / (1 - p))`` with ``p = (1 - confidence)^(1/r)`` (r=100:
3.5, r=300: 4.6 at 95%), and with the Poisson sampling of DP-SGD most canaries enter only a
few steps, so correct implementations give bounds far below the claim. A bound well below the
claim is expected and is *not* evidence that the accounting is tight. Not covered: truncation
of a Poisson batch at B_max (the canaries are never dropped; the accountant's truncated event
differs from the untruncated one only with the overflow probability, ~1e-6 per step).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from ffa_jax.config import RunConfig
from ffa_jax.errors import ConfigError
from ffa_jax.federated import modes
from ffa_jax.privacy import secret as secret_lib
from ffa_jax.privacy.audit import canary_directions, epsilon_lower_bound, guess_and_count
from ffa_jax.run.inputs import round_inputs, run_round
from ffa_jax.run.loop import check_finite
from ffa_jax.run.resume import check_budget
from ffa_jax.run.rundir import privacy_line
from ffa_jax.run.setup import build_round, init_server_state, prepare, train_key

# The canaries' key purpose, under the audit's own secret (audit_secret): independent of
# everything the audited run and any training run draw.
AUDIT_PURPOSE = 5
# Sub-purposes of the audit key.
_INCLUSION, _DIRECTIONS, _PARTICIPATION = 0, 1, 2
DEFAULT_CANARIES = 1000
DEFAULT_GUESSES = 100


@dataclasses.dataclass(frozen=True)
class RunAudit:
    """The result of :func:`audit_run`.

    Attributes:
      epsilon_lower_bound: the empirical lower bound on epsilon (at ``confidence``).
      claimed_epsilon: the ledger's epsilon of the audited unit after all rounds.
      delta, accountant, unit: of the run's privacy config.
      canaries, guesses, correct: m, r, v.
      included: canaries included (each with probability 1/2).
      confidence: of the test.
      client: the audited client (``sample``), None (``client``: every client is a unit).
      rounds: rounds the audited unit's releases cover (rounds the client took part in).
      noise_scale: factor on the calibrated noise (1.0 unless a test breaks the mechanism).
    """

    epsilon_lower_bound: float
    claimed_epsilon: float
    delta: float
    accountant: str
    unit: str
    canaries: int
    guesses: int
    correct: int
    included: int
    confidence: float
    client: int | None
    rounds: int
    noise_scale: float

    @property
    def violation(self) -> bool:
        """The bound exceeds the claimed epsilon: the run is not as private as accounted."""
        return self.epsilon_lower_bound > self.claimed_epsilon

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["violation"] = self.violation
        return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in d.items()}

    def summary(self) -> str:
        who = f"client {self.client}" if self.unit == "sample" else "any client"
        verdict = (
            "VIOLATION: the run leaks more than its ledger claims"
            if self.violation
            else "no violation detected (a bound below the claim does not show the claim is tight)"
        )
        cmp = ">" if self.violation else "<="
        return (
            f"privacy audit ({self.unit}-level, {who}, {self.rounds} rounds): "
            f"{self.correct} of {self.guesses} guesses correct on {self.canaries} canaries "
            f"({self.included} included)\n"
            f"epsilon lower bound {self.epsilon_lower_bound:.3f} at "
            f"{self.confidence:.0%} confidence {cmp} claimed epsilon {self.claimed_epsilon:.3f} "
            f"({self.accountant}, delta={self.delta:g}): {verdict}"
        )


def check_audit_args(canaries: int, guesses: int | None, confidence: float) -> int:
    """Validates the audit's own arguments (before any compute); returns r.

    Raises:
      ConfigError: canaries < 3, guesses outside [2, canaries), confidence outside (0, 1).
    """
    if not isinstance(canaries, int) or isinstance(canaries, bool) or canaries < 3:
        raise ConfigError(
            f"audit canaries={canaries!r} must be an integer >= 3 (e.g. --canaries 1000)."
        )
    r = min(DEFAULT_GUESSES, canaries - 1) if guesses is None else guesses
    if not isinstance(r, int) or isinstance(r, bool) or not 2 <= r < canaries:
        raise ConfigError(
            f"audit guesses={guesses!r} must be an integer in [2, canaries={canaries}): "
            "r/2 'in' and r/2 'out' guesses among the canaries, at least one canary left "
            "unguessed (jax_privacy's auditor needs it; e.g. --guesses 100)."
        )
    if not (isinstance(confidence, (int, float)) and 0 < confidence < 1):
        raise ConfigError(f"audit confidence={confidence!r} must be in (0, 1), e.g. 0.95.")
    return r


def check_audit_config(cfg: RunConfig) -> None:
    """Refuses configs the audit cannot compare with a claim. Raises ConfigError."""
    mode = modes.spec(cfg.lora.mode)
    if mode.alternating or mode.server_rule is not None or mode.client_state is not None:
        raise ConfigError(
            f"lora.mode={mode.name!r}: the audit plants canaries in the whole trainable tree of "
            f"every round, but {mode.title} sends part of it per round or transforms the "
            "aggregate at the server; audit lora.mode: ffa, lora or fedsb."
        )
    if not cfg.privacy.enabled:
        raise ConfigError(
            f"privacy.epsilon={cfg.privacy.epsilon}: a non-private run claims no epsilon, so "
            "there is nothing to audit; set a finite privacy.epsilon (e.g. --set "
            "privacy.epsilon=6) or a privacy.noise_multiplier."
        )
    if (
        cfg.privacy.unit == "client"
        and cfg.federated.client_sampling == "fixed"
        and cfg.federated.clients_per_round not in (None, 0, cfg.federated.clients)
    ):
        raise ConfigError(
            "federated.client_sampling=fixed: its client-level accounting is for replacing one "
            "client, which the audit's add/remove canaries do not test; audit with "
            "federated.client_sampling=poisson (or full participation)."
        )
    if cfg.privacy.mechanism == "banded_mf":
        raise ConfigError(
            "privacy.mechanism=banded_mf: the audit's canary scoring assumes independent noise "
            "in every round; auditing correlated BandMF noise (which needs the canaries' "
            "scores decorrelated by C) is planned. Audit with privacy.mechanism=gaussian."
        )


@jax.jit
def _canary_sum(sampled: jax.Array, dirs: jax.Array) -> jax.Array:
    """``[..., m]`` {0, 1} x ``[m, d]`` -> ``[..., d]``: the sum of the sampled canaries."""
    return sampled.astype(dirs.dtype) @ dirs


@jax.jit
def _scores(dirs: jax.Array, released: jax.Array) -> jax.Array:
    return dirs @ released


def audit_secret(cfg: RunConfig) -> int:
    """The audit run's own secret: a fresh draw from the OS; with ``privacy.noise_seed`` set
    (reproducible research), ``SHA-256(noise_seed || "audit")``, which shares no draw with
    the training run of that seed (whose secret is ``noise_seed`` itself)."""
    if cfg.privacy.noise_seed is None:
        return secret_lib.draw()
    return secret_lib.derive(cfg.privacy.noise_seed, "audit")


def audit_run(
    cfg: RunConfig,
    *,
    canaries: int = DEFAULT_CANARIES,
    guesses: int | None = None,
    confidence: float = 0.95,
    client: int | None = None,
    noise_scale: float = 1.0,
    progress: bool = False,
    log=print,
) -> RunAudit:
    """Trains ``cfg``'s run with gradient canaries and returns the empirical epsilon lower
    bound next to the ledger's claimed epsilon (see the module docstring for what is audited
    and the formal statement).

    Args:
      cfg: a private run config (``ffa-jax train``'s); nothing is written.
      canaries: m >= 3 (memory ``m x trainable size`` floats).
      guesses: r in [2, m) (default min(100, m - 1)): r // 2 "in", the rest "out".
      confidence: of the lower bound, in (0, 1).
      client: the audited client under ``sample`` (default: the one with the largest
        accounted epsilon); must be None under ``client``.
      noise_scale: factor on the calibrated noise multipliers while the ledger still claims
        the calibrated epsilon. Only for tests of the audit itself (0.0 is a broken
        mechanism that the audit must catch); deliberately not a config field.
      progress: show a progress bar over rounds.

    Raises:
      ConfigError: bad audit arguments or a config that cannot be audited (non-private,
        fixed-size client sampling under ``client``), before any compute; or as
        :func:`ffa_jax.run.prepare` (bad config, data or model files).
      NonFiniteError: the run produced a non-finite update (no score can be computed).
    """
    r = check_audit_args(canaries, guesses, confidence)
    check_audit_config(cfg)
    unit = cfg.privacy.unit
    if unit == "client" and client is not None:
        raise ConfigError(
            f"audit client={client}: under privacy.unit=client the unit is any client (canary "
            "clients are added at the server); do not pass a client."
        )
    k_num = cfg.federated.clients
    if client is not None and not (isinstance(client, int) and 0 <= client < k_num):
        raise ConfigError(f"audit client={client!r} must be in [0, {k_num}) (federated.clients).")

    # Fresh keys, independent of any training run's: the audit's noise, batches, participants
    # and canaries never repeat a training run's draws, so the artefacts of a training run and
    # of its audit together cannot cancel either's noise (see audit_secret).
    a_secret = audit_secret(cfg)
    prep = prepare(cfg, log=log, secret=a_secret)
    check_budget(prep, None)
    log(privacy_line(prep))
    plan = prep.plan
    if unit == "sample":
        if client is None:
            client = int(np.argmax(plan.client_epsilon))
        claimed = float(plan.client_epsilon[client])
        norm = cfg.privacy.clip_norm
        if plan.rounds_participated[client] == 0:
            raise ConfigError(
                f"audit client={client} takes part in no round (federated.clients_per_round="
                f"{cfg.federated.clients_per_round}): nothing of its data is released; audit "
                "another client or run more rounds."
            )
    else:
        claimed = plan.epsilon
        norm = cfg.privacy.client_clip_norm

    flat0, unravel = ravel_pytree(prep.trainable)
    key = secret_lib.jax_key(a_secret, AUDIT_PURPOSE)
    included = np.asarray(
        jax.random.bernoulli(jax.random.fold_in(key, _INCLUSION), 0.5, (canaries,))
    )
    dirs = canary_directions(jax.random.fold_in(key, _DIRECTIONS), canaries, flat0.size, norm)
    incl = jnp.asarray(included)
    per_round_key = jax.random.fold_in(key, _PARTICIPATION)
    steps = cfg.federated.local_steps

    round_fn, server_opt = build_round(prep, return_deltas=True)
    state = jax.device_get(init_server_state(prep, server_opt))
    run_key = train_key(prep)
    scores = np.zeros(canaries, np.float64)
    rounds_released = 0
    rounds = range(cfg.federated.rounds)
    if progress:
        from tqdm.auto import tqdm

        rounds = tqdm(rounds, desc=f"audit {cfg.name}", unit="round")
    t0 = time.time()
    for rnd in rounds:
        inp = round_inputs(prep, rnd)
        rkey = jax.random.fold_in(per_round_key, rnd)
        if unit == "sample":
            dp = inp.inputs.dp
            inputs = inp.inputs._replace(
                dp=dp._replace(noise_multiplier=dp.noise_multiplier * noise_scale)
            )
            inp = inp._replace(inputs=inputs)
            where = np.flatnonzero(inp.slots == client)
            slot = int(where[0]) if len(where) else None  # None: the client sits out
            # Each included canary takes part in each local step with the client's Poisson
            # rate q_k, as a real example would; zeros when the client sits the round out.
            rate = float(plan.sampling_rates[client]) if slot is not None else 0.0
            sampled = jax.random.bernoulli(rkey, rate, (steps, canaries)) & incl
            sums = jnp.zeros((len(inp.slots), steps, flat0.size), jnp.float32)
            if slot is not None:
                sums = sums.at[slot].set(_canary_sum(sampled, dirs))
            extra = {"extra_grad_sums": jax.vmap(jax.vmap(unravel))(sums)}
        else:
            sdp = inp.inputs.server_dp
            inputs = inp.inputs._replace(
                server_dp=sdp._replace(noise_multiplier=sdp.noise_multiplier * noise_scale)
            )
            inp = inp._replace(inputs=inputs)
            # A canary client takes part in each round like a real one: Poisson at M / N.
            rate = plan.sampling.rate
            sampled = jax.random.bernoulli(rkey, rate, (canaries,)) & incl
            extra = {"extra_update_sum": unravel(_canary_sum(sampled, dirs))}
        new_state, metrics, released = run_round(round_fn, prep, state, inp, run_key, **extra)
        loss = float(metrics.loss)
        # No checkpoint is written, so none is named in the error.
        check_finite(rnd, loss, float(metrics.update_norm), new_state.trainable, Path(), None)
        state = jax.device_get(new_state)
        if unit == "sample":
            if slot is None:
                continue
            upload = jax.tree_util.tree_map(lambda x, s=slot: x[s], released.deltas)
            # A sampled canary gradient moves the client's model along -u_i.
            scores -= np.asarray(_scores(dirs, ravel_pytree(upload)[0]), np.float64)
        else:
            # A sampled canary update moves the aggregate along +u_i.
            scores += np.asarray(_scores(dirs, ravel_pytree(released.mean_delta)[0]), np.float64)
        rounds_released += 1
        if not progress:
            log(
                f"audit round {rnd + 1}/{cfg.federated.rounds}: train loss {loss:.4f} "
                f"({time.time() - t0:.0f} s)"
            )

    k_in = r // 2
    r, v = guess_and_count(scores, included, k_in, r - k_in)
    return RunAudit(
        epsilon_lower_bound=epsilon_lower_bound(canaries, r, v, cfg.privacy.delta, confidence),
        claimed_epsilon=claimed,
        delta=cfg.privacy.delta,
        accountant=cfg.privacy.accountant,
        unit=unit,
        canaries=canaries,
        guesses=r,
        correct=v,
        included=int(included.sum()),
        confidence=float(confidence),
        client=client,
        rounds=rounds_released,
        noise_scale=float(noise_scale),
    )
