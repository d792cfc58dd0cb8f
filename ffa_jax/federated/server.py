"""Server side: weighted aggregation of client deltas and an Optax server optimiser.

The averaged delta is treated as a negative pseudo-gradient (Reddi et al., 2021, "Adaptive
Federated Optimization"): ``sgd`` with learning rate 1 reproduces FedAvg exactly, ``momentum``
is FedAvgM, ``adam`` / ``yogi`` are FedAdam / FedYogi.

Under FFA-LoRA the trees are the B matrices only, and because every client holds the same
frozen A, ``mean_k(B_k) @ A == mean_k(B_k @ A)``: the aggregation is exact. Under LoRA, A and B
are averaged separately (the paper's baseline), which is not exact.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from ffa_jax.config import ServerConfig

# Client-level DP aggregation lives in ffa_jax.privacy; re-exported for existing callers.
from ffa_jax.privacy.aggregation import (  # noqa: F401
    banded_mf_aggregate,
    dp_fedavg_aggregate,
)
from ffa_jax.types import PyTree


class ServerState(NamedTuple):
    """The global model's trainable tree, the server optimiser state, the round counter and
    two optional states (no leaves when unused, so the checkpoint is unchanged):

    ``noise``: the state of correlated server noise (``privacy.mechanism=banded_mf``: the
    :class:`ffa_jax.privacy.correlated.BandedNoise` state; ``()`` otherwise).
    ``extra``: state a ``lora.mode`` keeps besides the trainable tree (None: none), e.g.
    FedEx-LoRA's folded base-weight deltas or FedSVD's re-factorised A (see
    :mod:`ffa_jax.federated.modes`)."""

    trainable: PyTree
    opt_state: optax.OptState
    round: jax.Array  # int32 scalar: rounds completed
    noise: PyTree = ()
    extra: PyTree = None


def make_server_optimizer(cfg: ServerConfig) -> optax.GradientTransformation:
    if cfg.optimizer == "sgd":
        return optax.sgd(cfg.learning_rate)
    if cfg.optimizer == "momentum":
        return optax.sgd(cfg.learning_rate, momentum=cfg.momentum)
    if cfg.optimizer == "adam":
        return optax.adam(cfg.learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    return optax.yogi(cfg.learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)


def server_init(
    trainable: PyTree, optimizer: optax.GradientTransformation, noise: PyTree = ()
) -> ServerState:
    """The state before round 0; ``noise``: the initial correlated-noise state, if any."""
    return ServerState(
        trainable=trainable,
        opt_state=optimizer.init(trainable),
        round=jnp.zeros((), jnp.int32),
        noise=noise,
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
    return state._replace(
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
