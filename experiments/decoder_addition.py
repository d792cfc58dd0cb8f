"""Does a short private federated fine-tuning move SmolLM2-135M? 2-digit addition, offline.

The grid: FFA-LoRA and LoRA, epsilon in {inf, 8, 2} (delta 1e-5, per client, PLD), each one
``ffa-jax train`` of ``configs/gsm_smollm2.yaml`` on the task of
``experiments/prepare/addition.py`` (7,850 train / 250 test problems ``What is a + b?`` ->
``#### <sum>``), 3 IID clients, exact match of greedy answers of at most ``MAX_NEW`` tokens on
a seeded subset of ``EVAL`` test problems (the same subset for every cell: same seed). The
pretrained model is evaluated once, in the first cell (``eval.baseline=true``, round 0).

Resumable per cell: a cell whose run directory holds ``summary.json`` is not run again (a cell
killed midway restarts from scratch). Results (``runs.csv`` with each cell's exact command and
git commit, ``table.md`` with 95 % Wilson intervals) go to ``--results``::

    nice -n 19 python experiments/decoder_addition.py \
        --runs /work/runs/decoder --results experiments/results/decoder

``--report-only`` rewrites the results from the finished cells without running anything.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import pathlib
import platform
import re
import resource
import shlex
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
EVAL = 200
ROUNDS = 3
MAX_NEW = 8
COMMON = [
    "model.max_length=65",  # the 59-token chat prompt + '#### <sum>' (4-5 tokens) + EOS
    "federated.clients=3",
    f"federated.rounds={ROUNDS}",
    "federated.local_steps=2",
    "client.batch_size=8",
    "client.optimizer=adam",
    "client.learning_rate=0.01",
    "privacy.clip_norm=1.0",
    f"eval.max_examples={EVAL}",
    "eval.batch_size=50",
    f"eval.max_new_tokens={MAX_NEW}",
    "checkpoint.every=0",
    "checkpoint.keep=1",
    "seed=0",
]
LR = "0.01"  # client.learning_rate of COMMON (Adam)
CELLS = [  # (lora.mode, privacy.epsilon, client.learning_rate); the first also evaluates the
    # pretrained model. LoRA (A and B trained) gets a second, smaller rate: at 0.01 its
    # non-private loss rose again in round 3, and a baseline must not lose by an untuned rate.
    # Both rates are reported; none is selected.
    ("ffa", "inf", LR),
    ("lora", "inf", LR),
    ("ffa", "8", LR),
    ("lora", "8", LR),
    ("ffa", "2", LR),
    ("lora", "2", LR),
    ("lora", "inf", "0.001"),
    ("lora", "8", "0.001"),
    ("lora", "2", "0.001"),
]
FIELDS = [
    "cell",
    "lora.mode",
    "privacy.epsilon",
    "client.learning_rate",
    "status",
    "exact_match",
    "correct",
    "test_examples",
    "exact_match_lenient",
    "format_rate",
    "baseline_exact_match",
    "baseline_exact_match_lenient",
    "baseline_format_rate",
    "epsilon_spent",
    "noise_multiplier",
    "final_train_loss",
    "wall_seconds",
    "cpu_seconds",
    "commit",
    "command",
]


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95 % Wilson score interval of a binomial proportion ``k / n``."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def cell_name(mode: str, eps: str, lr: str = LR) -> str:
    return f"{mode}-eps{eps}" + ("" if lr == LR else f"-lr{lr}")


def command(
    runs: pathlib.Path, data: pathlib.Path, mode: str, eps: str, lr: str, first: bool
) -> list[str]:
    sets = [
        *COMMON,
        *([] if lr == LR else [f"client.learning_rate={lr}"]),  # the later --set wins
        f"data.task={data}",
        f"lora.mode={mode}",
        f"privacy.epsilon={eps}",
        f"eval.baseline={'true' if first else 'false'}",
        f"output_dir={runs / 'cells'}",
        f"name={cell_name(mode, eps, lr)}",
    ]
    argv = ["ffa-jax", "train", "--no-progress", "--overwrite", "--config"]
    argv.append("configs/gsm_smollm2.yaml")
    return argv + [x for s in sets for x in ("--set", s)]


def read_cell(run: pathlib.Path) -> dict | None:
    """The finished cell's numbers, from its run directory: ``metrics.jsonl``'s round-0 line
    (the pretrained model, first cell only) and its last line, which must be the final
    round's test evaluation next to a saved adapter (else None: not finished)."""
    path = run / "metrics.jsonl"
    if not (path.is_file() and (run / "adapter.safetensors").is_file()):
        return None
    history = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    last = history[-1] if history else {}
    if last.get("round") != ROUNDS or "eval_exact_match" not in last:
        return None
    r0 = next((h for h in history if h["round"] == 0 and "eval_exact_match" in h), None)
    eps = last.get("epsilon")
    summary = {
        "test_examples": last["eval_examples"],
        "test_exact_match": last["eval_exact_match"],
        "test_exact_match_lenient": last["eval_exact_match_lenient"],
        "baseline_exact_match": None if r0 is None else r0["eval_exact_match"],
        "baseline_exact_match_lenient": None if r0 is None else r0["eval_exact_match_lenient"],
        "baseline_format_rate": None if r0 is None else r0.get("eval_format_rate"),
        "epsilon": math.inf if eps is None else eps,
    }
    history = [
        {**h, "train_loss": h["diagnostics"]["train_loss"]} if h.get("diagnostics") else h
        for h in history
    ]
    return {"summary": summary, "last": last, "history": history}


def row_of(mode, eps, lr, run, meta) -> dict:
    cell = read_cell(run)
    row = {
        "cell": run.name,
        "lora.mode": mode,
        "privacy.epsilon": eps,
        "client.learning_rate": lr,
        **meta,
    }
    if cell is None:
        return {**row, "status": "missing"}
    s, last = cell["summary"], cell["last"]
    n = int(s["test_examples"])
    losses = [h["train_loss"] for h in cell["history"] if "train_loss" in h]
    return {
        **row,
        "status": "ok",
        "exact_match": s["test_exact_match"],
        "correct": round(s["test_exact_match"] * n),
        "test_examples": n,
        "exact_match_lenient": s["test_exact_match_lenient"],
        "format_rate": last.get("eval_format_rate"),
        "baseline_exact_match": s.get("baseline_exact_match"),
        "baseline_exact_match_lenient": s.get("baseline_exact_match_lenient"),
        "baseline_format_rate": s.get("baseline_format_rate"),
        "epsilon_spent": s.get("epsilon"),
        "noise_multiplier": logged_sigma(run.parent.parent / f"{run.name}.log"),
        "final_train_loss": losses[-1] if losses else None,
        "wall_seconds": meta.get("wall_seconds", s.get("wall_seconds")),
    }


def logged_sigma(log: pathlib.Path) -> float | None:
    """The clients' noise multiplier as the run's log states it (``sigma=[z, z, z]``)."""
    if not log.is_file():
        return None
    m = re.search(r"sigma=\[([0-9.]+)", log.read_text())
    return float(m.group(1)) if m else None


def fmt_ci(k: int, n: int) -> str:
    lo, hi = wilson(k, n)
    return f"{k}/{n} = {k / n:.3f} [{lo:.3f}, {hi:.3f}]"


def report(runs: pathlib.Path, results: pathlib.Path, data: pathlib.Path) -> None:
    meta_path = runs / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    rows = []
    for i, (mode, eps, lr) in enumerate(CELLS):
        name = cell_name(mode, eps, lr)
        m = meta.get(name, {})
        m.setdefault("command", shlex.join(command(runs, data, mode, eps, lr, i == 0)))
        rows.append(row_of(mode, eps, lr, runs / "cells" / name, m))
    results.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, FIELDS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    (results / "runs.csv").write_text(buf.getvalue())

    base = next((r for r in rows if r.get("baseline_exact_match") is not None), None)
    first = runs / "cells" / cell_name(*CELLS[0]) / "metrics.jsonl"
    if base is None and first.is_file():  # the baseline is logged (round 0) before round 1
        rec = [json.loads(x) for x in first.read_text().splitlines() if x.strip()]
        r0 = next((r for r in rec if r["round"] == 0 and "eval_exact_match" in r), None)
        if r0 is not None:
            base = {
                "test_examples": r0["eval_examples"],
                "baseline_exact_match": r0["eval_exact_match"],
                "baseline_exact_match_lenient": r0["eval_exact_match_lenient"],
                "baseline_format_rate": r0.get("eval_format_rate"),
            }
    lines = [
        "# Decoder experiment: SmolLM2-135M on 2-digit addition, private federated (FFA-)LoRA",
        "",
        "Generated by `experiments/decoder_addition.py` from the finished cells "
        f"(`{runs}/cells/`). Data: `python experiments/prepare/addition.py --out "
        f"{data}` (every `a + b` with 10 <= a, b <= 99, shuffled with the public seed "
        "20261207; 7,850 train / 250 test; answer `#### <sum>`).",
        "",
        "Every cell: `configs/gsm_smollm2.yaml` (SmolLM2-135M-Instruct, rank 8, alpha 16, "
        "q_proj/v_proj, sample-level DP-SGD per client, delta 1e-5, PLD) with "
        + ", ".join(f"`{s}`" for s in COMMON)
        + f"; exact match of the number after `####` in at most {MAX_NEW} greedy tokens, on the "
        f"same seeded {EVAL} of the 250 test problems; 95 % Wilson score intervals. The exact "
        "command and git commit of each cell are in `runs.csv`.",
        "",
        f"- machine: {platform.machine()}, 2 CPU cores shared with other jobs",
        "- learning rates: 0.01 (Adam) for both methods; LoRA also at 0.001. Both are "
        "reported; none is selected (there is no validation split here), so read the LoRA "
        "rows as a range.",
        "",
        "| method | epsilon | learning rate | exact match (95 % CI) | lenient | answers in the "
        "`####` format (95 % CI) | sigma | epsilon spent | wall |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    if base is not None:
        n = int(base["test_examples"])
        k = round(base["baseline_exact_match"] * n)
        fr = base.get("baseline_format_rate")
        fmt = "-" if fr is None else fmt_ci(round(fr * n), n)
        lines.append(
            f"| pretrained (no fine-tuning) | - | - | {fmt_ci(k, n)} | "
            f"{base['baseline_exact_match_lenient']:.3f} | {fmt} | - | - | - |"
        )
    for r in rows:
        method = {"ffa": "FFA-LoRA", "lora": "LoRA"}[r["lora.mode"]]
        if r["status"] != "ok":
            lines.append(
                f"| {method} | {r['privacy.epsilon']} | {r['client.learning_rate']} "
                "| not finished | | | | | |"
            )
            continue
        sigma = r["noise_multiplier"]
        eps = r["epsilon_spent"]
        lines.append(
            f"| {method} | {r['privacy.epsilon']} | {r['client.learning_rate']} "
            f"| {fmt_ci(r['correct'], r['test_examples'])} | "
            f"{r['exact_match_lenient']:.3f} | "
            f"{fmt_ci(round(r['format_rate'] * r['test_examples']), r['test_examples'])} | "
            f"{'-' if sigma in (None, 0) else f'{sigma:.3f}'} | "
            f"{'-' if eps is None or not math.isfinite(eps) else f'{eps:.3f}'} | "
            f"{float(r['wall_seconds']) / 60:.1f} min |"
        )
    missing = [r["cell"] for r in rows if r["status"] != "ok"]
    if missing:
        lines += [
            "",
            f"Missing cells: {', '.join(missing)}. Resume (finished cells are skipped): "
            f"`nice -n 19 python experiments/decoder_addition.py --runs {runs} --results "
            f"{results}`.",
        ]
    (results / "table.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=pathlib.Path, default=pathlib.Path("/work/runs/decoder"))
    ap.add_argument("--results", type=pathlib.Path, default=ROOT / "experiments/results/decoder")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    runs = args.runs.resolve()
    data = runs / "addition.jsonl"
    if not data.is_file():
        subprocess.run(
            [sys.executable, str(ROOT / "experiments/prepare/addition.py"), "--out", str(data)],
            check=True,
        )
    meta_path = runs / "meta.json"
    if not args.report_only:
        for i, (mode, eps, lr) in enumerate(CELLS):
            name = cell_name(mode, eps, lr)
            if read_cell(runs / "cells" / name) is not None:
                continue
            argv = command(runs, data, mode, eps, lr, i == 0)
            cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.time()
            log = runs / f"{name}.log"
            with open(log, "w") as f:
                rc = subprocess.run(
                    [sys.executable, "-m", "ffa_jax.cli", *argv[1:]],
                    cwd=ROOT,
                    stdout=f,
                    stderr=subprocess.STDOUT,
                ).returncode
            cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
            meta[name] = {
                "command": shlex.join(argv),
                "commit": git_commit(),
                "wall_seconds": round(time.time() - t0, 1),
                "cpu_seconds": round(
                    cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, 1
                ),
                "returncode": rc,
            }
            tmp = meta_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(meta, indent=1))
            tmp.replace(meta_path)
            print(f"{name}: rc {rc}, {meta[name]['wall_seconds']} s", flush=True)
            report(runs, args.results, data)
    report(runs, args.results, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
