"""Client-level DP (DP-FedAvg): clipped client updates, server noise on the sum."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ffa_jax.config import ServerConfig
from ffa_jax.federated.client import make_client_update, step_noise_key
from ffa_jax.federated.round import RoundInputs, client_key, make_round, server_noise_key
from ffa_jax.federated.server import (
    ServerDpParams,
    dp_fedavg_aggregate,
    make_server_optimizer,
    server_init,
)
from ffa_jax.privacy.aggregation import clipped_sum
from tests.unit.federated.test_round import dp_params, loss_fn_for, make_batches, setup


def _sdp(clip, z, m):
    return ServerDpParams(
        clip_norm=jnp.float32(clip),
        noise_multiplier=jnp.float32(z),
        expected_clients=jnp.float32(m),
    )


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e6])
def test_clipped_client_update_norms_are_bounded(scale):
    rng = np.random.default_rng(0)
    stacked = {
        "b": jnp.asarray(rng.normal(size=(6, 4, 5)) * scale, jnp.float32),
        "c": jnp.asarray(rng.normal(size=(6, 3)) * scale, jnp.float32),
    }
    # Each client alone in the sum: its clipped update.
    for k in range(6):
        alone = jnp.zeros(6).at[k].set(1.0)
        clipped, norms = clipped_sum(stacked, alone, jnp.float32(0.7))
        after = np.sqrt(sum(np.sum(np.asarray(x) ** 2) for x in clipped.values()))
        assert after <= 0.7 * (1 + 1e-5)
        raw = np.sqrt(sum(np.sum(np.asarray(x[k]) ** 2) for x in stacked.values()))
        assert float(norms[k]) == pytest.approx(raw, rel=1e-5)
        if raw <= 0.7:
            assert after == pytest.approx(raw, rel=1e-5)


def test_nonfinite_update_is_dropped():
    stacked = {"b": jnp.array([[1.0, 0.0], [jnp.nan, 1.0]])}
    summed, norms = clipped_sum(stacked, jnp.ones(2), jnp.float32(10.0))
    np.testing.assert_array_equal(np.asarray(summed["b"]), [1.0, 0.0])
    assert not np.isfinite(float(norms[1]))


def test_server_noise_std_is_z_times_s_over_m():
    stacked = {"b": jnp.zeros((3, 4000))}
    out, _ = dp_fedavg_aggregate(stacked, jnp.ones(3), _sdp(0.5, 2.0, 3.0), jax.random.key(1))
    std = float(jnp.std(out["b"]))
    assert std == pytest.approx(2.0 * 0.5 / 3.0, rel=0.03)


def test_noise_free_limit_equals_mean_of_clipped_participants():
    stacked = {"b": jnp.array([[3.0, 4.0], [0.3, 0.4], [100.0, 100.0]])}
    out, norms = dp_fedavg_aggregate(
        stacked, jnp.array([1.0, 1.0, 0.0]), _sdp(1.0, 0.0, 2.0), jax.random.key(0)
    )
    np.testing.assert_allclose(
        np.asarray(out["b"]), ([0.6, 0.8] + np.array([0.3, 0.4])) / 2, rtol=1e-6
    )
    np.testing.assert_allclose(np.asarray(norms)[:2], [5.0, 0.5], rtol=1e-6)


def test_round_with_client_level_dp_compiles_once_and_matches_manual():
    module, _, trainable, frozen = setup("ffa")
    K = 3
    cu = make_client_update(loss_fn_for(module), optax.sgd(0.5), private=False)
    opt = make_server_optimizer(ServerConfig())
    round_fn = make_round(cu, opt, client_level_dp=True)
    key = jax.random.key(5)
    state = server_init(trainable, opt)
    batches = make_batches(K, 2, 8)
    sdp = _sdp(0.05, 1.0, 3.0)
    new, _ = round_fn(
        state, frozen, RoundInputs(batches, jnp.ones(K), jnp.arange(K), dp_params(K), sdp), key
    )
    deltas = []
    for k in range(K):
        bk = jax.tree_util.tree_map(lambda x, k=k: x[k], batches)
        dk = jax.tree_util.tree_map(lambda x, k=k: x[k], dp_params(K))
        deltas.append(jax.jit(cu)(trainable, frozen, bk, dk, client_key(key, 0, k))[0])
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *deltas)
    agg, _ = dp_fedavg_aggregate(stacked, jnp.ones(K), sdp, server_noise_key(key, 0))
    expected = jax.tree_util.tree_map(lambda t, d: t + d, trainable, agg)
    for a, b in zip(
        jax.tree_util.tree_leaves(new.trainable), jax.tree_util.tree_leaves(expected), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    for r in range(2):
        new, _ = round_fn(
            new,
            frozen,
            RoundInputs(
                make_batches(K, 2, 8, seed=r + 1),
                jnp.array([1.0, 0.0, 1.0]),
                jnp.arange(K),
                dp_params(K),
                _sdp(0.1 * (r + 1), 0.5, 2.0),
            ),
            key,
        )
    assert round_fn._cache_size() == 1


def test_server_noise_keys_never_collide_with_client_or_step_keys():
    key = jax.random.key(0)
    seen = set()
    for r in range(5):
        seen.add(tuple(np.asarray(jax.random.key_data(server_noise_key(key, r))).tolist()))
        for c, s in itertools.product(range(4), range(4)):
            seen.add(
                tuple(
                    np.asarray(
                        jax.random.key_data(step_noise_key(client_key(key, r, c), s))
                    ).tolist()
                )
            )
            seen.add(tuple(np.asarray(jax.random.key_data(client_key(key, r, c))).tolist()))
    assert len(seen) == 5 * (1 + 4 + 16)  # server key, client keys, step noise keys: all distinct


@pytest.mark.parametrize("client_level", [False, True], ids=["sample-level", "client-level"])
@pytest.mark.parametrize("chunk", [1, 2])
def test_idle_chunks_are_skipped_without_changing_results(client_level, chunk):
    """Partial participation: slots of non-participants (weight 0) are filled last, whole idle
    chunks are skipped by lax.cond, and the result equals the unchunked round over the same
    participants, which equals the round over the participants alone."""
    from ffa_jax.federated import participation

    module, _, trainable, frozen = setup("ffa")
    P = 6
    cu = make_client_update(loss_fn_for(module), optax.sgd(0.5), private=not client_level)
    opt = make_server_optimizer(ServerConfig())
    sdp = _sdp(0.05, 0.0, 2.0) if client_level else None
    members = np.array([4, 9])  # 2 participants of a 10-client federation, 6 slots
    slots = participation.slots(members, P, chunk)
    real = slots >= 0
    batches = make_batches(P, 2, 8)
    for k in batches:
        batches[k] = np.where(
            real.reshape((-1,) + (1,) * (batches[k].ndim - 1)), batches[k], 0 * batches[k]
        )
    weights = jnp.asarray(real, jnp.float32)
    ids = jnp.asarray(np.where(real, slots, 10 + np.arange(P)), jnp.int32)
    key = jax.random.key(3)
    args = (frozen, RoundInputs(batches, weights, ids, dp_params(P), sdp), key)
    round_chunked = make_round(cu, opt, clients_per_chunk=chunk, client_level_dp=client_level)
    got, m = round_chunked(server_init(trainable, opt), *args)
    ref, _ = make_round(cu, opt, client_level_dp=client_level)(server_init(trainable, opt), *args)
    for a, b in zip(
        jax.tree_util.tree_leaves(got.trainable),
        jax.tree_util.tree_leaves(ref.trainable),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    # Same as a round that only ever had the two participants.
    sub = jax.tree_util.tree_map(lambda x: x[real], batches)
    alone, _ = make_round(cu, opt, client_level_dp=client_level)(
        server_init(trainable, opt),
        frozen,
        RoundInputs(sub, jnp.ones(2), jnp.asarray(slots[real], jnp.int32), dp_params(2), sdp),
        key,
    )
    for a, b in zip(
        jax.tree_util.tree_leaves(got.trainable),
        jax.tree_util.tree_leaves(alone.trainable),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    # Skipped slots report zeros; the participants did train.
    assert np.all(np.asarray(m.clients.num_examples)[~real] == 0)
    assert np.all(np.asarray(m.clients.num_examples)[real] > 0)
    # Another round with other participants reuses the executable.
    other = participation.slots(np.array([0, 1, 2, 3, 5]), P, chunk)
    w2 = jnp.asarray(other >= 0, jnp.float32)
    round_chunked(got, frozen, RoundInputs(batches, w2, ids, dp_params(P), sdp), key)
    assert round_chunked._cache_size() == 1


def test_noise_is_added_to_the_sum_before_dividing():
    """(sum + N(0, (zS)^2)) / M: the output noise std is z S / M, not z S (noise after the
    division) and not z S / sqrt(M) (noise per client)."""
    m = 8.0
    out, _ = dp_fedavg_aggregate(
        {"b": jnp.zeros((8, 20000))}, jnp.ones(8), _sdp(0.5, 2.0, m), jax.random.key(7)
    )
    std = float(jnp.std(out["b"]))
    assert std == pytest.approx(2.0 * 0.5 / m, rel=0.03)
    assert abs(std - 2.0 * 0.5) > 0.5 and abs(std - 2.0 * 0.5 / np.sqrt(m)) > 0.1
