"""The GELUs' hand-written VJPs equal jax.nn.gelu's autodiff (values and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ffa_jax.models.layers import activation


@pytest.mark.parametrize(
    "name,approximate", [("gelu", False), ("gelu_new", True), ("gelu_pytorch_tanh", True)]
)
def test_gelu_matches_jax(name, approximate):
    x = jnp.linspace(-8.0, 8.0, 4000).reshape(4, -1)
    g = jax.random.normal(jax.random.key(0), x.shape)
    ours = activation(name)
    ref = lambda x: jax.nn.gelu(x, approximate=approximate)  # noqa: E731
    np.testing.assert_array_equal(ours(x), ref(x))
    got = jax.vjp(ours, x)[1](g)[0]
    want = jax.vjp(ref, x)[1](g)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Inside jit and vmap, as the per-example gradients use it.
    per_ex = jax.jit(jax.vmap(jax.grad(lambda r: jnp.sum(ours(r) ** 2))))(x)
    per_ex_ref = jax.vmap(jax.grad(lambda r: jnp.sum(ref(r) ** 2)))(x)
    np.testing.assert_allclose(per_ex, per_ex_ref, rtol=1e-5, atol=1e-5)


def test_gelu_bf16_gradient_dtype():
    x = jnp.linspace(-4.0, 4.0, 64, dtype=jnp.bfloat16)
    out, vjp = jax.vjp(activation("gelu"), x)
    (gx,) = vjp(jnp.ones_like(out))
    assert gx.dtype == jnp.bfloat16
    want = jax.grad(lambda r: jnp.sum(jax.nn.gelu(r, approximate=False)))(x.astype(jnp.float32))
    np.testing.assert_allclose(gx.astype(jnp.float32), want, atol=2e-2)


def test_unknown_activation():
    with pytest.raises(ValueError, match="hidden_act='swish'"):
        activation("swish")
