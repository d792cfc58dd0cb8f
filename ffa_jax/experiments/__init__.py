"""Experiment grids reproducing the paper's claims: ``ffa-jax experiment NAME``.

:mod:`~ffa_jax.experiments.grid` expands ``experiments/grids/NAME.yaml`` into cells,
:mod:`~ffa_jax.experiments.runner` runs the missing ones and writes ``experiments/results/NAME/``,
:mod:`~ffa_jax.experiments.results` and :mod:`~ffa_jax.experiments.plots` turn the cell files
into ``runs.csv``, ``table.md`` and PNGs, and :mod:`~ffa_jax.experiments.probes` measures what
a plain training run does not log (the paper's Figure 1 noise terms, Theorem 1's equivalence).
"""

from ffa_jax.experiments.grid import Cell, Grid, load_grid
from ffa_jax.experiments.runner import run_experiment

__all__ = ["Cell", "Grid", "load_grid", "run_experiment"]
