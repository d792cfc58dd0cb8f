"""Server side: weighted aggregation of client deltas and an Optax server optimiser.

The averaged delta is treated as a negative pseudo-gradient (Reddi et al., 2021, "Adaptive
Federated Optimization"): ``sgd`` with learning rate 1 reproduces FedAvg exactly, ``momentum``
is FedAvgM, ``adam`` / ``yogi`` are FedAdam / FedYogi.

Under FFA-LoRA the trees are the B matrices only, and because every client holds the same
frozen A, ``mean_k(B_k) @ A == mean_k(B_k @ A)``: the aggregation is exact. Under LoRA, A and B
are averaged separately (the paper's baseline), which is not exact.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ffa_jax.config import ServerConfig

PyTree = Any


class ServerState(NamedTuple):
    """The global model's trainable tree, the server optimiser state and the round counter."""

    trainable: PyTree
    opt_state: optax.OptState
    round: jax.Array  # int32 scalar: rounds completed


def make_server_optimizer(cfg: ServerConfig) -> optax.GradientTransformation:
    if cfg.optimizer == "sgd":
        return optax.sgd(cfg.learning_rate)
    if cfg.optimizer == "momentum":
        return optax.sgd(cfg.learning_rate, momentum=cfg.momentum)
    if cfg.optimizer == "adam":
        return optax.adam(cfg.learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    return optax.yogi(cfg.learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)


def server_init(trainable: PyTree, optimizer: optax.GradientTransformation) -> ServerState:
    return ServerState(
        trainable=trainable, opt_state=optimizer.init(trainable), round=jnp.zeros((), jnp.int32)
    )


def weighted_mean(stacked: PyTree, weights: jax.Array) -> PyTree:
    """``sum_k w_k x_k / sum_k w_k`` over the leading client axis of every leaf.

    Args:
      stacked: tree of ``[K, ...]`` arrays.
      weights: ``[K]`` non-negative; padded (dummy) clients have weight 0 and contribute
        nothing, even if their values are not finite.
    """
    total = jnp.maximum(jnp.sum(weights), 1e-12)

    def mean(x):
        w = weights.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
        return jnp.sum(jnp.where(w > 0, x * w, 0), axis=0) / total

    return jax.tree_util.tree_map(mean, stacked)


def server_update(
    state: ServerState, mean_delta: PyTree, optimizer: optax.GradientTransformation
) -> ServerState:
    """Applies the server optimiser to the pseudo-gradient ``-mean_delta``."""
    pseudo_grad = jax.tree_util.tree_map(jnp.negative, mean_delta)
    updates, opt_state = optimizer.update(pseudo_grad, state.opt_state, state.trainable)
    return ServerState(
        trainable=optax.apply_updates(state.trainable, updates),
        opt_state=opt_state,
        round=state.round + 1,
    )


class ServerDpParams(NamedTuple):
    """Client-level DP (DP-FedAvg) parameters; runtime values, changing them never recompiles.

    Attributes:
      clip_norm: S, the L2 bound of each client's whole uploaded update.
      noise_multiplier: z; the server adds ``N(0, (z S)^2 I)`` to the sum of clipped updates.
      expected_clients: the fixed denominator (expected number of participating clients).
    """

    clip_norm: jax.Array
    noise_multiplier: jax.Array
    expected_clients: jax.Array


def clip_updates(stacked: PyTree, clip_norm: jax.Array) -> tuple[PyTree, jax.Array]:
    """Scales each client's update (leading axis K) to global L2 norm <= ``clip_norm``.

    Returns the clipped stack and the norms before clipping ``[K]``. A non-finite update is
    replaced by zeros (it would otherwise break the sensitivity bound).
    """
    leaves = jax.tree_util.tree_leaves(stacked)
    sq = sum(
        jnp.sum(jnp.square(x.astype(jnp.float32)).reshape(x.shape[0], -1), axis=1) for x in leaves
    )
    norms = jnp.sqrt(sq)
    finite = jnp.isfinite(norms)
    factor = jnp.where(finite, jnp.minimum(1.0, clip_norm / jnp.maximum(norms, 1e-30)), 0.0)

    def scale(x):
        f = factor.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
        return jnp.where(f > 0, x * f, 0)

    return jax.tree_util.tree_map(scale, stacked), norms


def dp_fedavg_aggregate(
    stacked: PyTree,
    participation: jax.Array,
    dp: ServerDpParams,
    key: jax.Array,
    extra_sum: PyTree | None = None,
) -> tuple[PyTree, jax.Array]:
    """Client-level DP aggregation (DP-FedAvg, McMahan et al., ICLR 2018).

    ``(sum_k p_k clip_S(delta_k) + N(0, (z S)^2 I)) / expected_clients`` with ``p_k`` in {0, 1}.

    Args:
      stacked: client updates, leaves ``[K, ...]``.
      participation: ``[K]`` 1 for clients that took part, 0 for dummies / non-sampled.
      dp: :class:`ServerDpParams`.
      key: the server's noise key for this round (never used for anything else).
      extra_sum: optional tree like one client's update (no client axis), added to the sum of
        clipped updates before the noise: the privacy audit's canary client updates (each of
        norm S), see :mod:`ffa_jax.privacy.audit_run`. None leaves the computation unchanged.

    Returns:
      (noisy mean update, norms before clipping ``[K]``).

    Formal guarantee:
      Adding or removing all the data of one client changes the clipped sum by at most S in
      L2 norm, so with noise std ``z S`` each round is the Gaussian mechanism with sensitivity
      S; with Poisson client sampling at rate q it is the sampled Gaussian mechanism, composed
      over rounds by :mod:`ffa_jax.privacy.accounting` (client-level (epsilon, delta)-DP).
      The server is trusted to add the noise (it sees the clipped updates).
    """
    from ffa_jax.privacy.noise import gaussian_noise_like

    clipped, norms = clip_updates(stacked, dp.clip_norm)
    p = participation.astype(jnp.float32)

    def total(x):
        w = p.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
        return jnp.sum(jnp.where(w > 0, x * w, 0), axis=0)

    summed = jax.tree_util.tree_map(total, clipped)
    if extra_sum is not None:
        summed = jax.tree_util.tree_map(jnp.add, summed, extra_sum)
    noise = gaussian_noise_like(summed, dp.noise_multiplier * dp.clip_norm, key)
    noisy = jax.tree_util.tree_map(lambda s, n: (s + n) / dp.expected_clients, summed, noise)
    return noisy, norms
