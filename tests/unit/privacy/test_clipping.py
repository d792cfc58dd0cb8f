"""Properties of per-example clipping: norm bound, exactness, padding, chunking, transforms."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ffa_jax.errors import ConfigError
from ffa_jax.privacy import GradStats, clipped_grad, mean_grad
from ffa_jax.privacy.clipping import guard_with_scale

D_IN, HIDDEN, D_OUT, B = 5, 7, 3, 8


def init_params(seed):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    return {
        "hidden": {
            "kernel": jax.random.normal(k1, (D_IN, HIDDEN)) / np.sqrt(D_IN),
            "bias": 0.1 * jax.random.normal(k2, (HIDDEN,)),
        },
        "head": {
            "kernel": jax.random.normal(k3, (HIDDEN, D_OUT)) / np.sqrt(HIDDEN),
            "bias": 0.1 * jax.random.normal(k4, (D_OUT,)),
        },
    }


def split(params):
    """Trains the hidden kernel and the head bias (a nested subset), freezes the rest."""
    trainable = {
        "hidden": {"kernel": params["hidden"]["kernel"]},
        "head": {"bias": params["head"]["bias"]},
    }
    frozen = {
        "hidden": {"bias": params["hidden"]["bias"]},
        "head": {"kernel": params["head"]["kernel"]},
    }
    return trainable, frozen


def loss_fn(trainable, frozen, example):
    # ReLU keeps the gradient growing with the input scale, so huge inputs give huge gradients.
    h = jax.nn.relu(example["x"] @ trainable["hidden"]["kernel"] + frozen["hidden"]["bias"])
    y = h @ frozen["head"]["kernel"] + trainable["head"]["bias"]
    return jnp.sum(jnp.square(y - example["y"]))


def make_batch(seed, scale=1.0, b=B):
    kx, ky = jax.random.split(jax.random.key(1000 + seed))
    return {
        "x": scale * jax.random.normal(kx, (b, D_IN)),
        "y": jax.random.normal(ky, (b, D_OUT)),
    }


def example(batch, i):
    return {k: v[i] for k, v in batch.items()}


def tree_norm64(tree):
    return np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree)))


_grad_one = jax.jit(jax.grad(loss_fn))


@functools.cache
def jitted(kind="clip", microbatch_size=None):
    """One compiled function per (kind, microbatch_size); the clip norm is a traced argument."""
    if kind == "clip":
        return jax.jit(lambda c, *a: clipped_grad(loss_fn, c, microbatch_size=microbatch_size)(*a))
    f = jax.jit(mean_grad(loss_fn, microbatch_size=microbatch_size))
    return lambda c, *a: f(*a)


def reference(trainable, frozen, batch, mask, clip):
    """Slow loop: grad, clip, sum, one example at a time, in float64 on the host."""
    grad = _grad_one
    total = jax.tree.map(lambda x: np.zeros(x.shape, np.float64), trainable)
    norms = np.zeros(len(mask))
    for i in np.flatnonzero(np.asarray(mask)):
        g = grad(trainable, frozen, example(batch, i))
        norms[i] = tree_norm64(g)
        factor = min(1.0, clip / norms[i])
        total = jax.tree.map(lambda t, x, f=factor: t + f * np.asarray(x, np.float64), total, g)
    return total, norms


def assert_tree_close(a, b, **kw):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw), a, b)


MASK = np.array([1, 1, 0, 1, 1, 1, 0, 1], bool)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3, 1e8, 1e15])
def test_each_clipped_example_norm_is_at_most_clip_norm(seed, scale):
    clip = 0.7
    trainable, frozen = split(init_params(seed))
    batch = make_batch(seed, scale)
    for i in range(B):
        one_hot = np.arange(B) == i
        g, stats = jitted()(clip, trainable, frozen, batch, one_hot)
        norm = tree_norm64(g)
        assert np.isfinite(norm)
        assert norm <= clip + 1e-6, (i, norm)
        # Finite gradients are scaled, not dropped: without an overflow-safe norm, scales
        # >= 1e10 would square past float32's range and give zero here.
        raw = float(stats.grad_norms[i])
        assert np.isfinite(raw)
        np.testing.assert_allclose(norm, min(raw, clip), rtol=1e-5)
        assert float(stats.num_examples) == 1.0


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("scale", [0.3, 3.0, 30.0])
def test_grad_sum_and_stats_equal_slow_loop(seed, scale):
    clip = 1.0
    trainable, frozen = split(init_params(seed))
    batch = make_batch(seed, scale)
    g, stats = jitted()(clip, trainable, frozen, batch, MASK)
    ref, ref_norms = reference(trainable, frozen, batch, MASK, clip)
    assert_tree_close(g, ref, atol=1e-5, rtol=1e-5)
    jax.tree.map(
        lambda x, t: (x.shape == t.shape and x.dtype == t.dtype) or pytest.fail(), g, trainable
    )
    assert isinstance(stats, GradStats)
    np.testing.assert_allclose(stats.grad_norms, ref_norms, rtol=1e-5)
    assert np.all(np.asarray(stats.grad_norms)[~MASK] == 0)
    assert float(stats.num_examples) == MASK.sum()
    real_norms = ref_norms[MASK]
    np.testing.assert_allclose(stats.clipped_fraction, np.mean(real_norms > clip), atol=1e-7)
    losses = [float(loss_fn(trainable, frozen, example(batch, i))) for i in np.flatnonzero(MASK)]
    np.testing.assert_allclose(stats.loss_sum, sum(losses), rtol=1e-5)


def test_clipped_fraction_spans_zero_to_one():
    trainable, frozen = split(init_params(0))
    batch = make_batch(0)
    _, tight = jitted()(1e-6, trainable, frozen, batch, MASK)
    _, loose = jitted()(1e6, trainable, frozen, batch, MASK)
    assert float(tight.clipped_fraction) == 1.0 and float(loose.clipped_fraction) == 0.0
    g, none = jitted()(1.0, trainable, frozen, batch, np.zeros(B, bool))
    assert float(none.num_examples) == 0 and float(none.clipped_fraction) == 0
    assert tree_norm64(g) == 0


def garbage_padding(batch, mask):
    bad = np.array([np.inf, -np.inf, np.nan, 1e30, -1e38], np.float32)
    out = {}
    for k, v in batch.items():
        v = np.array(v)
        pad = np.flatnonzero(~mask)
        v[pad] = bad[np.arange(v[pad].size) % len(bad)].reshape(v[pad].shape)
        out[k] = jnp.asarray(v)
    return out


@pytest.mark.parametrize("microbatch_size", [None, 2])
def test_padding_contributes_nothing_even_if_garbage(microbatch_size):
    trainable, frozen = split(init_params(3))
    batch = make_batch(3)
    dirty = garbage_padding(batch, MASK)
    f = jitted("clip", microbatch_size)
    g_clean, s_clean = f(0.5, trainable, frozen, batch, MASK)
    g_dirty, s_dirty = f(0.5, trainable, frozen, dirty, MASK)
    jax.tree.map(lambda x: np.all(np.isfinite(x)) or pytest.fail("nan/inf in grad_sum"), g_dirty)
    assert_tree_close(g_dirty, g_clean, atol=0, rtol=0)
    for a, b in zip(s_dirty, s_clean, strict=True):
        np.testing.assert_array_equal(a, b)
    # Equal to the sum over the real examples alone.
    only_real = {k: v[MASK] for k, v in batch.items()}
    g_real, _ = jitted()(0.5, trainable, frozen, only_real, np.ones(MASK.sum()))
    assert_tree_close(g_dirty, g_real, atol=1e-6, rtol=1e-6)


def test_float_mask_is_accepted():
    trainable, frozen = split(init_params(4))
    batch = make_batch(4)
    a, _ = jitted()(0.5, trainable, frozen, batch, MASK)
    b, _ = jitted()(0.5, trainable, frozen, batch, MASK.astype(np.float32))
    assert_tree_close(a, b, atol=0, rtol=0)


def test_real_example_with_non_finite_gradient_contributes_zero():
    trainable, frozen = split(init_params(5))
    batch = make_batch(5)
    x = np.array(batch["x"])
    x[1, 0] = np.inf
    bad = dict(batch, x=jnp.asarray(x))
    g_bad, stats = jitted()(0.5, trainable, frozen, bad, MASK)
    without = MASK.copy()
    without[1] = False
    g_ref, _ = jitted()(0.5, trainable, frozen, batch, without)
    assert_tree_close(g_bad, g_ref, atol=1e-6, rtol=1e-6)
    assert not np.isfinite(np.asarray(stats.grad_norms)[1])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_guard_zeroes_a_gradient_with_any_non_finite_entry(bad):
    # The guard reads finiteness off max |g| (nan and inf propagate through max): one entry
    # in the second of three leaves must zero the whole tree, finite leaves included.
    b = np.ones((2, 3), np.float32)
    b[1, 2] = bad
    tree = {"a": jnp.full((4,), 2.0), "b": jnp.asarray(b), "c": jnp.zeros((), jnp.bfloat16)}
    guarded, scale = jax.jit(guard_with_scale, static_argnums=1)(tree, 1e3)
    assert float(scale) == 0.0
    for leaf in jax.tree.leaves(guarded):
        assert leaf.dtype == jnp.float32 and not np.any(np.asarray(leaf))
    # Finite: unchanged below the bound, rescaled to max |g| = bound above it.
    ok, s1 = guard_with_scale({"a": jnp.array([3.0, -4.0])}, 10.0)
    np.testing.assert_array_equal(ok["a"], [3.0, -4.0])
    assert float(s1) == 1.0
    big, s2 = guard_with_scale({"a": jnp.array([3.0, -40.0])}, 10.0)
    np.testing.assert_allclose(big["a"], [0.75, -10.0])
    assert float(s2) == pytest.approx(0.25)


@pytest.mark.parametrize("microbatch_size", [1, 2, 4, 8, 16])
def test_microbatched_equals_unchunked(microbatch_size):
    trainable, frozen = split(init_params(6))
    batch = make_batch(6, 10.0)
    g0, s0 = jitted()(0.8, trainable, frozen, batch, MASK)
    g1, s1 = jitted("clip", microbatch_size)(0.8, trainable, frozen, batch, MASK)
    # Equal up to float32 summation order: the sums reach ~40, where one ulp is ~4e-6, and
    # XLA:CPU's reduction order depends on the host's vector width.
    scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(g0))
    assert_tree_close(g1, g0, atol=1e-6 * scale, rtol=1e-6)
    for a, b in zip(s1, s0, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    m0, ms0 = jitted("mean")(None, trainable, frozen, batch, MASK)
    m1, ms1 = jitted("mean", microbatch_size)(None, trainable, frozen, batch, MASK)
    scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(m0))
    assert_tree_close(m1, m0, atol=1e-6 * scale, rtol=1e-6)
    np.testing.assert_allclose(ms1.loss_sum, ms0.loss_sum, rtol=1e-6)


def test_microbatch_size_must_divide_batch():
    trainable, frozen = split(init_params(0))
    f = clipped_grad(loss_fn, 1.0, microbatch_size=3)
    with pytest.raises(ConfigError, match=r"microbatch_size=3.*B_max=8.*\[1, 2, 4, 8\]"):
        f(trainable, frozen, make_batch(0), MASK)
    with pytest.raises(ConfigError, match="microbatch_size"):
        mean_grad(loss_fn, microbatch_size=3)(trainable, frozen, make_batch(0), MASK)
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ConfigError, match="microbatch_size"):
            clipped_grad(loss_fn, 1.0, microbatch_size=bad)


@pytest.mark.parametrize("clip", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_clip_norm_names_the_field(clip):
    with pytest.raises(ConfigError, match="privacy.clip_norm"):
        clipped_grad(loss_fn, clip)


def test_eager_equals_jit():
    trainable, frozen = split(init_params(7))
    batch = make_batch(7, 5.0)
    f = clipped_grad(loss_fn, 0.3, microbatch_size=4)
    g_eager, _ = f(trainable, frozen, batch, MASK)
    g_jit, _ = jax.jit(f)(trainable, frozen, batch, MASK)
    assert_tree_close(g_eager, g_jit, atol=1e-6, rtol=1e-6)


def test_traced_clip_norm_does_not_recompile_and_matches_python_float():
    trainable, frozen = split(init_params(8))
    batch = make_batch(8, 3.0)
    traces = []

    @jax.jit
    def run(clip, trainable, batch, mask):
        traces.append(None)
        return clipped_grad(loss_fn, clip, microbatch_size=2)(trainable, frozen, batch, mask)

    for clip in (0.1, 0.5, 2.0):
        g_traced, s_traced = run(jnp.float32(clip), trainable, batch, MASK)
        # A Python-float clip norm is baked into the trace: the static path.
        g_static, s_static = jax.jit(clipped_grad(loss_fn, clip))(trainable, frozen, batch, MASK)
        assert_tree_close(g_traced, g_static, atol=1e-6, rtol=1e-6)
        np.testing.assert_allclose(s_traced.clipped_fraction, s_static.clipped_fraction)
    assert len(traces) == 1


def test_vmap_over_clients_equals_per_client_loop():
    n_clients = 3
    params = [split(init_params(10 + c)) for c in range(n_clients)]
    batches = [make_batch(10 + c, 2.0) for c in range(n_clients)]
    masks = np.stack([MASK, np.ones(B, bool), np.zeros(B, bool)])
    stack = lambda *xs: jax.tree.map(lambda *a: jnp.stack(a), *xs)  # noqa: E731
    trainables = stack(*[p[0] for p in params])
    frozen = params[0][1]  # broadcast, never stacked
    batch = stack(*batches)
    for factory in (
        clipped_grad(loss_fn, 0.4, microbatch_size=4),
        mean_grad(loss_fn, microbatch_size=4),
    ):
        g_all, s_all = jax.jit(jax.vmap(factory, in_axes=(0, None, 0, 0)))(
            trainables, frozen, batch, masks
        )
        for c in range(n_clients):
            g_c, s_c = jax.jit(factory)(params[c][0], frozen, batches[c], masks[c])
            assert_tree_close(jax.tree.map(lambda x, c=c: x[c], g_all), g_c, atol=1e-6, rtol=1e-6)
            np.testing.assert_allclose(s_all.loss_sum[c], s_c.loss_sum, rtol=1e-6)
            np.testing.assert_allclose(s_all.grad_norms[c], s_c.grad_norms, rtol=1e-6)


@pytest.mark.parametrize("microbatch_size", [None, 4])
def test_mean_grad_is_mean_of_per_example_grads(microbatch_size):
    trainable, frozen = split(init_params(9))
    batch = make_batch(9, 2.0)
    dirty = garbage_padding(batch, MASK)
    g, stats = jitted("mean", microbatch_size)(None, trainable, frozen, dirty, MASK)
    ref, _ = reference(trainable, frozen, batch, MASK, clip=np.inf)
    ref = jax.tree.map(lambda x: x / MASK.sum(), ref)
    assert_tree_close(g, ref, atol=1e-5, rtol=1e-5)
    losses = [float(loss_fn(trainable, frozen, example(batch, i))) for i in np.flatnonzero(MASK)]
    np.testing.assert_allclose(stats.loss_sum, sum(losses), rtol=1e-5)
    assert float(stats.num_examples) == MASK.sum()
    assert np.all(np.asarray(stats.grad_norms) == 0) and float(stats.clipped_fraction) == 0
    # The non-private limit: with a clip norm nobody reaches, clipped sum / n == mean.
    s, _ = jitted()(1e9, trainable, frozen, batch, MASK)
    assert_tree_close(jax.tree.map(lambda x: x / MASK.sum(), s), g, atol=1e-5, rtol=1e-5)


def test_mean_grad_with_no_real_examples_is_zero():
    trainable, frozen = split(init_params(0))
    dirty = garbage_padding(make_batch(0), np.zeros(B, bool))
    g, stats = jitted("mean")(None, trainable, frozen, dirty, np.zeros(B, bool))
    assert tree_norm64(g) == 0 and float(stats.num_examples) == 0 and float(stats.loss_sum) == 0


# ----------------------------------------------------------------------------- tail split

TAIL_B = 48


def tail_masks():
    """Real-first masks of every interesting size (empty, inside the first micro-batch, at
    and around the 16-boundaries, full), and two that are not real-first."""
    out = {f"first{n}": np.arange(TAIL_B) < n for n in (0, 1, 3, 4, 15, 16, 17, 31, 33, 47, 48)}
    rng = np.random.default_rng(0)
    out["shuffled20"] = rng.permutation(np.arange(TAIL_B) < 20)
    out["last_only"] = np.arange(TAIL_B) == TAIL_B - 1
    return out


@pytest.mark.parametrize("tail", [1, 2, 4, 8])
def test_tail_split_equals_unchunked(tail):
    trainable, frozen = split(init_params(11))
    batch = make_batch(11, 10.0, b=TAIL_B)
    whole = jax.jit(clipped_grad(loss_fn, 0.8))
    split_tail = jax.jit(clipped_grad(loss_fn, 0.8, microbatch_size=16, tail_microbatch_size=tail))
    for name, mask in tail_masks().items():
        dirty = garbage_padding(batch, mask)
        g0, s0 = whole(trainable, frozen, batch, mask)
        g1, s1 = split_tail(trainable, frozen, dirty, mask)
        scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(g0)) or 1.0
        assert_tree_close(g1, g0, atol=1e-6 * scale, rtol=1e-6)
        for a, b in zip(s1, s0, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, err_msg=name)


def test_tail_split_computes_full_micro_batches_then_tail_blocks():
    # Count the examples whose loss is evaluated: the split computes floor(n / 16) 16 +
    # ceil((n mod 16) / 4) 4 of them, the plain micro-batching ceil(n / 16) 16.
    seen = []

    def counting_loss(trainable, frozen, example):
        jax.debug.callback(lambda _: seen.append(1), example["x"][0])
        return loss_fn(trainable, frozen, example)

    trainable, frozen = split(init_params(12))
    batch = make_batch(12, b=TAIL_B)
    for tail, n, expected in [(4, 33, 36), (4, 32, 32), (4, 1, 4), (4, 0, 0), (None, 33, 48)]:
        f = jax.jit(clipped_grad(counting_loss, 0.8, microbatch_size=16, tail_microbatch_size=tail))
        seen.clear()
        jax.block_until_ready(f(trainable, frozen, batch, np.arange(TAIL_B) < n))
        assert len(seen) == expected, (tail, n)


def test_tail_split_vmaps_over_clients():
    trainable, frozen = split(init_params(13))
    batches = [make_batch(13 + c, 2.0, b=TAIL_B) for c in range(3)]
    masks = np.stack([np.arange(TAIL_B) < n for n in (5, 37, 48)])
    stack = lambda *xs: jax.tree.map(lambda *a: jnp.stack(a), *xs)  # noqa: E731
    f = clipped_grad(loss_fn, 0.4, microbatch_size=16, tail_microbatch_size=4)
    g_all, s_all = jax.jit(jax.vmap(f, in_axes=(None, None, 0, 0)))(
        trainable, frozen, stack(*batches), masks
    )
    for c in range(3):
        g_c, s_c = jax.jit(clipped_grad(loss_fn, 0.4))(trainable, frozen, batches[c], masks[c])
        assert_tree_close(jax.tree.map(lambda x, c=c: x[c], g_all), g_c, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(s_all.grad_norms[c], s_c.grad_norms, rtol=1e-6)


def test_tail_microbatch_size_must_divide_the_micro_batch():
    trainable, frozen = split(init_params(0))
    f = clipped_grad(loss_fn, 1.0, microbatch_size=16, tail_microbatch_size=3)
    with pytest.raises(ConfigError, match=r"tail_microbatch_size=3.*microbatch_size=16"):
        f(trainable, frozen, make_batch(0, b=TAIL_B), np.ones(TAIL_B, bool))
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ConfigError, match="tail_microbatch_size"):
            clipped_grad(loss_fn, 1.0, microbatch_size=16, tail_microbatch_size=bad)
    # No micro-batching, or a tail no smaller than the micro-batch: nothing to split.
    batch, mask = make_batch(0, b=TAIL_B), np.arange(TAIL_B) < 30
    g_ref, _ = clipped_grad(loss_fn, 1.0)(trainable, frozen, batch, mask)
    for mb, tail in ((None, 4), (16, 16), (16, 32)):
        g, _ = clipped_grad(loss_fn, 1.0, microbatch_size=mb, tail_microbatch_size=tail)(
            trainable, frozen, batch, mask
        )
        assert_tree_close(g, g_ref, atol=1e-5, rtol=1e-5)
