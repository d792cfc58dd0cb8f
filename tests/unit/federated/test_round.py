"""The federated round: exact FedAvg semantics, FFA invariants, one compile, chunking, sharding."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ffa_jax import lora
from ffa_jax.config import LoRAConfig, ServerConfig
from ffa_jax.federated.client import DpParams, make_client_update, step_noise_key
from ffa_jax.federated.round import RoundInputs, client_key, client_mesh, make_round
from ffa_jax.federated.server import make_server_optimizer, server_init, weighted_mean
from ffa_jax.models.layers import Dense

D_IN, D_H, N_LABELS = 12, 16, 3


class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(Dense(D_H, name="query")(x))
        h = h + jnp.tanh(Dense(D_H, name="value")(x))
        return Dense(N_LABELS, name="head")(h)


def loss_fn_for(module):
    def loss_fn(trainable, frozen, ex):
        logits = module.apply({"params": lora.combine(trainable, frozen)}, ex["x"][None])[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, ex["label"])

    return loss_fn


def setup(mode="ffa", rank=4):
    module = Tiny()
    params = module.init(jax.random.key(0), jnp.zeros((1, D_IN)))["params"]
    lp = lora.init(params, LoRAConfig(mode=mode, rank=rank, alpha=8), jax.random.key(1))
    if mode == "lora":
        # Non-zero B so that A receives a gradient in LoRA mode.
        lp = jax.tree_util.tree_map(
            lambda n: (
                n.replace(b=0.1 * jax.random.normal(jax.random.key(5), n.b.shape))
                if lora.is_lora(n)
                else n
            ),
            lp,
            is_leaf=lora.is_lora,
        )
    trainable, frozen = lora.split(lp, lora.trainable_mask(lp, mode))
    return module, lp, trainable, frozen


def make_batches(K, S, B, seed=0, fill=None):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(K, S, B, D_IN)).astype(np.float32) * 3
    label = rng.integers(0, N_LABELS, size=(K, S, B)).astype(np.int32)
    mask = rng.random((K, S, B)) < (fill if fill is not None else 0.7)
    return {"x": x, "label": label, "mask": mask}


def dp_params(K, clip=0.5, sigma=1.0, expected=4.0):
    return DpParams(
        clip_norm=jnp.full((K,), clip),
        noise_multiplier=jnp.full((K,), sigma),
        expected_batch_size=jnp.full((K,), expected),
    )


def tree_allclose(a, b, **kw):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw)


@pytest.mark.parametrize("private", [True, False])
def test_ffa_a_frozen_b_trained_uplink_is_b(private):
    module, lp, trainable, frozen = setup("ffa")
    K = 3
    cu = make_client_update(loss_fn_for(module), optax.sgd(0.5), private=private)
    opt = make_server_optimizer(ServerConfig())
    round_fn = make_round(cu, opt)
    state = server_init(trainable, opt)
    a_before = {p: np.asarray(n.a).copy() for p, n in lora.lora_nodes(lp).items()}
    for r in range(3):
        state, m = round_fn(
            state,
            frozen,
            RoundInputs(make_batches(K, 2, 8, seed=r), jnp.ones(K), jnp.arange(K), dp_params(K)),
            jax.random.key(9),
        )
    final = lora.combine(state.trainable, frozen)
    for p, n in lora.lora_nodes(final).items():
        np.testing.assert_array_equal(np.asarray(n.a), a_before[p])  # bit-identical
        assert float(jnp.abs(n.b).max()) > 0  # B moved
    # What a client uploads is the delta of the trainable tree: B leaves only, analytic size.
    names = [lora.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(state.trainable)]
    assert names == ["query/kernel/b", "value/kernel/b"]
    assert lora.tree_bytes(state.trainable) == 2 * 4 * D_H * 4
    assert np.isfinite(np.asarray(m.clients.loss)).all()


def test_lora_mode_uploads_a_and_b_and_trains_a():
    module, lp, trainable, frozen = setup("lora")
    assert lora.tree_bytes(trainable) == 2 * (4 * D_H * 4 + D_IN * 4 * 4)
    cu = make_client_update(loss_fn_for(module), optax.sgd(0.5), private=True)
    opt = make_server_optimizer(ServerConfig())
    state, _ = make_round(cu, opt)(
        server_init(trainable, opt),
        frozen,
        RoundInputs(make_batches(3, 2, 8), jnp.ones(3), jnp.arange(3), dp_params(3)),
        jax.random.key(0),
    )
    n0, n1 = lp["query"]["kernel"], state.trainable["query"]["kernel"]
    assert not np.array_equal(np.asarray(n0.a), np.asarray(n1.a))


@pytest.mark.parametrize("private, devices", [(True, 1), (False, 1), (True, 4)])
def test_vmapped_round_equals_sequential_clients(private, devices):
    module, _, trainable, frozen = setup("ffa")
    K = 4
    cu = make_client_update(loss_fn_for(module), optax.sgd(0.3), private=private)
    opt = make_server_optimizer(ServerConfig())
    batches = make_batches(K, 3, 8)
    weights = jnp.array([1.0, 2.0, 0.5, 1.5])
    ids = jnp.arange(K, dtype=jnp.int32) + 10
    key = jax.random.key(3)
    if devices > len(jax.devices()):
        pytest.skip(f"needs {devices} (simulated) devices")
    mesh = client_mesh(devices) if devices > 1 else None
    state, _ = make_round(cu, opt, mesh=mesh)(
        server_init(trainable, opt), frozen, RoundInputs(batches, weights, ids, dp_params(K)), key
    )

    deltas = []
    for k in range(K):
        bk = jax.tree_util.tree_map(lambda x, k=k: x[k], batches)
        dk = jax.tree_util.tree_map(lambda x, k=k: x[k], dp_params(K))
        d, _ = jax.jit(cu)(trainable, frozen, bk, dk, client_key(key, 0, ids[k]))
        deltas.append(d)
    mean = jax.tree_util.tree_map(
        lambda *xs: sum(w * x for w, x in zip(weights, xs, strict=True)) / weights.sum(), *deltas
    )
    expected = jax.tree_util.tree_map(
        lambda t, d: t + d, trainable, mean
    )  # FedAvg: server sgd lr 1
    tree_allclose(state.trainable, expected, rtol=1e-5, atol=1e-6)


def test_non_private_single_step_is_plain_fedavg_sgd():
    module, lp, trainable, frozen = setup("ffa")
    K, lr = 2, 0.7
    loss_fn = loss_fn_for(module)
    cu = make_client_update(loss_fn, optax.sgd(lr), private=False)
    opt = make_server_optimizer(ServerConfig())
    batches = make_batches(K, 1, 6, fill=1.0)
    state, _ = make_round(cu, opt)(
        server_init(trainable, opt),
        frozen,
        RoundInputs(batches, jnp.ones(K), jnp.arange(K), dp_params(K)),
        jax.random.key(0),
    )
    grads = []
    for k in range(K):

        def batch_loss(t, k=k):
            return jnp.mean(
                jnp.stack(
                    [
                        loss_fn(
                            t,
                            frozen,
                            {"x": batches["x"][k, 0, i], "label": batches["label"][k, 0, i]},
                        )
                        for i in range(6)
                    ]
                )
            )

        grads.append(jax.grad(batch_loss)(trainable))
    expected = jax.tree_util.tree_map(lambda t, g0, g1: t - lr * (g0 + g1) / 2, trainable, *grads)
    tree_allclose(state.trainable, expected, rtol=1e-5, atol=1e-6)


def test_round_compiles_once_across_rounds_and_batch_sizes():
    module, _, trainable, frozen = setup("ffa")
    K = 3
    cu = make_client_update(loss_fn_for(module), optax.sgd(0.5), private=True)
    opt = make_server_optimizer(ServerConfig())
    round_fn = make_round(cu, opt)
    state = server_init(trainable, opt)
    for r, fill in enumerate([0.1, 0.5, 0.9, 0.0, 1.0]):  # different realised Poisson batch sizes
        dp = dp_params(K, clip=0.1 * (r + 1), sigma=0.5 * (r + 1))  # runtime DP values
        state, _ = round_fn(
            state,
            frozen,
            RoundInputs(make_batches(K, 2, 8, seed=r, fill=fill), jnp.ones(K), jnp.arange(K), dp),
            jax.random.key(0),
        )
    assert round_fn._cache_size() == 1


@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
def test_client_chunking_does_not_change_results(chunk):
    module, _, trainable, frozen = setup("ffa")
    K = 5
    cu = make_client_update(loss_fn_for(module), optax.sgd(0.5), private=True)
    opt = make_server_optimizer(ServerConfig())
    args = (
        frozen,
        RoundInputs(make_batches(K, 2, 8), jnp.arange(1.0, K + 1), jnp.arange(K), dp_params(K)),
        jax.random.key(4),
    )
    ref, mref = make_round(cu, opt)(server_init(trainable, opt), *args)
    got, mgot = make_round(cu, opt, clients_per_chunk=chunk)(server_init(trainable, opt), *args)
    tree_allclose(got.trainable, ref.trainable, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(mgot.clients.loss, mref.clients.loss, rtol=1e-5)
    assert mgot.clients.loss.shape == (K,)


def test_zero_weight_dummy_clients_are_no_ops():
    module, _, trainable, frozen = setup("ffa")
    cu = make_client_update(loss_fn_for(module), optax.sgd(0.5), private=True)
    opt = make_server_optimizer(ServerConfig())
    b3 = make_batches(3, 2, 8)
    ref, _ = make_round(cu, opt)(
        server_init(trainable, opt),
        frozen,
        RoundInputs(b3, jnp.ones(3), jnp.arange(3), dp_params(3)),
        jax.random.key(2),
    )
    junk = make_batches(2, 2, 8, seed=99)
    junk["x"] = np.full_like(junk["x"], 1e30)
    b5 = jax.tree_util.tree_map(lambda a, b: np.concatenate([a, b]), b3, junk)
    got, _ = make_round(cu, opt)(
        server_init(trainable, opt),
        frozen,
        RoundInputs(b5, jnp.array([1.0, 1, 1, 0, 0]), jnp.arange(5), dp_params(5)),
        jax.random.key(2),
    )
    tree_allclose(got.trainable, ref.trainable, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (simulated) devices")
@pytest.mark.parametrize("devices, chunk", [(8, 0), (4, 4), (2, 2)])
def test_sharded_round_equals_single_device(devices, chunk):
    module, _, trainable, frozen = setup("ffa")
    K = 8
    cu = make_client_update(loss_fn_for(module), optax.sgd(0.5), private=True)
    opt = make_server_optimizer(ServerConfig())
    args = (
        frozen,
        RoundInputs(make_batches(K, 2, 8), jnp.ones(K), jnp.arange(K), dp_params(K)),
        jax.random.key(6),
    )
    ref, _ = make_round(cu, opt)(server_init(trainable, opt), *args)
    mesh = client_mesh(devices)
    got, _ = make_round(cu, opt, clients_per_chunk=chunk, mesh=mesh)(
        server_init(trainable, opt), *args
    )
    tree_allclose(got.trainable, ref.trainable, rtol=1e-5, atol=1e-7)


def test_no_two_round_client_step_triples_share_a_noise_key():
    key = jax.random.key(0)
    seen = set()
    for r, c, s in itertools.product(range(6), range(5), range(6)):
        k = step_noise_key(client_key(key, r, c), s)
        seen.add(tuple(np.asarray(jax.random.key_data(k)).tolist()))
    assert len(seen) == 6 * 5 * 6


def test_weighted_mean_ignores_nonfinite_dummies():
    x = {"b": jnp.array([[1.0, 2.0], [3.0, 4.0], [jnp.nan, jnp.inf]])}
    out = weighted_mean(x, jnp.array([1.0, 3.0, 0.0]))
    np.testing.assert_allclose(out["b"], [2.5, 3.5])


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam", "yogi"])
def test_server_optimizers_run(name):
    module, _, trainable, frozen = setup("ffa")
    cu = make_client_update(loss_fn_for(module), optax.sgd(0.5), private=False)
    opt = make_server_optimizer(
        ServerConfig(optimizer=name, learning_rate=0.1 if name in ("adam", "yogi") else 1.0)
    )
    state = server_init(trainable, opt)
    round_fn = make_round(cu, opt)
    for r in range(2):
        state, m = round_fn(
            state,
            frozen,
            RoundInputs(make_batches(3, 2, 8, seed=r), jnp.ones(3), jnp.arange(3), dp_params(3)),
            jax.random.key(0),
        )
    assert int(state.round) == 2 and np.isfinite(float(m.loss))
