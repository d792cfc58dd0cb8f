"""LoRA on stock flax.linen models through ``lora.attach`` + ``lora.intercept``.

The stock models (``nn.Dense``, ``nn.MultiHeadDotProductAttention``, ``nn.Einsum``) must give
the same outputs and gradients as the project's own LoRA path (``layers.Dense`` ->
``lora.dense``) for the same w0/A/B, keep A out of training under FFA, and run the DP client
step unchanged.
"""

from __future__ import annotations

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

SPEC = LoRAConfig(rank=2, alpha=4.0, targets=r".*(query|value)/kernel")


class MLP(nn.Module):
    dense: type = nn.Dense

    @nn.compact
    def __call__(self, x):
        h = nn.relu(self.dense(16, name="query")(x))
        return self.dense(3, name="value")(h)


class QVAttention(nn.Module):
    """A hand-written single-head attention block with q/k/v/out projections."""

    dense: type = nn.Dense

    @nn.compact
    def __call__(self, x):  # x: [T, D]
        q = self.dense(8, name="query")(x)
        k = self.dense(8, name="key")(x)
        v = self.dense(8, name="value")(x)
        w = jax.nn.softmax(q @ k.T / jnp.sqrt(8.0), axis=-1)
        return self.dense(x.shape[-1], name="out")(w @ v)


def random_b(params, key):
    """Non-zero B everywhere, so the low-rank branch matters in every comparison."""

    def fill(path, x):
        if not lora.is_lora(x):
            return x
        k = jax.random.fold_in(key, hash(lora.path_str(path)) & 0xFFFF)
        return x.replace(b=0.1 * jax.random.normal(k, x.b.shape))

    return jax.tree_util.tree_map_with_path(fill, params, is_leaf=lora.is_lora)


def assert_trees_close(a, b, atol=1e-5, rtol=1e-5):
    for (pa, x), (pb, y) in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b), strict=True
    ):
        assert pa == pb
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol)


@pytest.mark.parametrize("stock_cls,x_shape", [(MLP, (5, 8)), (QVAttention, (6, 8))])
def test_stock_model_matches_project_lora_path(stock_cls, x_shape):
    x = jax.random.normal(jax.random.key(1), x_shape)
    stock = stock_cls()
    own = stock_cls(dense=layers.Dense)  # the project's Dense: lora.dense on LoRA nodes
    params = stock.init(jax.random.key(0), x)["params"]
    attached = lora.attach(stock, params, SPEC, jax.random.key(2), x)
    # 2-D kernels: attach builds exactly lora.init's tree (same A from the same key and path).
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, attached, lora.init(params, SPEC, jax.random.key(2))
    )
    p = random_b(attached, jax.random.key(3))
    apply = lora.linen_apply(stock, mode="lora")

    np.testing.assert_allclose(apply(p, x), own.apply({"params": p}, x), atol=1e-6)
    np.testing.assert_allclose(apply(p, x), stock.apply({"params": lora.merge(p)}, x), atol=1e-5)

    def loss(f):
        return lambda q: jnp.sum(jnp.tanh(f(q)))

    g_stock = jax.grad(loss(lambda q: apply(q, x)))(p)
    g_own = jax.grad(loss(lambda q: own.apply({"params": q}, x)))(p)
    assert_trees_close(g_stock, g_own)


def test_stock_multi_head_attention_matches_merged_kernels():
    """``nn.MultiHeadDotProductAttention`` (DenseGeneral with 3-D kernels, ``out`` contracting
    two axes): unmerged outputs and B-gradients equal those of the merged kernels."""
    x = jax.random.normal(jax.random.key(1), (2, 5, 8))
    mha = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)
    params = mha.init(jax.random.key(0), x)["params"]
    assert lora.linen_kernels(mha, params, x) == {
        "query/kernel": 1,
        "key/kernel": 1,
        "value/kernel": 1,
        "out/kernel": 2,
    }
    spec = LoRAConfig(rank=2, targets=r"(query|value|out)/kernel")
    p = random_b(lora.attach(mha, params, spec, jax.random.key(2), x), jax.random.key(3))
    assert p["query"]["kernel"].a.shape == (8, 2) and p["query"]["kernel"].b.shape == (2, 2, 4)
    assert p["out"]["kernel"].a.shape == (2, 4, 2) and p["out"]["kernel"].b.shape == (2, 8)
    apply = lora.linen_apply(mha, mode="lora")

    def via_merge(q):
        return mha.apply({"params": lora.merge(q)}, x)

    np.testing.assert_allclose(apply(p, x), via_merge(p), atol=1e-5)
    g_unmerged = jax.grad(lambda q: jnp.sum(jnp.tanh(apply(q, x))))(p)
    g_merged = jax.grad(lambda q: jnp.sum(jnp.tanh(via_merge(q))))(p)
    assert_trees_close(g_unmerged, g_merged, atol=1e-4, rtol=1e-4)


def test_stock_einsum_matches_merged_kernel():
    class Proj(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Einsum((8, 2, 3), "...d,dhk->...hk", name="query")(x)

    x = jax.random.normal(jax.random.key(1), (4, 8))
    m = Proj()
    params = m.init(jax.random.key(0), x)["params"]
    p = random_b(lora.attach(m, params, SPEC, jax.random.key(2), x), jax.random.key(3))
    assert p["query"]["kernel"].b.shape == (2, 2, 3)
    np.testing.assert_allclose(
        lora.linen_apply(m, "lora")(p, x), m.apply({"params": lora.merge(p)}, x), atol=1e-5
    )


def test_ffa_leaves_a_with_zero_gradient():
    x = jax.random.normal(jax.random.key(1), (5, 8))
    stock = MLP()
    params = stock.init(jax.random.key(0), x)["params"]
    p = random_b(lora.attach(stock, params, SPEC, jax.random.key(2), x), jax.random.key(3))
    g = jax.grad(lambda q: jnp.sum(lora.linen_apply(stock, "ffa")(q, x) ** 2))(p)
    for node in lora.lora_nodes(g).values():
        assert not np.any(np.asarray(node.a))
        assert np.any(np.asarray(node.b))
    trainable, _ = lora.split(p, lora.trainable_mask(p, "ffa"))
    assert [lora.path_str(k) for k, _ in jax.tree_util.tree_leaves_with_path(trainable)] == [
        "query/kernel/b",
        "value/kernel/b",
    ]


def test_dp_client_step_runs_on_a_stock_model():
    """The project's DP-SGD client update (per-example clipping + Gaussian noise) on a stock
    nn.Dense MLP: only B moves, A and w0 stay bit-identical, per-example grads are r x d_out."""
    n, d = 32, 8
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    stock = MLP()
    params = stock.init(jax.random.key(0), x[:1])["params"]
    p = lora.attach(stock, params, SPEC, jax.random.key(2), x[:1])
    trainable, frozen = lora.split(p, lora.trainable_mask(p, "ffa"))
    apply = lora.linen_apply(stock, "ffa")

    def loss_fn(tr, fr, ex):
        logits = apply(lora.combine(tr, fr), ex["x"][None])[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, ex["y"])

    update = jax.jit(make_client_update(loss_fn, optax.sgd(1.0), private=True))
    batches = {"x": x.reshape(2, 16, d), "y": y.reshape(2, 16), "mask": np.ones((2, 16), bool)}
    dp = DpParams(jnp.float32(0.5), jnp.float32(1.0), jnp.float32(16.0))
    delta, metrics = update(trainable, frozen, batches, dp, jax.random.key(7))
    assert jax.tree_util.tree_structure(delta) == jax.tree_util.tree_structure(trainable)
    assert delta["query"]["kernel"].b.shape == (2, 16)
    assert np.isfinite(float(metrics.loss)) and float(metrics.delta_norm) > 0
    assert 0.0 <= float(metrics.clipped_fraction) <= 1.0


def test_targets_matching_no_stock_layer_name_the_field():
    x = jnp.ones((1, 8))
    stock = MLP()
    params = stock.init(jax.random.key(0), x)["params"]
    with pytest.raises(ConfigError, match="lora.targets"):
        lora.attach(stock, params, LoRAConfig(targets=".*nothing/kernel"), jax.random.key(0), x)
    with pytest.raises(ConfigError, match="lora.rank=9"):
        lora.attach(stock, params, LoRAConfig(rank=9, targets="value/kernel"), jax.random.key(0), x)
