"""Gaussian noise for DP-SGD: noise the clipped SUM, then divide by a FIXED batch size.

Dividing by the realised (Poisson) batch size would make the output depend on how many
examples were sampled, which the accountant does not charge for; dividing by the expected
batch size is post-processing of the noisy sum and costs nothing.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ffa_jax.errors import ConfigError

PyTree = Any


def _check_nonneg(value: Any, field: str, fix: str, *, strict: bool) -> None:
    # Traced values cannot be checked here; they are the caller's contract.
    if isinstance(value, numbers.Real) and not (
        math.isfinite(value) and (value > 0 if strict else value >= 0)
    ):
        bound = "> 0" if strict else ">= 0"
        raise ConfigError(f"{field}={value!r} must be a finite number {bound}; {fix}")


def _check_args(clip_norm: Any, noise_multiplier: Any, expected_batch_size: Any) -> None:
    _check_nonneg(clip_norm, "privacy.clip_norm", "the paper's grid is 2, 5, 10.", strict=True)
    _check_nonneg(
        noise_multiplier,
        "privacy.noise_multiplier",
        "calibrate it from privacy.epsilon with accounting.calibrate_noise_multiplier.",
        strict=False,
    )
    _check_nonneg(
        expected_batch_size,
        "expected_batch_size",
        "use the client's batch size, i.e. sampling rate x client examples.",
        strict=True,
    )


def gaussian_noise_like(tree: PyTree, stddev: float | jax.Array, key: jax.Array) -> PyTree:
    """I.i.d. N(0, stddev^2) noise with the structure, shapes and dtypes of ``tree``.

    Each leaf gets its own key from ``jax.random.split(key, num_leaves)``, so leaves are
    independent. Samples are drawn in float32 and cast, so low-precision leaves still get a
    correctly scaled Gaussian.

    Args:
        tree: pytree of floating arrays (any shapes).
        stddev: scalar, Python float or traced; >= 0.
        key: a JAX PRNG key (raw uint32[2] or typed). The same key gives the same noise.

    Returns:
        A pytree like ``tree`` of noise arrays.

    Raises:
        TypeError: if a leaf is not floating point.
    """
    leaves, treedef = jax.tree.flatten(tree)
    if not leaves:
        return tree
    for x in leaves:
        if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
            raise TypeError(
                f"gaussian_noise_like needs floating leaves; got dtype {jnp.asarray(x).dtype}."
            )
    keys = jax.random.split(key, len(leaves))
    std = jnp.asarray(stddev, jnp.float32)
    noise = [
        (std * jax.random.normal(k, jnp.shape(x), jnp.float32)).astype(jnp.asarray(x).dtype)
        for k, x in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, noise)


def privatize_grad_sum(
    grad_sum: PyTree,
    *,
    clip_norm: float | jax.Array,
    noise_multiplier: float | jax.Array,
    expected_batch_size: float | jax.Array,
    key: jax.Array,
) -> PyTree:
    """The DP-SGD gradient: ``(grad_sum + N(0, (noise_multiplier * clip_norm)^2 I)) / B``.

    Args:
        grad_sum: pytree, the sum of per-example gradients clipped to ``clip_norm`` (from
            ``clipping.clipped_grad``).
        clip_norm: C > 0, the clipping norm used for ``grad_sum`` (Python or traced scalar).
        noise_multiplier: sigma >= 0 (Python or traced scalar); 0 disables noise.
        expected_batch_size: B > 0, the FIXED expected batch size (q x client examples);
            never the realised count of sampled examples.
        key: PRNG key; use a fresh one per step and client.

    Returns:
        A pytree like ``grad_sum`` (same dtypes).

    Raises:
        ConfigError: if a Python-number argument is out of range.

    Formal guarantee:
        If ``grad_sum`` has add/remove sensitivity ``clip_norm``, the output is the Gaussian
        mechanism with noise multiplier sigma followed by post-processing, i.e. one step of
        ``accounting.dp_sgd_event``: sample-level DP per client (neighbouring datasets differ
        in one example of one client); the server adds no noise.
    """
    _check_args(clip_norm, noise_multiplier, expected_batch_size)
    stddev = jnp.asarray(noise_multiplier, jnp.float32) * jnp.asarray(clip_norm, jnp.float32)
    noise = gaussian_noise_like(grad_sum, stddev, key)
    denom = jnp.asarray(expected_batch_size, jnp.float32)
    return jax.tree.map(
        lambda g, z: ((g.astype(jnp.float32) + z.astype(jnp.float32)) / denom).astype(g.dtype),
        grad_sum,
        noise,
    )


class PrivatizerState(NamedTuple):
    """State of ``gaussian_privatizer``: the PRNG key of the next step."""

    key: jax.Array


def gaussian_privatizer(
    *,
    clip_norm: float | jax.Array,
    noise_multiplier: float | jax.Array,
    expected_batch_size: float | jax.Array,
    key: jax.Array,
) -> optax.GradientTransformation:
    """``privatize_grad_sum`` as an optax transformation whose state is a PRNG key.

    Chain an optimiser after it (``optax.chain(gaussian_privatizer(...), optax.sgd(lr))``):
    everything after the noise is post-processing. Feed it the clipped SUM, not a mean.

    Args:
        clip_norm, noise_multiplier, expected_batch_size: as in ``privatize_grad_sum``.
        key: the initial key; each update splits it, uses one half, and stores the other.

    Returns:
        An ``optax.GradientTransformation`` with state ``PrivatizerState``.

    Raises:
        ConfigError: if a Python-number argument is out of range.

    Formal guarantee:
        As ``privatize_grad_sum``, one DP-SGD step per ``update``; the key stream never
        repeats a key, so noise of different steps is independent.
    """
    _check_args(clip_norm, noise_multiplier, expected_batch_size)

    def init(params):
        del params
        return PrivatizerState(key=key)

    def update(updates, state, params=None):
        del params
        next_key, step_key = jax.random.split(state.key)
        out = privatize_grad_sum(
            updates,
            clip_norm=clip_norm,
            noise_multiplier=noise_multiplier,
            expected_batch_size=expected_batch_size,
            key=step_key,
        )
        return out, PrivatizerState(key=next_key)

    return optax.GradientTransformation(init, update)
