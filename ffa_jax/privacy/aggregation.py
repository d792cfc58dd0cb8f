"""Client-level DP aggregation at the server (DP-FedAvg): per-client clipping of whole
updates and their sum with ``jax_privacy.clipping.clipped_fun`` and noise on the sum: independent
Gaussian from jax-privacy's Gaussian privatizer (via :mod:`ffa_jax.privacy.noise`), or
correlated BandMF noise from its matrix-factorization privatizer
(:mod:`ffa_jax.privacy.correlated`).

:mod:`ffa_jax.federated.server` and :mod:`ffa_jax.federated.round` call these; the
accounting of the released sums is :mod:`ffa_jax.privacy.client_level`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import jax_privacy.clipping

from ffa_jax.privacy.clipping import guard_with_scale, overflow_bound
from ffa_jax.privacy.correlated import BandedNoise
from ffa_jax.privacy.noise import gaussian_noise_like
from ffa_jax.types import PyTree


def dp_fedavg_aggregate(
    stacked: PyTree,
    participation: jax.Array,
    dp: Any,
    key: jax.Array,
    extra_sum: PyTree | None = None,
) -> tuple[PyTree, jax.Array]:
    """Client-level DP aggregation (DP-FedAvg, McMahan et al., ICLR 2018).

    ``(sum_k p_k clip_S(delta_k) + N(0, (z S)^2 I)) / expected_clients`` with ``p_k`` in {0, 1}.

    Args:
      stacked: client updates, leaves ``[K, ...]``.
      participation: ``[K]`` 1 for clients that took part, 0 for dummies / non-sampled.
      dp: a :class:`ffa_jax.federated.server.ServerDpParams` (clip_norm S, noise_multiplier z,
        expected_clients).
      key: the server's noise key for this round (never used for anything else).
      extra_sum: optional tree like one client's update (no client axis), added to the sum of
        clipped updates before the noise: the privacy audit's canary client updates (each of
        norm S), see :mod:`ffa_jax.run.audit`. None leaves the computation unchanged.

    Returns:
      (noisy mean update, norms before clipping ``[K]``).

    Formal guarantee:
      Adding or removing all the data of one client changes the clipped sum by at most S in
      L2 norm, so with noise std ``z S`` each round is the Gaussian mechanism with sensitivity
      S; with Poisson client sampling at rate q it is the sampled Gaussian mechanism, composed
      over rounds by :mod:`ffa_jax.privacy.accounting` (client-level (epsilon, delta)-DP).
      The server is trusted to add the noise (it sees the clipped updates).
    """
    summed, norms = clipped_sum(stacked, participation, dp.clip_norm, extra_sum)
    noise = gaussian_noise_like(summed, dp.noise_multiplier * dp.clip_norm, key)
    noisy = jax.tree_util.tree_map(lambda s, n: (s + n) / dp.expected_clients, summed, noise)
    return noisy, norms


def clipped_sum(
    stacked: PyTree,
    participation: jax.Array,
    clip_norm: jax.Array,
    extra_sum: PyTree | None = None,
) -> tuple[PyTree, jax.Array]:
    """``sum_k p_k clip_S(delta_k)`` (+ ``extra_sum``) and the norms before clipping ``[K]``.

    Per-client (per-user) clipping by ``jax_privacy.clipping.clipped_fun`` over the client
    axis: each client's whole update is one group, clipped to global L2 norm S
    (``clip_pytree``), non-participants (``p_k = 0``: dummies, clients not sampled) zeroed
    as its padding examples, and the clipped updates summed in float32. Before the library's
    clip, :func:`ffa_jax.privacy.clipping.guard_with_scale` zeroes an update with a
    non-finite entry (it would otherwise break the sensitivity bound) and rescales a huge
    finite one so that its norm cannot overflow.

    Not private by itself: the server noises it (:func:`dp_fedavg_aggregate`,
    :func:`banded_mf_aggregate`). Leaves like one client's update (client axis summed out).

    Args:
      stacked: client updates, leaves ``[K, ...]``.
      participation: ``[K]`` in {0, 1} (uniform weighting is enforced by the config under
        client-level DP).
      clip_norm: S > 0 (scalar, Python or traced).
      extra_sum: optional tree like one client's update, added after clipping.

    Returns:
      The sum (leaves like one update, in their dtypes) and the norms before clipping ``[K]``
      (float32; nan for a non-finite update).

    Formal guarantee:
      Adding or removing one client changes the sum by at most S in L2 norm (the library's
      ``BoundedSensitivityCallable.sensitivity``), whatever the updates hold.
    """
    bound = overflow_bound(jax.tree_util.tree_map(lambda x: x[0], stacked))
    clip = jax_privacy.clipping.clipped_fun(
        lambda update: guard_with_scale(update, bound),
        has_aux=True,
        keep_batch_dim=False,
        l2_clip_norm=jnp.asarray(clip_norm, jnp.float32),
        dtype=jnp.float32,
        return_norms=True,
    )
    summed, (scales, guarded_norms) = clip(stacked, is_padding_example=participation <= 0)
    summed = jax.tree_util.tree_map(lambda s, x: s.astype(x.dtype), summed, stacked)
    if extra_sum is not None:
        summed = jax.tree_util.tree_map(jnp.add, summed, extra_sum)
    # The raw update's norm: the guard multiplied it by ``scale`` (0 when non-finite: nan).
    return summed, guarded_norms / scales


def banded_mf_aggregate(
    stacked: PyTree,
    participation: jax.Array,
    dp: Any,
    noise: BandedNoise,
    noise_state: PyTree,
    extra_sum: PyTree | None = None,
) -> tuple[PyTree, jax.Array, PyTree]:
    """Client-level DP aggregation with correlated (BandMF) noise: DP-FedAvg whose server
    noise is round t's row of ``z S C^{-1} W`` (:mod:`ffa_jax.privacy.correlated`).

    ``(sum_k p_k clip_S(delta_k) + z S (C^{-1} W)_t) / expected_clients``.

    Args:
      stacked, participation, dp, extra_sum: as in :func:`dp_fedavg_aggregate`.
      noise: the run's :class:`ffa_jax.privacy.correlated.BandedNoise` (static).
      noise_state: its state before this round (from the server state).

    Returns:
      (noisy mean update, norms before clipping ``[K]``, the next noise state).

    Formal guarantee:
      With cyclic Poisson client sampling of cycle length ``noise.bands`` (accounted by
      :mod:`ffa_jax.privacy.client_level` with ``cycle_length = bands``), the released
      sequence of noisy sums is the amplified BandMF mechanism: client-level
      (epsilon, delta)-DP under add/remove of one client, the server trusted with the
      clipped updates (see :mod:`ffa_jax.privacy.correlated`).
    """
    summed, norms = clipped_sum(stacked, participation, dp.clip_norm, extra_sum)
    corr, noise_state = noise.next(summed, dp.noise_multiplier * dp.clip_norm, noise_state)
    noisy = jax.tree_util.tree_map(
        lambda s, n: ((s.astype(jnp.float32) + n) / dp.expected_clients).astype(s.dtype),
        summed,
        corr,
    )
    return noisy, norms, noise_state
