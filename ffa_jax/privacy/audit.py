"""Empirical privacy auditing in one run (Steinke, Nasr, Jagielski, NeurIPS 2023).

m canaries are each included independently with probability 1/2; after one training run an
auditor scores every canary, guesses "in" for the ``k_in`` highest scores and "out" for the
``k_out`` lowest (r = k_in + k_out guesses) and counts the v correct guesses. If the mechanism
is (epsilon, delta)-DP with respect to one canary, v is stochastically dominated as in their
Theorem 5.2 / Appendix D, which gives a p-value for "the mechanism is (epsilon, delta)-DP"; the
largest epsilon rejected at the given confidence is an empirical **lower bound** on the true
epsilon. A correct implementation must give a lower bound <= the accounted epsilon (up to the
1 - confidence chance of a false rejection); a lower bound above it proves a privacy bug.

:func:`gradient_canary_audit` audits ffa_jax's DP-SGD noise step (``privatize_grad_sum``) with
white-box gradient canaries: every step releases the sum of the included canaries' gradients
(each of norm C, the clipping norm) plus the mechanism's Gaussian noise; the auditor scores a
canary by the inner product of its direction with the sum of the released updates. This is the
strongest adversary for the Gaussian mechanism (it sees every noisy sum), so the bound is as
tight as one run allows; it audits the mechanism, not the federated pipeline around it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax_privacy import auditing

from ffa_jax.errors import ConfigError
from ffa_jax.privacy.noise import privatize_grad_sum


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest epsilon that ``v`` correct of ``r`` guesses on ``m`` canaries rejects at
    ``confidence`` (0.0 if none), computed by ``jax_privacy.auditing.CanaryScoreAuditor``.

    With probability >= ``confidence`` (over the canaries' inclusion and the mechanism's
    randomness), a mechanism that is (epsilon', delta)-DP for each canary does not produce
    ``v`` or more correct guesses for any epsilon' below the returned value (Steinke, Nasr,
    Jagielski 2023, Theorem 5.2). The p-value of that theorem depends only on ``(m, r, v)``,
    while the library's auditor scores one-sided "in" guesses above a threshold. ffa_jax's
    guesses are two-sided (:func:`guess_and_count`), so they are handed to the auditor as
    *correctness* scores: each correct guess is a held-in canary scoring 1, each wrong guess a
    held-out canary scoring 1, every unguessed canary scores 0, and the threshold is 1
    (``Explicit(1.0)``): the auditor then sees exactly ``r`` guesses, ``v`` correct, of ``m``.

    Raises:
      ConfigError: not ``0 <= v <= r < m`` (the auditor needs a held-out canary, so at least one
        canary stays unguessed), delta outside (0, 1], or confidence outside (0, 1).
    """
    if not (0 <= v <= r < m) or not 0 < delta <= 1:
        raise ConfigError(
            f"audit: need 0 <= v <= r < m and delta in (0, 1]; got m={m}, r={r}, v={v}, "
            f"delta={delta}."
        )
    if not 0 < confidence < 1:
        raise ConfigError(f"audit confidence={confidence!r} must be in (0, 1), e.g. 0.95.")
    # One unguessed canary goes to the held-out side when every guess is right, so neither
    # side is empty (the auditor refuses an empty side); unguessed canaries count only in m.
    spare_out = int(v == r)
    held_in = np.r_[np.ones(v), np.zeros(m - r - spare_out)]
    held_out = np.r_[np.ones(r - v), np.zeros(spare_out)]
    auditor = auditing.CanaryScoreAuditor(held_in, held_out)
    return float(
        auditor.epsilon_one_run(1.0 - confidence, delta, threshold_strategy=auditing.Explicit(1.0))
    )


class AuditResult(NamedTuple):
    epsilon_lower_bound: float
    canaries: int  # m
    guesses: int  # r
    correct: int  # v
    confidence: float


def guess_and_count(
    scores: np.ndarray, included: np.ndarray, k_in: int, k_out: int
) -> tuple[int, int]:
    """Guess "in" for the ``k_in`` highest scores and "out" for the ``k_out`` lowest;
    returns ``(r, v)``: guesses made and guesses correct."""
    order = np.argsort(scores)
    out_idx, in_idx = order[:k_out], order[len(order) - k_in :]
    v = int(np.sum(included[in_idx])) + int(np.sum(~included[out_idx]))
    return k_in + k_out, v


def canary_directions(key: jax.Array, m: int, dim: int, norm: float) -> jax.Array:
    """``[m, dim]`` float32 random directions (Gaussian, normalised) of L2 norm exactly
    ``norm``: the gradient canaries."""
    d = jax.random.normal(key, (m, dim), jnp.float32)
    return norm * d / jnp.linalg.norm(d, axis=1, keepdims=True)


def gradient_canary_audit(
    *,
    noise_multiplier: float,
    steps: int,
    key: jax.Array,
    num_canaries: int = 1000,
    dim: int = 4096,
    clip_norm: float = 1.0,
    guesses: int = 100,
    delta: float = 1e-5,
    confidence: float = 0.95,
) -> AuditResult:
    """One-run audit of ``steps`` DP-SGD noise steps with white-box gradient canaries.

    Each of ``num_canaries`` canaries is a random direction of norm ``clip_norm`` in
    ``dim`` dimensions, included with probability 1/2 (from ``key``). Every step releases
    ``privatize_grad_sum(sum of included canaries, noise_multiplier, ...)``; a canary's score
    is the inner product of its direction with the sum of the releases. ``guesses`` in and
    ``guesses`` out are made (r = 2 x guesses).

    The mechanism audited is ``steps`` compositions of the Gaussian mechanism with sensitivity
    ``clip_norm`` and noise multiplier ``noise_multiplier`` (every canary in every step), whose
    accounted epsilon is ``SelfComposedDpEvent(GaussianDpEvent(sigma), steps)``.
    """
    k_incl, k_dir, k_noise = jax.random.split(key, 3)
    included = np.asarray(jax.random.bernoulli(k_incl, 0.5, (num_canaries,)))
    dirs = canary_directions(k_dir, num_canaries, dim, clip_norm)
    grad_sum = {"g": jnp.asarray(included, jnp.float32) @ dirs}
    total = jnp.zeros((dim,), jnp.float32)
    for s in range(steps):
        out = privatize_grad_sum(
            grad_sum,
            clip_norm=clip_norm,
            noise_multiplier=noise_multiplier,
            expected_batch_size=1.0,
            key=jax.random.fold_in(k_noise, s),
        )
        total = total + out["g"]
    scores = np.asarray(dirs @ total)
    r, v = guess_and_count(scores, included, guesses, guesses)
    bound = epsilon_lower_bound(num_canaries, r, v, delta, confidence)
    return AuditResult(bound, num_canaries, r, v, confidence)
