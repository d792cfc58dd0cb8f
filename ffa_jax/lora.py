"""LoRA and FFA-LoRA as a pytree transform of a model's parameter tree.

A *target* leaf (a ``[d_in, d_out]`` dense kernel whose path matches a regular expression,
query and value projections by default) is replaced by a :class:`LoRAWeight` node holding the
frozen pretrained kernel ``w0``, the factors ``a`` ``[d_in, r]`` and ``b`` ``[r, d_out]`` and the
static ``scale = alpha / r``. Layers compute ``x @ w0 + scale * ((x @ a) @ b)`` (see
:func:`dense`): the update is never materialised during training, so per-example gradients of
``b`` are ``r x d_out``, not ``d_in x d_out``.

In PyTorch/PEFT layout (``[out, in]``) this is ``W = W0 + scale * B_pt @ A_pt`` with
``A_pt = a.T`` (``[r, d_in]``) and ``B_pt = b.T`` (``[d_out, r]``).

Modes:

* ``"ffa"`` (FFA-LoRA, Sun et al., ICLR 2024): ``a`` is random and frozen, identical on every
  client because it is drawn from one shared seed; only ``b`` (zero at init) is trained,
  uploaded and averaged.
* ``"lora"``: ``a`` and ``b`` are both trained and averaged separately (the paper's baseline).
* The federated variants that followed FFA-LoRA (``rolora``, ``fedsb``, ...; see
  :mod:`ffa_jax.federated.modes`): :data:`TRAINED_FACTORS` says which factors each trains.
  Fed-SB adds an ``r x r`` matrix ``mid`` between the factors: ``w0 + scale * a @ mid @ b``.

Trainable and frozen leaves are separated by :func:`split` into two trees of the same structure
(``None`` where a leaf belongs to the other tree) and joined by :func:`combine`; gradients are
only ever taken with respect to the trainable tree.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import re
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ffa_jax.config import LORA_MODES, LoRAConfig
from ffa_jax.errors import ConfigError
from ffa_jax.types import PyTree

MODES = LORA_MODES

# Which factors of a LoRA node the server's trainable tree holds, per mode (w0 never). A
# mode may train only part of them in a given round (RoLoRA), see ffa_jax.federated.modes.
TRAINED_FACTORS: dict[str, tuple[str, ...]] = {
    "ffa": ("b",),
    "lora": ("a", "b"),
    "rolora": ("a", "b"),
    "fedsb": ("mid",),
    "fedex": ("a", "b"),
    "flora": ("a", "b"),
    "fedsvd": ("b",),
    # FedSA-LoRA: the server holds (and averages) A only; each client trains A and its own B.
    "fedsa": ("a",),
}


@struct.dataclass
class LoRAWeight:
    """A dense kernel with a low-rank adapter: ``w0 + scale * a @ b``.

    Attributes:
      w0: frozen pretrained kernel, ``[d_in, d_out]``: a ``jax.Array``, or a numpy array in
        host memory until the frozen tree is placed (``perf.model_devices > 1``, see
        :func:`ffa_jax.workloads.host_weights`).
      a: ``[d_in, r]``; frozen under FFA-LoRA.
      b: ``[r, d_out]``; zero at init, always trainable.
      scale: ``alpha / r`` (static, part of the tree structure).
      mid: None (plain LoRA: no leaf, the tree is unchanged), or Fed-SB's trainable
        ``[r, r]`` matrix between frozen ``a`` and ``b``: the update is ``a @ mid @ b``.
    """

    w0: jax.Array
    a: jax.Array
    b: jax.Array
    scale: float = struct.field(pytree_node=False)
    mid: jax.Array | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.w0.shape)

    @property
    def rank(self) -> int:
        return int(self.a.shape[-1])

    def merged(self) -> jax.Array:
        """The plain kernel ``w0 + scale * a @ b``, ``[d_in, d_out]``.

        For an N-D kernel attached by :func:`attach` (``a`` ``[*in_shape, r]``, ``b``
        ``[r, *out_shape]``) the product is ``tensordot(a, b, 1)``, shaped like ``w0``; for
        2-D factors that is exactly ``a @ b``. With ``mid`` (Fed-SB): ``a @ mid @ b``."""
        return self.w0 + self.scale * jnp.tensordot(self.a_eff(), self.b, axes=1).astype(
            self.w0.dtype
        )

    def a_eff(self) -> jax.Array:
        """``a``, or ``a @ mid`` (``[..., r]``) when the node has a Fed-SB ``mid``."""
        if self.mid is None:
            return self.a
        return jnp.tensordot(self.a, self.mid.astype(self.a.dtype), axes=1)


def is_lora(x: Any) -> bool:
    return isinstance(x, LoRAWeight)


def dense(x: jax.Array, kernel: jax.Array | LoRAWeight) -> jax.Array:
    """``x @ kernel`` for a plain or LoRA kernel. ``x``: ``[..., d_in]`` -> ``[..., d_out]``.

    The LoRA branch stays factorised (two skinny matmuls) so that gradients with respect to
    ``b`` never form a ``d_in x d_out`` matrix.
    """
    if isinstance(kernel, LoRAWeight):
        low = x @ kernel.a.astype(x.dtype)
        if kernel.mid is not None:
            low = low @ kernel.mid.astype(x.dtype)
        low = low @ kernel.b.astype(x.dtype)
        return x @ kernel.w0.astype(x.dtype) + kernel.scale * low
    return x @ kernel.astype(x.dtype)


def path_str(path: Sequence[Any]) -> str:
    """``/``-joined names of a ``jax.tree_util`` key path (dict keys, attributes, indices)."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(str(k.name))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        else:
            parts.append(str(k))
    return "/".join(parts)


def _init_a(key: jax.Array, d_in: int, rank: int, how: str, dtype) -> jax.Array:
    if how == "uniform":
        bound = 1.0 / np.sqrt(d_in)
        return jax.random.uniform(key, (d_in, rank), dtype, -bound, bound)
    if how == "gaussian":
        return jax.random.normal(key, (d_in, rank), dtype) / np.sqrt(d_in)
    # Orthonormal unit columns: entries have variance 1/d_in, as with "gaussian".
    return jax.nn.initializers.orthogonal()(key, (d_in, rank), jnp.float32).astype(dtype)


def path_key(key: jax.Array, path: str) -> jax.Array:
    """The key of the LoRA node at ``path``: ``key`` folded with the path's crc32 (stable
    across processes and Python hash seeds), so a node's draw does not depend on leaf order."""
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def draw_a(key: jax.Array, path: str, d_in: int, rank: int, how: str) -> jax.Array:
    """A fresh ``a`` ``[d_in, rank]`` (float32) for the node at ``path``, drawn as
    :func:`init` draws it from the shared ``key`` (``how``: ``lora.a_init``)."""
    return _init_a(path_key(key, path), d_in, rank, how, jnp.float32)


def target_paths(params: PyTree, targets: str) -> list[str]:
    """Paths of the leaves of ``params`` that ``targets`` fullmatches (2-D leaves only)."""
    pattern = re.compile(targets)
    out = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        p = path_str(path)
        if pattern.fullmatch(p) and getattr(leaf, "ndim", 0) == 2:
            out.append(p)
    return out


def init(params: PyTree, spec: LoRAConfig, key: jax.Array) -> PyTree:
    """Wraps every target kernel of ``params`` in a :class:`LoRAWeight` with B = 0.

    A is a deterministic function of ``key`` and the leaf's path (not of leaf order), so every
    client that calls ``init`` with the same shared key holds bit-identical A matrices: A never
    needs to be communicated.

    Only shapes and paths of ``params`` are read: its leaves may be ``jax.Array`` or host
    numpy arrays (they become the ``w0`` as they are, never copied to a device); ``a`` and
    ``b`` are float32 ``jax.Array`` leaves either way.

    Args:
      params: the pretrained parameter tree (plain arrays).
      spec: the ``lora`` config section.
      key: the shared LoRA key (same on every client).

    Returns:
      A tree of the same structure where targets are :class:`LoRAWeight` nodes.

    Raises:
      ConfigError: if ``spec.targets`` matches no 2-D weight (the message lists some paths),
        or ``rank`` exceeds a target's dimensions.
    """
    paths = target_paths(params, spec.targets)
    if not paths:
        candidates = [
            path_str(p)
            for p, leaf in jax.tree_util.tree_leaves_with_path(params)
            if getattr(leaf, "ndim", 0) == 2
        ]
        raise ConfigError(
            f"lora.targets={spec.targets!r} matches no 2-D weight of the model. "
            f"Some weight paths are: {candidates[:8]}; pass a regular expression that fullmatches "
            "some of them, e.g. '.*(query|value)/kernel'."
        )
    wanted = set(paths)

    def wrap(path, leaf):
        p = path_str(path)
        if p not in wanted:
            return leaf
        d_in, d_out = leaf.shape
        if spec.rank > min(d_in, d_out):
            raise ConfigError(
                f"lora.rank={spec.rank} exceeds the dimensions {leaf.shape} of target {p}; use a smaller rank."
            )
        leaf_key = path_key(key, p)
        if spec.mode == "fedsb":
            return fedsb_node(leaf, leaf_key, spec)
        a = _init_a(leaf_key, d_in, spec.rank, spec.a_init, jnp.float32)
        b = jnp.zeros((spec.rank, d_out), jnp.float32)
        return LoRAWeight(w0=leaf, a=a, b=b, scale=spec.scale)

    return jax.tree_util.tree_map_with_path(wrap, params)


def fedsb_node(w0: Any, key: jax.Array, spec: LoRAConfig) -> LoRAWeight:
    """A Fed-SB node for kernel ``w0`` ``[d_in, d_out]``: frozen ``a`` ``[d_in, r]`` and ``b``
    ``[r, d_out]``, trainable ``mid`` ``[r, r]`` = 0 (so the model starts as the base model).

    ``spec.sb_init``: ``"svd"``: ``a`` = the top-r left singular vectors of ``w0`` and ``b`` =
    the top-r right ones (transposed), both orthonormal, computed on the host in float64 from
    the public pretrained weight; ``"random"``: ``a`` drawn as ``lora.a_init`` from ``key``
    and ``b`` with orthonormal rows from ``fold_in(key, 1)``. Either way every client derives
    the same ``a`` and ``b`` from public inputs: they are never communicated.
    """
    d_in, d_out = w0.shape
    r = spec.rank
    if spec.sb_init == "svd":
        u, _, vt = np.linalg.svd(np.asarray(w0, np.float64), full_matrices=False)
        a = jnp.asarray(u[:, :r], jnp.float32)
        b = jnp.asarray(vt[:r, :], jnp.float32)
    else:
        a = _init_a(key, d_in, r, spec.a_init, jnp.float32)
        b = jax.nn.initializers.orthogonal()(jax.random.fold_in(key, 1), (d_out, r), jnp.float32).T
    mid = jnp.zeros((r, r), jnp.float32)
    return LoRAWeight(w0=w0, a=a, b=b, scale=spec.scale, mid=mid)


def fold_mid(params: PyTree) -> PyTree:
    """Every Fed-SB node ``a @ mid @ b`` as a plain LoRA node ``a @ (mid @ b)`` (``mid``
    folded into ``b``, ``mid`` dropped): what PEFT's ``W0 + s B A`` can represent (PEFT
    ``lora_B = (mid @ b).T``). Other nodes are returned as they are."""

    def one(x):
        if not is_lora(x) or x.mid is None:
            return x
        b = jnp.tensordot(x.mid.astype(x.b.dtype), x.b, axes=1)
        return LoRAWeight(w0=x.w0, a=x.a, b=b, scale=x.scale)

    return jax.tree_util.tree_map(one, params, is_leaf=is_lora)


def merge(params: PyTree) -> PyTree:
    """Replaces every :class:`LoRAWeight` by its merged kernel (for inference and export)."""
    return jax.tree_util.tree_map(
        lambda x: x.merged() if is_lora(x) else x, params, is_leaf=is_lora
    )


@functools.lru_cache(maxsize=64)
def _merge_into(sharding) -> Callable[[LoRAWeight], jax.Array]:
    return jax.jit(lambda node: node.merged(), out_shardings=sharding)


def merge_sharded(params: PyTree) -> PyTree:
    """:func:`merge` for eager callers (outside ``jax.jit``) whose frozen kernels may be
    sharded over several devices (``perf.model_devices > 1``, see
    :func:`ffa_jax.federated.round.place_frozen`): a merged kernel gets its ``w0``'s
    sharding, so no device holds more of it than of ``w0`` (an eager ``w0 + a @ b`` would
    leave the placement to XLA, and ``a @ b`` would be whole on every device of the mesh).
    Nodes whose ``w0`` is on one device, or on the host, merge exactly as :func:`merge`."""

    def one(x):
        if not is_lora(x):
            return x
        sharding = getattr(x.w0, "sharding", None)
        if not isinstance(x.w0, jax.Array) or len(sharding.device_set) <= 1:
            return x.merged()
        return _merge_into(sharding)(x)

    return jax.tree_util.tree_map(one, params, is_leaf=is_lora)


def trainable_mask(params: PyTree, mode: str, *, extra: str | None = None) -> PyTree:
    """Bool tree (same structure as ``params``' leaves): True for leaves that are trained.

    The factors :data:`TRAINED_FACTORS` names for ``mode`` (``b`` under FFA; ``a`` and ``b``
    under LoRA; ``mid`` under Fed-SB); ``w0`` never. ``extra`` is an optional regular
    expression of additional plain leaves to train (e.g. the classification head,
    ``classifier/.*``).
    """
    if mode not in MODES:
        raise ConfigError(f"lora.mode={mode!r} is not one of {MODES}.")
    return factor_mask(params, TRAINED_FACTORS[mode], extra=extra)


def factor_mask(
    params: PyTree, factors: Sequence[str], *, extra: str | None = None, plain: bool | None = None
) -> PyTree:
    """Bool tree like :func:`trainable_mask`: True for the LoRA factors named in ``factors``
    (of ``"a"``, ``"b"``, ``"mid"``) and for plain leaves matching ``extra`` (or, when
    ``plain`` is given, for every plain leaf that is not None: ``True``/``False``)."""
    extra_re = re.compile(extra) if extra else None

    def leaf_mask(path, leaf):
        if is_lora(leaf):
            mid = None if leaf.mid is None else "mid" in factors
            return LoRAWeight(
                w0=False, a="a" in factors, b="b" in factors, scale=leaf.scale, mid=mid
            )
        if plain is not None:
            return plain
        return bool(extra_re and extra_re.fullmatch(path_str(path)))

    return jax.tree_util.tree_map_with_path(leaf_mask, params, is_leaf=is_lora)


def split(params: PyTree, mask: PyTree) -> tuple[PyTree, PyTree]:
    """Splits ``params`` into ``(trainable, frozen)`` trees by a :func:`trainable_mask`.

    Both trees keep the full structure, with ``None`` where a leaf lives in the other tree,
    so ``combine(*split(p, m)) == p``.
    """
    trainable = jax.tree_util.tree_map(lambda m, x: x if m else None, mask, params)
    frozen = jax.tree_util.tree_map(lambda m, x: None if m else x, mask, params)
    return trainable, frozen


def combine(trainable: PyTree, frozen: PyTree) -> PyTree:
    """Inverse of :func:`split`: takes each leaf from whichever tree holds it."""
    return jax.tree_util.tree_map(
        lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None
    )


def tree_bytes(tree: PyTree) -> int:
    """Total bytes of the array leaves of ``tree`` (``None`` leaves count zero)."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)))


def lora_nodes(params: PyTree) -> dict[str, LoRAWeight]:
    """``{path: LoRAWeight}`` of every LoRA node in ``params``."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params, is_leaf=is_lora):
        if is_lora(leaf):
            out[path_str(path)] = leaf
    return out


def apply_fn_with_lora(apply_fn: Callable, mode: str) -> Callable:
    """Wraps a model ``apply_fn(params, ...)`` so that, under FFA, ``a`` is stop-gradiented.

    Gradients are taken only with respect to the trainable tree anyway; this guards users who
    differentiate the combined tree directly.
    """
    if "a" in TRAINED_FACTORS.get(mode, ()):
        return apply_fn

    def wrapped(params, *args, **kwargs):
        params = jax.tree_util.tree_map(
            lambda x: x.replace(a=jax.lax.stop_gradient(x.a)) if is_lora(x) else x,
            params,
            is_leaf=is_lora,
        )
        return apply_fn(params, *args, **kwargs)

    return wrapped


# ---------------------------------------------------------------------------------------------
# LoRA on a stock flax.linen model, without rewriting it: ``attach`` + ``intercept``.
#
# The project's own models call :func:`dense` on kernels that may be LoRA nodes. A stock Flax
# model calls ``nn.Dense`` / ``nn.DenseGeneral`` / ``nn.Einsum`` instead, which cannot take a
# LoRA node. ``flax.linen.intercept_methods`` lets us take over those calls from the outside:
# when a layer's ``kernel`` is a :class:`LoRAWeight`, the interceptor runs the stock layer on
# ``w0`` (its own dtype promotion, bias, precision) and adds the unmerged low-rank branch
# ``scale * ((x . a) . b)``, so per-example gradients of ``b`` stay ``r x d_out``.

LINEN_LAYERS = ("Dense", "DenseGeneral", "Einsum")


def _linen_layer_kind(module: Any) -> str | None:
    import flax.linen as nn

    for name in LINEN_LAYERS:
        if isinstance(module, getattr(nn, name)):
            return name
    return None


def _einsum_str(module: Any, args: tuple, kwargs: dict) -> str:
    eq = kwargs.get("einsum_str", args[1] if len(args) > 1 else None) or module.einsum_str
    return eq.replace(" ", "")


def _einsum_split(eq: str, path: str) -> tuple[str, str, str, str]:
    """``(lhs, out, in_letters, out_letters)`` of a stock ``nn.Einsum`` equation whose kernel
    subscripts are contracted input axes followed by output axes (e.g. ``...d,dhk->...hk``).

    Raises:
      ConfigError: another kernel layout (a kernel axis that is both in the input and the
        output, or contracted axes not leading): LoRA cannot be factorised over it.
    """
    lhs, rest = eq.split(",")
    rhs, out = rest.split("->")
    n_in = 0
    while n_in < len(rhs) and rhs[n_in] in lhs and rhs[n_in] not in out:
        n_in += 1
    in_letters, out_letters = rhs[:n_in], rhs[n_in:]
    if not in_letters or any(c in lhs or c not in out for c in out_letters):
        raise ConfigError(
            f"lora.targets matches {path}, an nn.Einsum with equation {eq!r}, whose kernel axes "
            "are not (contracted input axes, then output axes); LoRA cannot be attached to it. "
            "Narrow lora.targets so that it does not match this kernel."
        )
    return lhs, out, in_letters, out_letters


def _kernel_in_axes(kind: str, module: Any, args: tuple, kwargs: dict, path: str) -> int:
    """How many leading axes of the layer's kernel are contracted with the input."""
    if kind == "Dense":
        return 1
    if kind == "DenseGeneral":
        if module.batch_dims:
            raise ConfigError(
                f"lora.targets matches {path}, an nn.DenseGeneral with batch_dims="
                f"{module.batch_dims}; LoRA supports DenseGeneral without batch_dims only. "
                "Narrow lora.targets so that it does not match this kernel."
            )
        axis = module.axis
        return len(axis) if isinstance(axis, Sequence) else 1
    return len(_einsum_split(_einsum_str(module, args, kwargs), path)[2])


@dataclasses.dataclass(frozen=True)
class LowRankLayout:
    """How a layer call's low-rank input ``u = x . a`` (``[..., r]``) and an array ``g`` laid
    out like its output line up (the book-keeping tape's view of the call).

    Attributes:
      rows: ``g -> [T, d_out]``, row t aligned with ``u.reshape(T, r)`` row t.
      outer: ``(u, g) -> [r, d_out]``, ``sum_t u_t (x) g_t`` contracted in the call's own
        layouts (no transposing copy of ``g``): the gradient of ``b`` when ``g`` is the output
        gradient, before the node's scale.
      x_rows: ``x -> [T, d_in]``, the input's contracted axes flattened in the order of
        ``a``'s input axes, rows aligned with ``u``'s (the gradient of ``a`` is
        ``scale * sum_t x_t (x) (g_t . b^T)``).
    """

    rows: Callable[[jax.Array], jax.Array]
    outer: Callable[[jax.Array, jax.Array], jax.Array]
    x_rows: Callable[[jax.Array], jax.Array]


def _low_rank(
    kind: str, module: Any, x: jax.Array, node: LoRAWeight, args, kwargs
) -> tuple[jax.Array, jax.Array, LowRankLayout]:
    """``(u, low, layout)`` of the layer's unmerged branch, never forming ``a @ b``:
    ``u = x . a`` (``[..., r]``), ``low = u . b`` (the layer's output layout) and their
    :class:`LowRankLayout`."""
    a, b = node.a_eff().astype(x.dtype), node.b.astype(x.dtype)
    r, d_out, d_in = b.shape[0], int(np.prod(b.shape[1:])), int(np.prod(a.shape[:-1]))

    def trailing(g):
        return g.reshape(-1, d_out)

    def leading_outer(u, g):  # u [..., r], g [..., *features]: contract the shared "..."
        lead = tuple(range(u.ndim - 1))
        return jnp.tensordot(u, g, axes=(lead, lead)).reshape(r, d_out)

    if kind == "Dense":
        u = x @ a
        return u, u @ b, LowRankLayout(trailing, leading_outer, lambda x: x.reshape(-1, d_in))
    if kind == "DenseGeneral":
        axis = module.axis if isinstance(module.axis, Sequence) else (module.axis,)
        axis = tuple(ax % x.ndim for ax in axis)
        u = jax.lax.dot_general(x, a, ((axis, tuple(range(len(axis)))), ((), ())))
        low = jnp.tensordot(u, b, axes=1)  # [..., r] . [r, *features]

        def x_rows(x):  # the contracted axes last, in a's order; the rest as in u
            return jnp.moveaxis(x, axis, tuple(range(x.ndim - len(axis), x.ndim))).reshape(-1, d_in)

        return u, low, LowRankLayout(trailing, leading_outer, x_rows)
    path = "/".join(module.path)
    lhs, out, in_letters, out_letters = _einsum_split(_einsum_str(module, args, kwargs), path)
    rank_letter = next(c for c in "rRzZqQ" if c not in lhs + out + in_letters)
    kept = lhs.replace("...", ".")
    mid = "".join(c for c in kept if c not in in_letters).replace(".", "...") + rank_letter
    u = jnp.einsum(f"{lhs},{in_letters}{rank_letter}->{mid}", x, a)
    low = jnp.einsum(f"{mid},{rank_letter}{out_letters}->{out}", u, b)

    def rows(g):
        return trailing(jnp.einsum(f"{out}->{mid[:-1]}{out_letters}", g))

    def outer(u, g):
        return jnp.einsum(f"{mid},{out}->{rank_letter}{out_letters}", u, g).reshape(r, d_out)

    def x_rows(x):
        return jnp.einsum(f"{lhs}->{mid[:-1]}{in_letters}", x).reshape(-1, d_in)

    return u, low, LowRankLayout(rows, outer, x_rows)


# ---------------------------------------------------------------------------------------------
# The book-keeping tape (:mod:`ffa_jax.privacy.bookkeeping`): per-example clipping without
# per-example gradients. While a :class:`Tape` is active, every intercepted stock layer whose
# ``b`` is one of the tape's slots records its low-rank input ``u`` and adds a zero "tap" to
# its output; the gradient of the loss with respect to that tap is the layer's output gradient
# ``g``, and the gradient of ``b`` is ``scale * sum_t u_t (x) g_t``. The DP step can then clip
# from ``u`` and ``g`` (activation-sized) instead of materialising ``[B, r, d_out]``.


@dataclasses.dataclass(frozen=True)
class TapUse:
    """One call of a tapped layer in one per-example forward pass.

    Attributes:
      slot: which of the tape's ``b`` factors the layer used.
      u: the call's low-rank input ``x . a``, ``[..., r]`` (T = the product of ``...``); its
        ``jax.ShapeDtypeStruct`` in the records :func:`ffa_jax.privacy.bookkeeping.probe`
        returns.
      x: the call's input (likewise).
      out: shape and dtype of the call's output (the tap's per-example shape).
      layout: how ``u`` and an output-shaped ``g`` line up (:class:`LowRankLayout`).
      scale: the node's ``alpha / r``.
    """

    slot: int
    u: jax.Array | jax.ShapeDtypeStruct
    x: jax.Array | jax.ShapeDtypeStruct
    out: jax.ShapeDtypeStruct
    layout: LowRankLayout
    scale: float


class Tape:
    """Records the tapped layer calls of one traced forward pass (see :func:`tape`)."""

    def __init__(self, slots: dict[int, int], taps: Sequence[jax.Array] | None):
        self._slots = slots
        self._taps = taps
        self.uses: list[TapUse] = []

    def tap(
        self,
        node: LoRAWeight,
        x: jax.Array,
        u: jax.Array,
        low: jax.Array,
        layout: LowRankLayout,
    ) -> jax.Array | None:
        """The tap to add to this call's output, or None when ``node.b`` is not a slot."""
        slot = self._slots.get(id(node.b))
        if slot is None:
            return None
        i = len(self.uses)
        out = jax.ShapeDtypeStruct(low.shape, low.dtype)
        self.uses.append(TapUse(slot, u, x, out, layout, node.scale))
        if self._taps is None:  # the shape probe: no taps yet
            return jnp.zeros(low.shape, low.dtype)
        if i >= len(self._taps) or self._taps[i].shape != low.shape:
            raise RuntimeError(
                "the book-keeping tape saw a different sequence of tapped layer calls than its "
                "shape probe (a forward pass whose layer calls depend on the data?); use "
                "clipping='vmap'."
            )
        return self._taps[i]


_TAPE: contextvars.ContextVar[Tape | None] = contextvars.ContextVar(
    "ffa_jax_lora_tape", default=None
)


@contextlib.contextmanager
def tape(slots: dict[int, int], taps: Sequence[jax.Array] | None = None):
    """Context manager: a :class:`Tape` that records the calls of intercepted stock layers
    (:func:`intercept`, :func:`linen_apply`) whose ``b`` factor is one of ``slots``
    (``{id(b array): slot}``, the very array objects the forward pass is given) and adds
    ``taps[i]`` (zeros shaped like the call's output) to the ``i``-th such call.
    ``taps=None`` is the shape probe: zeros are added and the calls recorded. Project models
    that call :func:`dense` are not tapped (their DP step clips vmapped per-example gradients).
    """
    t = Tape(slots, taps)
    token = _TAPE.set(t)
    try:
        yield t
    finally:
        _TAPE.reset(token)


def _lora_interceptor(mode: str):
    if mode not in MODES:
        raise ConfigError(f"lora.mode={mode!r} is not one of {MODES}.")

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        kind = _linen_layer_kind(module) if context.method_name == "__call__" else None
        if kind is None or not module.has_variable("params", "kernel"):
            return next_fun(*args, **kwargs)
        node = module.get_variable("params", "kernel")
        if not is_lora(node):
            return next_fun(*args, **kwargs)
        if "a" not in TRAINED_FACTORS[mode]:
            node = node.replace(a=jax.lax.stop_gradient(node.a))
        # The stock layer on w0: Flax's own dtype promotion, bias and precision. It is a
        # fresh top-level copy, so this interceptor passes it through (its kernel is plain).
        own = dict(module.variables["params"])
        own["kernel"] = node.w0
        base = module.clone(parent=None).apply({"params": own}, *args, **kwargs)
        x = args[0] if args else kwargs["inputs"]
        x = x.astype(base.dtype)
        u, low, layout = _low_rank(kind, module, x, node, args, kwargs)
        out = base + node.scale * low.astype(base.dtype)
        active = _TAPE.get()
        tap = None if active is None else active.tap(node, x, u, out, layout)
        return out if tap is None else out + tap

    return interceptor


def intercept(mode: str = "ffa"):
    """Context manager: inside it, stock ``flax.linen`` ``Dense`` / ``DenseGeneral`` /
    ``Einsum`` layers whose ``kernel`` parameter is a :class:`LoRAWeight` (from
    :func:`attach`) compute ``layer(x; w0) + scale * ((x . a) . b)``; other layers and plain
    kernels are untouched. ``mode="ffa"`` stop-gradients ``a`` (a guard: the trainable tree
    of :func:`split` holds only ``b`` anyway).

    Example::

        with lora.intercept("ffa"):
            y = model.apply({"params": lora_params}, x)
    """
    import flax.linen as nn

    return nn.intercept_methods(_lora_interceptor(mode))


def linen_apply(module: Any, mode: str = "ffa", method: str | None = None) -> Callable:
    """``apply(params, *args, **kwargs) -> module.apply({"params": params}, *args, **kwargs)``
    under :func:`intercept`: a pure function of a parameter tree holding LoRA nodes (from
    :func:`attach`), jittable and differentiable with respect to ``b`` (and ``a``)."""
    interceptor = _lora_interceptor(mode)

    def apply(params, *args, **kwargs):
        import flax.linen as nn

        with nn.intercept_methods(interceptor):
            return module.apply({"params": params}, *args, method=method, **kwargs)

    return apply


def linen_kernels(module: Any, params: PyTree, *args, **kwargs) -> dict[str, int]:
    """``{kernel path: number of input axes}`` of every stock ``Dense`` / ``DenseGeneral`` /
    ``Einsum`` call that ``module.apply({"params": params}, *args, **kwargs)`` makes (traced
    with ``jax.eval_shape``: no compute). Paths are ``/``-joined like :func:`path_str` of
    ``params`` (e.g. ``"MultiHeadDotProductAttention_0/query/kernel"``)."""
    import flax.linen as nn

    found: dict[str, int] = {}

    def record(next_fun, f_args, f_kwargs, context):
        module_ = context.module
        kind = _linen_layer_kind(module_) if context.method_name == "__call__" else None
        if kind is not None and module_.has_variable("params", "kernel"):
            path = "/".join([*module_.path, "kernel"])
            found[path] = (kind, module_, f_args, f_kwargs)
        return next_fun(*f_args, **f_kwargs)

    def run(p):
        with nn.intercept_methods(record):
            return module.apply({"params": p}, *args, **kwargs)

    jax.eval_shape(run, params)
    return {path: _kernel_in_axes(kind, m, a, k, path) for path, (kind, m, a, k) in found.items()}


def attach(module: Any, params: PyTree, spec: LoRAConfig, key: jax.Array, *args, **kwargs):
    """LoRA nodes on the stock Flax layers of ``module`` whose kernel path ``spec.targets``
    fullmatches: the ``flax.linen`` counterpart of :func:`init`, for a model that calls
    ``nn.Dense`` / ``nn.DenseGeneral`` / ``nn.Einsum`` (not :func:`dense`).

    ``args``/``kwargs`` are sample inputs of ``module.apply`` (e.g. one example): the calls
    are traced (shapes only) to learn which axes of each kernel are contracted with the input.
    A kernel ``[*in_shape, *out_shape]`` gets ``a`` ``[*in_shape, r]`` (drawn exactly as
    :func:`init` draws it, from ``key`` and the path) and ``b = 0`` ``[r, *out_shape]``; for a
    2-D kernel the node is bit-identical to :func:`init`'s. The result is an ordinary LoRA
    tree: :func:`trainable_mask`, :func:`split`, :func:`combine`, :func:`merge`, clipping, the
    federated round and the DP machinery work on it unchanged. Run the model with
    :func:`linen_apply` (or inside :func:`intercept`).

    Args:
      module: a ``flax.linen.Module``.
      params: its ``"params"`` collection (plain arrays).
      spec: the ``lora`` config section (``targets``, ``rank``, ``alpha``, ``a_init``).
      key: the shared LoRA key (same on every client).

    Raises:
      ConfigError: ``spec.targets`` matches no stock layer kernel (the message lists them),
        the rank exceeds a target's dimensions, or a matched layer cannot be factorised.
    """
    kernels = linen_kernels(module, params, *args, **kwargs)
    pattern = re.compile(spec.targets)
    wanted = {p: n for p, n in kernels.items() if pattern.fullmatch(p)}
    if not wanted:
        raise ConfigError(
            f"lora.targets={spec.targets!r} matches no Dense/DenseGeneral/Einsum kernel of the "
            f"model. Its kernels are: {sorted(kernels)[:8]}; pass a regular expression that "
            "fullmatches some of them, e.g. '.*(query|value)/kernel'."
        )

    def wrap(path, leaf):
        p = path_str(path)
        if p not in wanted:
            return leaf
        n_in = wanted[p]
        in_shape, out_shape = tuple(leaf.shape[:n_in]), tuple(leaf.shape[n_in:])
        d_in, d_out = int(np.prod(in_shape)), int(np.prod(out_shape))
        if spec.rank > min(d_in, d_out):
            raise ConfigError(
                f"lora.rank={spec.rank} exceeds the dimensions {leaf.shape} (in {d_in}, out "
                f"{d_out}) of target {p}; use a smaller rank."
            )
        leaf_key = jax.random.fold_in(key, zlib.crc32(p.encode()) & 0x7FFFFFFF)
        a = _init_a(leaf_key, d_in, spec.rank, spec.a_init, jnp.float32)
        a = a.reshape(*in_shape, spec.rank)
        b = jnp.zeros((spec.rank, *out_shape), jnp.float32)
        return LoRAWeight(w0=leaf, a=a, b=b, scale=spec.scale)

    return jax.tree_util.tree_map_with_path(wrap, params)


__all__ = [
    "LINEN_LAYERS",
    "MODES",
    "LoRAWeight",
    "LowRankLayout",
    "Tape",
    "TapUse",
    "apply_fn_with_lora",
    "attach",
    "combine",
    "dense",
    "draw_a",
    "factor_mask",
    "fedsb_node",
    "fold_mid",
    "init",
    "intercept",
    "is_lora",
    "linen_apply",
    "linen_kernels",
    "lora_nodes",
    "merge",
    "merge_sharded",
    "path_key",
    "path_str",
    "split",
    "tape",
    "target_paths",
    "trainable_mask",
    "tree_bytes",
]
