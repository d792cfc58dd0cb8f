"""Gaussian noise for DP-SGD: noise the clipped SUM, then divide by a FIXED batch size.

Dividing by the realised (Poisson) batch size would make the output depend on how many
examples were sampled, which the accountant does not charge for; dividing by the expected
batch size is post-processing of the noisy sum and costs nothing.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import jax_privacy.noise_addition
import optax

from ffa_jax.errors import ConfigError
from ffa_jax.types import PyTree


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


def _jax_privacy_gaussian(stddev: float | jax.Array, key: jax.Array):
    """jax-privacy's Gaussian privatizer (``jax_privacy.noise_addition.gaussian_privatizer``,
    the identity-matrix case of its matrix-factorization privatizer), drawing in float32."""
    return jax_privacy.noise_addition.gaussian_privatizer(
        stddev=jnp.asarray(stddev, jnp.float32), prng_key=key, dtype=jnp.float32
    )


def _check_floating(tree: PyTree) -> None:
    for x in jax.tree.leaves(tree):
        if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
            raise TypeError(
                f"gaussian_noise_like needs floating leaves; got dtype {jnp.asarray(x).dtype}."
            )


def _add_noise(tree: PyTree, stddev: float | jax.Array, key: jax.Array) -> PyTree:
    """``tree + N(0, stddev^2 I)`` by one update of jax-privacy's Gaussian privatizer with
    initial key ``key`` (it splits the key and draws one independent stream per leaf)."""
    tx = _jax_privacy_gaussian(stddev, key)
    noisy, _ = tx.update(tree, tx.init(tree))
    return noisy


def gaussian_noise_like(tree: PyTree, stddev: float | jax.Array, key: jax.Array) -> PyTree:
    """I.i.d. N(0, stddev^2) noise with the structure, shapes and dtypes of ``tree``.

    Drawn by jax-privacy's Gaussian privatizer applied to a zero tree: leaves get
    independent streams (``optax.tree.random_like``). Samples are drawn in float32 and cast,
    so low-precision leaves still get a correctly scaled Gaussian.

    Args:
        tree: pytree of floating arrays (any shapes).
        stddev: scalar, Python float or traced; >= 0.
        key: a JAX PRNG key (raw uint32[2] or typed). The same key gives the same noise,
            and the same noise as ``privatize_grad_sum`` with this key.

    Returns:
        A pytree like ``tree`` of noise arrays.

    Raises:
        TypeError: if a leaf is not floating point.
    """
    if not jax.tree.leaves(tree):
        return tree
    _check_floating(tree)
    return _add_noise(jax.tree.map(jnp.zeros_like, tree), stddev, key)


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
    if not jax.tree.leaves(grad_sum):
        return grad_sum
    _check_floating(grad_sum)
    stddev = jnp.asarray(noise_multiplier, jnp.float32) * jnp.asarray(clip_norm, jnp.float32)
    noisy = _add_noise(jax.tree.map(lambda g: g.astype(jnp.float32), grad_sum), stddev, key)
    denom = jnp.asarray(expected_batch_size, jnp.float32)
    return jax.tree.map(lambda z, g: (z / denom).astype(g.dtype), noisy, grad_sum)


def gaussian_privatizer(
    *,
    clip_norm: float | jax.Array,
    noise_multiplier: float | jax.Array,
    expected_batch_size: float | jax.Array,
    key: jax.Array,
) -> optax.GradientTransformation:
    """``privatize_grad_sum`` as an optax transformation: jax-privacy's stateful Gaussian
    privatizer (std ``noise_multiplier * clip_norm``) chained with ``optax.scale(1 / B)``.

    Chain an optimiser after it (``optax.chain(gaussian_privatizer(...), optax.sgd(lr))``):
    everything after the noise is post-processing. Feed it the clipped SUM, not a mean.

    Args:
        clip_norm, noise_multiplier, expected_batch_size: as in ``privatize_grad_sum``.
        key: the initial key; jax-privacy's state splits it at every update, so the first
            update equals ``privatize_grad_sum(..., key=key)`` and no key is used twice.

    Returns:
        An ``optax.GradientTransformation`` (state: jax-privacy's privatizer state, then
        ``optax.scale``'s empty state).

    Raises:
        ConfigError: if a Python-number argument is out of range.

    Formal guarantee:
        As ``privatize_grad_sum``, one DP-SGD step per ``update``; the key stream never
        repeats a key, so noise of different steps is independent.
    """
    _check_args(clip_norm, noise_multiplier, expected_batch_size)
    stddev = jnp.asarray(noise_multiplier, jnp.float32) * jnp.asarray(clip_norm, jnp.float32)
    return optax.chain(
        _jax_privacy_gaussian(stddev, key),
        optax.scale(1.0 / jnp.asarray(expected_batch_size, jnp.float32)),
    )
