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

from ffa_jax.privacy import accounting


@dataclasses.dataclass(frozen=True)
class PrivacyPlan:
    """Sample-level DP-SGD on every client (the paper's setting).

    Attributes:
      noise_multipliers: ``[K]`` sigma_k (0 when the run is not private).
      sampling_rates: ``[K]`` q_k = batch_size / n_k.
      client_sizes: ``[K]`` n_k.
      max_batch_size: B_max, the fixed physical batch (Poisson batches are padded to it).
      steps: local DP-SGD steps per client over the run (rounds x local_steps).
      epsilon_curve: ``[rounds]`` epsilon spent after each round, max over clients.
      client_epsilon: ``[K]`` final epsilon of each client.
      overflow_probability: ``[K]`` per-step probability that a Poisson batch exceeds B_max.
      delta, accountant: as configured.
    """

    noise_multipliers: np.ndarray
    sampling_rates: np.ndarray
    client_sizes: np.ndarray
    max_batch_size: int
    steps: int
    epsilon_curve: np.ndarray
    client_epsilon: np.ndarray
    overflow_probability: np.ndarray
    delta: float
    accountant: str
    private: bool

    @property
    def epsilon(self) -> float:
        return float(self.epsilon_curve[-1])

    def to_json(self) -> dict[str, Any]:
        def num(x):
            return None if not math.isfinite(float(x)) else float(x)

        return {
            "private": self.private,
            "unit": "sample-level, per client",
            "accountant": self.accountant,
            "delta": self.delta if self.private else None,
            "epsilon": num(self.epsilon),
            "noise_multiplier": [float(s) for s in self.noise_multipliers],
            "sampling_rate": [float(q) for q in self.sampling_rates],
            "client_sizes": [int(n) for n in self.client_sizes],
            "max_batch_size": self.max_batch_size,
            "steps": self.steps,
            "epsilon_curve": [num(e) for e in self.epsilon_curve],
            "client_epsilon": [num(e) for e in self.client_epsilon],
            "overflow_probability_per_step": [float(p) for p in self.overflow_probability],
        }


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
) -> PrivacyPlan:
    """Calibrates sigma_k for every client so that each spends exactly ``epsilon`` (or, with
    a fixed ``noise_multiplier``, reports what it spends).

    Each client has its own sampling rate ``q_k = batch_size / n_k`` and therefore its own
    sigma_k: every client meets the target, none is over-noised. The accounting covers the
    fixed-size padding exactly with PLD (truncated Poisson sampling, see
    :mod:`ffa_jax.privacy.accounting`).

    Formal guarantee:
      With these sigma_k, client k's local training over all ``rounds x local_steps`` steps
      is (epsilon_k, delta)-DP with respect to adding or removing one of its examples; the
      reported epsilon is ``max_k epsilon_k``.
    """
    sizes = np.asarray(client_sizes, dtype=np.int64)
    q = batch_size / sizes
    steps = rounds * local_steps
    private = math.isfinite(epsilon) or noise_multiplier is not None
    overflow = np.array(
        [
            accounting.overflow_probability(int(n), float(qk), max_batch_size)
            for n, qk in zip(sizes, q, strict=True)
        ]
    )
    if not private:
        k = len(sizes)
        return PrivacyPlan(
            noise_multipliers=np.zeros(k),
            sampling_rates=q,
            client_sizes=sizes,
            max_batch_size=max_batch_size,
            steps=steps,
            epsilon_curve=np.full(rounds, math.inf),
            client_epsilon=np.full(k, math.inf),
            overflow_probability=overflow,
            delta=delta,
            accountant=accountant,
            private=False,
        )
    truncs = [accounting.Truncation(int(n), int(max_batch_size)) for n in sizes]
    if noise_multiplier is not None:
        sigmas = np.full(len(sizes), float(noise_multiplier))
    else:
        sigmas = np.array(
            [
                accounting.calibrate_noise_multiplier(
                    epsilon, delta, float(qk), steps, accountant, truncation=t
                )
                for qk, t in zip(q, truncs, strict=True)
            ]
        )
    curves = np.stack(
        [
            accounting.epsilon_curve(
                float(s), float(qk), local_steps, rounds, delta, accountant, truncation=t
            )
            for s, qk, t in zip(sigmas, q, truncs, strict=True)
        ]
    )
    return PrivacyPlan(
        noise_multipliers=sigmas,
        sampling_rates=q,
        client_sizes=sizes,
        max_batch_size=max_batch_size,
        steps=steps,
        epsilon_curve=curves.max(axis=0),
        client_epsilon=curves[:, -1],
        overflow_probability=overflow,
        delta=delta,
        accountant=accountant,
        private=True,
    )


def alternatives(
    plan: PrivacyPlan, *, batch_size: int, rounds: int, local_steps: int, epsilon: float
) -> list[dict[str, Any]]:
    """What-if table: for other (rounds, local steps, batch size) choices, the noise multiplier
    needed to keep the target epsilon and the epsilon the current sigma would spend.

    Uses untruncated Poisson accounting (fast); fixed-size truncation changes these numbers
    by well under 1%.
    """
    if not plan.private:
        return []
    k = int(np.argmax(plan.sampling_rates))  # the smallest client is the binding one
    n = int(plan.client_sizes[k])
    sigma_now = float(plan.noise_multipliers[k])
    rows = []
    for name, r, s, b in [
        ("as configured", rounds, local_steps, batch_size),
        ("rounds x 2", rounds * 2, local_steps, batch_size),
        ("rounds / 2", max(1, rounds // 2), local_steps, batch_size),
        ("local_steps x 2", rounds, local_steps * 2, batch_size),
        ("batch_size x 2", rounds, local_steps, batch_size * 2),
        ("batch_size / 2", rounds, local_steps, max(1, batch_size // 2)),
    ]:
        q = min(1.0, b / n)
        steps = r * s
        row = {"change": name, "rounds": r, "local_steps": s, "batch_size": b, "sampling_rate": q}
        row["epsilon_at_current_sigma"] = accounting.epsilon_spent(
            sigma_now, q, steps, plan.delta, plan.accountant
        )
        if math.isfinite(epsilon):
            row["sigma_for_target"] = accounting.calibrate_noise_multiplier(
                epsilon, plan.delta, q, steps, plan.accountant
            )
        rows.append(row)
    return rows


def format_plan(plan: PrivacyPlan, alt: list[dict[str, Any]], every: int | None = None) -> str:
    """Human-readable tables of a plan."""
    if not plan.private:
        return "privacy.epsilon = inf: no clipping, no noise, no privacy guarantee."
    lines = [
        f"Sample-level DP per client ({plan.accountant.upper()} accountant, delta={plan.delta:g}), "
        f"{plan.steps} local DP-SGD steps per client, physical batch B_max={plan.max_batch_size}",
        "",
        "client      n   sampling rate q   noise multiplier   overflow/step   final epsilon",
    ]
    for i in range(len(plan.client_sizes)):
        lines.append(
            f"{i:6d} {plan.client_sizes[i]:6d} {plan.sampling_rates[i]:17.5f} {plan.noise_multipliers[i]:18.4f}"
            f" {plan.overflow_probability[i]:15.2e} {plan.client_epsilon[i]:15.4f}"
        )
    rounds = len(plan.epsilon_curve)
    every = every or max(1, rounds // 10)
    lines += ["", "round   epsilon spent (max over clients)"]
    for r in range(rounds):
        if (r + 1) % every == 0 or r == 0 or r + 1 == rounds:
            lines.append(f"{r + 1:5d}   {plan.epsilon_curve[r]:.4f}")
    if alt:
        lines += [
            "",
            "alternatives (binding = smallest client)     sigma for target   epsilon at current sigma",
        ]
        for row in alt:
            sig = row.get("sigma_for_target")
            lines.append(
                f"  {row['change']:<16} rounds={row['rounds']:<5} steps={row['local_steps']:<3} batch={row['batch_size']:<5}"
                f" {sig if sig is None else f'{sig:10.4f}':>12} {row['epsilon_at_current_sigma']:22.4f}"
            )
    return "\n".join(lines)


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
        title=f"privacy spent ({plan.accountant}, delta={plan.delta:g})",
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
