"""Per-example clipped gradients (the sensitivity-bounding half of DP-SGD) and their
non-private counterpart.

Both factories take a single-example loss ``loss_fn(trainable, frozen, example) -> scalar``
(``example``: a dict of arrays without batch axis) and return a pure, jittable function

    f(trainable, frozen, batch, mask) -> (gradient_tree, GradStats)

where ``batch`` is a dict of arrays with a fixed leading axis ``B_max`` and ``mask`` (bool or
float, shape ``[B_max]``) marks the real examples. Padded slots contribute exactly nothing, even
when they hold garbage (inf/NaN/huge values): they are removed with ``jnp.where``, never by
multiplying by zero (``0 * inf = nan``).

Only ``trainable`` is differentiated (the frozen tree is an input, not a parameter), so the
per-example gradient memory and the DP dimension are those of the trainable tree.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax_privacy.clipping

from ffa_jax.errors import ConfigError
from ffa_jax.types import PyTree

LossFn = Callable[[PyTree, PyTree, dict], jax.Array]
GradFn = Callable[[PyTree, PyTree, dict, jax.Array], tuple[PyTree, "GradStats"]]


class GradStats(NamedTuple):
    """Auxiliary statistics of one batch; every field is a jnp array (a valid pytree).

    Formal guarantee:
        None. These are computed from private data WITHOUT noise: use them for local
        diagnostics, and do not send them to the server or log them per client in a setting
        that must be private unless their release is accounted for separately.

    Attributes:
        loss_sum: scalar float32, sum of per-example losses over real examples.
        num_examples: scalar float32, number of real (mask=True) examples.
        grad_norms: float32 ``[B_max]``, per-example gradient L2 norms before clipping
            (0 for padding; ``mean_grad`` does not compute them and reports zeros).
        clipped_fraction: scalar float32, fraction of real examples whose gradient norm
            exceeded ``clip_norm`` (0 if there are no real examples; always 0 in
            ``mean_grad``).
    """

    loss_sum: jax.Array
    num_examples: jax.Array
    grad_norms: jax.Array
    clipped_fraction: jax.Array


# ----------------------------------------------------------------------------- helpers


def validate_clip_norm(clip_norm: Any) -> None:
    # Only concrete Python numbers can be checked; a traced value is the caller's contract.
    if isinstance(clip_norm, numbers.Real) and not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ConfigError(
            f"privacy.clip_norm={clip_norm!r} must be a finite number > 0 "
            "(the paper's grid is 2, 5, 10)."
        )


def validate_microbatch_size(microbatch_size: int | None, name: str = "microbatch_size") -> None:
    if microbatch_size is None:
        return
    if (
        isinstance(microbatch_size, bool)
        or not isinstance(microbatch_size, numbers.Integral)
        or microbatch_size < 1
    ):
        raise ConfigError(
            f"{name}={microbatch_size!r} must be a positive integer dividing the "
            + ("padded batch size" if name == "microbatch_size" else "micro-batch size")
            + ", or None to process the whole batch at once."
        )


def batch_size_of(batch: dict, mask: jax.Array) -> int:
    sizes = {x.shape[0] if x.ndim else None for x in jax.tree.leaves(batch)}
    b = mask.shape[0] if mask.ndim == 1 else None
    if b is None or sizes != {b}:
        raise ValueError(
            f"batch leaves must share the leading (batch) axis of mask [B_max]; got mask "
            f"shape {mask.shape} and batch leading sizes {sorted(sizes, key=str)}."
        )
    return b


def num_microbatches(batch_size: int, microbatch_size: int | None) -> int:
    if microbatch_size is None or microbatch_size >= batch_size:
        return 1
    if batch_size % microbatch_size:
        divisors = [d for d in range(1, batch_size + 1) if batch_size % d == 0]
        raise ConfigError(
            f"microbatch_size={microbatch_size} does not divide the padded batch size "
            f"B_max={batch_size}; choose one of {divisors} (or None). (ffa-jax train pads B_max "
            "to a multiple of perf.microbatch_size itself; direct callers pad the batch.)"
        )
    return batch_size // microbatch_size


def _tail_size(m: int, n_chunks: int, tail: int | None) -> int | None:
    """The tail micro-batch to use, or None when the batch runs in one piece or the tail
    would be no smaller than the micro-batch ``m``."""
    if tail is None or n_chunks == 1 or tail >= m:
        return None
    if m % tail:
        divisors = [d for d in range(1, m) if m % d == 0]
        raise ConfigError(
            f"tail_microbatch_size={tail} does not divide microbatch_size={m}; choose one of "
            f"{divisors} (or None)."
        )
    return tail


def chunked(tree: PyTree, num_chunks: int) -> PyTree:
    return jax.tree.map(lambda x: x.reshape((num_chunks, -1) + x.shape[1:]), tree)


def _bcast(v: jax.Array, x: jax.Array) -> jax.Array:
    """Reshapes a per-example vector ``[b]`` to broadcast against ``x`` of shape ``[b, ...]``."""
    return v.reshape(v.shape + (1,) * (x.ndim - 1))


def _zeros_f32(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tree)


# ----------------------------------------------------------------------------- DP


def overflow_bound(tree: PyTree) -> float:
    """Largest max-abs entry for which ``optax.global_norm(tree)`` cannot overflow float32:
    ``n x bound^2 <= 1e37`` (float32 overflows at ~3.4e38), n = number of entries."""
    return math.sqrt(1e37 / max(sum(x.size for x in jax.tree.leaves(tree)), 1))


def guard_with_scale(grad: PyTree, max_abs_bound: float) -> tuple[PyTree, jax.Array]:
    """Prepares one example's gradient (or one client's update) for
    ``jax_privacy.clipping.clip_pytree``; no clipping here.

    A gradient with a non-finite entry becomes all zeros (the example then contributes
    nothing, rather than its finite part). A finite gradient whose largest entry exceeds
    ``max_abs_bound`` (:func:`overflow_bound`) is rescaled to max-abs ``max_abs_bound``: same
    direction, norm still above any sane clip norm, and its sum of squares cannot overflow
    float32 in the library's norm (which would otherwise give an infinite norm and drop the
    example). Clipping the result to C is exactly ``C * g / ||g||`` as before.

    Returns the guarded tree (float32) and the scalar it multiplied the gradient by: 1
    (unchanged), ``max_abs_bound / max_abs`` < 1 (huge) or 0 (non-finite). The gradient's own
    norm is the guarded tree's norm divided by it (nan for 0)."""
    # One reduction pass per leaf: max |g| is nan when any entry is nan and inf when any is
    # inf, so it also says whether the gradient is finite. A separate isfinite pass over the
    # per-example gradients made a width-256 MLP's clipped-gradient step 0.88 ms instead of
    # 0.79 ms (non-private: 0.63 ms; issue 20).
    max_abs = jnp.max(
        jnp.stack([jnp.max(jnp.abs(g)).astype(jnp.float32) for g in jax.tree.leaves(grad)])
    )
    finite = jnp.isfinite(max_abs)
    scale = jnp.where(
        finite,
        jnp.where(max_abs > max_abs_bound, max_abs_bound / jnp.where(finite, max_abs, 1.0), 1.0),
        0.0,
    )
    guarded = jax.tree.map(lambda g: jnp.where(finite, g.astype(jnp.float32), 0.0) * scale, grad)
    return guarded, scale


def clipped_stats(
    real: jax.Array, losses: jax.Array, norms: jax.Array, clip_norm: float | jax.Array
) -> GradStats:
    """The :class:`GradStats` of a clipped step from per-example ``losses`` and gradient
    ``norms`` (``[B_max]``; padded slots, ``real`` False, are ignored and report norm 0)."""
    norms = jnp.where(real, norms, 0.0)
    c = jnp.asarray(clip_norm, jnp.float32)
    num = jnp.sum(real, dtype=jnp.float32)
    return GradStats(
        loss_sum=jnp.sum(jnp.where(real, losses, 0.0)),
        num_examples=num,
        grad_norms=norms,
        clipped_fraction=jnp.sum(real & (norms > c), dtype=jnp.float32) / jnp.maximum(num, 1.0),
    )


def _interleave(rows: int, cols: int) -> Callable[[jax.Array], jax.Array]:
    """``x[B, ...] -> x.reshape(rows, cols, ...).swapaxes(0, 1).reshape(B, ...)``, B = rows
    x cols: position ``r cols + c`` moves to ``c rows + r``. ``_interleave(cols, rows)``
    undoes ``_interleave(rows, cols)``."""

    def f(x):
        return x.reshape((rows, cols) + x.shape[1:]).swapaxes(0, 1).reshape(x.shape)

    return f


def clipped_grad(
    loss_fn: LossFn,
    clip_norm: float | jax.Array,
    *,
    microbatch_size: int | None = None,
    tail_microbatch_size: int | None = None,
) -> GradFn:
    """Sum of per-example gradients, each clipped to global L2 norm ``clip_norm``.

    Built on ``jax_privacy.clipping.clipped_fun`` (jax-privacy 2.0): per-example gradients
    of ``loss_fn`` w.r.t. ``trainable`` only (the frozen tree is never differentiated), each
    clipped by ``jax_privacy.clipping.clip_pytree`` to ``min(1, C / ||g||) g`` with the norm
    over the whole trainable tree, padding examples zeroed by ``is_padding_example`` and the
    clipped gradients summed in float32. ffa_jax adds two things before the library's clip:
    a real example whose gradient is not finite contributes zero (its norm is still reported
    in ``GradStats.grad_norms``), and huge finite gradients are rescaled so that the norm
    cannot overflow (see ``guard_with_scale``); neither affects the sensitivity bound.

    Args:
        loss_fn: ``loss_fn(trainable, frozen, example) -> scalar`` for ONE example.
        clip_norm: C > 0; a Python float, or a traced scalar when the returned function is
            called inside the same trace (so C can change without recompiling; a traced C
            is not validated).
        microbatch_size: if set and smaller than B_max, the batch is processed in
            ``B_max / microbatch_size`` micro-batches (``optax.microbatching.micro_vmap``),
            so at most ``microbatch_size`` per-example gradients are alive at once. Must
            divide B_max. The result equals the unchunked one up to float summation order.
            The loop stops after the last micro-batch holding a real example
            (jax-privacy's ``num_real_microbatches``); ``data.batching`` puts the real
            examples of a padded Poisson batch first, so every all-padding micro-batch is
            skipped and the cost follows the sampled batch size rather than B_max (unless
            the caller ``vmap``s over a batched mask: the loop then runs to the largest
            client's bound).
        tail_microbatch_size: with ``microbatch_size = m`` set, the last, partly filled
            micro-batch is processed in micro-batches of this smaller size ``t`` (it must
            divide ``m``): the full micro-batches before the last real example run as above,
            then a window of ``m`` slots starting where they end runs in ``m / t``
            micro-batches, stopping after the last real one. A sampled batch of ``n`` real
            examples then computes ``floor(n / m) m + ceil((n mod m) / t) t`` examples
            instead of ``ceil(n / m) m``: on a CPU, where the cost is per example, the
            quickstart's expected ~7.5 padded slots per step drop to ~1.5 (issue 22). On an
            accelerator, where a small micro-batch costs as much as a full one, leave it
            None (``ffa_jax.perf.resolve`` does). Every example is in exactly one of the two
            parts, so the sum and the guarantee below are unchanged; only the float
            summation order differs.

    Returns:
        ``f(trainable, frozen, batch, mask) -> (grad_sum, stats)``:
        ``batch`` a dict of arrays ``[B_max, ...]``, ``mask`` bool/float ``[B_max]``
        (False/0 = padding); ``grad_sum`` a tree shaped and typed like ``trainable``
        (accumulated in float32); ``stats`` a ``GradStats``.

    Raises:
        ConfigError: if ``clip_norm`` is a Python number that is not finite and > 0, if
            ``microbatch_size`` or ``tail_microbatch_size`` is not a positive integer, or
            (at trace time) if ``microbatch_size`` does not divide B_max or
            ``tail_microbatch_size`` does not divide ``microbatch_size``.

    Formal guarantee:
        Adding or removing one example of the client changes ``grad_sum`` by a vector of L2
        norm at most ``clip_norm`` (the add/remove sensitivity is C; jax-privacy's
        ``BoundedSensitivityCallable.sensitivity``), whatever the model, the data or the
        padding. Adding N(0, (sigma C)^2 I) to ``grad_sum`` (see ``ffa_jax.privacy.noise``)
        then gives the Gaussian mechanism that ``ffa_jax.privacy.accounting`` accounts for:
        sample-level DP per client, neighbouring datasets differing in one example of one
        client. ``GradStats`` are not private.
    """
    validate_clip_norm(clip_norm)
    validate_microbatch_size(microbatch_size)
    validate_microbatch_size(tail_microbatch_size, "tail_microbatch_size")
    value_and_grad = jax.value_and_grad(loss_fn)

    def per_example(trainable, frozen, example):
        loss, grad = value_and_grad(trainable, frozen, example)
        # float32 sums of squares overflow at ~3.4e38: keep n * bound^2 well below it.
        guarded, scale = guard_with_scale(grad, overflow_bound(grad))
        return guarded, (loss.astype(jnp.float32), scale)

    def clipped_sum(trainable, frozen, batch, considered, m):
        """The library's clipped sum over the examples ``considered`` of ``batch`` (``[b]``),
        in micro-batches of ``m`` (None: all at once); per-example losses, guard scales and
        guarded norms in batch order (zeros where a skipped micro-batch was not computed)."""
        b = considered.shape[0]
        n_chunks = 1 if m is None else b // m
        clip = jax_privacy.clipping.clipped_fun(
            per_example,
            has_aux=True,
            batch_argnums=2,
            keep_batch_dim=False,
            l2_clip_norm=jnp.asarray(clip_norm, jnp.float32),
            microbatch_size=None if n_chunks == 1 else m,
            dtype=jnp.float32,
            # The library's norm of each guarded gradient, which its clip computes anyway:
            # the per-example norm statistic costs no extra pass over the per-example
            # gradients (a separate norm cost two, and made the DP step of a small model
            # 2.4x its per-example gradients' time; issue 22).
            return_norms=True,
        )
        # optax forms micro-batch j from the examples j, j + n, j + 2n, ... (a column-major
        # reshape, n = number of micro-batches), so its early stop after the last real
        # micro-batch would skip nothing on a real-first batch. Interleaving the batch first
        # makes micro-batch j the contiguous slice [j m, (j + 1) m): the all-padding tail is
        # skipped, as the cost model of perf.microbatch_size assumes.
        size = b // n_chunks
        to_mb, from_mb = _interleave(n_chunks, size), _interleave(size, n_chunks)
        grad_sum, ((losses, scales), norms) = clip(
            trainable, frozen, jax.tree.map(to_mb, batch), is_padding_example=to_mb(~considered)
        )
        return grad_sum, from_mb(losses), from_mb(scales), from_mb(norms)

    def f(trainable, frozen, batch, mask):
        mask = jnp.asarray(mask)
        b = batch_size_of(batch, mask)
        n_chunks = num_microbatches(b, microbatch_size)
        real = mask.astype(bool)
        m = b // n_chunks
        tail = _tail_size(m, n_chunks, tail_microbatch_size)
        if tail is None:
            grad_sum, losses, scales, guarded_norms = clipped_sum(
                trainable, frozen, batch, real, None if n_chunks == 1 else m
            )
        else:
            # Head: every full micro-batch before the last real example. ``end`` is one past
            # the last real slot (the sampled size for a real-first batch), so the real
            # examples from ``head_end`` on all lie in the m-slot window that starts there.
            idx = jnp.arange(b)
            end = jnp.max(jnp.where(real, idx + 1, 0))
            head_end = (end // m) * m
            grad_sum, losses, scales, guarded_norms = clipped_sum(
                trainable, frozen, batch, real & (idx < head_end), m
            )
            # Tail: the window [head_end, head_end + m) in micro-batches of ``tail``. When the
            # head covers the whole batch (head_end = b) the window is clamped inside it and
            # considers nothing, so no example is counted twice.
            start = jnp.minimum(head_end, b - m)
            window = jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, m), batch)
            in_tail = jax.lax.dynamic_slice_in_dim(real, start, m) & (
                start + jnp.arange(m) >= head_end
            )
            tail_sum, *tail_stats = clipped_sum(trainable, frozen, window, in_tail, tail)
            grad_sum = jax.tree.map(jnp.add, grad_sum, tail_sum)

            def merge(head_values, tail_values):
                placed = jax.lax.dynamic_update_slice_in_dim(head_values, tail_values, start, 0)
                return jnp.where(idx >= head_end, placed, head_values)

            losses, scales, guarded_norms = map(merge, (losses, scales, guarded_norms), tail_stats)
        # The raw gradient's norm: the guard multiplied it by ``scale`` (1 almost always; < 1
        # for a huge gradient; 0 for a non-finite one, whose norm is then reported as nan).
        stats = clipped_stats(real, losses, guarded_norms / scales, clip_norm)
        grad_sum = jax.tree.map(lambda g, p: g.astype(p.dtype), grad_sum, trainable)
        return grad_sum, stats

    return f


# ----------------------------------------------------------------------------- non-DP


def mean_grad(loss_fn: LossFn, *, microbatch_size: int | None = None) -> GradFn:
    """Non-private counterpart of ``clipped_grad``: the mean gradient over real examples.

    One ``jax.value_and_grad`` of the masked summed loss (no per-example gradients). Padded
    examples are replaced by zeros before the forward pass, so garbage in a padding slot
    cannot leak ``0 * inf = nan`` into the backward pass.

    Args:
        loss_fn: ``loss_fn(trainable, frozen, example) -> scalar`` for ONE example.
        microbatch_size: as in ``clipped_grad``; bounds activation memory.

    Returns:
        ``f(trainable, frozen, batch, mask) -> (grad_mean, stats)``: ``grad_mean`` shaped and
        typed like ``trainable``, the mean over real examples (zeros if there are none);
        ``stats`` a ``GradStats`` with ``grad_norms`` all zeros and ``clipped_fraction`` 0
        (not computed here).

    Raises:
        ConfigError: as in ``clipped_grad`` for ``microbatch_size``.

    Formal guarantee:
        None: the output is not private and must only be used when privacy is off.
    """
    validate_microbatch_size(microbatch_size)
    per_example_loss = jax.vmap(loss_fn, in_axes=(None, None, 0))

    def summed_loss(trainable, frozen, batch, real):
        clean = jax.tree.map(lambda x: jnp.where(_bcast(real, x), x, jnp.zeros((), x.dtype)), batch)
        losses = per_example_loss(trainable, frozen, clean).astype(jnp.float32)
        return jnp.sum(jnp.where(real, losses, 0.0))

    grad_fn = jax.value_and_grad(summed_loss)

    def f(trainable, frozen, batch, mask):
        mask = jnp.asarray(mask)
        b = batch_size_of(batch, mask)
        n_chunks = num_microbatches(b, microbatch_size)
        real = mask.astype(bool)
        if n_chunks == 1:
            loss_sum, grad_sum = grad_fn(trainable, frozen, batch, real)
            grad_sum = jax.tree.map(lambda g: g.astype(jnp.float32), grad_sum)
        else:

            def skipped(_batch, _real):
                return jnp.float32(0), jax.tree.map(jnp.zeros_like, trainable)

            def body(carry, xs):
                g_acc, loss_acc = carry
                # Chunks without real examples are skipped (their gradient is exactly zero).
                loss, g = jax.lax.cond(
                    jnp.any(xs[1]), functools.partial(grad_fn, trainable, frozen), skipped, *xs
                )
                return (
                    jax.tree.map(lambda a, x: a + x.astype(jnp.float32), g_acc, g),
                    loss_acc + loss,
                ), None

            init = (_zeros_f32(trainable), jnp.float32(0))
            (grad_sum, loss_sum), _ = jax.lax.scan(
                body, init, (chunked(batch, n_chunks), chunked(real, n_chunks))
            )
        num = jnp.sum(real, dtype=jnp.float32)
        denom = jnp.maximum(num, 1.0)
        grad_mean = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grad_sum, trainable)
        stats = GradStats(
            loss_sum=loss_sum,
            num_examples=num,
            grad_norms=jnp.zeros((b,), jnp.float32),
            clipped_fraction=jnp.float32(0),
        )
        return grad_mean, stats

    return f
