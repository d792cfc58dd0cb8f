"""The quickstart under several noise seeds, for one code tree: its epsilon and test metrics.

Issue 17's check that moving the DP core onto jax-privacy changed nothing a user sees: the
quickstart's epsilon must be unchanged and its accuracy within the spread of five noise seeds
of the old code. Run it once per code tree (``--code``: a checkout of the commit to measure,
e.g. a ``git worktree`` of the commit before the move) with the same seeds::

    python experiments/quickstart_seeds.py --code /work/wt/old17 --label before \
        --runs /work/runs/qs_seeds --out experiments/results/quickstart_seeds/runs.csv
    python experiments/quickstart_seeds.py --code . --label after ...

Each run is ``ffa-jax train --config configs/quickstart.yaml`` of that tree with
``privacy.noise_seed=S`` (a research run: the noise, the Poisson batches and the client
sampling are regenerable from S, so it is NOT a private release). Resumable: a run whose
``metrics.jsonl`` ends with its final test evaluation is read, not rerun. One CSV row per (label, seed).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

FIELDS = [
    "label",
    "seed",
    "commit",
    "epsilon",
    "delta",
    "test_accuracy",
    "test_balanced_accuracy",
    "test_loss",
    "wall_seconds",
    "command",
]


def finished(run: Path) -> dict | None:
    """The last line of a finished run's ``metrics.jsonl`` (the final round, with its test
    evaluation), else None."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return None
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    if not lines or "eval_accuracy" not in lines[-1]:
        return None
    cfg = (run / "config.yaml").read_text()
    rounds = next(
        (int(x.split(":")[1]) for x in cfg.splitlines() if x.strip().startswith("rounds:")), None
    )
    return lines[-1] if lines[-1].get("round") == rounds else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--code", type=Path, required=True, help="the code tree to run")
    p.add_argument("--label", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--runs", type=Path, default=Path("/work/runs/qs_seeds"))
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    code = args.code.resolve()
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=code, capture_output=True, text=True, check=True
    ).stdout.strip()
    env = dict(os.environ, PYTHONPATH=str(code))
    rows = []
    if args.out.exists():
        rows = [r for r in csv.DictReader(args.out.open()) if r["label"] != args.label]
    for seed in args.seeds:
        name = f"{args.label}-s{seed}"
        run = args.runs / name
        cmd = [
            sys.executable,
            "-m",
            "ffa_jax.cli",
            "train",
            "--no-progress",
            "--overwrite",
            "--config",
            "configs/quickstart.yaml",
            "--set",
            f"privacy.noise_seed={seed}",
            "--set",
            f"output_dir={args.runs}",
            "--set",
            f"name={name}",
        ]
        t0 = time.time()
        if finished(run) is None:
            subprocess.run(cmd, cwd=code, env=env, check=True)
        wall = time.time() - t0
        last = finished(run)
        if last is None:
            raise SystemExit(f"{run}: the run ended without its final test evaluation")
        rows.append(
            {
                "label": args.label,
                "seed": seed,
                "commit": commit,
                "epsilon": last.get("epsilon"),
                "delta": last.get("delta"),
                "test_accuracy": last.get("eval_accuracy"),
                "test_balanced_accuracy": last.get("eval_balanced_accuracy"),
                "test_loss": last.get("eval_loss"),
                "wall_seconds": round(wall, 1),
                "command": " ".join(cmd[1:]),
            }
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            w.writeheader()
            w.writerows(rows)
        tmp.replace(args.out)
        print(json.dumps(rows[-1]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
