"""Sample-level BandMF (correlated noise over each client's rounds x local steps, cyclic
Poisson batches within each client): the per-client stream's covariance over steps and its
persistence across rounds, the amplified accounting against jax-privacy's own, bands=1 =
Gaussian DP-SGD, the cyclic batches, bad input, keys from the run's secret.

(Bit-exact resume: ``tests/test_resume.py``, case ``sample-banded-mf``.)
"""

from __future__ import annotations

import math
import types

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax_privacy import batch_selection
from jax_privacy.experimental import accounting as jp_accounting
from jax_privacy.experimental.execution_plan import BandMFExecutionPlanConfig

from ffa_jax import checkpoint as ckpt_lib
from ffa_jax.config import load_config
from ffa_jax.data import batching
from ffa_jax.errors import ConfigError
from ffa_jax.federated.client import DpParams, make_client_update
from ffa_jax.federated.round import banded_noise_key, client_key
from ffa_jax.privacy import accounting, correlated
from ffa_jax.privacy import secret as secret_lib
from ffa_jax.privacy.ledger import account
from ffa_jax.run import planner
from ffa_jax.run.setup import KEY_TRAIN, client_noise_keys, init_server_state

DELTA = 1e-5
STEPS, BANDS = 8, 3  # one strategy shape (banded.optimize compiles per (steps, bands))


def _zero_loss(trainable, frozen, example):
    # Gradient 0: the client's update is exactly minus its noise (lr 1, expected batch 1).
    return 0.0 * jnp.sum(trainable["w"]) + 0.0 * jnp.sum(example["x"])


def _stream_by_rounds(key, d, steps_per_round, rounds, bands=BANDS):
    """The noise client k adds at each of its steps, read from its updates round by round,
    threading its stream state as the run does: ``[rounds * steps_per_round, d]``."""
    mech = correlated.BandedNoise(rounds * steps_per_round, bands)
    update = jax.jit(
        make_client_update(_zero_loss, optax.sgd(1.0), private=True, banded_noise=mech)
    )
    like = {"w": jnp.zeros(d)}
    state = mech.init(like, key)
    batches = {"x": jnp.ones((1, 2)), "mask": jnp.ones((1, 2), bool)}
    dp = DpParams(jnp.float32(1.0), jnp.float32(1.0), jnp.float32(1.0))
    rows = []
    for r in range(rounds * steps_per_round):  # one local step per call: one row each
        delta, _, state = update(like, {}, batches, dp, client_key(key, r, 0), None, state)
        rows.append(-np.asarray(delta["w"], np.float64))
    return np.stack(rows)


def test_client_noise_covariance_over_steps_matches_c_inverse_c_inverse_transpose():
    d = 40_000
    x = _stream_by_rounds(jax.random.key(7), d, 1, STEPS)  # [T, d]
    emp = x @ x.T / d
    want = correlated.noise_covariance(STEPS, BANDS)
    se = np.sqrt((np.outer(np.diag(want), np.diag(want)) + want**2) / d)
    assert np.all(np.abs(emp - want) <= 5 * se), np.max(np.abs(emp - want) / se)
    assert np.max(np.abs(want - np.diag(np.diag(want)))) > 0.05  # really correlated


def test_client_stream_persists_across_rounds_as_one_stream():
    key, d = jax.random.key(3), 16
    by_rounds = _stream_by_rounds(key, d, 1, STEPS)
    one = np.asarray(correlated.noise_stream(STEPS, BANDS, {"w": jnp.zeros(d)}, key, STEPS)["w"])
    np.testing.assert_allclose(by_rounds, one, rtol=1e-6, atol=1e-6)
    # Several local steps per call (2 rounds x 4 steps) thread the same stream.
    mech = correlated.BandedNoise(STEPS, BANDS)
    update = jax.jit(
        make_client_update(_zero_loss, optax.sgd(1.0), private=True, banded_noise=mech)
    )
    like = {"w": jnp.zeros(d)}
    state = mech.init(like, key)
    batches = {"x": jnp.ones((4, 1, 2)), "mask": jnp.ones((4, 1), bool)}
    dp = DpParams(jnp.float32(1.0), jnp.float32(1.0), jnp.float32(1.0))
    sums = []
    for r in range(2):
        delta, _, state = update(like, {}, batches, dp, client_key(key, r, 0), None, state)
        sums.append(-np.asarray(delta["w"]))
    np.testing.assert_allclose(sums, [one[:4].sum(0), one[4:].sum(0)], rtol=1e-5, atol=1e-5)


def test_bands_1_noise_is_independent_with_the_gaussian_std():
    d = 40_000
    x = _stream_by_rounds(jax.random.key(11), d, 1, 4, bands=1)
    emp = x @ x.T / d
    np.testing.assert_allclose(emp, np.eye(4), atol=5 * math.sqrt(2 / d))


# ----------------------------------------------------------------------------- accounting


def _plan(sizes, bands, rounds=4, local_steps=3, accountant="rdp", **kw):
    """RDP calibrates in well under a second; PLD is checked with fixed sigmas (a PLD
    calibration of truncated events takes tens of seconds on a loaded 2-core machine)."""
    return planner.sample_level_plan(
        client_sizes=sizes,
        batch_size=6,
        max_batch_size=14,
        rounds=rounds,
        local_steps=local_steps,
        epsilon=kw.pop("epsilon", 3.0),
        delta=DELTA,
        accountant=accountant,
        bands=bands,
        mechanism="banded_mf",
        **kw,
    )


def _jax_privacy_epsilon(sigma, steps, bands, n, batch, b_max):
    """jax-privacy's own BandMF execution plan (EQUAL_SPLIT groups, truncated Poisson, its
    default PLD accountant under the zero-out relation)."""
    cfg = BandMFExecutionPlanConfig(
        iterations=steps,
        strategy=np.ones(bands),  # only its length (the bands) enters the DpEvent
        epsilon=None,
        delta=None,
        noise_multiplier=sigma,
        sampling_prob=batch / (n // bands),
        truncated_batch_size=b_max,
        num_examples=n,
        partition_type=batch_selection.PartitionType.EQUAL_SPLIT,
    )
    acc = dp_accounting.pld.PLDAccountant(
        dp_accounting.NeighboringRelation.REPLACE_SPECIAL,
        value_discretization_interval=accounting.PLD_VALUE_DISCRETIZATION,
    )
    return acc.compose(cfg.plan.dp_event).get_epsilon(DELTA)


def test_epsilon_equals_jax_privacy_bandmf_execution_plan():
    sizes = [60, 95]
    sigmas = [1.3, 1.1]
    plan = _plan(sizes, 3, accountant="pld", noise_multipliers=sigmas, compare=False)
    for k, n in enumerate(sizes):
        want = _jax_privacy_epsilon(sigmas[k], 12, 3, n, 6, 14)
        assert plan.client_epsilon[k] == pytest.approx(want, rel=0.01)
    # The curve steps at ceil(steps / b) compositions: rounds of 3 steps, 3 bands -> one each.
    assert np.all(np.diff(plan.epsilon_curve) > 0)
    # RDP: jax-privacy's untruncated amplified event under an RDP accountant (max over clients).
    want_rdp = max(
        dp_accounting.rdp.RdpAccountant(accounting.RDP_ORDERS)
        .compose(
            jp_accounting.amplified_bandmf_event(
                float(sigma), 12, num_bands=3, sampling_prob=6 / (n // 3)
            )
        )
        .get_epsilon(DELTA)
        for sigma, n in zip(plan.noise_multipliers, sizes, strict=True)
    )
    assert plan.curves["rdp"][-1] == pytest.approx(want_rdp, rel=0.01)


def test_calibrated_sigma_reaches_the_target_per_jax_privacy():
    sizes = [60]
    plan = _plan(sizes, 3, compare=False)  # RDP, epsilon 3
    for sigma, n in zip(plan.noise_multipliers, sizes, strict=True):
        ev = jp_accounting.amplified_bandmf_event(
            float(sigma), 12, num_bands=3, sampling_prob=6 / (n // 3)
        )
        eps = dp_accounting.rdp.RdpAccountant(accounting.RDP_ORDERS).compose(ev)
        assert eps.get_epsilon(DELTA) == pytest.approx(3.0, rel=0.011)
        assert eps.get_epsilon(DELTA) <= 3.0 * (1 + 1e-9)


def test_zero_out_and_add_remove_give_the_same_epsilon_for_these_events():
    ev = correlated.sample_event(1.1, 12, bands=4, rate=0.3, group=25, max_batch_size=14)
    eps = [
        dp_accounting.pld.PLDAccountant(rel, value_discretization_interval=1e-3)
        .compose(ev)
        .get_epsilon(DELTA)
        for rel in (
            dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
            dp_accounting.NeighboringRelation.REPLACE_SPECIAL,
        )
    ]
    assert eps[0] == pytest.approx(eps[1], rel=1e-9)


def test_ledger_recomputes_the_plans_epsilon_from_jax_privacy_events():
    plan = _plan([60, 95], 3, accountant="pld", noise_multiplier=1.2, compare=False)
    for done in (2, 4):
        led = plan.ledger(done)
        assert led.bands == 3
        assert led.neighboring_relation == dp_accounting.NeighboringRelation.REPLACE_SPECIAL
        assert account(led, "pld") == pytest.approx(led.epsilon_spent, rel=0.005)
        assert type(led).from_json(led.to_json()) == led


def test_bands_1_is_exactly_the_gaussian_sample_level_plan():
    sizes = [60, 95]
    gauss = planner.sample_level_plan(
        client_sizes=sizes,
        batch_size=6,
        max_batch_size=14,
        rounds=4,
        local_steps=3,
        epsilon=3.0,
        delta=DELTA,
        accountant="rdp",
    )
    banded = _plan(sizes, 1)
    np.testing.assert_array_equal(banded.noise_multipliers, gauss.noise_multipliers)
    np.testing.assert_array_equal(banded.sampling_rates, gauss.sampling_rates)
    for acc in ("pld", "rdp"):
        np.testing.assert_array_equal(banded.curves[acc], gauss.curves[acc])
        np.testing.assert_array_equal(banded.deltas[acc], gauss.deltas[acc])
    assert banded.ledger(4).events("pld") == gauss.ledger(4).events("pld")
    rows = banded.noise_comparison
    assert rows["gaussian"]["noise_multiplier"] == rows["banded_mf"]["noise_multiplier"]
    assert rows["gaussian"]["summed_noise_std_final"] == pytest.approx(
        rows["banded_mf"]["summed_noise_std_final"]
    )


def test_privacy_table_shows_both_mechanisms_side_by_side():
    plan = _plan([60], 3)
    rows = plan.noise_comparison
    assert rows["banded_mf"]["bands"] == 3 and rows["gaussian"]["bands"] == 1
    # Same epsilon: the Gaussian sigma is calibrated for the same client over the same steps.
    k = int(np.argmax(plan.client_epsilon))
    g = accounting.epsilon_spent(
        rows["gaussian"]["noise_multiplier"], 6 / plan.client_sizes[k], 12, DELTA, "rdp"
    )
    assert g == pytest.approx(plan.client_epsilon[k], rel=0.011)
    text = planner.format_plan(plan, [])
    assert "banded_mf" in text and "gaussian" in text and "zero-out" in text
    js = plan.to_json()
    assert js["mechanism"] == "banded_mf" and js["bands"] == 3
    assert set(js["noise_comparison"]) == {"gaussian", "banded_mf"}


# ----------------------------------------------------------------------------- batches


def test_cyclic_poisson_batches_draw_each_step_from_its_group_only():
    rng = np.random.default_rng(0)
    sizes, b, steps = [40, 31], 4, 8
    groups = [batching.cyclic_partition(rng, n, b) for n in sizes]
    assert [g.shape for g in groups] == [(4, 10), (4, 7)]
    for g, n in zip(groups, sizes, strict=True):  # disjoint, within the client
        assert len(set(g.ravel())) == g.size and g.max() < n
    rates = [3 / g.shape[1] for g in groups]
    counts = np.zeros(2)
    draws = 400
    for r in range(draws):
        idx, mask, dropped = batching.poisson_batch_indices(
            rng, sizes, rates, steps, 16, groups=groups, first_step=r * steps
        )
        assert dropped == 0
        for k in range(2):
            for s in range(steps):
                chosen = idx[k, s][mask[k, s]]
                assert set(chosen) <= set(groups[k][(r * steps + s) % b])
        counts += mask.sum(axis=(1, 2))
    # The expected batch is unchanged: 3 examples per step.
    np.testing.assert_allclose(counts / (draws * steps), 3.0, rtol=0.05)


def test_truncation_keeps_a_random_subset_and_counts_the_dropped():
    rng = np.random.default_rng(1)
    groups = [batching.cyclic_partition(rng, 40, 2)]
    idx, mask, dropped = batching.poisson_batch_indices(
        rng, [40], [1.0], 2, 5, groups=groups, first_step=0
    )
    assert mask.sum() == 10 and dropped == 2 * (20 - 5)


# ----------------------------------------------------------------------------- bad input

BASE = ["federated.clients=3", "federated.rounds=4", "federated.local_steps=2"]  # T = 8


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["privacy.bands=0"], "privacy.bands"),
        (["privacy.bands=9"], "privacy.bands"),  # > rounds x local_steps = 8
        (["privacy.bands=2", "federated.clients_per_round=2"], "federated.clients_per_round"),
        (
            [
                "privacy.bands=2",
                "federated.clients_per_round=2",
                "federated.client_sampling=fixed",
                "privacy.accountant=rdp",
            ],
            "federated.clients_per_round",
        ),
        (["privacy.bands=2", "lora.mode=rolora"], "privacy.mechanism"),
        (["privacy.bands=2", "privacy.epsilon=inf"], "privacy.mechanism"),
    ],
)
def test_bad_sample_banded_mf_configs_raise_config_error_naming_the_field(overrides, field):
    from ffa_jax.federated import modes

    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        cfg = load_config(None, [*BASE, "privacy.mechanism=banded_mf", *overrides])
        modes.check_config(cfg)


def test_groups_smaller_than_the_batch_are_refused_before_compute():
    with pytest.raises(ConfigError, match=r"privacy\.bands=4.*client 1 has 20 examples"):
        _plan([60, 20], 4)  # 20 // 4 = 5 < batch_size 6


def test_resume_that_changes_rounds_or_local_steps_is_refused():
    over = [*BASE, "privacy.mechanism=banded_mf", "privacy.bands=2"]
    saved = load_config(None, over)
    for field, value in (("federated.local_steps", 3), ("federated.rounds", 5)):
        other = load_config(None, [*over, f"{field}={value}"])
        with pytest.raises(ConfigError, match=rf"{field.replace('.', '[.]')}={value}"):
            ckpt_lib.check_config(saved.to_dict(), other, "ckpt/2")
    assert ckpt_lib.check_config(saved.to_dict(), saved, "ckpt/2") == saved


# ----------------------------------------------------------------------------- keys


class _Sgd:
    def init(self, params):
        return ()


def _states(cfg, secret, clients=3):
    trainable = {"b": np.zeros((2, 3), np.float32)}
    prep = types.SimpleNamespace(
        cfg=cfg,
        trainable=trainable,
        params=trainable,
        client_indices=[0] * clients,
        secret=secret,
    )
    return init_server_state(prep, _Sgd()).noise


def test_client_noise_keys_come_from_the_run_secret_not_the_seed():
    over = [*BASE, "privacy.mechanism=banded_mf", f"privacy.bands={BANDS}"]
    cfg = load_config(None, over)
    keys, per_leaf = _states(cfg, 1234)
    train = secret_lib.jax_key(1234, KEY_TRAIN)
    want = jax.vmap(jax.random.key_data)(client_noise_keys(train, 3))
    np.testing.assert_array_equal(keys, want)
    index, buffers = per_leaf["b"]
    assert index.shape == (3,) and buffers.shape == (3, BANDS, 2, 3) and np.all(buffers == 0)
    assert len({tuple(k) for k in np.asarray(keys)}) == 3  # one stream per client
    np.testing.assert_array_equal(_states(load_config(None, [*over, "seed=9"]), 1234)[0], keys)
    assert not np.array_equal(_states(cfg, 1235)[0], keys)
    # Not the server's stream key, nor any (round, client) key of the same run.
    others = [jax.random.key_data(banded_noise_key(train))]
    others += [jax.random.key_data(client_key(train, r, c)) for r in range(8) for c in range(3)]
    for k in np.asarray(keys):
        assert not any(np.array_equal(k, o) for o in others)
