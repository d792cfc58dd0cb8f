"""Properties of the Gaussian noise: scale, order (noise the sum, then divide), independence."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ffa_jax.errors import ConfigError
from ffa_jax.privacy import (
    gaussian_noise_like,
    gaussian_privatizer,
    privatize_grad_sum,
)


def zeros_tree(n=200_000):
    return {"a": jnp.zeros((n // 2,)), "b": {"c": jnp.zeros((n // 4, 2))}}


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


@pytest.mark.parametrize("sigma,clip", [(0.5, 2.0), (1.3, 1.0), (4.0, 10.0)])
def test_empirical_std_is_sigma_times_clip(sigma, clip):
    # 200k draws: the std estimate has relative error ~0.16%, far inside the 3% band.
    out = privatize_grad_sum(
        zeros_tree(),
        clip_norm=clip,
        noise_multiplier=sigma,
        expected_batch_size=1.0,
        key=jax.random.key(0),
    )
    z = flat(out)
    assert abs(np.std(z) / (sigma * clip) - 1) < 0.03
    assert abs(np.mean(z)) < 5 * sigma * clip / np.sqrt(z.size)


def test_noise_is_added_to_the_sum_before_dividing():
    key = jax.random.key(1)
    grad_sum = {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones((5,))}
    sigma, clip, n = 1.5, 2.0, 7.0
    out = privatize_grad_sum(
        grad_sum, clip_norm=clip, noise_multiplier=sigma, expected_batch_size=n, key=key
    )
    noise = gaussian_noise_like(grad_sum, sigma * clip, key)
    expected = jax.tree.map(lambda g, z: (g + z) / n, grad_sum, noise)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), out, expected)
    # The other order (mean + undivided noise) gives a different answer with the same key.
    wrong = jax.tree.map(lambda g, z: g / n + z, grad_sum, noise)
    assert not np.allclose(flat(out), flat(wrong))


def test_noise_std_after_division_is_sigma_clip_over_batch():
    sigma, clip, n = 1.0, 3.0, 50.0
    out = privatize_grad_sum(
        zeros_tree(),
        clip_norm=clip,
        noise_multiplier=sigma,
        expected_batch_size=n,
        key=jax.random.key(2),
    )
    assert abs(np.std(flat(out)) / (sigma * clip / n) - 1) < 0.03


def test_leaves_get_independent_noise():
    tree = {"x": jnp.zeros((50_000,)), "y": jnp.zeros((50_000,)), "z": jnp.zeros((50_000,))}
    noise = gaussian_noise_like(tree, 1.0, jax.random.key(3))
    xs = [np.asarray(noise[k]) for k in "xyz"]
    corr = np.corrcoef(np.stack(xs))
    # Independent N(0,1) vectors of length 50k: |corr| ~ 1/sqrt(50k) = 0.0045.
    assert np.all(np.abs(corr[np.triu_indices(3, 1)]) < 0.03)
    assert not np.array_equal(xs[0], xs[1])


def test_same_key_same_noise_different_key_different_noise():
    tree = {"w": jnp.zeros((4, 3)), "b": jnp.zeros((3,))}
    a = gaussian_noise_like(tree, 1.0, jax.random.key(4))
    b = gaussian_noise_like(tree, 1.0, jax.random.key(4))
    c = gaussian_noise_like(tree, 1.0, jax.random.key(5))
    np.testing.assert_array_equal(flat(a), flat(b))
    assert not np.any(flat(a) == flat(c))
    # Raw uint32 keys work too.
    d = gaussian_noise_like(tree, 1.0, jax.random.PRNGKey(4))
    assert flat(d).shape == flat(a).shape


def test_structure_shapes_and_dtypes_are_preserved():
    tree = {"f32": jnp.zeros((3, 2)), "bf16": jnp.zeros((4,), jnp.bfloat16), "empty": {}}
    noise = gaussian_noise_like(tree, 2.0, jax.random.key(6))
    assert jax.tree.structure(noise) == jax.tree.structure(tree)
    assert noise["f32"].dtype == jnp.float32 and noise["bf16"].dtype == jnp.bfloat16
    assert noise["f32"].shape == (3, 2)
    out = privatize_grad_sum(
        tree, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=2, key=jax.random.key(0)
    )
    assert out["bf16"].dtype == jnp.bfloat16
    with pytest.raises(TypeError, match="floating"):
        gaussian_noise_like({"i": jnp.zeros(3, jnp.int32)}, 1.0, jax.random.key(0))


def test_zero_noise_multiplier_is_plain_division():
    g = {"w": jnp.linspace(-1.0, 1.0, 9)}
    out = privatize_grad_sum(
        g, clip_norm=1.0, noise_multiplier=0.0, expected_batch_size=3, key=jax.random.key(0)
    )
    np.testing.assert_allclose(out["w"], g["w"] / 3, rtol=1e-7)


def test_traced_arguments_under_jit_and_vmap():
    g = {"w": jnp.ones((1000,))}

    @jax.jit
    def run(sigma, clip, n, key):
        return privatize_grad_sum(
            g, clip_norm=clip, noise_multiplier=sigma, expected_batch_size=n, key=key
        )

    out = run(jnp.float32(2.0), jnp.float32(0.5), jnp.float32(4.0), jax.random.key(7))
    eager = privatize_grad_sum(
        g, clip_norm=0.5, noise_multiplier=2.0, expected_batch_size=4.0, key=jax.random.key(7)
    )
    np.testing.assert_allclose(out["w"], eager["w"], rtol=1e-5, atol=1e-6)
    keys = jax.random.split(jax.random.key(8), 3)  # one key per client
    per_client = jax.vmap(run, in_axes=(None, None, None, 0))(2.0, 0.5, 4.0, keys)
    w = np.asarray(per_client["w"])
    assert not np.allclose(w[0], w[1]) and not np.allclose(w[1], w[2])


def test_gaussian_privatizer_is_an_optax_transform_with_a_key_state():
    key = jax.random.key(9)
    g = {"w": jnp.full((6,), 3.0)}
    tx = gaussian_privatizer(clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=2.0, key=key)
    state = tx.init(g)
    u1, state1 = tx.update(g, state)
    u2, _ = tx.update(g, state1)
    # jax-privacy's privatizer splits its key at every update; the first update is the
    # functional form with the initial key.
    expected = privatize_grad_sum(
        g, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=2.0, key=key
    )
    np.testing.assert_allclose(u1["w"], expected["w"], rtol=1e-6)
    assert not np.allclose(u1["w"], u2["w"])  # a fresh key each step
    # Post-processing by an optimiser chained after the noise.
    chained = optax.chain(tx, optax.sgd(0.1))
    upd, _ = jax.jit(chained.update)(g, chained.init(g))
    np.testing.assert_allclose(upd["w"], -0.1 * expected["w"], rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"clip_norm": 0.0}, "privacy.clip_norm"),
        ({"clip_norm": float("nan")}, "privacy.clip_norm"),
        ({"noise_multiplier": -1.0}, "privacy.noise_multiplier"),
        ({"expected_batch_size": 0}, "expected_batch_size"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, field):
    args = {
        "clip_norm": 1.0,
        "noise_multiplier": 1.0,
        "expected_batch_size": 4.0,
        "key": jax.random.key(0),
    }
    args.update(kwargs)
    with pytest.raises(ConfigError, match=field):
        privatize_grad_sum({"w": jnp.zeros(2)}, **args)
    with pytest.raises(ConfigError, match=field):
        gaussian_privatizer(**args)
