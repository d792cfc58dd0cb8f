"""The README's evidence results: one verdict table, generated from the committed ``runs.csv``.

For every evidence grid (:data:`GRIDS`) and every claim it states, one row per condition (the
other axes' values): the number of seed pairs, both methods' mean test metric at the
validation-selected round, the mean paired difference with its 95% interval, win counts and the
verdict of :func:`ffa_jax.experiments.stats.verdict` (the same numbers as the grid's
``table.md``, :func:`ffa_jax.experiments.evidence.claim_rows`). A grid whose reported runs are
not all committed yet gets a status line instead of numbers: a verdict on part of the seeds
is not one.

    python -m ffa_jax.experiments.readme           # rewrite the block in README.md
    python -m ffa_jax.experiments.readme --check   # exit 1 if README.md's block is stale

Run from the repository root (grid files name their base configs relative to it). The block
sits between :data:`BEGIN` and :data:`END`; a test regenerates it and compares, so every number
in the README's results table comes from the committed CSVs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ffa_jax.experiments import evidence
from ffa_jax.experiments import grid as grid_lib
from ffa_jax.experiments import results as results_lib
from ffa_jax.fileio import atomic_write_text

GRIDS = (
    "privacy_evidence",
    "heterogeneity_evidence",
    "alpha_evidence",
    "rank_evidence",
    "vision_evidence",
)
BEGIN = "<!-- evidence-results:begin (python -m ffa_jax.experiments.readme writes this block) -->"
END = "<!-- evidence-results:end -->"
RESULTS = Path("experiments/results")
GRIDS_DIR = Path("experiments/grids")


def grid_rows(
    name: str, results: Path = RESULTS, grids: Path = GRIDS_DIR, *, quick: bool = False
) -> list[list[str]]:
    """The table rows of one grid: a status row until all its reported runs are in its
    ``runs.csv``, then one row per claim and condition. ``quick``: the grid's ``--quick``
    results (``NAME-quick``; CI size, for tests)."""
    grid = grid_lib.load_grid(grids / f"{name}.yaml", quick=quick)
    n_main, n_tune = len(grid_lib.main_cells(grid, None)), len(grid_lib.tune_cells(grid))
    folder = results / (name + ("-quick" if quick else ""))
    path = folder / "runs.csv"
    main = (
        [r for r in evidence.read_runs_csv(path) if r["stage"] == "main"] if path.is_file() else []
    )
    if len(main) < n_main:
        # No counts of the cells committed so far: the block changes only when a grid
        # finishes (its runs.csv is committed), not with every cell a session commits.
        status = f"not finished ({n_tune} tuning + {n_main} reported runs)"
        return [[f"`{name}`", status, *["-"] * 6]]
    link = f"[`{name}`]({folder / 'table.md'})"
    rows = []
    for claim in grid.claims:
        for where, p, verdict, _ in evidence.claim_rows(grid, claim, main):
            condition = ", ".join(
                f"{grid_lib.short(a)} {grid_lib.axis_label(a, v)}" for a, v in where
            )
            rows.append(
                [
                    link,
                    f"{claim['name']}: {condition}" if condition else claim["name"],
                    str(p.n),
                    "-" if p.n == 0 else f"{p.mean_better:.3f}",
                    "-" if p.n == 0 else f"{p.mean_worse:.3f}",
                    "-" if p.half is None else f"{p.diff:+.3f} ± {p.half:.3f}",
                    f"{p.wins} / {p.losses} / {p.ties}",
                    f"**{verdict}**",
                ]
            )
    return rows


def block(results: Path = RESULTS, grids: Path = GRIDS_DIR, names=GRIDS) -> str:
    """The generated block, markers included."""
    header = [
        "experiment",
        "claim: condition",
        "pairs",
        "A",
        "B",
        "paired difference A - B (95% CI)",
        "seeds A > B / A < B / ties",
        "verdict",
    ]
    rows = [row for name in names for row in grid_rows(name, results, grids)]
    return "\n".join(
        [
            BEGIN,
            "",
            "Test balanced accuracy at each run's validation-selected round, 10 paired seeds "
            "per condition. A and B are the two sides a claim compares: FFA-LoRA and LoRA "
            "(*beats*: reproduced when the 95% interval of A - B is above 0, not reproduced "
            "when below); the FFA-LoRA - LoRA gap at the later and the earlier condition "
            "(*gap grows*: the same rule); one method at two values of an axis (*depends*: "
            "reproduced when the interval excludes 0 and is not within the claim's margin, "
            "not reproduced when within it; *insensitive*: the reverse). Otherwise "
            "inconclusive. Each grid's `table.md` states its claims' rules and margins.",
            "",
            results_lib.md_table(header, rows),
            "",
            END,
        ]
    )


def replace_block(text: str, new_block: str) -> str:
    """``text`` with its block (markers included) replaced by ``new_block``.

    Raises:
      ValueError: the markers are missing or out of order.
    """
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README.md has no results block: add the lines {BEGIN!r} and {END!r}.")
    return text[:start] + new_block + text[end + len(END) :]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--readme", type=Path, default=Path("README.md"))
    p.add_argument("--check", action="store_true", help="exit 1 if the block is stale")
    args = p.parse_args(argv)
    text = args.readme.read_text()
    new = replace_block(text, block())
    if args.check:
        if new != text:
            print(f"{args.readme}: the results block is stale; run python -m {__name__}")
            return 1
        return 0
    if new != text:
        atomic_write_text(args.readme, new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
