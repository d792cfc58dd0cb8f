"""Book-keeping clipping (``ffa_jax.privacy.bookkeeping``) against the vmapped per-example
clipping of ``clipped_grad``: the same clipped sum and statistics on stock Flax models (Dense,
DenseGeneral through multi-head attention, Einsum, a layer called twice; the ghost and the
materialised norm), padding with garbage, non-finite examples, the sensitivity bound, the
fallback where it does not apply, and its compiled cost next to the non-private step."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ffa_jax import lora
from ffa_jax.config import LoRAConfig
from ffa_jax.errors import ConfigError
from ffa_jax.federated.client import DpParams, make_client_update
from ffa_jax.models import layers
from ffa_jax.privacy import bookkeeping
from ffa_jax.privacy.clipping import clipped_grad

B = 8


class MLP(nn.Module):
    width: int = 16

    @nn.compact
    def __call__(self, x):  # x: [1, 6] (one example) or [1, T, 6] (T positions)
        h = nn.relu(nn.Dense(self.width, name="query")(x))
        h = nn.relu(nn.Dense(self.width, name="value")(h))
        return nn.Dense(3, name="head")(jnp.mean(h, axis=1) if h.ndim == 3 else h)


class Attention(nn.Module):
    width: int = 16

    @nn.compact
    def __call__(self, x):  # x: [1, T, 6]
        h = nn.Dense(self.width, name="embed")(x)
        h = h + nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(h)
        return nn.Dense(3, name="head")(jnp.mean(h, axis=1))


class EinsumNet(nn.Module):
    @nn.compact
    def __call__(self, x):  # x: [1, T, 6]
        h = nn.Einsum((6, 2, 8), "btd,dhk->bthk", name="query")(x)
        return nn.Dense(3, name="head")(jnp.mean(h.reshape(*h.shape[:2], -1), axis=1))


class Shared(nn.Module):
    """One Dense layer called twice: its b gets two taps per example."""

    @nn.compact
    def __call__(self, x):  # x: [1, 6]
        layer = nn.Dense(6, name="query")
        return nn.Dense(3, name="head")(nn.relu(layer(nn.relu(layer(x)))))


class ProjectMLP(nn.Module):
    """The project's own layer (lora.dense), which the book-keeping tape does not see."""

    @nn.compact
    def __call__(self, x):
        return layers.Dense(3, name="head")(nn.relu(layers.Dense(8, name="query")(x)))


def setup(model, x, targets, rank=4, head=False, mode="ffa"):
    """``(loss_fn, trainable, frozen)`` of FFA-LoRA (or ``mode``) on ``model`` with random
    non-zero B (a
    stock model through lora.attach, or a model of the project's layers through lora.init)."""
    params = model.init(jax.random.key(0), x[:1])["params"]
    spec = LoRAConfig(rank=rank, alpha=8.0, targets=targets)
    if isinstance(model, ProjectMLP):
        p = lora.init(params, spec, jax.random.key(1))
    else:
        p = lora.attach(model, params, spec, jax.random.key(1), x[:1])

    def fill(path, node):
        if not lora.is_lora(node):
            return node
        key = jax.random.fold_in(jax.random.key(3), hash(lora.path_str(path)) & 0xFFFF)
        return node.replace(b=0.3 * jax.random.normal(key, node.b.shape))

    p = jax.tree_util.tree_map_with_path(fill, p, is_leaf=lora.is_lora)
    mask = lora.trainable_mask(p, mode, extra="head/.*" if head else None)
    trainable, frozen = lora.split(p, mask)
    if isinstance(model, ProjectMLP):
        apply = lambda q, x: model.apply({"params": q}, x)  # noqa: E731 (lora.dense inside)
    else:
        apply = lora.linen_apply(model, mode)

    def loss_fn(t, f, ex):
        logits = apply(lora.combine(t, f), ex["x"][None])[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, ex["y"])

    return loss_fn, trainable, frozen


def batch_of(shape, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, *shape)).astype(np.float32)
    return {"x": x, "y": rng.integers(0, 3, B).astype(np.int32)}


MASK = np.array([1, 1, 1, 0, 1, 1, 1, 0], bool)

CASES = {
    # name: (model, per-example input shape, targets); T positions per call of the LoRA layer
    "mlp_T1": (MLP(), (6,), "(query|value)/kernel"),  # T = 1: |u|^2 |g|^2
    "mlp_T2_ghost": (MLP(), (2, 6), "(query|value)/kernel"),  # T (r + d) < r d: Gram form
    "mlp_T12_materialised": (MLP(), (12, 6), "(query|value)/kernel"),
    "attention": (Attention(), (5, 6), "attn/(query|value)/kernel"),  # DenseGeneral
    "einsum": (EinsumNet(), (5, 6), "query/kernel"),
    "shared_layer": (Shared(), (6,), "query/kernel"),
}


@functools.cache
def compiled(case, mode="ffa", microbatch_size=None):
    """``(trainable, frozen, vmapped, booked)`` of a case: both clipped sums jitted once, the
    batch, mask and clip norm as arguments (so the tests below share their compilations)."""
    model, shape, targets = CASES[case]
    loss_fn, trainable, frozen = setup(model, batch_of(shape)["x"], targets, mode=mode)

    def vmapped(t, f, batch, mask, c):
        return clipped_grad(loss_fn, c)(t, f, batch, mask)

    def booked(t, f, batch, mask, c):
        grad = bookkeeping.clipped_grad_auto(
            loss_fn, c, method="bookkeeping", microbatch_size=microbatch_size
        )
        return grad(t, f, batch, mask)

    return trainable, frozen, jax.jit(vmapped), jax.jit(booked)


def run_both(case, clip_norm, batch, mask, microbatch_size=None, mode="ffa"):
    trainable, frozen, vmapped, booked = compiled(case, mode, microbatch_size)
    c = jnp.float32(clip_norm)
    return vmapped(trainable, frozen, batch, mask, c), booked(trainable, frozen, batch, mask, c)


def pairs(a, b):
    """Corresponding leaves of two trees of the same structure."""
    return zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)


def assert_same(ref, got, atol=1e-5):
    (g_ref, s_ref), (g_got, s_got) = ref, got
    assert jax.tree_util.tree_structure(g_ref) == jax.tree_util.tree_structure(g_got)
    for x, y in pairs(g_ref, g_got):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=atol, rtol=1e-4)
    np.testing.assert_allclose(s_got.grad_norms, s_ref.grad_norms, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(s_got.loss_sum, s_ref.loss_sum, rtol=1e-5)
    assert float(s_got.num_examples) == float(s_ref.num_examples)
    assert float(s_got.clipped_fraction) == float(s_ref.clipped_fraction)


@pytest.mark.parametrize("mode", ["ffa", "lora"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_same_clipped_sum_as_vmapped_per_example_gradients(case, mode):
    """FFA-LoRA (b trained) and LoRA (a and b trained: the gradient of a is
    ``scale sum_t x_t (x) (g_t b^T)``)."""
    shape = CASES[case][1]
    batch = batch_of(shape)
    # A clip norm between the smallest and largest per-example norm: some clipped, some not.
    ref, got = run_both(case, 1.0, batch, MASK, mode=mode)
    norms = np.asarray(ref[1].grad_norms)[MASK]
    c = float(np.median(norms))
    ref, got = run_both(case, c, batch, MASK, mode=mode)
    assert 0 < float(ref[1].clipped_fraction) < 1
    assert_same(ref, got)


def test_norm_forms_are_the_ones_named():
    # The cases above cover each branch of the norm: check the branch choice itself.
    assert bookkeeping._ghost(1, 4, 16)
    assert bookkeeping._ghost(2, 4, 16)  # 2 * 20 < 64
    assert not bookkeeping._ghost(12, 4, 16)


def test_micro_batches_give_the_same_sum():
    batch = batch_of((6,))
    ref, got = run_both("mlp_T1", 0.5, batch, MASK, microbatch_size=2)
    assert_same(ref, got)
    # A micro-batch of padding only is skipped, not mis-summed.
    mask = np.array([1, 1, 1, 1, 0, 0, 0, 0], bool)
    ref, got = run_both("mlp_T1", 0.5, batch, mask, microbatch_size=2)
    assert_same(ref, got)


def test_garbage_in_padding_and_a_non_finite_example_contribute_nothing():
    batch = batch_of((6,))
    batch["x"][3] = np.inf  # padding (MASK[3] = False)
    batch["x"][7] = np.nan  # padding
    ref, got = run_both("mlp_T1", 0.5, batch, MASK)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(got[0]))
    assert_same(ref, got)
    # A real example whose gradient is not finite is dropped: the sum equals the sum without it.
    bad = batch_of((6,))
    bad["x"][1] = np.inf
    dropped = MASK.copy()
    dropped[1] = False
    _, got_bad = run_both("mlp_T1", 0.5, bad, MASK)
    _, got_without = run_both("mlp_T1", 0.5, bad, dropped)
    for x, y in pairs(got_bad[0], got_without[0]):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
    assert not np.isfinite(float(got_bad[1].grad_norms[1]))


@pytest.mark.parametrize("case", ["mlp_T1", "attention"])
def test_removing_one_example_moves_the_sum_by_at_most_c(case):
    c = 0.05  # well below every per-example norm: every example is clipped
    batch = batch_of(CASES[case][1], seed=4)
    _, full = run_both(case, c, batch, MASK)
    for i in np.flatnonzero(MASK):
        mask = MASK.copy()
        mask[i] = False
        _, less = run_both(case, c, batch, mask)
        diff = jnp.sqrt(sum(jnp.sum((x - y) ** 2) for x, y in pairs(full[0], less[0])))
        assert float(diff) <= c * (1 + 1e-5)


@pytest.mark.parametrize(
    "model,targets,head,why",
    [
        (ProjectMLP(), "query/kernel", False, "lora.dense"),  # the project's own layers
        (MLP(), "(query|value)/kernel", True, "not a LoRA factor"),  # a trained head
    ],
)
def test_auto_falls_back_to_vmap_where_bookkeeping_does_not_apply(model, targets, head, why):
    batch = batch_of((6,))
    loss_fn, trainable, frozen = setup(model, batch["x"], targets, head=head)

    def run(method):
        grad = bookkeeping.clipped_grad_auto(loss_fn, 0.5, method=method)
        return jax.jit(lambda t, f: grad(t, f, batch, MASK))(trainable, frozen)

    auto, vmapped = run("auto"), run("vmap")
    for x, y in pairs(auto, vmapped):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # the very same program
    with pytest.raises(ConfigError, match=why):
        run("bookkeeping")


@pytest.mark.parametrize("case,booked", [("mlp_T1", True), ("mlp_T12_materialised", False)])
def test_auto_books_only_where_every_norm_takes_the_ghost_form(case, booked):
    model, shape, targets = CASES[case]
    batch = batch_of(shape)
    loss_fn, trainable, frozen = setup(model, batch["x"], targets)
    uses = bookkeeping.probe(loss_fn, trainable, frozen, jax.tree.map(lambda x: x[0], batch))
    assert all(bookkeeping.ghost_forms(uses, trainable)) == booked

    def run(method):
        grad = bookkeeping.clipped_grad_auto(loss_fn, 0.5, method=method)
        return jax.jit(lambda t, f: grad(t, f, batch, MASK))(trainable, frozen)

    same = run("bookkeeping" if booked else "vmap")
    for x, y in pairs(run("auto"), same):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_unknown_clipping_method_is_a_config_error_before_compute():
    with pytest.raises(ConfigError, match="clipping='ghost'"):
        make_client_update(lambda t, f, e: 0.0, optax.sgd(0.1), private=True, clipping="ghost")


@pytest.mark.parametrize(
    "model,shape,targets,max_bytes",
    [
        (MLP(width=64), (64,), "(query|value)/kernel", 1.25),
        (Attention(width=32), (16, 6), "attn/(query|value)/kernel", 1.1),
    ],
)
def test_dp_update_compiles_to_about_the_non_private_cost(model, shape, targets, max_bytes):
    """XLA's cost analysis of the compiled client update (load-independent, not a timing):
    the default DP step (book-keeping on the MLP; on the attention block, 16 positions per
    example, the vmapped path) has about the non-private step's FLOPs and bytes; on the MLP
    the vmapped per-example path moves ~3.5x the bytes (issue 20)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 64, *shape)).astype(np.float32)
    batches = {"x": x, "y": np.zeros((2, 64), np.int32), "mask": np.ones((2, 64), bool)}
    loss_fn, trainable, frozen = setup(model, x[0], targets)
    dp = DpParams(jnp.float32(0.5), jnp.float32(1.0), jnp.float32(64))

    def cost(private, clipping="auto"):
        update = make_client_update(loss_fn, optax.sgd(0.1), private=private, clipping=clipping)
        compiled = (
            jax.jit(update).lower(trainable, frozen, batches, dp, jax.random.key(0)).compile()
        )
        analysis = compiled.cost_analysis()
        analysis = analysis[0] if isinstance(analysis, list) else analysis
        return analysis["flops"], analysis["bytes accessed"]

    (f_dp, b_dp), (f_plain, b_plain) = cost(True), cost(False)
    assert f_dp <= 1.05 * f_plain
    assert b_dp <= max_bytes * b_plain
    if isinstance(model, MLP):
        assert cost(True, "vmap")[1] >= 2 * b_dp
