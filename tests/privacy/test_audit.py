"""One-run privacy audit: the empirical lower bound stays below the accounted epsilon for the
real noise step, and exceeds it when the noise is switched off while epsilon is still claimed."""

import dp_accounting
import jax
import pytest

from ffa_jax.privacy import accounting, audit

STEPS, DELTA = 4, 1e-5


def _accounted(sigma):
    acc = accounting.make_accountant("pld")
    acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(sigma), STEPS))
    return acc.get_epsilon(DELTA)


def test_p_value_and_bound_behave():
    # Perfect guessing of many canaries is strong evidence; coin-flip guessing is none.
    assert audit.epsilon_lower_bound(1000, 200, 200, DELTA) > 3.0
    assert audit.epsilon_lower_bound(1000, 200, 100, DELTA) == 0.0
    # More correct guesses never lower the bound; a higher epsilon never lowers the p-value.
    bounds = [audit.epsilon_lower_bound(1000, 200, v, DELTA) for v in (120, 150, 180)]
    assert bounds == sorted(bounds)
    assert audit.p_value(1000, 200, 150, 0.5, DELTA) < audit.p_value(1000, 200, 150, 1.0, DELTA)


@pytest.mark.parametrize("seed", [0, 1])
def test_audit_of_the_real_noise_stays_below_the_accounted_epsilon(seed):
    sigma = accounting.calibrate_noise_multiplier(2.0, DELTA, 1.0, STEPS, "rdp")
    claimed = _accounted(sigma)
    res = audit.gradient_canary_audit(
        noise_multiplier=sigma, steps=STEPS, key=jax.random.key(seed), delta=DELTA
    )
    assert res.guesses == 200 and res.correct > 100  # the canaries leak something...
    assert res.epsilon_lower_bound <= claimed  # ...but never more than accounted


def test_audit_detects_a_mechanism_without_noise():
    sigma = accounting.calibrate_noise_multiplier(2.0, DELTA, 1.0, STEPS, "rdp")
    claimed = _accounted(sigma)
    broken = audit.gradient_canary_audit(
        noise_multiplier=0.0, steps=STEPS, key=jax.random.key(0), delta=DELTA
    )
    assert broken.correct == broken.guesses
    assert broken.epsilon_lower_bound > claimed  # the violation is detected
