"""Cells that are the same run in two grids run once: the runner copies the finished record
(named by its resolved config's fingerprint) instead of training again, and says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ffa_jax.config import load_config
from ffa_jax.experiments import grid as grid_lib
from ffa_jax.experiments import runner

ROOT = Path(__file__).resolve().parents[3]
TEMPLATE = next(
    iter(sorted((ROOT / "experiments/results/privacy_evidence_pilot/cells").glob("main_*.json")))
)

GRID = """\
description: reuse test grid {name}
kind: train
base: {base}
select_on: validation
set:
  - data.validation_fraction=0.1
  - federated.rounds=3
seeds: [0]
axes:
  {axis}: {values}
"""


def _grid(tmp: Path, name: str, axis: str, values: str) -> Path:
    path = tmp / f"{name}.yaml"
    base = ROOT / "configs/quickstart.yaml"
    path.write_text(GRID.format(name=name, base=base, axis=axis, values=values))
    return path


@pytest.fixture
def fake_runs(monkeypatch):
    """Replaces training with a record whose score identifies the cell that ran it."""
    ran: list[str] = []
    template = json.loads(TEMPLATE.read_text())

    def fake(grid, cell, extra, scratch, log):
        ran.append(f"{grid.name}:{cell.cell_id}")
        rec = dict(template)
        rec["selected_val_balanced_accuracy"] = 0.5 + len(ran) / 100
        rec["wall_seconds"] = 100.0 + len(ran)
        return rec

    monkeypatch.setattr(runner, "run_cell", fake)
    return ran


def test_fingerprint_ignores_only_where_a_run_is_written():
    base = ROOT / "configs/quickstart.yaml"
    a = runner.run_fingerprint(load_config(base, ["name=a", "output_dir=/tmp/a"]), 2)
    b = runner.run_fingerprint(load_config(base, ["name=b", "output_dir=/tmp/b"]), 2)
    assert a == b
    # The same value reached through another override is the same run ...
    assert runner.run_fingerprint(load_config(base, ["lora.alpha=8.0"]), 2) == a
    # ... and any field that changes what is computed changes the fingerprint, as does the
    # CPU count (XLA:CPU's threads set the matmuls' float summation order).
    for o in ("seed=1", "privacy.noise_seed=0", "lora.alpha=16", "data.validation_fraction=0.1"):
        assert runner.run_fingerprint(load_config(base, [o]), 2) != a, o
    assert runner.run_fingerprint(load_config(base, []), 1) != a


def test_a_cell_finished_by_another_grid_is_copied_not_rerun(tmp_path, monkeypatch, fake_runs):
    monkeypatch.chdir(ROOT)
    results = tmp_path / "results"
    quiet = dict(scratch=tmp_path / "scratch", log=lambda *a: None)
    modes = _grid(tmp_path, "modes", "lora.mode", "[ffa, lora]")
    alphas = _grid(tmp_path, "alphas", "lora.alpha", "[8, 16]")

    res = runner.run_experiment(str(modes), out=results / "modes", **quiet)
    assert res["ran"] == 2 and res["reused"] == 0 and len(fake_runs) == 2

    # alpha=8 is the quickstart's alpha: that cell is modes' ffa cell (mode ffa is the default).
    logs: list[str] = []
    res = runner.run_experiment(
        str(alphas), out=results / "alphas", **{**quiet, "log": logs.append}
    )
    assert res["ran"] == 1 and res["reused"] == 1 and len(fake_runs) == 3
    assert fake_runs[-1].startswith("alphas:main,alpha=16")
    cells = {json.loads(p.read_text())["cell_id"]: p for p in (results / "alphas/cells").glob("*")}
    copy = json.loads(cells["main,alpha=8,seed=0"].read_text())
    source_path = next((results / "modes/cells").glob("main_mode-ffa*.json"))
    source = json.loads(source_path.read_text())
    assert copy["reused_from"] == source_path.as_posix()
    assert copy["fingerprint"] == source["fingerprint"]
    # The numbers, commit and run time are the source run's; the place in the grid is ours.
    for key in ("selected_val_balanced_accuracy", "wall_seconds", "commit", "history"):
        assert copy[key] == source[key], key
    assert copy["axes"] == {"lora.alpha": "8"} and source["axes"] == {"lora.mode": "ffa"}
    assert "lora.alpha=8" in copy["command"] and copy["command"] != source["command"]
    assert any("reused (the same run config) from" in line for line in logs)
    meta = json.loads((results / "alphas/meta.json").read_text())
    assert meta["cells_reused"] == 1
    assert (
        "1 of these runs have the same resolved config" in (results / "alphas/table.md").read_text()
    )

    # A rerun skips both; --no-reuse in a fresh folder runs everything.
    res = runner.run_experiment(str(alphas), out=results / "alphas", **quiet)
    assert res["ran"] == 0 and res["skipped"] == 2
    res = runner.run_experiment(str(alphas), out=results / "fresh", reuse=False, **quiet)
    assert res["ran"] == 2 and res["reused"] == 0 and len(fake_runs) == 5


def test_the_evidence_grids_share_their_epsilon_4_label_mix_tuning_runs(monkeypatch):
    """The tuning runs at label mix, epsilon 4 and rank 8 (2 methods x 4 rates x 4 alphas)
    are one run in the privacy, heterogeneity and rank grids: 32 runs x 3 grids, so 64 are
    copies."""
    monkeypatch.chdir(ROOT)
    owners: dict[str, list[str]] = {}
    for name in ("privacy_evidence", "heterogeneity_evidence", "alpha_evidence", "rank_evidence"):
        grid = grid_lib.load_grid(grid_lib.find_grid(name))
        for cell in grid_lib.tune_cells(grid):
            fp = runner.run_fingerprint(grid_lib.cell_config(grid, cell, []), 1)
            owners.setdefault(fp, []).append(f"{name}:{cell.cell_id}")
    shared = [v for v in owners.values() if len(v) > 1]
    assert len(shared) == 32 and all(len(v) == 3 for v in shared)
    assert all("epsilon=4" in v[0] and "label_mix" in v[1] and "rank=8" in v[2] for v in shared)


def test_a_worker_skips_cells_another_worker_holds(tmp_path, monkeypatch, fake_runs):
    """Worker mode (in-process, training faked): a cell whose claim a live process holds is
    left to it; once released, the next pass runs it. Cells record the worker's CPUs, and their
    command starts with the taskset that reproduces them."""
    from ffa_jax.experiments import workers

    monkeypatch.chdir(ROOT)
    grid = _grid(tmp_path, "modes", "lora.mode", "[ffa, lora]")
    out, scratch = tmp_path / "results" / "modes", tmp_path / "scratch"
    kw = dict(out=out, scratch=scratch, worker=(0, 2), log=lambda *a: None)
    held = scratch / ".claims" / f"{_stem(grid, 'lora')}.claim"
    assert workers.claim(held)  # this live process stands in for the other worker
    res = runner.run_experiment(str(grid), **kw)
    assert res["ran"] == 1 and [r.split(":")[1] for r in fake_runs] == ["main,mode=ffa,seed=0"]
    workers.release(held)
    res = runner.run_experiment(str(grid), **kw)
    assert res["ran"] == 1 and res["skipped"] == 1 and len(fake_runs) == 2
    assert not list((scratch / ".claims").iterdir())
    prefix = workers.taskset_prefix(workers.usable_cpus())
    for p in (out / "cells").glob("*.json"):
        rec = json.loads(p.read_text())
        assert rec["command"].startswith(prefix + "ffa-jax train ")
        assert rec["cpu_threads"] == len(workers.usable_cpus())


def _stem(grid_path: Path, mode: str) -> str:
    grid = grid_lib.load_grid(grid_path)
    return next(c.file_stem for c in grid_lib.main_cells(grid, None) if c.axes["lora.mode"] == mode)
