"""Per-example clipping without per-example gradients ("book-keeping" clipping) for FFA-LoRA
and LoRA on stock Flax layers.

Under FFA-LoRA the trainable tree is the ``b`` factors only. For one call of a layer with a
LoRA node, the gradient of ``b`` from one example is ``scale * sum_t u_t (x) g_t``, where
``u = x . a`` (``[T, r]``, the layer's low-rank input at the call's T positions) and ``g``
(``[T, d_out]``) the gradient of the loss with respect to the layer's output. One batched
forward and backward pass (the non-private step's cost) records both through the
:func:`ffa_jax.lora.tape` of the stock-layer interceptor; then, per example,

* the squared norm is ``||sum_t u_t g_t^T||_F^2``: ``|u|^2 |g|^2`` at T = 1, the "ghost" Gram
  form ``sum_{t,t'} (u_t . u_t')(g_t . g_t')`` when ``T (r + d_out) < r d_out``, else the
  materialised ``[r, d_out]`` outer product (Bu et al. 2022, "Differentially private
  optimization on large model at small cost"; Li et al. 2022, ghost clipping);
* the clipped sum is one contraction ``sum_{i,t} w_i u_it (x) g_it`` with
  ``w_i = min(1, C / ||grad_i||)``.

Under LoRA ``a`` is trained too; its gradient is ``scale * sum_t x_t (x) (g_t . b^T)`` (``x`` the
call's input, also recorded) and is handled the same way, the norm summing both factors.

So the ``[B, r, d_out]`` per-example gradients and the passes over them (guard, norm, scale,
sum) that :func:`ffa_jax.privacy.clipping.clipped_grad` makes are gone; at small widths those
passes were most of the DP step's extra cost (issue 20). The result is the same clipped sum up
to float rounding (tested against :func:`clipped_grad`).

Only where it is exact: every trainable leaf is a factor of a LoRA node that trains ``b``
(and perhaps ``a``; not Fed-SB's ``mid``, not a head), every such node is used through intercepted stock ``Dense`` /
``DenseGeneral`` / ``Einsum`` calls (:func:`ffa_jax.lora.linen_apply`) and nowhere else, and a
probe trace of one example records each of them. :func:`clipped_grad_auto` checks the first
three at trace time and falls back to :func:`clipped_grad` otherwise; the last is the
caller's contract (a loss that reads ``b`` directly, e.g. a penalty on it, would have that
part of the gradient missed; privacy is unaffected, see below).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ffa_jax import lora
from ffa_jax.errors import ConfigError
from ffa_jax.privacy.clipping import (
    GradFn,
    LossFn,
    batch_size_of,
    chunked,
    clipped_grad,
    clipped_stats,
    num_microbatches,
    validate_clip_norm,
    validate_microbatch_size,
)
from ffa_jax.types import PyTree

CLIPPING_METHODS = ("auto", "vmap", "bookkeeping")


def validate_clipping(method: str) -> None:
    """A ConfigError unless ``method`` is one of :data:`CLIPPING_METHODS`."""
    if method not in CLIPPING_METHODS:
        raise ConfigError(f"clipping={method!r} must be one of {CLIPPING_METHODS}.")


@dataclasses.dataclass(frozen=True)
class Factor:
    """One trainable leaf: factor ``name`` (``"a"`` or ``"b"``) of the LoRA node in ``slot``,
    shaped ``shape``."""

    slot: int
    name: str
    shape: tuple[int, ...]


def _factors(trainable: PyTree) -> tuple[dict[int, int], list[Any], list[Factor]] | str:
    """``({id(b): slot}, [b per slot], [Factor per trainable leaf, in flatten order])`` when
    every trainable leaf is a factor of a LoRA node that trains ``b`` (and perhaps ``a``);
    otherwise the reason it is not."""
    slots: dict[int, int] = {}
    bs: list[Any] = []
    factors: list[Factor] = []
    for leaf in jax.tree_util.tree_leaves(trainable, is_leaf=lora.is_lora):
        if not lora.is_lora(leaf):
            return "a trainable leaf is not a LoRA factor (e.g. a trained head)"
        if leaf.mid is not None or leaf.b is None or leaf.w0 is not None:
            return "a LoRA node trains w0, Fed-SB's mid, or a without b"
        slot = len(bs)
        slots[id(leaf.b)] = slot
        bs.append(leaf.b)
        if leaf.a is not None:  # LoRAWeight's leaves flatten as a, then b
            factors.append(Factor(slot, "a", tuple(leaf.a.shape)))
        factors.append(Factor(slot, "b", tuple(leaf.b.shape)))
    if not bs:
        return "the trainable tree is empty"
    return slots, bs, factors


def _shape(x) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


def probe(loss_fn: LossFn, trainable: PyTree, frozen: PyTree, example: dict) -> list | str:
    """The tape's record of one example's forward pass (shapes only, no compute): a list of
    :class:`ffa_jax.lora.TapUse`, or the reason book-keeping clipping does not apply."""
    found = _factors(trainable)
    if isinstance(found, str):
        return found
    slots, bs, _ = found
    uses: list = []

    def run(ex):
        # trainable/frozen are closed over, not arguments: the tape finds b by identity.
        with lora.tape(slots) as t:
            loss_fn(trainable, frozen, ex)
        uses.extend(t.uses)
        return 0

    jax.eval_shape(run, example)
    # Keep the layouts, shapes and slots; the probe's tracers must not outlive its trace.
    uses = [dataclasses.replace(use, u=_shape(use.u), x=_shape(use.x)) for use in uses]
    used = {use.slot for use in uses}
    if used != set(range(len(bs))):
        return (
            f"{len(bs) - len(used)} of {len(bs)} trainable b factors are not used through an "
            "intercepted stock Flax layer (lora.linen_apply); project models that call "
            "lora.dense clip vmapped per-example gradients"
        )
    return uses


def _positions(use) -> int:
    """T of one recorded call (``use.u`` per example: ``[..., r]``)."""
    return int(np.prod(use.u.shape[:-1]))


def ghost_forms(uses: list, trainable: PyTree) -> list[bool]:
    """Per trainable leaf (a LoRA factor; ``uses`` from :func:`probe` on ``trainable``):
    whether its per-example norms take the ghost form (see :func:`_forms`)."""
    return _forms(uses, _factors(trainable)[2])


def _forms(uses: list, factors: list[Factor]) -> list[bool]:
    """Per trainable factor: whether its per-example norms take the ghost form
    (:func:`_ghost`: T = 1, or the Gram form cheaper than the materialised products). The
    gradient of ``b`` is ``sum_t u_t (x) g_t`` (sides r and d_out), of ``a``
    ``sum_t x_t (x) (g_t . b^T)`` (sides d_in and r)."""
    forms = []
    for f in factors:
        mine = [use for use in uses if use.slot == f.slot]
        t = sum(_positions(use) for use in mine)
        r = mine[0].u.shape[-1]
        d_out = int(np.prod(mine[0].out.shape)) // _positions(mine[0])
        d_in = int(np.prod(f.shape[:-1])) if f.name == "a" else 0
        forms.append(_ghost(t, r, d_out) if f.name == "b" else _ghost(t, d_in, r))
    return forms


def _per_factor(uses: list, factors: list[Factor], bs: list, aux: list, gs: list) -> list:
    """Per trainable factor, float32: ``(L [B, T, p], R [B, T, q])`` rows whose per-example
    ``sum_t L_t (x) R_t`` is the factor's gradient (``[p, q]``, the factor's shape
    flattened), the node's calls concatenated along T, when the ghost norm is the cheaper;
    otherwise the materialised per-example gradients ``[B, p, q]``. For ``b``: ``L = scale u``,
    ``R = g`` (materialised in the call's own layouts: no transposing copy of ``g``); for
    ``a``: ``L = x``, ``R = scale g . b^T``. The scale goes on the side with the fewer
    entries per row (r): scaling ``g`` cost a pass over activation-sized data."""
    ghost = _forms(uses, factors)
    out = []
    for f, is_ghost in zip(factors, ghost, strict=True):
        idx = [i for i, use in enumerate(uses) if use.slot == f.slot]
        if f.name == "b":
            left = [aux[i][0].astype(jnp.float32) * uses[i].scale for i in idx]
            if not is_ghost:
                out.append(
                    sum(
                        jax.vmap(uses[i].layout.outer)(u, gs[i].astype(jnp.float32))
                        for i, u in zip(idx, left, strict=True)
                    )
                )
                continue
            left = [u.reshape(u.shape[0], -1, u.shape[-1]) for u in left]
            right = [jax.vmap(uses[i].layout.rows)(gs[i]).astype(jnp.float32) for i in idx]
        else:
            b = bs[f.slot].astype(jnp.float32)
            b = b.reshape(b.shape[0], -1)  # [r, d_out]
            left = [jax.vmap(uses[i].layout.x_rows)(aux[i][1]).astype(jnp.float32) for i in idx]
            right = [
                jax.vmap(uses[i].layout.rows)(gs[i]).astype(jnp.float32) @ (b.T * uses[i].scale)
                for i in idx
            ]
        left, right = jnp.concatenate(left, axis=1), jnp.concatenate(right, axis=1)
        out.append((left, right) if is_ghost else jnp.einsum("btp,btq->bpq", left, right))
    return out


def _ghost(t: int, p: int, q: int) -> bool:
    """Whether per-example norms of ``sum_t l_t r_t^T`` (T positions, ``l_t`` of size p,
    ``r_t`` of size q) are cheaper from ``l`` and ``r`` directly (T = 1, or the Gram form's
    ``T^2 (p + q)`` below the materialised ``T p q``) than from the ``[p, q]`` products."""
    return t == 1 or t * (p + q) < p * q


def _ghost_sq_norms(u: jax.Array, g: jax.Array) -> jax.Array:
    """``[B]`` squared Frobenius norms of ``sum_t u_t g_t^T`` without forming it."""
    if u.shape[1] == 1:
        return jnp.sum(u[:, 0] ** 2, -1) * jnp.sum(g[:, 0] ** 2, -1)
    return jnp.sum(jnp.einsum("btr,bsr->bts", u, u) * jnp.einsum("btd,bsd->bts", g, g), (1, 2))


def _zero_sums(factors: list[Factor]) -> list[jax.Array]:
    """float32 zeros ``[p, q]`` per factor (the clipped sums before reshaping)."""
    return [jnp.zeros(_pq(f), jnp.float32) for f in factors]


def _pq(f: Factor) -> tuple[int, int]:
    """The factor's gradient as a matrix: ``a`` ``[d_in, r]``, ``b`` ``[r, d_out]``."""
    if f.name == "a":
        return int(np.prod(f.shape[:-1])), f.shape[-1]
    return f.shape[0], int(np.prod(f.shape[1:]))


def bookkeeping_grad(
    loss_fn: LossFn,
    clip_norm: float | jax.Array,
    uses: list,
    *,
    microbatch_size: int | None = None,
) -> GradFn:
    """Book-keeping clipped sum for the recorded ``uses`` (from :func:`probe`); the same
    contract and guarantee as :func:`ffa_jax.privacy.clipping.clipped_grad`.

    Args:
        loss_fn: ``loss_fn(trainable, frozen, example) -> scalar`` for ONE example.
        clip_norm: C > 0 (a traced scalar is allowed).
        uses: the probe's record for this ``loss_fn`` and trainable tree.
        microbatch_size: if set and smaller than B_max (and a divisor of it), the batch runs
            in micro-batches of this size: it bounds activation memory (there are no
            per-example gradients to bound), and micro-batches of padding only are skipped,
            so a real-first Poisson batch pays for about its sampled size (what
            :func:`ffa_jax.perf.resolve` picks it for on a CPU).

    Returns:
        ``f(trainable, frozen, batch, mask) -> (grad_sum, stats)`` like ``clipped_grad``. An
        example whose gradient norm is not finite (a non-finite entry, or a norm above
        float32's ~1.8e19) contributes nothing; its norm is reported as computed.

    Formal guarantee:
        The same as ``clipped_grad``: each example's contribution ``w_i grad_i`` is computed
        from that example alone (a vmapped per-example forward and backward pass; no batch
        statistics) and has L2 norm ``min(||grad_i||, C) <= C`` (0 for padding and for a
        non-finite norm), so adding or removing one example changes ``grad_sum`` by at most
        C. This holds even where the tape missed a use of ``b`` (the contribution is then a
        wrong gradient, still clipped to C).
    """
    validate_clip_norm(clip_norm)
    validate_microbatch_size(microbatch_size)
    taps_spec = [use.out for use in uses]

    def one_chunk(trainable, frozen, batch, real, c):
        slots, bs, factors = _factors(trainable)

        def per_example(taps, example):
            with lora.tape(slots, taps) as t:
                loss = loss_fn(trainable, frozen, example)
            if len(t.uses) != len(taps):
                raise RuntimeError(
                    f"the book-keeping tape recorded {len(t.uses)} tapped layer calls, its "
                    f"shape probe {len(taps)}; use clipping='vmap' for this loss."
                )
            # x is only read for trained a factors; XLA drops it otherwise.
            return loss.astype(jnp.float32), [(use.u, use.x) for use in t.uses]

        b = real.shape[0]
        taps = [jnp.zeros((b, *s.shape), s.dtype) for s in taps_spec]
        (losses, aux), gs = jax.vmap(jax.value_and_grad(per_example, has_aux=True))(taps, batch)
        parts = _per_factor(uses, factors, bs, aux, gs)
        sq = [
            _ghost_sq_norms(*part) if isinstance(part, tuple) else jnp.sum(part**2, (1, 2))
            for part in parts
        ]
        # The Gram form can round a (near-)zero square slightly below 0; NaN stays NaN.
        norms = jnp.sqrt(jnp.maximum(sum(sq), 0.0))
        ok = real & jnp.isfinite(norms)
        weight = jnp.where(ok, jnp.minimum(1.0, c / jnp.where(ok & (norms > 0), norms, 1.0)), 0.0)
        keep = ok[:, None, None]
        sums = []
        for part in parts:
            # jnp.where, not a zero weight: a padded or non-finite example's values may be
            # inf/nan, and 0 * inf = nan would reach the sum.
            if isinstance(part, tuple):
                left, right = part
                left = jnp.where(keep, left * weight[:, None, None], 0.0)
                sums.append(jnp.einsum("btp,btq->pq", left, jnp.where(keep, right, 0.0)))
            else:
                sums.append(jnp.einsum("b,bpq->pq", weight, jnp.where(keep, part, 0.0)))
        return sums, losses, norms

    def f(trainable, frozen, batch, mask):
        mask = jnp.asarray(mask)
        b = batch_size_of(batch, mask)
        n_chunks = num_microbatches(b, microbatch_size)
        real = mask.astype(bool)
        c = jnp.asarray(clip_norm, jnp.float32)
        factors = _factors(trainable)[2]
        if n_chunks == 1:
            sums, losses, norms = one_chunk(trainable, frozen, batch, real, c)
        else:
            chunk = functools.partial(one_chunk, trainable, frozen, c=c)
            m = b // n_chunks

            def skipped(_batch, _real):
                zero = jnp.zeros((m,), jnp.float32)
                return _zero_sums(factors), zero, zero

            def body(acc, xs):
                sums, losses, norms = jax.lax.cond(jnp.any(xs[1]), chunk, skipped, *xs)
                return [a + s for a, s in zip(acc, sums, strict=True)], (losses, norms)

            sums, (losses, norms) = jax.lax.scan(
                body, _zero_sums(factors), (chunked(batch, n_chunks), chunked(real, n_chunks))
            )
            losses, norms = losses.reshape(b), norms.reshape(b)
        leaves, treedef = jax.tree_util.tree_flatten(trainable)
        # The trainable tree's leaves are exactly the factors, in flatten order (_factors).
        grad_sum = [s.reshape(x.shape).astype(x.dtype) for s, x in zip(sums, leaves, strict=True)]
        stats = clipped_stats(real, losses, norms, clip_norm)
        return jax.tree_util.tree_unflatten(treedef, grad_sum), stats

    return f


def clipped_grad_auto(
    loss_fn: LossFn,
    clip_norm: float | jax.Array,
    *,
    method: str = "auto",
    microbatch_size: int | None = None,
    tail_microbatch_size: int | None = None,
) -> GradFn:
    """The DP step's clipped gradient sum by ``method``:

    * ``"vmap"``: :func:`ffa_jax.privacy.clipping.clipped_grad` (vmapped per-example
      gradients through jax-privacy; every model);
    * ``"bookkeeping"``: :func:`bookkeeping_grad`; a ConfigError at trace time where it does
      not apply (the message says why);
    * ``"auto"`` (default): book-keeping where the probe finds it applies (FFA-LoRA or LoRA
      on stock Flax layers run through :func:`ffa_jax.lora.linen_apply`) and every norm takes the
      ghost form (:func:`ghost_forms`: one position per example, or few), ``"vmap"``
      otherwise (with many positions both paths form the per-example products; the vmapped
      one measured as fast or faster).

    The probe is one shape-only trace of one example's forward pass when the returned
    function is traced. ``tail_microbatch_size`` applies to ``"vmap"`` only. Same contract
    and formal guarantee as ``clipped_grad``.
    """
    validate_clipping(method)
    vmapped = clipped_grad(
        loss_fn,
        clip_norm,
        microbatch_size=microbatch_size,
        tail_microbatch_size=tail_microbatch_size,
    )
    if method == "vmap":
        return vmapped

    def f(trainable, frozen, batch, mask):
        uses = probe(loss_fn, trainable, frozen, jax.tree.map(lambda x: x[0], batch))
        if method == "auto" and not isinstance(uses, str) and not all(ghost_forms(uses, trainable)):
            # A slot whose norms need the [r, d_out] per-example products (many positions per
            # example) forms them either way; there the vmapped path measured as fast or
            # faster (stock attention block, 32 positions: 1.01-1.04x vs 1.02-1.07x).
            uses = "some per-example norms need the materialised [r, d_out] products"
        if isinstance(uses, str):
            if method == "bookkeeping":
                raise ConfigError(
                    f"clipping='bookkeeping' does not apply: {uses}. Use 'auto' or 'vmap'."
                )
            return vmapped(trainable, frozen, batch, mask)
        grad = bookkeeping_grad(loss_fn, clip_norm, uses, microbatch_size=microbatch_size)
        return grad(trainable, frozen, batch, mask)

    return f
