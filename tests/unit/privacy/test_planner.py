"""`ffa-jax privacy`: the planning command prints the numbers a run would use."""

import json
import math

import dp_accounting
import pytest

from ffa_jax import cli
from ffa_jax.privacy import accounting
from ffa_jax.run import planner

FAST = ["--set", "privacy.accountant=rdp", "--set", "federated.rounds=4"]


def test_privacy_json_matches_dp_accounting(capsys, tmp_path):
    png = tmp_path / "eps.png"
    assert cli.main(["privacy", "--json", "--png", str(png), *FAST]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["accountant"] == "rdp" and out["steps"] == 4 * 2 and out["delta"] == 1e-5
    assert out["epsilon"] == pytest.approx(6.0, rel=0.01)
    assert len(out["epsilon_curve"]) == 4 and out["epsilon_curve"] == sorted(out["epsilon_curve"])
    for sigma, q in zip(out["noise_multiplier"], out["sampling_rate"], strict=True):
        acc = accounting.make_accountant("rdp")
        acc.compose(
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)),
                out["steps"],
            )
        )
        assert acc.get_epsilon(1e-5) == pytest.approx(6.0, rel=0.01)
    assert {r["change"] for r in out["alternatives"]} >= {
        "as configured",
        "rounds x 2",
        "batch_size x 2",
    }
    assert png.stat().st_size > 1000


def test_privacy_table_and_non_private(capsys):
    assert cli.main(["privacy", *FAST]) == 0
    text = capsys.readouterr().out
    assert "noise multiplier" in text and "alternatives" in text
    assert cli.main(["privacy", "--set", "privacy.epsilon=inf"]) == 0
    assert "no privacy guarantee" in capsys.readouterr().out


def test_fixed_noise_multiplier_reports_epsilon():
    plan = planner.sample_level_plan(
        client_sizes=[500, 800],
        batch_size=32,
        max_batch_size=60,
        rounds=3,
        local_steps=2,
        epsilon=float("inf"),
        delta=1e-5,
        accountant="rdp",
        noise_multiplier=1.0,
    )
    assert plan.private and list(plan.noise_multipliers) == [1.0, 1.0]
    # The smaller client has the larger sampling rate, so it spends more.
    assert (
        plan.client_epsilon[0] > plan.client_epsilon[1] and plan.epsilon == plan.client_epsilon[0]
    )
    assert plan.epsilon == pytest.approx(
        accounting.epsilon_spent(1.0, 32 / 500, 6, 1e-5, "rdp"), rel=1e-9
    )


def test_privacy_json_client_level_partial_participation(capsys):
    args = [
        "privacy",
        "--json",
        *FAST,
        "--set",
        "privacy.unit=client",
        "--set",
        "federated.clients=6",
        "--set",
        "federated.clients_per_round=2",
    ]
    assert cli.main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["unit"] == "client" and out["neighbouring_relation"].startswith("add/remove one")
    assert out["steps"] == 4 and out["clients_per_round"] == 2 and out["clients"] == 6
    assert out["sampling_rate"] == pytest.approx(1 / 3) and out["client_sampling"] == "poisson"
    acc = accounting.make_accountant("rdp")
    acc.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(
                1 / 3, dp_accounting.GaussianDpEvent(out["noise_multiplier"])
            ),
            4,
        )
    )
    assert acc.get_epsilon(1e-5) == pytest.approx(out["epsilon"], rel=1e-6)
    assert out["epsilon"] == pytest.approx(6.0, rel=0.01) and out["epsilon_rdp"] == out["epsilon"]
    changes = {r["change"]: r for r in out["alternatives"]}
    # More clients per round: a larger sampling rate needs more noise for the same budget.
    more = changes["clients/round x 2"]
    assert more["clients_per_round"] == 4
    assert more["sigma_for_target"] > changes["as configured"]["sigma_for_target"]
    assert sum(out["rounds_participated"]) > 0


def _rdp_plan(max_batch_size, **kw):
    args = dict(
        client_sizes=[1011, 1011, 1011],
        batch_size=64,
        max_batch_size=max_batch_size,
        rounds=10,
        local_steps=2,
        epsilon=6.0,
        delta=1e-5,
        accountant="rdp",
    )
    return planner.sample_level_plan(**{**args, **kw})


def test_rdp_run_holds_the_delta_it_was_asked_for():
    """Under RDP the truncation is paid in delta. With B_max sized by
    perf.batch_overflow_probability (the quickstart's shape: 128) and the epsilon calibrated at
    delta minus the truncation term, the run holds (6, 1e-5), as dp-accounting's RDP of the
    untruncated event plus the overflow term confirms."""
    from scipy import stats

    from ffa_jax import perf
    from ffa_jax.config import load_config

    cfg = load_config(None, ["privacy.accountant=rdp"])
    b_max = perf.max_batch_size(cfg.perf, 64, perf.batch_overflow_probability(cfg))
    assert b_max == 128
    plan = _rdp_plan(b_max)
    assert plan.epsilon <= 6.0 and plan.delta_after(10) <= 1e-5
    q, steps, sigma = 64 / 1011, 20, float(plan.noise_multipliers[0])
    term = (1 + math.exp(6.0)) * (1 - (1 - stats.binom.sf(b_max, 1012, q)) ** steps)
    assert 0 < term <= 0.01 * 1e-5
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    eps = dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(1e-5 - term)
    assert eps <= 6.0 + 1e-9
    # B_max sized for PLD (112) leaves a term above delta: the plan then reports the larger
    # delta that holds, as before, instead of claiming 1e-5.
    small = _rdp_plan(112)
    assert small.delta_after(10) > 1e-5


def test_rdp_with_a_fixed_noise_multiplier_keeps_the_plain_delta_and_b_max():
    from ffa_jax import perf
    from ffa_jax.config import load_config

    for overrides in (
        ["privacy.accountant=rdp", "privacy.noise_multiplier=1.0"],
        ["privacy.accountant=pld"],
        ["privacy.accountant=rdp", "privacy.epsilon=inf"],
    ):
        cfg = load_config(None, overrides)
        assert perf.batch_overflow_probability(cfg) == perf.OVERFLOW_PROBABILITY
    cfg = load_config(None, ["privacy.accountant=rdp"])
    assert perf.batch_overflow_probability(cfg) == pytest.approx(
        accounting.rdp_overflow_target(6.0, 1e-5, 20)
    )
