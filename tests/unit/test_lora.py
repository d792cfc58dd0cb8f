"""LoRA as a pytree transform: init, modes, split/combine, merge, uplink bytes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ffa_jax import lora
from ffa_jax.config import LoRAConfig
from ffa_jax.errors import ConfigError
from ffa_jax.models.layers import Dense


class TinyAttention(nn.Module):
    """Names like an encoder layer so the default targets match query/value only."""

    @nn.compact
    def __call__(self, x):
        q = Dense(24, name="query")(x)
        k = Dense(24, name="key")(x)
        v = Dense(24, name="value")(x)
        h = jnp.tanh(q * k + v)
        return Dense(3, name="out")(h)


@pytest.fixture(scope="module")
def base():
    module = TinyAttention()
    x = jax.random.normal(jax.random.key(0), (5, 16))
    params = module.init(jax.random.key(1), x)["params"]
    return module, params, x


def test_targets_and_b_zero_equals_base_exactly(base):
    module, params, x = base
    lp = lora.init(params, LoRAConfig(rank=4, alpha=8), jax.random.key(2))
    assert sorted(lora.lora_nodes(lp)) == ["query/kernel", "value/kernel"]
    assert isinstance(lp["key"]["kernel"], jax.Array)
    y0 = module.apply({"params": params}, x)
    y1 = module.apply({"params": lp}, x)
    np.testing.assert_array_equal(np.asarray(y0), np.asarray(y1))


def test_merge_equals_unmerged_forward(base):
    module, params, x = base
    lp = lora.init(params, LoRAConfig(rank=4, alpha=16), jax.random.key(2))
    lp = jax.tree_util.tree_map(
        lambda n: (
            n.replace(b=jax.random.normal(jax.random.key(3), n.b.shape)) if lora.is_lora(n) else n
        ),
        lp,
        is_leaf=lora.is_lora,
    )
    merged = lora.merge(lp)
    assert all(not lora.is_lora(v) for v in jax.tree_util.tree_leaves(merged, is_leaf=lora.is_lora))
    np.testing.assert_allclose(
        module.apply({"params": lp}, x), module.apply({"params": merged}, x), rtol=1e-5, atol=1e-5
    )
    node = lp["query"]["kernel"]
    np.testing.assert_allclose(node.merged(), node.w0 + 4.0 * node.a @ node.b, rtol=1e-6)


def test_a_init_is_shared_and_peft_scaled(base):
    _, params, _ = base
    cfg = LoRAConfig(rank=8, alpha=8)
    a1 = lora.init(params, cfg, jax.random.key(7))["query"]["kernel"].a
    a2 = lora.init(params, cfg, jax.random.key(7))["query"]["kernel"].a
    a3 = lora.init(params, cfg, jax.random.key(8))["query"]["kernel"].a
    np.testing.assert_array_equal(a1, a2)  # same shared seed -> every client holds the same A
    assert not np.array_equal(a1, a3)
    bound = 1 / np.sqrt(16)
    assert a1.shape == (16, 8) and float(jnp.max(jnp.abs(a1))) <= bound
    # Different targets get different A.
    lp = lora.init(params, cfg, jax.random.key(7))
    assert not np.array_equal(lp["query"]["kernel"].a, lp["value"]["kernel"].a)
    for how in ("gaussian", "orthogonal"):
        a = lora.init(params, LoRAConfig(rank=8, a_init=how), jax.random.key(7))["query"][
            "kernel"
        ].a
        assert a.shape == (16, 8) and np.isfinite(np.asarray(a)).all()
    q = lora.init(params, LoRAConfig(rank=8, a_init="orthogonal"), jax.random.key(7))["query"][
        "kernel"
    ].a
    np.testing.assert_allclose(q.T @ q, np.eye(8), atol=1e-5)


@pytest.mark.parametrize("mode", ["ffa", "lora"])
def test_split_combine_and_uplink_bytes(base, mode):
    _, params, _ = base
    r = 4
    lp = lora.init(params, LoRAConfig(mode=mode, rank=r), jax.random.key(2))
    trainable, frozen = lora.split(lp, lora.trainable_mask(lp, mode))
    back = lora.combine(trainable, frozen)
    assert jax.tree_util.tree_structure(back, is_leaf=lora.is_lora) == jax.tree_util.tree_structure(
        lp, is_leaf=lora.is_lora
    )
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(lp), strict=True):
        assert a is b
    b_bytes = 2 * (r * 24 * 4)  # two targets, b is [r, d_out] float32
    a_bytes = 2 * (16 * r * 4)  # a is [d_in, r]
    expected = b_bytes if mode == "ffa" else a_bytes + b_bytes
    assert lora.tree_bytes(trainable) == expected
    names = [lora.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(trainable)]
    assert all(n.endswith("/b") or (mode == "lora" and n.endswith("/a")) for n in names)


def test_train_head_extra_pattern(base):
    _, params, _ = base
    lp = lora.init(params, LoRAConfig(), jax.random.key(2))
    mask = lora.trainable_mask(lp, "ffa", extra=r"out/.*")
    trainable, _ = lora.split(lp, mask)
    names = sorted(lora.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(trainable))
    assert names == ["out/bias", "out/kernel", "query/kernel/b", "value/kernel/b"]


def test_ffa_gradient_never_reaches_a(base):
    module, params, x = base
    lp = lora.init(params, LoRAConfig(), jax.random.key(2))
    apply = lora.apply_fn_with_lora(lambda p, x: module.apply({"params": p}, x), "ffa")
    g = jax.grad(lambda p: jnp.sum(apply(p, x) ** 2))(lp)
    assert float(jnp.abs(g["query"]["kernel"].a).max()) == 0.0


def test_bad_targets_and_rank(base):
    _, params, _ = base
    with pytest.raises(ConfigError, match="lora.targets"):
        lora.init(params, LoRAConfig(targets=r".*nothing/kernel"), jax.random.key(0))
    with pytest.raises(ConfigError, match="lora.rank"):
        lora.init(params, LoRAConfig(rank=64), jax.random.key(0))
    with pytest.raises(ConfigError, match="lora.rank"):
        LoRAConfig(rank=0)
    with pytest.raises(ConfigError, match="lora.mode"):
        LoRAConfig(mode="full")
