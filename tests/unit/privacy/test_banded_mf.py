"""Correlated (BandMF) client-level noise: the noise's covariance over rounds, the amplified
accounting against jax-privacy's own, bands=1 = independent Gaussian, bad input, secret keys.

(Bit-exact resume under banded_mf: ``tests/e2e/test_resume.py``, case ``client-banded-mf``.)
"""

from __future__ import annotations

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax_privacy import accounting as jp_accounting

from ffa_jax import checkpoint as ckpt_lib
from ffa_jax.config import load_config
from ffa_jax.errors import ConfigError
from ffa_jax.federated import participation
from ffa_jax.federated.round import banded_noise_key, server_noise_key
from ffa_jax.federated.server import ServerDpParams
from ffa_jax.privacy import accounting, client_level, correlated
from ffa_jax.privacy import secret as secret_lib
from ffa_jax.privacy.aggregation import banded_mf_aggregate, clipped_sum
from ffa_jax.privacy.noise import gaussian_noise_like
from ffa_jax.run import planner
from ffa_jax.run.setup import KEY_TRAIN, init_server_state

DELTA = 1e-5
# One strategy shape for every test: banded.optimize compiles per (steps, bands).
STEPS, BANDS = 8, 3


def _sampling(n, m, b):
    return client_level.ClientSampling(
        n, m, "poisson", participation.slot_count(n // b, m, "poisson"), b
    )


# ----------------------------------------------------------------------------- the noise


def test_noise_covariance_over_rounds_matches_c_inverse_c_inverse_transpose():
    steps, bands, d = STEPS, BANDS, 40_000
    noise = correlated.noise_stream(steps, bands, jnp.zeros(d), jax.random.key(1), steps)
    x = np.asarray(noise, np.float64)  # [steps, d]: d independent draws of the [steps] vector
    emp = x @ x.T / d
    want = correlated.noise_covariance(steps, bands)
    # Entry (i, j) of a sample covariance of d draws has std sqrt((S_ii S_jj + S_ij^2) / d).
    se = np.sqrt((np.outer(np.diag(want), np.diag(want)) + want**2) / d)
    assert np.all(np.abs(emp - want) <= 5 * se), np.max(np.abs(emp - want) / se)
    # The noise really is correlated (C^-1 is not diagonal) and of mean zero.
    assert np.max(np.abs(want - np.diag(np.diag(want)))) > 0.05
    assert np.all(np.abs(x.mean(axis=1)) < 5 * np.sqrt(np.diag(want) / d))


def test_strategy_is_column_normalised_banded_and_cached():
    c = np.asarray(correlated.strategy(STEPS, BANDS).materialize())
    np.testing.assert_allclose(np.linalg.norm(c, axis=0), 1.0, rtol=1e-5)
    i, j = np.indices(c.shape)
    assert np.all(c[(i - j >= BANDS) | (j > i)] == 0)  # lower triangular, BANDS bands
    assert correlated.strategy(STEPS, BANDS) is correlated.strategy(STEPS, BANDS)


def test_prefix_sum_error_is_below_independent_noise_for_several_bands():
    t = STEPS
    err = correlated.prefix_sum_error(t, BANDS)
    np.testing.assert_allclose(correlated.prefix_sum_error(t, 1), np.arange(1, t + 1))
    assert np.mean(err) < np.mean(np.arange(1, t + 1))
    s = correlated.summed_noise_std(2.0, t, 1)
    assert s["final"] == pytest.approx(2.0 * math.sqrt(t)) and s["per_round"] == 2.0


def test_banded_aggregate_adds_the_streamed_noise_to_the_clipped_sum():
    k, d = 3, 6
    stacked = {"b": jnp.arange(k * d, dtype=jnp.float32).reshape(k, d) / 10}
    part = jnp.array([1.0, 0.0, 1.0])
    dp = ServerDpParams(
        clip_norm=jnp.float32(1.0),
        noise_multiplier=jnp.float32(0.5),
        expected_clients=jnp.float32(2.0),
    )
    mech = correlated.BandedNoise(STEPS, BANDS)
    state0 = mech.init({"b": jnp.zeros(d)}, jax.random.key(3))
    out, _, state1 = jax.jit(banded_mf_aggregate, static_argnums=3)(stacked, part, dp, mech, state0)
    summed, _ = clipped_sum(stacked, part, dp.clip_norm)
    noise, state_ref = mech.next(summed, 0.5, state0)
    np.testing.assert_allclose(out["b"], (summed["b"] + noise["b"]) / 2.0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(state1), jax.tree.leaves(state_ref), strict=True):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- accounting


@pytest.mark.parametrize(("n", "m", "b", "rounds"), [(60, 3, 4, 20), (40, 2, 5, 23)])
def test_epsilon_equals_jax_privacy_amplified_bandmf_accountant(n, m, b, rounds):
    s = _sampling(n, m, b)
    z = 1.3
    # jax-privacy's cyclic-Poisson BandMF accountant, PLD with the same discretisation, the
    # truncation of the group's Poisson sample at P slots included.
    jp_pld = jp_accounting.DpsgdTrainingAccountant(
        jp_accounting.PldAccountantConfig(
            value_discretization_interval=accounting.PLD_VALUE_DISCRETIZATION
        )
    )
    params = jp_accounting.DpParams(
        noise_multipliers=z,
        num_samples=n,
        delta=DELTA,
        batch_size=m,
        cycle_length=b,
        truncated_batch_size=s.max_clients,
    )
    want = jp_pld.compute_epsilon(rounds, params)
    got = client_level.epsilon_spent(z, s, rounds, DELTA, "pld")
    assert got == pytest.approx(want, rel=0.01)
    curve = client_level.epsilon_curve(z, s, rounds, DELTA, "pld")
    assert curve[-1] == pytest.approx(want, rel=0.01)
    # The curve steps once per cycle: round r has had ceil((r + 1) / b) compositions.
    assert curve[b - 1] == curve[0] < curve[b]
    # RDP (untruncated; the truncation goes to delta) against jax-privacy's RDP accountant.
    jp_rdp = jp_accounting.DpsgdTrainingAccountant(
        jp_accounting.RdpAccountantConfig(orders=accounting.RDP_ORDERS)
    )
    params_rdp = jp_accounting.DpParams(
        noise_multipliers=z, num_samples=n, delta=DELTA, batch_size=m, cycle_length=b
    )
    got_rdp = client_level.epsilon_curve(z, s, rounds, DELTA, "rdp")[-1]
    assert got_rdp == pytest.approx(jp_rdp.compute_epsilon(rounds, params_rdp), rel=0.01)


def test_calibrated_z_reaches_the_target_epsilon_per_jax_privacy():
    # RDP keeps the calibration fast; the PLD epsilon is compared above.
    s = _sampling(60, 3, 4)
    z = client_level.calibrate(4.0, DELTA, s, 20, "rdp")
    eps = jp_accounting.DpsgdTrainingAccountant(
        jp_accounting.RdpAccountantConfig(orders=accounting.RDP_ORDERS)
    ).compute_epsilon(
        20,
        jp_accounting.DpParams(
            noise_multipliers=z, num_samples=60, delta=DELTA, batch_size=3, cycle_length=4
        ),
    )
    assert eps == pytest.approx(4.0, rel=0.01)


def test_bands_1_is_independent_gaussian_same_epsilon_and_std():
    # Full participation keeps the plan's PLD curve cheap (a plain Gaussian event).
    plain = client_level.ClientSampling(6, 6, "poisson", 6)
    s1 = _sampling(6, 6, 1)
    assert s1 == plain
    common = dict(
        client_sizes=[10] * 6,
        batch_size=4,
        max_batch_size=8,
        rounds=6,
        local_steps=1,
        epsilon=5.0,
        delta=DELTA,
        accountant="rdp",
        participation=np.ones((6, 6), bool),
        sampling=plain,
    )
    g = planner.client_level_plan(mechanism="gaussian", **common)
    b = planner.client_level_plan(mechanism="banded_mf", **common)
    assert b.client_noise_multiplier == g.client_noise_multiplier
    np.testing.assert_array_equal(b.epsilon_curve, g.epsilon_curve)
    assert b.noise_comparison["banded_mf"] == b.noise_comparison["gaussian"]
    # The noise: identity covariance, std 1 per coordinate and round, like the Gaussian's.
    d = 20_000
    corr = np.asarray(correlated.noise_stream(6, 1, jnp.zeros(d), jax.random.key(0), 6))
    np.testing.assert_allclose(corr @ corr.T / d, np.eye(6), atol=5 * math.sqrt(2 / d))
    ind = np.asarray(gaussian_noise_like(jnp.zeros(d), 1.0, server_noise_key(jax.random.key(0), 0)))
    assert np.std(corr[0]) == pytest.approx(np.std(ind), rel=0.03)


# ----------------------------------------------------------------------------- sampling


def test_cyclic_poisson_draws_each_round_from_its_group_only():
    sched = participation.schedule(7, 40, 22, 2, "poisson", cycle_length=4)
    for r in range(40):
        members = np.flatnonzero(sched[r])
        assert np.all(members % 4 == r % 4) and np.all(members < 20)  # 22 // 4 = 5 per group
    # A client takes part at most once every 4 rounds (min separation = bands).
    for k in range(22):
        rounds = np.flatnonzero(sched[:, k])
        assert np.all(np.diff(rounds) >= 4)


# ----------------------------------------------------------------------------- bad input

BASE = ["privacy.unit=client", "federated.clients=21", "federated.clients_per_round=2"]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["privacy.mechanism=banded_mf", "privacy.bands=0"], "privacy.bands"),
        (
            ["privacy.mechanism=banded_mf", "privacy.bands=11", "federated.rounds=10"],
            "privacy.bands",
        ),
        (
            [
                "privacy.mechanism=banded_mf",
                "privacy.bands=2",
                "federated.client_sampling=fixed",
                "privacy.accountant=rdp",
            ],
            "federated.client_sampling",
        ),
        (
            ["privacy.mechanism=banded_mf", "privacy.bands=11", "federated.rounds=20"],
            "privacy.bands",
        ),  # 2 clients x 11 bands > 21 clients
        (
            ["privacy.mechanism=banded_mf", "privacy.bands=2", "federated.clients_per_round=null"],
            "privacy.bands",
        ),  # full participation: only bands=1
        # Sample level needs every client every round (BASE samples 2 of 21).
        (["privacy.mechanism=banded_mf", "privacy.unit=sample"], "federated.clients_per_round"),
        (["privacy.mechanism=banded_mf", "privacy.epsilon=inf"], "privacy.mechanism"),
        (["privacy.bands=3"], "privacy.bands"),  # bands with the gaussian mechanism
        (["privacy.mechanism=toeplitz"], "privacy.mechanism"),
    ],
)
def test_bad_banded_mf_configs_raise_config_error_naming_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [*BASE, *overrides])


def test_sample_level_banded_mf_is_accepted_with_every_client_every_round():
    # (Its own tests: tests/unit/privacy/test_sample_banded_mf.py.)
    full = [
        "privacy.unit=sample",
        "federated.clients=21",
        "federated.clients_per_round=null",
        "privacy.mechanism=banded_mf",
        "privacy.bands=4",
    ]
    cfg = load_config(None, full)
    assert cfg.privacy.unit == "sample" and cfg.privacy.bands == 4


def test_resume_that_changes_rounds_under_banded_mf_is_refused():
    saved = load_config(
        None, [*BASE, "privacy.mechanism=banded_mf", "privacy.bands=2", "federated.rounds=10"]
    )
    longer = load_config(
        None, [*BASE, "privacy.mechanism=banded_mf", "privacy.bands=2", "federated.rounds=12"]
    )
    with pytest.raises(ConfigError, match=r"federated\.rounds=12"):
        ckpt_lib.check_config(saved.to_dict(), longer, "ckpt/10")
    assert ckpt_lib.check_config(saved.to_dict(), saved, "ckpt/10") == saved
    # The Gaussian mechanism may still extend a run.
    g10 = load_config(None, [*BASE, "federated.rounds=10"])
    ckpt_lib.check_config(g10.to_dict(), load_config(None, [*BASE, "federated.rounds=12"]), "x")


# ----------------------------------------------------------------------------- keys


def _noise_state(cfg, secret):
    trainable = {"b": np.zeros((2, 3), np.float32)}
    prep = types.SimpleNamespace(
        cfg=cfg, trainable=trainable, params=trainable, client_indices=[0], secret=secret
    )
    return init_server_state(prep, _SGD).noise


class _Sgd:
    def init(self, params):
        return ()


_SGD = _Sgd()


def test_banded_noise_keys_come_from_the_run_secret_not_the_seed():
    over = [
        *BASE,
        "privacy.mechanism=banded_mf",
        f"privacy.bands={BANDS}",
        f"federated.rounds={STEPS}",
    ]
    cfg = load_config(None, over)
    other_seed = load_config(None, [*over, "seed=123"])
    key, per_leaf = _noise_state(cfg, 1234)
    want = jax.random.key_data(banded_noise_key(secret_lib.jax_key(1234, KEY_TRAIN)))
    np.testing.assert_array_equal(key, want)
    index, buffers = per_leaf["b"]
    assert int(index) == 0 and buffers.shape == (BANDS, 2, 3) and np.all(buffers == 0)
    np.testing.assert_array_equal(_noise_state(other_seed, 1234)[0], key)  # seed: no effect
    assert not np.array_equal(_noise_state(cfg, 1235)[0], key)  # another secret: another key
    # The key is not any round's Gaussian server key of the same run.
    train = secret_lib.jax_key(1234, KEY_TRAIN)
    for r in range(4):
        assert not np.array_equal(jax.random.key_data(server_noise_key(train, r)), key)


def test_ledger_recomputes_the_cyclic_epsilon_from_its_events():
    from ffa_jax.privacy.ledger import PrivacyLedger, account

    s = _sampling(40, 2, 4)
    z, done = 1.1, 10
    curve = client_level.epsilon_curve(z, s, 12, DELTA, "rdp")
    ledger = PrivacyLedger(
        private=True,
        unit="client",
        accountant="rdp",
        delta=DELTA,
        noise_multipliers=(0.0,) * 40,
        sampling_rates=(0.1,) * 40,
        client_sizes=(10,) * 40,
        max_batch_size=4,
        steps_per_round=1,
        rounds_done=done,
        rounds_participated=(0,) * 40,
        epsilon_spent=float(curve[done - 1]),
        clients_per_round=2,
        client_sampling="poisson",
        max_clients_per_round=s.max_clients,
        client_noise_multiplier=z,
        cycle_length=4,
    )
    assert ledger.sampling == s
    assert account(ledger, "rdp") == pytest.approx(float(curve[done - 1]), rel=1e-9)
    assert PrivacyLedger.from_json(ledger.to_json()) == ledger
