"""One client's local training: ``lax.scan`` over local steps, DP-SGD or plain SGD.

A client starts from the server's trainable tree (B under FFA-LoRA; A and B under LoRA), runs
``local_steps`` optimiser steps on its own fixed-shape batches and returns the *delta* of its
trainable tree. The frozen tree (pretrained weights and, under FFA, the shared A) is an
argument, never part of the carry: it is shared by all clients, never copied per client.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ffa_jax.config import ClientConfig
from ffa_jax.privacy.bookkeeping import clipped_grad_auto, validate_clipping
from ffa_jax.privacy.clipping import mean_grad
from ffa_jax.privacy.noise import privatize_grad_sum
from ffa_jax.types import PyTree

LossFn = Callable[[PyTree, PyTree, dict[str, jax.Array]], jax.Array]

# Purposes folded into a client's key so that no two uses share randomness.
NOISE_PURPOSE = 1


class DpParams(NamedTuple):
    """Per-client DP-SGD parameters, runtime values (changing them never recompiles).

    Attributes:
      clip_norm: scalar C.
      noise_multiplier: sigma of this client (noise std on the summed gradient is sigma * C).
      expected_batch_size: q_k * n_k, the fixed denominator of the noisy mean.
    """

    clip_norm: jax.Array
    noise_multiplier: jax.Array
    expected_batch_size: jax.Array


class ClientMetrics(NamedTuple):
    """Per-client metrics of one round (scalars; stacked to ``[K]`` by the round)."""

    loss: jax.Array  # mean training loss over the real examples of all local steps
    num_examples: jax.Array  # real examples processed over all local steps
    clipped_fraction: jax.Array  # mean over steps (0 without DP)
    grad_norm: jax.Array  # mean per-example gradient norm before clipping
    delta_norm: jax.Array  # L2 norm of the uploaded delta


def make_client_optimizer(cfg: ClientConfig) -> optax.GradientTransformation:
    """The local optimiser. Its state is re-initialised at the start of every round."""
    if cfg.optimizer == "sgd":
        return optax.sgd(cfg.learning_rate)
    if cfg.optimizer == "momentum":
        return optax.sgd(cfg.learning_rate, momentum=cfg.momentum)
    return optax.adam(cfg.learning_rate)


def step_noise_key(client_key: jax.Array, step: jax.Array | int) -> jax.Array:
    """The DP noise key of local step ``step`` of a client whose round key is ``client_key``."""
    return jax.random.fold_in(jax.random.fold_in(client_key, step), NOISE_PURPOSE)


def make_client_update(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    private: bool,
    microbatch_size: int | None = None,
    tail_microbatch_size: int | None = None,
    banded_noise: Any = None,
    clipping: str = "auto",
) -> Callable[..., tuple[PyTree, ClientMetrics]]:
    """Builds ``client_update(trainable, frozen, batches, dp, key, extra_grad_sums=None)
    -> (delta, ClientMetrics)``, or, with ``banded_noise``, ``client_update(trainable,
    frozen, batches, dp, key, extra_grad_sums, noise_state) -> (delta, ClientMetrics,
    new noise_state)``.

    Args:
      loss_fn: per-example loss ``loss_fn(trainable, frozen, example) -> scalar``.
      optimizer: local optax optimiser.
      private: DP-SGD (clip per example, noise the sum, divide by the expected batch size)
        when True; the plain mean gradient over real examples otherwise.
      microbatch_size: per-example gradients in chunks of this size (memory bound).
      tail_microbatch_size: DP steps process the last, partly filled micro-batch in chunks
        of this smaller size (see :func:`ffa_jax.privacy.clipping.clipped_grad`); None: not
        split. Non-private steps ignore it.
      banded_noise: sample-level BandMF (a :class:`ffa_jax.privacy.correlated.BandedNoise`
        for the client's T = rounds x local_steps steps; ``private=True``): step t's noise is
        the t-th row of the client's correlated stream, ``noise_multiplier * clip_norm *
        (C^{-1} W)_t``, read from ``noise_state`` (the client's own stream state, leaves as
        :meth:`BandedNoise.init` of the trainable tree; SECRET client state, never sent) and
        the state after the round's steps is returned. ``key`` is then unused for noise.
      clipping: how DP steps clip (:func:`ffa_jax.privacy.bookkeeping.clipped_grad_auto`):
        ``"auto"`` (book-keeping clipping without per-example gradients for FFA-LoRA and LoRA
        on stock Flax layers where every per-example norm takes the ghost form, vmapped per-example
        gradients otherwise), ``"vmap"`` or ``"bookkeeping"``. The sum (to float rounding) and
        the guarantee are the same; only the cost differs.

    The returned function takes ``batches``: a dict of arrays ``[S, B_max, ...]`` with a
    ``"mask"`` entry ``[S, B_max]`` (S local steps; padded slots masked out), ``dp``: a
    :class:`DpParams` of scalars, ``key``: this client's key for this round, and optionally
    ``extra_grad_sums``: a tree like ``trainable`` with leaves ``[S, ...]``, added to step s's
    clipped per-example gradient sum before the noise (``private=True`` only). It is the
    privacy audit's hook (:mod:`ffa_jax.privacy.audit_run`): gradient canaries enter exactly
    like real examples. Without it (the default) the traced computation is unchanged.

    Formal guarantee (``private=True``): each local step is the sampled Gaussian mechanism on
    this client's data with sensitivity ``clip_norm`` (add/remove one example) and noise std
    ``noise_multiplier * clip_norm``, provided the batches were drawn by Poisson sampling at
    the rate the accountant assumes. The returned delta is post-processing of those steps.
    """
    plain_grad = mean_grad(loss_fn, microbatch_size=microbatch_size)
    validate_clipping(clipping)  # before any trace: clipped_grad_auto runs inside the step
    if banded_noise is not None and not private:
        raise ValueError("banded_noise needs private=True (it noises the clipped sums).")

    def client_update(
        trainable, frozen, batches, dp: DpParams, key, extra_grad_sums=None, noise_state=None
    ):
        if extra_grad_sums is not None and not private:
            raise ValueError("extra_grad_sums needs private=True (they join the clipped sum).")
        if (noise_state is None) != (banded_noise is None):
            raise ValueError("noise_state is given exactly when banded_noise is (BandMF).")

        def step(carry, xs):
            params, opt_state, stream = carry
            batch, step_idx, extra = xs
            mask = batch["mask"]
            example = {k: v for k, v in batch.items() if k != "mask"}
            if private:
                # C is a runtime value, so changing it never recompiles.
                clip = clipped_grad_auto(
                    loss_fn,
                    dp.clip_norm,
                    method=clipping,
                    microbatch_size=microbatch_size,
                    tail_microbatch_size=tail_microbatch_size,
                )
                g_sum, stats = clip(params, frozen, example, mask)
                if extra is not None:
                    # Already bounded (each canary has norm C): joins the sum unclipped.
                    g_sum = jax.tree_util.tree_map(jnp.add, g_sum, extra)
                if banded_noise is not None:
                    # Correlated noise: this step's row of the client's own stream.
                    grads, stream = banded_grad(g_sum, dp, banded_noise, stream)
                else:
                    grads = privatize_grad_sum(
                        g_sum,
                        clip_norm=dp.clip_norm,
                        noise_multiplier=dp.noise_multiplier,
                        expected_batch_size=dp.expected_batch_size,
                        key=step_noise_key(key, step_idx),
                    )
            else:
                grads, stats = plain_grad(params, frozen, example, mask)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            n = stats.num_examples
            mean_norm = jnp.sum(stats.grad_norms) / jnp.maximum(n, 1.0)
            carry = (params, opt_state, stream)
            return carry, (stats.loss_sum, n, stats.clipped_fraction, mean_norm)

        steps = jax.tree_util.tree_leaves(batches)[0].shape[0]
        (final, _, new_stream), (loss_sum, n, clipped, norms) = jax.lax.scan(
            step,
            (trainable, optimizer.init(trainable), noise_state),
            (batches, jnp.arange(steps), extra_grad_sums),
        )
        delta = jax.tree_util.tree_map(lambda new, old: new - old, final, trainable)
        total = jnp.sum(n)
        metrics = ClientMetrics(
            loss=jnp.sum(loss_sum) / jnp.maximum(total, 1.0),
            num_examples=total,
            clipped_fraction=jnp.mean(clipped),
            grad_norm=jnp.mean(norms),
            delta_norm=optax.tree.norm(delta),  # the trainable tree is float32
        )
        if banded_noise is not None:
            return delta, metrics, new_stream
        return delta, metrics

    return client_update


def banded_grad(g_sum: PyTree, dp: DpParams, banded_noise: Any, stream: PyTree):
    """One sample-level BandMF step: ``(g_sum + noise_multiplier * clip_norm * (C^{-1}
    W)_t) / expected_batch_size`` (noise the sum, then divide by the FIXED expected batch)
    and the client's next stream state. ``g_sum``: the clipped per-example gradient sum
    (float leaves); ``banded_noise``: a :class:`ffa_jax.privacy.correlated.BandedNoise`.

    Formal guarantee: see :mod:`ffa_jax.privacy.correlated` (sample level): with cyclic
    Poisson batches, the client's sequence of these outputs is the amplified BandMF
    mechanism on its data, followed by post-processing."""
    stddev = jnp.asarray(dp.noise_multiplier, jnp.float32) * jnp.asarray(dp.clip_norm, jnp.float32)
    noise, stream = banded_noise.next(g_sum, stddev, stream)
    denom = jnp.asarray(dp.expected_batch_size, jnp.float32)
    grads = jax.tree_util.tree_map(
        lambda g, z: ((g.astype(jnp.float32) + z) / denom).astype(g.dtype), g_sum, noise
    )
    return grads, stream
