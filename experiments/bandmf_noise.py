"""The accumulated server noise of the two client-level mechanisms at the same (epsilon, delta),
measured by drawing it (no training): ``||sum_{t<=T} noise_t|| / M`` for a trainable tree of
``--dim`` numbers, over several noise keys, next to the planner's prediction
(:func:`ffa_jax.privacy.correlated.summed_noise_std` x sqrt(dim) / M).

Same settings as ``experiments/bandmf_pair.py`` by default (N = 100 clients, M = 5 per round,
T = 100 rounds, b = 10 bands, epsilon = 8, RDP, |B| = 2,304: rank-1 FFA-LoRA on MiniLM's six
value projections, client clip norm S = 1).

    python experiments/bandmf_noise.py --out experiments/results/bandmf/noise.csv
"""

from __future__ import annotations

import argparse
import csv
import math
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ffa_jax.federated import participation
from ffa_jax.federated.round import server_noise_key
from ffa_jax.privacy import client_level, correlated
from ffa_jax.privacy.noise import gaussian_noise_like

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--per-round", type=int, default=5)
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--bands", type=int, default=10)
    p.add_argument("--epsilon", type=float, default=8.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--accountant", default="rdp")
    p.add_argument("--dim", type=int, default=2304)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--keys", type=int, default=10)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    n, m, t, b = a.clients, a.per_round, a.rounds, a.bands
    samplings = {
        "gaussian": (
            client_level.ClientSampling(n, m, "poisson", participation.slot_count(n, m, "poisson")),
            1,
        ),
        "banded_mf": (
            client_level.ClientSampling(
                n, m, "poisson", participation.slot_count(n // b, m, "poisson"), b
            ),
            b,
        ),
    }
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    rows = []
    like = jnp.zeros(a.dim, jnp.float32)
    for name, (s, bands) in samplings.items():
        z = client_level.calibrate(a.epsilon, a.delta, s, t, a.accountant)
        eps = client_level.epsilon_spent(z, s, t, a.delta, a.accountant)
        std = z * a.clip
        pred = correlated.summed_noise_std(z, t, bands)
        norms, per_round = [], []
        for k in range(a.keys):
            key = jax.random.key(1000 + k)
            if bands == 1:
                noise = jnp.stack(
                    [gaussian_noise_like(like, std, server_noise_key(key, r)) for r in range(t)]
                )
            else:
                noise = std * correlated.noise_stream(t, bands, like, key, t)
            noise = np.asarray(noise, np.float64)
            norms.append(np.linalg.norm(noise.sum(axis=0)) / m)
            per_round.append(np.mean(np.linalg.norm(noise, axis=1)) / m)
        row = {
            "mechanism": name,
            "bands": bands,
            "clients": n,
            "clients_per_round": m,
            "rounds": t,
            "epsilon": round(eps, 4),
            "delta": a.delta,
            "accountant": a.accountant,
            "noise_multiplier": round(z, 4),
            "dim": a.dim,
            "keys": a.keys,
            "accumulated_noise_norm_mean": round(float(np.mean(norms)), 3),
            "accumulated_noise_norm_sd": round(float(np.std(norms, ddof=1)), 3),
            "accumulated_noise_norm_predicted": round(
                pred["final"] * a.clip * math.sqrt(a.dim) / m, 3
            ),
            "per_round_noise_norm_mean": round(float(np.mean(per_round)), 3),
            "commit": commit,
        }
        print(row, flush=True)
        rows.append(row)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        with open(a.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
