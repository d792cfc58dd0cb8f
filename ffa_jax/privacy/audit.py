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

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ffa_jax.errors import ConfigError
from ffa_jax.privacy.noise import privatize_grad_sum


def _log_binom_pmf(k: np.ndarray, n: int, q: float) -> np.ndarray:
    k = np.asarray(k, np.float64)
    log_c = np.array([math.lgamma(n + 1) - math.lgamma(x + 1) - math.lgamma(n - x + 1) for x in k])
    if q <= 0.0:
        return np.where(k == 0, 0.0, -np.inf)
    if q >= 1.0:
        return np.where(k == n, 0.0, -np.inf)
    return log_c + k * math.log(q) + (n - k) * math.log1p(-q)


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P-value of "v or more of r guesses correct" if the mechanism were (epsilon, delta)-DP
    for each of m canaries (each included with probability 1/2).

    ``P[Binomial(r, q) >= v] + 2 m delta max_{1<=i<=v} P[v > Binomial(r, q) >= v - i] / i``
    with ``q = e^eps / (1 + e^eps)`` (Steinke, Nasr, Jagielski 2023, Theorem 5.2).
    """
    if not (0 <= v <= r <= m) or epsilon < 0 or not 0 <= delta <= 1:
        raise ConfigError(
            f"audit: need 0 <= v <= r <= m, epsilon >= 0, delta in [0, 1]; got "
            f"m={m}, r={r}, v={v}, epsilon={epsilon}, delta={delta}."
        )
    q = 1.0 / (1.0 + math.exp(-epsilon))
    pmf = np.exp(_log_binom_pmf(np.arange(r + 1), r, q))
    tail = float(pmf[v:].sum())
    below = np.cumsum(pmf[:v][::-1])  # below[i-1] = P[v - i <= B < v]
    alpha = float(np.max(below / np.arange(1, v + 1))) if v > 0 else 0.0
    return min(1.0, tail + 2.0 * m * delta * alpha)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest epsilon that ``(m, r, v)`` rejects at ``confidence`` (0 if none): with
    probability >= confidence, the mechanism is not (epsilon', delta)-DP for any epsilon' below
    it."""
    if not 0 < confidence < 1:
        raise ConfigError(f"audit confidence={confidence!r} must be in (0, 1), e.g. 0.95.")
    p = 1.0 - confidence
    if p_value(m, r, v, 0.0, delta) >= p:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < p:
        lo, hi = hi, 2 * hi
        if hi > 1e3:
            return math.inf
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if p_value(m, r, v, mid, delta) < p:
            lo = mid
        else:
            hi = mid
    return lo


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
