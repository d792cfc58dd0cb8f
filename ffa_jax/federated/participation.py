"""Which clients take part in each round (partial participation), drawn on the host.

The draw of round ``r`` is a pure function of ``(secret, r)`` (NumPy generator seeded with
``[secret, PARTICIPATION_PURPOSE, r]``, :func:`ffa_jax.privacy.secret.numpy_rng`) and never
looks at the data, so the whole schedule is known before training: the accountant composes
exactly what will happen, and a resumed run (which reads the secret from its checkpoint)
draws the same participants. ``secret`` is the run's secret (:mod:`ffa_jax.privacy.secret`),
never the public ``seed``: client-level DP's amplification by sampling assumes the draw is
not revealed.

Shapes stay fixed so the round never recompiles: the round's client axis has
:func:`slot_count` slots (P); the participants fill the first slots and the rest are masked
dummy clients (weight 0, every example masked).

* ``fixed``: exactly M of N clients, uniformly without replacement; P = M.
* ``poisson``: each client independently with probability q = M / N; P is the smallest size
  that a Binomial(N, q) count exceeds with probability <= ``overflow_probability`` (1e-6).
  An overflowing draw keeps a uniformly random subset of P clients (truncated Poisson
  sampling, which the PLD accountant accounts for exactly).
* all clients (M = N): every client, in order, every round; P = N.
* cyclic Poisson (``cycle_length`` b > 1, ``privacy.mechanism=banded_mf``): client k belongs
  to the public group k mod b (the last N mod b clients to none); round r draws ``poisson``
  with q = M / (N // b) from group r mod b only, with P from a Binomial(N // b, q) count
  (see :mod:`ffa_jax.privacy.client_level`).
"""

from __future__ import annotations

import numpy as np

from ffa_jax.privacy import accounting
from ffa_jax.privacy import secret as secret_lib

# Host-side randomness purposes of ffa_jax.run.setup are 0..3; participation has its own.
PARTICIPATION_PURPOSE = 4
SLOT_OVERFLOW_PROBABILITY = 1e-6


def slot_count(
    num_clients: int,
    clients_per_round: int,
    sampling: str,
    overflow_probability: float = SLOT_OVERFLOW_PROBABILITY,
) -> int:
    """P, the fixed size of the round's client axis."""
    n, m = int(num_clients), int(clients_per_round)
    if m >= n:
        return n
    if sampling == "fixed":
        return m
    q = m / n
    for b in range(m, n):
        if accounting.overflow_probability(n, q, b) <= overflow_probability:
            return b
    return n


def cyclic_group(num_clients: int, cycle_length: int, round_idx: int) -> np.ndarray:
    """The clients of the (public) group that round ``round_idx`` samples from under cyclic
    Poisson sampling: ``k`` with ``k mod b == round_idx mod b``, ``k < b (N // b)``."""
    b = int(cycle_length)
    size = int(num_clients) // b
    return (round_idx % b) + b * np.arange(size, dtype=np.int64)


def participants(
    secret: int,
    round_idx: int,
    num_clients: int,
    clients_per_round: int,
    sampling: str,
    cycle_length: int = 1,
) -> np.ndarray:
    """Sorted int array of the clients taking part in round ``round_idx`` (0-based), drawn
    from the run's ``secret``. ``cycle_length`` b > 1: cyclic Poisson sampling from the group
    :func:`cyclic_group` (``sampling`` must be ``poisson``)."""
    if cycle_length > 1:
        group = cyclic_group(num_clients, cycle_length, round_idx)
        local = participants(secret, round_idx, len(group), clients_per_round, sampling)
        return group[local]
    n, m = int(num_clients), int(clients_per_round)
    if m >= n:
        return np.arange(n)
    rng = secret_lib.numpy_rng(secret, PARTICIPATION_PURPOSE, round_idx)
    if sampling == "fixed":
        chosen = rng.choice(n, size=m, replace=False)
    else:
        chosen = np.flatnonzero(rng.random(n) < m / n)
        cap = slot_count(n, m, sampling)
        if len(chosen) > cap:  # truncated Poisson: a uniformly random subset of P clients
            chosen = rng.choice(chosen, size=cap, replace=False)
    return np.sort(chosen)


def schedule(
    secret: int,
    rounds: int,
    num_clients: int,
    clients_per_round: int,
    sampling: str,
    cycle_length: int = 1,
) -> np.ndarray:
    """``[rounds, N]`` bool: entry (r, k) is True when client k takes part in round r."""
    out = np.zeros((int(rounds), int(num_clients)), dtype=bool)
    for r in range(int(rounds)):
        out[
            r,
            participants(secret, r, num_clients, clients_per_round, sampling, cycle_length),
        ] = True
    return out


def fill_order(num_slots: int, clients_per_chunk: int) -> np.ndarray:
    """Slot indices in the order participants should fill them so that whole chunks of the
    round (see :mod:`ffa_jax.federated.round`) hold participants first: chunks of dummies only
    are then skipped. ``clients_per_chunk`` 0 means one chunk."""
    c = clients_per_chunk or num_slots
    n_chunks = -(-num_slots // c)
    # The round maps slot i to (chunk i % n_chunks, position i // n_chunks).
    order = [pos * n_chunks + chunk for chunk in range(n_chunks) for pos in range(c)]
    return np.asarray([i for i in order if i < num_slots], dtype=np.int64)


def slots(members: np.ndarray, num_slots: int, clients_per_chunk: int = 0) -> np.ndarray:
    """``[P]`` int: the client in each slot of the round, -1 for a dummy slot."""
    out = np.full(num_slots, -1, dtype=np.int64)
    members = np.asarray(members)
    if len(members) == num_slots:  # everyone takes part: keep the client order
        return members.astype(np.int64)
    if len(members) > num_slots:
        raise ValueError(f"{len(members)} participants do not fit {num_slots} slots.")
    out[fill_order(num_slots, clients_per_chunk)[: len(members)]] = members
    return out
