"""The evidence method's statistics on a small fixed table, against hand-computed values."""

from __future__ import annotations

import math

import pytest

from ffa_jax.experiments import stats

# Balanced accuracy of two methods on five paired seeds.
FFA = {0: 0.80, 1: 0.75, 2: 0.70, 3: 0.85, 4: 0.78}
LORA = {0: 0.70, 1: 0.72, 2: 0.71, 3: 0.75, 4: 0.70}


def test_t_quantiles():
    assert stats.t975(1) == 12.7062 and stats.t975(9) == 2.2622
    assert stats.t975(30) == 2.0423 and stats.t975(10**9) == pytest.approx(1.96, abs=1e-4)
    assert 2.0003 < stats.t975(50) < 2.0211  # between the 40 and 60 entries


def test_mean_ci_by_hand():
    mean, half = stats.mean_ci([0.80, 0.75, 0.70, 0.85, 0.78])
    # mean 0.776; deviations .024 -.026 -.076 .074 .004; sum of squares 0.01252;
    # s = sqrt(0.01252 / 4) = 0.0559464; half = 2.7764 * s / sqrt(5) = 0.0694650.
    assert mean == pytest.approx(0.776)
    assert half == pytest.approx(2.7764 * math.sqrt(0.01252 / 4) / math.sqrt(5))
    assert half == pytest.approx(0.069465, abs=1e-6)
    assert stats.mean_ci([0.5]) == (0.5, None)


def test_paired_difference_by_hand():
    p = stats.paired(FFA, LORA)
    # Differences: 0.10, 0.03, -0.01, 0.10, 0.08 -> mean 0.06; deviations .04 -.03 -.07 .04
    # .02, sum of squares 0.0094; s = sqrt(0.0094 / 4); half = 2.7764 * s / sqrt(5).
    assert p.n == 5 and p.diff == pytest.approx(0.06)
    assert p.half == pytest.approx(2.7764 * math.sqrt(0.0094 / 4) / math.sqrt(5))
    assert p.half == pytest.approx(0.0601905, abs=1e-6)
    assert (p.wins, p.losses, p.ties) == (4, 1, 0)
    assert p.mean_better == pytest.approx(0.776) and p.mean_worse == pytest.approx(0.716)
    # Only shared seeds with finite values are paired.
    q = stats.paired({**FFA, 9: 0.9}, {**LORA, 4: float("nan")})
    assert q.n == 4 and q.diff == pytest.approx((0.10 + 0.03 - 0.01 + 0.10) / 4)


def test_verdicts():
    p = stats.paired(FFA, LORA)
    # CI [-0.0002, 0.1202] contains 0 -> inconclusive; too few pairs at the default minimum.
    assert stats.verdict(p)[0] == "inconclusive" and "5 paired seeds" in stats.verdict(p)[1]
    v, why = stats.verdict(p, min_pairs=5)
    assert v == "inconclusive" and "contains 0" in why
    ten_a = {s: 0.8 + 0.01 * (s % 3) for s in range(10)}
    ten_b = {s: 0.7 for s in range(10)}
    assert stats.verdict(stats.paired(ten_a, ten_b))[0] == "reproduced"
    assert stats.verdict(stats.paired(ten_b, ten_a))[0] == "not reproduced"


def _p(diff: float, half: float, n: int = 10) -> stats.Paired:
    return stats.Paired(n, 0.8, 0.8 - diff, diff, half, 0, 0, 0)


@pytest.mark.parametrize(
    ("diff", "half", "depends", "insensitive"),
    [
        (0.050, 0.010, "reproduced", "not reproduced"),  # [0.04, 0.06]: excludes 0
        (-0.050, 0.010, "reproduced", "not reproduced"),  # two-sided: either sign
        (0.005, 0.010, "not reproduced", "reproduced"),  # [-0.005, 0.015] within 0.02
        (0.012, 0.005, "not reproduced", "reproduced"),  # [0.007, 0.017]: small, within
        (0.010, 0.030, "inconclusive", "inconclusive"),  # [-0.02, 0.04]: wide
        (0.030, 0.015, "reproduced", "not reproduced"),  # [0.015, 0.045]: past the margin
    ],
)
def test_two_sided_verdicts_against_the_equivalence_margin(diff, half, depends, insensitive):
    p = _p(diff, half)
    assert stats.verdict(p, kind="depends", margin=0.02)[0] == depends
    assert stats.verdict(p, kind="insensitive", margin=0.02)[0] == insensitive
    # Too few pairs decides nothing, whatever the interval.
    assert stats.verdict(_p(diff, half, n=9), kind="depends", margin=0.02)[0] == "inconclusive"


def test_verdict_needs_a_known_kind_and_a_margin_for_two_sided_claims():
    with pytest.raises(ValueError, match="kind="):
        stats.verdict(_p(0.1, 0.01), kind="grows")
    with pytest.raises(ValueError, match="margin"):
        stats.verdict(_p(0.1, 0.01), kind="insensitive")
    # gap_grows reads its interval as beats does.
    assert stats.verdict(_p(0.05, 0.01), kind="gap_grows")[0] == "reproduced"
    assert stats.verdict(_p(-0.05, 0.01), kind="gap_grows")[0] == "not reproduced"
