"""``server_step``, the one server step of the simulated round and the Flower server: its
FedAvg and DP-FedAvg aggregations equal the aggregation function followed by
``server_update``, bit for bit, and misuse is refused. (Its BandMF branch runs in the rounds of
the ``client-banded-mf`` case of tests/e2e/test_resume.py; a BandMF strategy takes up to a
minute to optimise on 2 busy cores, too much for one more test.)"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ffa_jax.federated.server import (
    ServerDpParams,
    server_init,
    server_step,
    server_update,
    weighted_mean,
)
from ffa_jax.privacy.aggregation import dp_fedavg_aggregate

K = 4


def _case():
    trainable = {"b": jnp.zeros((3, 2)), "head": jnp.ones(2)}
    deltas = jax.tree_util.tree_map(
        lambda x: jax.random.normal(jax.random.key(x.size), (K, *x.shape)), trainable
    )
    return trainable, deltas, jnp.array([1.0, 0.0, 1.0, 1.0])


def _equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb, strict=True)
    )


def test_weighted_mean_step_is_fedavg_then_the_optimizer():
    trainable, deltas, weights = _case()
    opt = optax.adam(0.1)
    state = server_init(trainable, opt)
    out = jax.jit(lambda s, d, w: server_step(s, d, w, opt))(state, deltas, weights)

    @jax.jit
    def reference(s, d, w):
        mean = weighted_mean(d, w)
        return mean, server_update(s, mean, opt)

    mean, new_state = reference(state, deltas, weights)
    assert out.client_norms is None
    assert _equal(out.mean_delta, mean) and _equal(out.state, new_state)
    assert int(out.state.round) == 1


def test_dp_fedavg_step_uses_the_given_noise_key():
    trainable, deltas, weights = _case()
    opt = optax.sgd(1.0)
    state = server_init(trainable, opt)
    sdp = ServerDpParams(jnp.float32(0.5), jnp.float32(1.0), jnp.float32(3.0))
    key = jax.random.key(3)
    step = jax.jit(lambda s, d, w, k: server_step(s, d, w, opt, server_dp=sdp, noise_key=k))
    out = step(state, deltas, weights, key)

    @jax.jit
    def reference(s, d, w, k):
        mean, norms = dp_fedavg_aggregate(d, w, sdp, k)
        return mean, norms, server_update(s, mean, opt)

    mean, norms, new_state = reference(state, deltas, weights, key)
    assert _equal(out.mean_delta, mean) and _equal(out.client_norms, norms)
    assert _equal(out.state, new_state)


def test_misuse_is_refused():
    trainable, deltas, weights = _case()
    opt = optax.sgd(1.0)
    state = server_init(trainable, opt)
    sdp = ServerDpParams(jnp.float32(0.5), jnp.float32(1.0), jnp.float32(3.0))
    with pytest.raises(ValueError, match="extra_update_sum"):
        server_step(state, deltas, weights, opt, extra_update_sum=trainable)
    with pytest.raises(ValueError, match="noise_key"):
        server_step(state, deltas, weights, opt, server_dp=sdp)


def test_cosine_schedule_decays_the_server_step_over_the_rounds():
    from ffa_jax.config import ServerConfig
    from ffa_jax.federated.server import make_server_optimizer

    rounds, lr = 4, 0.5
    opt = make_server_optimizer(ServerConfig(learning_rate=lr, schedule="cosine"), rounds)
    g = {"b": jnp.ones(3)}
    state, steps = opt.init(g), []
    for _ in range(rounds):
        upd, state = opt.update(g, state)
        steps.append(float(-upd["b"][0]))
    expect = [lr * (1 + np.cos(np.pi * t / rounds)) / 2 for t in range(rounds)]
    np.testing.assert_allclose(steps, expect, rtol=1e-6)
    assert steps[0] == pytest.approx(lr) and steps[-1] < 0.2 * lr
    # constant (the default) is plain optax.sgd: the same state tree, the same steps.
    const = make_server_optimizer(ServerConfig(learning_rate=lr), rounds)
    ref = optax.sgd(lr)
    assert jax.tree_util.tree_structure(const.init(g)) == jax.tree_util.tree_structure(ref.init(g))
    assert float(const.update(g, const.init(g))[0]["b"][0]) == -lr
    with pytest.raises(ValueError, match="rounds"):
        make_server_optimizer(ServerConfig(schedule="cosine"))


def test_a_bad_schedule_and_a_schedule_on_exact_aggregation_modes_are_refused():
    from ffa_jax.config import load_config
    from ffa_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="server.schedule"):
        load_config("configs/quickstart.yaml", ["server.schedule=linear"])
    from ffa_jax.federated import modes

    cfg = load_config(
        "configs/quickstart.yaml",
        ["server.schedule=cosine", "lora.mode=fedex", "privacy.epsilon=inf"],
    )
    with pytest.raises(ConfigError, match="server.schedule: constant"):
        modes.check_config(cfg)
