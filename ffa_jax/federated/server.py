"""Server side: weighted aggregation of client deltas and an Optax server optimiser.

The averaged delta is treated as a negative pseudo-gradient (Reddi et al., 2021, "Adaptive
Federated Optimization"): ``sgd`` with learning rate 1 reproduces FedAvg exactly, ``momentum``
is FedAvgM, ``adam`` / ``yogi`` are FedAdam / FedYogi.

Under FFA-LoRA the trees are the B matrices only, and because every client holds the same
frozen A, ``mean_k(B_k) @ A == mean_k(B_k @ A)``: the aggregation is exact. Under LoRA, A and B
are averaged separately (the paper's baseline), which is not exact.

:func:`server_step` is the server's whole half of a round (aggregation, then the optimiser
step); the simulated round and the Flower server both call it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ffa_jax.config import ServerConfig

# Client-level DP aggregation lives in ffa_jax.privacy; re-exported for existing callers.
from ffa_jax.privacy.aggregation import (  # noqa: F401
    banded_mf_aggregate,
    dp_fedavg_aggregate,
)
from ffa_jax.privacy.correlated import BandedNoise
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


def make_server_optimizer(
    cfg: ServerConfig, rounds: int | None = None
) -> optax.GradientTransformation:
    """The Optax server optimiser of ``cfg`` (``server.*``). ``rounds``: the run's
    ``federated.rounds``, the horizon of ``server.schedule: cosine`` (its state then counts
    the rounds applied, and is saved with the server state).

    Raises:
      ValueError: ``schedule: cosine`` without ``rounds``.
    """
    lr: float | optax.Schedule = cfg.learning_rate
    if cfg.schedule == "cosine":
        if not rounds:
            raise ValueError("server.schedule=cosine needs the number of rounds (rounds=...)")
        lr = optax.cosine_decay_schedule(cfg.learning_rate, decay_steps=rounds)
    if cfg.optimizer == "sgd":
        return optax.sgd(lr)
    if cfg.optimizer == "momentum":
        return optax.sgd(lr, momentum=cfg.momentum)
    if cfg.optimizer == "adam":
        return optax.adam(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    return optax.yogi(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)


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


class ServerStep(NamedTuple):
    """What :func:`server_step` returns."""

    state: ServerState  # the server state after the step (round + 1)
    mean_delta: PyTree  # the aggregated update applied (noisy under client-level DP)
    # [K] float32 L2 norms of the clients' updates before clipping (client-level DP), else None
    client_norms: jax.Array | None


def server_step(
    state: ServerState,
    deltas: PyTree,
    weights: jax.Array,
    optimizer: optax.GradientTransformation,
    *,
    server_dp: ServerDpParams | None = None,
    noise_key: jax.Array | None = None,
    banded_noise: BandedNoise | None = None,
    extra_update_sum: PyTree | None = None,
) -> ServerStep:
    """The server's half of a round: aggregate the clients' deltas, then one optimiser step.

    The one server step of the project: the simulated round
    (:func:`ffa_jax.federated.round.make_round`) and the Flower server
    (:class:`ffa_jax.flower.core.ServerRun`) both call it, so they compute the same thing.
    Pure and traceable (``jax.jit`` it, or call it inside a jitted round).

    Aggregation:
      * ``server_dp`` None: the weighted mean of the deltas (:func:`weighted_mean`; FedAvg).
      * ``server_dp`` given, ``banded_noise`` None: DP-FedAvg with independent Gaussian noise
        (:func:`ffa_jax.privacy.aggregation.dp_fedavg_aggregate`) drawn with ``noise_key``.
      * ``server_dp`` and ``banded_noise`` given: DP-FedAvg with correlated BandMF noise
        (:func:`ffa_jax.privacy.aggregation.banded_mf_aggregate`) continuing ``state.noise``;
        the new noise state is stored in the returned state (``noise_key`` is unused).

    Then :func:`server_update`: the optimiser step on the pseudo-gradient ``-mean_delta``,
    ``round`` + 1.

    Args:
      state: the server state before the step.
      deltas: the clients' updates, leaves ``[K, ...]`` (a tree like ``state.trainable``).
      weights: ``[K]`` aggregation weights, 0 for dummy or absent clients; under client-level
        DP participation indicators in {0, 1} (the mean divides by
        ``server_dp.expected_clients``, a fixed number, not by their sum).
      optimizer: the server optimiser (:func:`make_server_optimizer`).
      server_dp: :class:`ServerDpParams` for client-level DP; None: no server-side DP.
      noise_key: the server's noise key of this round
        (:func:`ffa_jax.federated.round.server_noise_key`), required with ``server_dp`` and
        no ``banded_noise``; never used for anything else.
      banded_noise: the run's :class:`~ffa_jax.privacy.correlated.BandedNoise` (static), with
        ``server_dp`` only.
      extra_update_sum: tree like one client's update (no client axis) added to the sum of
        clipped updates before the noise (the privacy audit's canary clients); needs
        ``server_dp``. None leaves the computation unchanged.

    Returns:
      :class:`ServerStep` ``(state, mean_delta, client_norms)``.

    Raises:
      ValueError: ``extra_update_sum`` without ``server_dp``, or ``server_dp`` with neither
        ``noise_key`` nor ``banded_noise``.

    Formal guarantee (with ``server_dp``): adding or removing all the data of one client
    changes the clipped sum by at most ``S = server_dp.clip_norm`` in L2 norm, and the server
    adds ``N(0, (z S)^2 I)`` (or BandMF noise of the same scale per round) before dividing by
    the fixed expected number of clients, so the released ``mean_delta`` -- and the new state,
    a post-processing of it -- is client-level (epsilon, delta)-DP as accounted by
    :mod:`ffa_jax.privacy.client_level`; the server is trusted with the clipped updates.
    Without ``server_dp`` the step adds no privacy of its own (sample-level DP, if any, was
    applied by each client before its delta left it).
    """
    norms = None
    noise_state: Any = None
    if server_dp is None:
        if extra_update_sum is not None:
            raise ValueError("extra_update_sum needs client-level DP (server_dp).")
        mean_delta = weighted_mean(deltas, weights)
    elif banded_noise is not None:
        mean_delta, norms, noise_state = banded_mf_aggregate(
            deltas, weights, server_dp, banded_noise, state.noise, extra_update_sum
        )
    else:
        if noise_key is None:
            raise ValueError("server_dp without banded_noise needs noise_key.")
        mean_delta, norms = dp_fedavg_aggregate(
            deltas, weights, server_dp, noise_key, extra_update_sum
        )
    new_state = server_update(state, mean_delta, optimizer)
    if banded_noise is not None and server_dp is not None:
        new_state = new_state._replace(noise=noise_state)
    return ServerStep(new_state, mean_delta, norms)
