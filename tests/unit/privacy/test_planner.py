"""`ffa-jax privacy`: the planning command prints the numbers a run would use."""

import json

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
