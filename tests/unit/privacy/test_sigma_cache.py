"""The disk memo of calibrated noise multipliers: a second process reuses the sigma without a
search, and a remembered value is only a hint (a wrong one is re-checked and replaced)."""

from __future__ import annotations

import json

import pytest

from ffa_jax.privacy import accounting, sigma_cache

ARGS = dict(target_epsilon=4.0, delta=1e-5, sampling_rate=0.05, steps=40)


@pytest.fixture
def memo(tmp_path, monkeypatch):
    monkeypatch.setenv(sigma_cache.ENV, str(tmp_path))
    accounting._calibrate_cached.cache_clear()  # a fresh process, as far as the memo goes
    yield tmp_path / sigma_cache.FILE_NAME
    accounting._calibrate_cached.cache_clear()


def _count_evaluations(monkeypatch) -> list[float]:
    seen: list[float] = []
    original = accounting._MemoAccountant._compute_epsilon

    def counting(self, num_updates, dp_params):
        seen.append(float(dp_params.noise_multipliers))
        return original(self, num_updates, dp_params)

    monkeypatch.setattr(accounting._MemoAccountant, "_compute_epsilon", counting)
    return seen


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_second_calibration_reuses_the_remembered_sigma(memo, monkeypatch, accountant):
    evaluations = _count_evaluations(monkeypatch)
    first = accounting.calibrate_noise_multiplier(**ARGS, accountant=accountant)
    searched = len(evaluations)
    assert memo.exists() and searched > 3
    accounting._calibrate_cached.cache_clear()  # as a new process would start
    evaluations.clear()
    again = accounting.calibrate_noise_multiplier(**ARGS, accountant=accountant)
    assert again == first
    assert evaluations == [first]  # one check of the remembered value, no search
    eps = accounting.epsilon_spent(first, ARGS["sampling_rate"], ARGS["steps"], 1e-5, accountant)
    assert (1 - accounting.CALIBRATION_RTOL) * 4.0 <= eps <= 4.0


def test_a_tampered_sigma_is_rechecked_and_replaced(memo, monkeypatch):
    good = accounting.calibrate_noise_multiplier(**ARGS)
    data = json.loads(memo.read_text())
    # The PLD search starts from the RDP sigma, which is remembered too.
    (key,) = [k for k, v in data.items() if v["params"]["accountant"] == "pld"]
    data[key]["sigma"] = good * 0.5  # would overspend epsilon
    memo.write_text(json.dumps(data))
    accounting._calibrate_cached.cache_clear()
    assert accounting.calibrate_noise_multiplier(**ARGS) == pytest.approx(good, rel=1e-9)
    assert json.loads(memo.read_text())[key]["sigma"] == pytest.approx(good, rel=1e-9)
    # Too much noise (epsilon far below the target) is not accepted either.
    data[key]["sigma"] = good * 3
    memo.write_text(json.dumps(data))
    accounting._calibrate_cached.cache_clear()
    assert accounting.calibrate_noise_multiplier(**ARGS) == pytest.approx(good, rel=1e-9)


def test_unreadable_memo_and_off_switch(memo, monkeypatch):
    memo.write_text("not json")
    sigma = accounting.calibrate_noise_multiplier(**ARGS)
    assert json.loads(memo.read_text())  # rewritten
    monkeypatch.setenv(sigma_cache.ENV, "0")
    assert sigma_cache.cache_file() is None
    accounting._calibrate_cached.cache_clear()
    assert accounting.calibrate_noise_multiplier(**ARGS) == pytest.approx(sigma, rel=1e-9)


def test_key_separates_every_parameter():
    base = dict(epsilon=4.0, delta=1e-5, q=0.05, steps=40, accountant="pld", truncation=None)
    keys = {sigma_cache.key_of(base)}
    for field, other in (
        ("epsilon", 2.0),
        ("delta", 1e-6),
        ("q", 0.1),
        ("steps", 41),
        ("accountant", "rdp"),
        ("truncation", [1000, 105]),
    ):
        keys.add(sigma_cache.key_of({**base, field: other}))
    assert len(keys) == 7
