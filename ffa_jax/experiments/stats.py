"""Statistics of the evidence method: means with 95% t intervals, paired differences across
seeds with their interval and win counts, and a verdict per claim. Pure numpy with a table of
Student t quantiles (scipy is not a dependency of ffa_jax).

Every claim is judged on per-seed paired differences ``d_s`` (the same seed gives every cell
the same split, partition, frozen A and data order), their mean and its 95% t interval
``[lo, hi]``. What ``d_s`` is depends on the claim's kind (:data:`CLAIM_RULES`):

* ``beats``: ``d_s = metric(better, s) - metric(worse, s)``;
* ``gap_grows``: the change of that gap between two conditions, ``d_s = gap_s(to) -
  gap_s(from)`` (a difference in differences);
* ``depends`` / ``insensitive``: one method at two values of an axis, ``d_s = metric(v1, s)
  - metric(v2, s)``, judged two-sided against an equivalence margin ``m`` stated in the grid.

With at least ``min_pairs`` pairs (else **inconclusive**):

* ``beats``, ``gap_grows``: **reproduced** when ``lo > 0``; **not reproduced** when ``hi <
  margin`` (with the default margin 0: the opposite holds significantly); else inconclusive.
* ``depends``: **not reproduced** when ``-m < lo`` and ``hi < m`` (any effect is smaller than
  the margin); **reproduced** when the interval excludes 0 otherwise; else inconclusive.
* ``insensitive``: the complement: reproduced when ``-m < lo`` and ``hi < m``; not
  reproduced when the interval excludes 0 otherwise; else inconclusive.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

# t_{0.975, df}, df = 1..30 (Student t; 4 decimals), then 40, 60, 120 and the normal limit.
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip
_T975_TAIL = ((30, 2.0423), (40, 2.0211), (60, 2.0003), (120, 1.9799), (math.inf, 1.9600))

VERDICTS = ("reproduced", "not reproduced", "inconclusive")


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (exact to 4 decimals
    for df <= 30; linear in 1/df between 30, 40, 60, 120 and infinity beyond)."""
    if df < 1:
        raise ValueError(f"df={df} must be >= 1")
    if df <= len(_T975):
        return _T975[df - 1]
    for (d0, t0), (d1, t1) in zip(_T975_TAIL, _T975_TAIL[1:], strict=False):
        if d0 <= df <= d1:
            x0, x1, x = 1 / d0, (0.0 if math.isinf(d1) else 1 / d1), 1 / df
            return t0 + (t1 - t0) * (x - x0) / (x1 - x0)
    return 1.96


def mean_ci(values: Sequence[float]) -> tuple[float, float | None]:
    """``(mean, half-width of the 95% t interval of the mean)``: ``t_{0.975, n-1} * s /
    sqrt(n)`` with the sample standard deviation ``s``; the half-width is None for n < 2 and
    the mean NaN for n = 0."""
    x = np.asarray(values, np.float64)
    if len(x) == 0:
        return math.nan, None
    if len(x) < 2:
        return float(x[0]), None
    return float(x.mean()), float(t975(len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))


@dataclasses.dataclass(frozen=True)
class Paired:
    """The paired comparison of two methods over the seeds both have.

    Attributes:
      n: number of pairs (seeds present, with a finite value, for both).
      mean_better / mean_worse: the two methods' means over those seeds.
      diff: mean of ``better - worse``; ``half``: half-width of its 95% t interval (None
        for n < 2).
      wins / losses / ties: seeds where ``better`` is above / below / equal to ``worse``.
    """

    n: int
    mean_better: float
    mean_worse: float
    diff: float
    half: float | None
    wins: int
    losses: int
    ties: int

    @property
    def interval(self) -> tuple[float, float] | None:
        if self.half is None:
            return None
        return self.diff - self.half, self.diff + self.half


def paired(better: Mapping[int, float], worse: Mapping[int, float]) -> Paired:
    """Pairs ``better[seed]`` with ``worse[seed]`` over the seeds both hold (finite values
    only) and summarises the differences ``better - worse``."""
    seeds = sorted(
        s
        for s in set(better) & set(worse)
        if better[s] is not None
        and worse[s] is not None
        and math.isfinite(better[s])
        and math.isfinite(worse[s])
    )
    a = np.array([better[s] for s in seeds], np.float64)
    b = np.array([worse[s] for s in seeds], np.float64)
    d = a - b
    diff, half = mean_ci(d)
    return Paired(
        n=len(seeds),
        mean_better=float(a.mean()) if len(a) else math.nan,
        mean_worse=float(b.mean()) if len(b) else math.nan,
        diff=diff,
        half=half,
        wins=int((d > 0).sum()),
        losses=int((d < 0).sum()),
        ties=int((d == 0).sum()),
    )


def verdict(
    p: Paired, *, min_pairs: int = 10, margin: float = 0.0, kind: str = "beats"
) -> tuple[str, str]:
    """``(verdict, the statistic that says so)`` for a claim of ``kind`` on its paired
    differences ``p`` (see the module docstring; ``margin``: the equivalence margin of
    ``depends`` / ``insensitive``, or the bound of "not reproduced" for the others)."""
    if kind not in CLAIM_RULES:
        raise ValueError(f"kind={kind!r}: use one of {tuple(CLAIM_RULES)}")
    if p.n < min_pairs or p.interval is None:
        return "inconclusive", f"{p.n} paired seeds (< {min_pairs})"
    lo, hi = p.interval
    stat = f"paired difference {p.diff:+.3f}, 95% CI [{lo:+.3f}, {hi:+.3f}], n={p.n}"
    if kind in EQUIVALENCE_KINDS:
        if margin <= 0:
            raise ValueError(f"kind={kind!r} needs an equivalence margin > 0, not {margin}")
        within = -margin < lo and hi < margin
        excludes_zero = lo > 0 or hi < 0
        if within:
            v = "not reproduced" if kind == "depends" else "reproduced"
            return v, stat + f" (within +-{margin:g})"
        if excludes_zero:
            v = "reproduced" if kind == "depends" else "not reproduced"
            return v, stat + " (excludes 0)"
        return "inconclusive", stat + f" (contains 0, not within +-{margin:g})"
    if lo > 0:
        return "reproduced", stat + " (above 0)"
    if hi < margin:
        return "not reproduced", stat + (" (below 0)" if margin == 0 else f" (below {margin:g})")
    return "inconclusive", stat + " (contains 0)"


# The kinds that compare one method at two axis values, two-sided against a margin.
EQUIVALENCE_KINDS = ("depends", "insensitive")
# How each claim kind reads its interval, in words (table.md and the README say it).
CLAIM_RULES = {
    "beats": "reproduced when the 95% interval of the mean paired difference is above 0, not "
    "reproduced when it is below 0, else inconclusive",
    "gap_grows": "reproduced when the 95% interval of the mean change in the paired gap is "
    "above 0, not reproduced when it is below 0, else inconclusive",
    "depends": "reproduced when the 95% interval of the mean paired difference excludes 0 and "
    "does not lie within +-margin, not reproduced when it lies within +-margin (no effect as "
    "large as the margin), else inconclusive",
    "insensitive": "reproduced when the 95% interval of the mean paired difference lies "
    "within +-margin, not reproduced when it excludes 0 otherwise, else inconclusive",
}
