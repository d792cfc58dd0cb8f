"""Paired comparison of the client-level noise mechanisms: ``gaussian`` vs ``banded_mf`` at the
same (epsilon, delta) on the offline SpamAssassin / MiniLM task, long enough (T rounds) for the
correlation of BandMF noise to matter.

For every noise seed both mechanisms run with the same config except ``privacy.mechanism`` /
``privacy.bands`` (and hence the client sampling: Poisson over all clients vs cyclic Poisson
over ``bands`` groups). After each run the script replays the server noise the run added, from
the run's secret (``privacy.noise_seed``: these are research runs, NOT private releases), and
reports the L2 norm of the accumulated noise in the model, ``||sum_t noise_t|| / M``.

Resumable: a finished run (``summary.json`` present) is skipped, an interrupted one is resumed
from its last checkpoint. Results: one CSV row per run in ``<out>/results.csv`` and a
markdown table in ``<out>/results.md``.

    nice -n 19 python experiments/bandmf_pair.py --out /work/runs/bandmf --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from ffa_jax.config import load_config
from ffa_jax.experiments import stats
from ffa_jax.federated.round import banded_noise_key, server_noise_key
from ffa_jax.privacy.noise import gaussian_noise_like
from ffa_jax.run import loop
from ffa_jax.run.setup import banded_noise, prepare, train_key

ROOT = Path(__file__).resolve().parents[1]

# Tiny settings so that 2 x seeds runs of T rounds fit a shared 2-core CPU: short e-mails,
# rank-1 FFA-LoRA on the value projections only (|B| = 6 x 384 = 2,304 numbers), 100 IID
# clients of which 5 take part per round, 1 local step.
COMMON = [
    "model.max_length=16",
    "lora.rank=1",
    "lora.alpha=1",
    "lora.targets=.*value/kernel",
    "data.partition=iid",
    "federated.clients=100",
    "federated.clients_per_round=5",
    "federated.local_steps=1",
    "client.batch_size=8",
    "client.learning_rate=50",
    "privacy.unit=client",
    "privacy.client_clip_norm=1.0",
    "eval.every=0",
    "eval.batch_size=128",
    "checkpoint.every=10",
    "checkpoint.keep=1",
    "perf.clients_per_chunk=1",
]
MECHANISMS = {
    "gaussian": ["privacy.mechanism=gaussian"],
    "banded_mf": ["privacy.mechanism=banded_mf"],
}


def accumulated_noise_norm(cfg) -> tuple[float, float]:
    """``(||sum_t noise_t|| / M, z)``: the L2 norm of all the server noise the run added to
    the model (server sgd with learning rate 1), replayed from the run's secret, and the
    run's noise multiplier z."""
    prep = prepare(cfg, log=lambda *a: None, secret=cfg.privacy.noise_seed)
    z = prep.plan.client_noise_multiplier
    std = z * cfg.privacy.client_clip_norm
    key = train_key(prep)
    like = prep.trainable
    total = jax.tree.map(lambda x: np.zeros(np.shape(x), np.float64), like)
    mech = banded_noise(cfg)
    state = None if mech is None else mech.init(like, banded_noise_key(key))
    for r in range(cfg.federated.rounds):
        if mech is None:
            n = gaussian_noise_like(like, std, server_noise_key(key, r))
        else:
            n, state = mech.next(like, std, state)
        total = jax.tree.map(lambda t, x: t + np.asarray(x, np.float64), total, n)
    sq = sum(float(np.sum(np.square(t))) for t in jax.tree.leaves(total))
    return float(np.sqrt(sq)) / prep.plan.sampling.clients_per_round, float(z)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/work/runs/bandmf")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--bands", type=int, default=10)
    p.add_argument("--epsilon", type=float, default=8.0)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    rows = []
    for seed in args.seeds:
        for mech, extra in MECHANISMS.items():
            name = f"{mech}-s{seed}"
            overrides = [
                *COMMON,
                *extra,
                f"federated.rounds={args.rounds}",
                f"privacy.epsilon={args.epsilon}",
                f"privacy.noise_seed={seed}",
                f"name={name}",
                f"output_dir={out}",
            ]
            if mech == "banded_mf":
                overrides.append(f"privacy.bands={args.bands}")
            cfg = load_config(ROOT / "configs" / "quickstart.yaml", overrides)
            run = out / name
            t0 = time.time()
            if not (run / "summary.json").exists():
                summary = loop.train(cfg, resume=run.exists(), progress=False, log=print)
                (run / "summary.json").write_text(json.dumps(summary, indent=1))
            summary = json.loads((run / "summary.json").read_text())
            metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            noise_norm, z = accumulated_noise_norm(cfg)
            row = {
                "mechanism": mech,
                "seed": seed,
                "rounds": args.rounds,
                "bands": args.bands if mech == "banded_mf" else 1,
                "epsilon": summary["epsilon"],
                "delta": summary["delta"],
                "noise_multiplier": z,
                "test_accuracy": metrics[-1].get("eval_accuracy"),
                "test_balanced_accuracy": metrics[-1].get("eval_balanced_accuracy"),
                "test_loss": metrics[-1].get("eval_loss"),
                "accumulated_noise_norm": noise_norm,
                "wall_seconds": round(time.time() - t0, 1),
                "commit": commit,
                "command": "python experiments/bandmf_pair.py " + " ".join(sys.argv[1:]),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
            with open(out / "results.csv", "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
            (out / "results.md").write_text(summary_table(rows))
    return 0


def summary_table(rows: list[dict]) -> str:
    """Markdown: per mechanism the mean and 95% t interval of each metric over seeds, and the
    paired difference banded_mf - gaussian (mean, 95% CI, wins/losses) over the seeds both
    mechanisms finished (:mod:`ffa_jax.experiments.stats`)."""
    by = {m: {r["seed"]: r for r in rows if r["mechanism"] == m} for m in MECHANISMS}
    keys = ["test_accuracy", "test_balanced_accuracy", "test_loss", "accumulated_noise_norm"]
    lines = [
        "| metric | gaussian mean [95% CI] | banded_mf mean [95% CI] | banded_mf - gaussian "
        "(paired) [95% CI] | wins / losses | pairs |",
        "|---|---|---|---|---|---|",
    ]

    def ci(vals):
        m, h = stats.mean_ci(vals)
        return f"{m:.4f}" + ("" if h is None else f" [{m - h:.4f}, {m + h:.4f}]")

    for k in keys:
        g = {s: float(r[k]) for s, r in by["gaussian"].items() if r.get(k) is not None}
        b = {s: float(r[k]) for s, r in by["banded_mf"].items() if r.get(k) is not None}
        p = stats.paired(b, g)
        iv = "" if p.interval is None else f" [{p.interval[0]:+.4f}, {p.interval[1]:+.4f}]"
        lines.append(
            f"| {k} | {ci(list(g.values()))} | {ci(list(b.values()))} | {p.diff:+.4f}{iv} "
            f"| {p.wins} / {p.losses} | {p.n} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
