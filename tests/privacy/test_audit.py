"""One-run privacy audit: the empirical lower bound stays below the accounted epsilon for the
real noise step, and exceeds it when the noise is switched off while epsilon is still claimed."""

import dp_accounting
import jax
import numpy as np
import pytest

from ffa_jax.errors import ConfigError
from ffa_jax.privacy import accounting, audit

STEPS, DELTA = 4, 1e-5


def _accounted(sigma):
    acc = accounting.make_accountant("pld")
    acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(sigma), STEPS))
    return acc.get_epsilon(DELTA)


# (m, r, v, delta, confidence) -> the bound of ffa_jax's own Steinke-Nasr-Jagielski p-value
# and bisection (60 halvings, commit b32e8b0), recorded before it was replaced by
# jax_privacy.auditing.CanaryScoreAuditor.epsilon_one_run (brentq, xtol 1e-6).
OLD_BOUNDS = [
    (4, 2, 0, 1e-5, 0.95, 0.0),
    (4, 2, 1, 1e-5, 0.95, 0.0),
    (4, 2, 2, 1e-3, 0.9, 0.0),
    (200, 100, 0, 1e-5, 0.95, 0.0),
    (200, 100, 50, 1e-5, 0.95, 0.0),
    (200, 100, 75, 1e-5, 0.95, 0.7016673185774623),
    (200, 100, 75, 1e-6, 0.99, 0.5557026263173148),
    (200, 100, 75, 1e-3, 0.9, 0.7429653099640784),
    (200, 100, 98, 1e-5, 0.95, 2.7207547241404395),
    (200, 100, 98, 1e-6, 0.99, 2.422686599008296),
    (200, 100, 99, 1e-3, 0.9, 2.966475331691761),
    (200, 100, 100, 1e-5, 0.95, 3.487464114967159),
    (200, 100, 100, 1e-6, 0.99, 3.053640147842246),
    (200, 100, 100, 1e-3, 0.9, 3.3281406228055515),
    (1000, 200, 100, 1e-5, 0.95, 0.0),
    (1000, 200, 150, 1e-5, 0.95, 0.8199729121700011),
    (1000, 200, 150, 1e-6, 0.99, 0.7153701900581731),
    (1000, 200, 198, 1e-3, 0.9, 2.4717436383709415),
    (1000, 200, 199, 1e-5, 0.95, 3.7109596341469757),
    (1000, 200, 200, 1e-5, 0.95, 4.16649017670451),
    (1000, 200, 200, 1e-6, 0.99, 3.7535594408638713),
    (1000, 200, 200, 1e-3, 0.9, 2.6002339608479565),
    (1000, 100, 75, 1e-3, 0.9, 0.48669159428543357),
    (1000, 100, 98, 1e-5, 0.95, 2.7109629220070395),
    (1000, 100, 99, 1e-6, 0.99, 2.6696237313357387),
    (1000, 100, 100, 1e-5, 0.95, 3.4653763478110453),
]


@pytest.mark.parametrize("m, r, v, delta, confidence, old", OLD_BOUNDS)
def test_library_bound_equals_the_old_hand_written_one(m, r, v, delta, confidence, old):
    # Same statistic (Theorem 5.2 of Steinke et al., two-sided guesses as correctness scores):
    # only the root finder differs (brentq to 1e-6 vs bisection to ~1e-16).
    assert audit.epsilon_lower_bound(m, r, v, delta, confidence) == pytest.approx(old, abs=2e-6)


def test_bound_behaves():
    # Perfect guessing of many canaries is strong evidence; coin-flip guessing is none.
    assert audit.epsilon_lower_bound(1000, 200, 200, DELTA) > 3.0
    assert audit.epsilon_lower_bound(1000, 200, 100, DELTA) == 0.0
    # More correct guesses never lower the bound.
    bounds = [audit.epsilon_lower_bound(1000, 200, v, DELTA) for v in (120, 150, 180)]
    assert bounds == sorted(bounds)


@pytest.mark.parametrize("m, r, v", [(10, 10, 10), (10, 11, 5), (10, 4, 5)])
def test_bound_refuses_impossible_counts(m, r, v):
    # The library's auditor needs one canary left unguessed (a held-out side): r < m.
    with pytest.raises(ConfigError, match="r < m"):
        audit.epsilon_lower_bound(m, r, v, DELTA)


def test_guess_and_count_on_fixed_scores():
    scores = np.array([0.9, -1.2, 0.3, 2.0, -0.4, 1.1, -2.2, 0.0])
    included = np.array([True, False, False, True, True, True, False, False])
    # "in" for 0.9, 1.1, 2.0 (all included); "out" for -2.2, -1.2 (excluded) and -0.4 (included).
    assert audit.guess_and_count(scores, included, 3, 3) == (6, 5)


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


# gradient_canary_audit at the RDP sigma of epsilon 2 over 4 steps (seeds 0, 1, 2) and without
# noise (seed 0): (correct of 200, bound) of the old hand-written bound (commit b32e8b0).
OLD_AUDITS = [
    (0, 1.0, 130, 0.3652571170734879),
    (1, 1.0, 144, 0.6755095452100411),
    (2, 1.0, 139, 0.5611045190091921),
    (0, 0.0, 200, 4.16649017670451),
]


@pytest.mark.parametrize("seed, noise, correct, bound", OLD_AUDITS)
def test_gradient_canary_audit_unchanged(seed, noise, correct, bound):
    sigma = accounting.calibrate_noise_multiplier(2.0, DELTA, 1.0, STEPS, "rdp")
    res = audit.gradient_canary_audit(
        noise_multiplier=noise * sigma, steps=STEPS, key=jax.random.key(seed), delta=DELTA
    )
    assert res.correct == correct
    assert res.epsilon_lower_bound == pytest.approx(bound, abs=2e-6)
