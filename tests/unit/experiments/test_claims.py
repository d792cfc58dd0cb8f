"""The claims a grid states, checked on small fixed tables: a difference-in-differences for
"the lead grows", a two-sided contrast with a margin for "depends" / "insensitive", and clear
errors for a malformed claim before anything runs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from ffa_jax.errors import ConfigError
from ffa_jax.experiments import evidence
from ffa_jax.experiments import grid as grid_lib

ROOT = Path(__file__).resolve().parents[3]

GRID = """\
description: claims test grid
kind: train
base: {base}
select_on: validation
set:
  - data.validation_fraction=0.1
seeds: [0, 1, 2]
axes:
  lora.mode: [ffa, lora]
  privacy.epsilon: [inf, 8, 1]
  lora.alpha: [1, 64]
claims:
{claims}
"""

GROWS = """\
  - name: the lead grows
    kind: gap_grows
    axis: lora.mode
    better: ffa
    worse: lora
    along: {privacy.epsilon: [8, 1]}
    at: {lora.alpha: [1]}
"""
DEPENDS = """\
  - name: LoRA depends on alpha
    kind: depends
    axis: lora.alpha
    between: [1, 64]
    at: {lora.mode: [lora], privacy.epsilon: [8]}
    margin: 0.02
"""


def _grid(tmp_path: Path, claims: str):
    path = tmp_path / "claims_test.yaml"
    path.write_text(GRID.format(base=ROOT / "configs/quickstart.yaml", claims=claims))
    return grid_lib.load_grid(path)


# Test balanced accuracy per (mode, epsilon, alpha) and seed 0, 1, 2.
TABLE = {
    ("ffa", "8", "1"): [0.80, 0.82, 0.78],
    ("lora", "8", "1"): [0.75, 0.80, 0.70],
    ("ffa", "1", "1"): [0.78, 0.79, 0.74],
    ("lora", "1", "1"): [0.60, 0.72, 0.58],
    ("lora", "8", "64"): [0.70, 0.74, 0.69],
}


def _rows() -> list[dict[str, str]]:
    rows = []
    for (mode, eps, alpha), values in TABLE.items():
        for seed, v in enumerate(values):
            rows.append(
                {
                    "stage": "main",
                    "seed": str(seed),
                    "status": "ok",
                    "lora.mode": mode,
                    "privacy.epsilon": eps,
                    "lora.alpha": alpha,
                    "selected_test_balanced_accuracy": str(v),
                }
            )
    return rows


def test_gap_grows_is_a_paired_difference_in_differences(tmp_path):
    grid = _grid(tmp_path, GROWS)
    [claim] = grid.claims
    assert claim["kind"] == "gap_grows" and claim["along"] == ("privacy.epsilon", "8", "1")
    [(where, p, verdict, _)] = evidence.claim_rows(grid, claim, _rows())
    assert where == (("privacy.epsilon", "8 → 1"), ("lora.alpha", "1"))
    # Gaps at epsilon 1: 0.18, 0.07, 0.16; at 8: 0.05, 0.02, 0.08; changes 0.13, 0.05, 0.08.
    assert p.n == 3
    assert p.mean_better == pytest.approx((0.18 + 0.07 + 0.16) / 3)
    assert p.mean_worse == pytest.approx((0.05 + 0.02 + 0.08) / 3)
    assert p.diff == pytest.approx((0.13 + 0.05 + 0.08) / 3)
    sd = math.sqrt(sum((d - 0.26 / 3) ** 2 for d in (0.13, 0.05, 0.08)) / 2)
    assert p.half == pytest.approx(4.3027 * sd / math.sqrt(3))
    assert (p.wins, p.losses) == (3, 0)
    assert verdict == "inconclusive"  # 3 pairs < 10
    text = "\n".join(evidence.claims_section(grid, _rows()))
    assert "A = FFA-LoRA - LoRA at epsilon 1, B = FFA-LoRA - LoRA at epsilon 8" in text
    assert "| 8 → 1 | 1 | 3 | 0.137 | 0.050 | +0.087 ± " in text


def test_depends_contrasts_one_method_at_two_axis_values(tmp_path):
    grid = _grid(tmp_path, DEPENDS)
    [claim] = grid.claims
    assert (claim["better"], claim["worse"], claim["margin"]) == ("1", "64", 0.02)
    [(where, p, _, why)] = evidence.claim_rows(grid, claim, _rows())
    assert where == (("lora.mode", "lora"), ("privacy.epsilon", "8"))
    # LoRA at epsilon 8: alpha 1 minus alpha 64 = 0.05, 0.06, 0.01.
    assert p.n == 3 and p.diff == pytest.approx(0.04)
    assert "3 paired seeds" in why
    text = "\n".join(evidence.claims_section(grid, _rows()))
    assert "A = alpha 1, B = alpha 64" in text and "within ±0.02" in text


@pytest.mark.parametrize(
    ("claims", "message"),
    [
        (GROWS.replace("gap_grows", "grows"), "kind='grows'"),
        (GROWS.replace("[8, 1]", "[8, 2]"), "along="),
        (GROWS.replace("{privacy.epsilon: [8, 1]}", "{lora.mode: [ffa, lora]}"), "along="),
        (GROWS.replace("    at: {lora.alpha: [1]}\n", "    at: {privacy.epsilon: [8]}\n"), ".at"),
        (GROWS.replace("kind: gap_grows", "kind: beats"), "only for kind gap_grows"),
        (DEPENDS.replace("    margin: 0.02\n", ""), "equivalence margin"),
        (DEPENDS.replace("margin: 0.02", "margin: 2"), "equivalence margin"),
        (DEPENDS.replace("[1, 64]", "[1, 1]"), "between="),
        (DEPENDS.replace("[1, 64]", "[1, 8]"), "between="),
        (DEPENDS + "    better: 1\n", "drop better/worse"),
        (DEPENDS.replace("kind: depends", "kind: beats"), "only for depends"),
    ],
)
def test_a_malformed_claim_is_refused_by_name(tmp_path, claims, message):
    with pytest.raises(ConfigError, match="claims\\[0\\]") as e:
        _grid(tmp_path, claims)
    assert message in str(e.value)


def test_the_committed_grids_state_the_papers_trend_and_sensitivity_claims():
    kinds = {}
    for name in ("privacy_evidence", "heterogeneity_evidence", "alpha_evidence"):
        grid = grid_lib.load_grid(ROOT / "experiments/grids" / f"{name}.yaml")
        kinds[name] = [c["kind"] for c in grid.claims]
    assert kinds["privacy_evidence"] == ["beats", "gap_grows", "gap_grows"]
    assert kinds["heterogeneity_evidence"] == ["beats", "gap_grows", "gap_grows"]
    assert kinds["alpha_evidence"] == ["beats", "depends", "insensitive"]


def test_a_diverged_run_counts_by_its_early_stopped_model(tmp_path):
    """A diverged reported run with a validation-selected round before the divergence is
    paired by that model's test metric (no survivorship bias); one that diverged before any
    validation has no metric and drops out of the pairs, and the table counts both."""
    grid = _grid(tmp_path, DEPENDS)
    rows = _rows()
    for r in rows:
        if (r["lora.mode"], r["privacy.epsilon"], r["lora.alpha"], r["seed"]) == (
            "lora",
            "8",
            "64",
            "2",
        ):
            r["status"] = "diverged"  # kept its round-12 model: 0.69
    [(_, p, _, _)] = evidence.claim_rows(grid, grid.claims[0], rows)
    assert p.n == 3 and p.diff == pytest.approx(0.04)
    rows[-1]["selected_test_balanced_accuracy"] = ""  # diverged before any validation
    [(_, p, _, _)] = evidence.claim_rows(grid, grid.claims[0], rows)
    assert p.n == 2


def test_runs_csv_and_the_table_carry_per_class_recall(tmp_path):
    grid = _grid(tmp_path, DEPENDS)
    cell = {
        "stage": "main",
        "cell_id": "x",
        "seed": 0,
        "status": "ok",
        "axes": {"lora.mode": "lora", "privacy.epsilon": "8", "lora.alpha": "1"},
        "selected_test_recall_per_class": [0.9, 0.7],
    }
    assert evidence.csv_row(grid, cell)["selected_test_recall_per_class"] == "0.9;0.7"
    blank = dict.fromkeys(evidence.fieldnames(grid), "")
    base = [{**blank, **r} for r in _rows()[:2]]
    rows = [
        {**r, "selected_test_recall_per_class": rec}
        for r, rec in zip(base, ["0.9;0.7", "0.8;0.6"], strict=True)
    ]
    assert "| 0.850 / 0.650 |" in evidence.results_table(grid, rows)
    # A runs.csv from before the column shows "-".
    assert "| - |" in evidence.results_table(grid, base)
