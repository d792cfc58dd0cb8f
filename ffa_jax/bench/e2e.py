"""``ffa-jax bench --quickstart`` / ``--config X``: a whole run of a config in ffa_jax and in
the sequential PyTorch Opacus+PEFT reference, side by side, each as a fresh subprocess.

What users feel is the whole run, not a fixed-batch step: this runs ``ffa-jax train`` on the
config (its defaults: auto micro-batching, the persistent compilation cache and the memo of
calibrated noise multipliers in folders of the bench's own, cold in the first run, warm after)
and the reference (:mod:`ffa_jax.bench.torch_run`, HF transformers + PEFT + Opacus, clients
one after another) at the same settings, alternately (ffa_jax, reference, ffa_jax, reference,
...), so that a change of machine load hits both sides alike, on the same host allocator.
Per run it records:

* ``wall_s``: the subprocess's whole wall time (start to exit: imports, model and data
  loading, noise calibration, compilation, rounds, evaluations, writing outputs);
* ``cpu_s``: its user + system CPU time (``wait4``); steadier than wall under load;
* ``peak_rss_mb``: the peak resident set of the subprocess tree, the larger of the tree's
  summed RSS sampled every 50 ms and the child's own ``ru_maxrss``; MB = 2^20 bytes;
* per-round seconds (ffa_jax's ``metrics.jsonl``, the reference's result), summarised as
  the first round (which compiles on ffa_jax) and the median and range of the *non-eval*
  rounds after the first;
* the final test accuracy, and epsilon (ffa_jax's accountant) or sigma (the reference's RDP
  calibration).

Ratios are ffa_jax / reference of the medians over runs (< 1: ffa_jax is faster or smaller),
and per pair. The reference's wall excludes reading and partitioning the raw texts, which
the bench does once (``prepare_s`` in the report); it includes tokenisation, model loading
and its noise calibration.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ffa_jax import allocator
from ffa_jax.config import AUTO, RunConfig
from ffa_jax.errors import ConfigError
from ffa_jax.fileio import atomic_write_text

TORCH_RUN = Path(__file__).resolve().with_name("torch_run.py")
SAMPLE_PERIOD_S = 0.05

# PEFT target modules: the Linear leaf names an ffa_jax ``lora.targets`` regex can select.
_ENCODER_LINEARS = ("query", "key", "value", "dense")


@dataclass(frozen=True, kw_only=True)
class E2ESpec:
    """What ``ffa-jax bench --config`` runs.

    ``config``: the YAML run config (None: the built-in quickstart defaults); ``overrides``:
    ``--set`` overrides applied to both sides; ``pairs``: how many (ffa_jax, reference) pairs
    run, alternately; ``reference``: run the torch side at all; ``threads``: torch's intra-op
    threads (XLA:CPU uses every usable core); ``allocator``: ``FFA_JAX_ALLOCATOR`` for both
    sides (``auto``: tcmalloc when found, as the ``ffa-jax`` command does).
    """

    config: str | None
    overrides: tuple[str, ...] = ()
    pairs: int = 2
    reference: bool = True
    threads: int = 0
    allocator: str = "auto"

    def __post_init__(self):
        if not isinstance(self.pairs, int) or self.pairs < 1:
            raise ConfigError(f"bench --pairs={self.pairs!r} is invalid: use an integer >= 1.")
        if self.allocator not in allocator.CHOICES:
            raise ConfigError(
                f"bench --allocator={self.allocator!r} is invalid: use one of "
                f"{', '.join(allocator.CHOICES)}."
            )


# ----------------------------------------------------------------------- the reference's job


def target_modules(targets: str) -> list[str]:
    """The PEFT ``target_modules`` (Linear leaf names of a BERT/RoBERTa encoder) that the
    ffa_jax ``lora.targets`` regex selects, e.g. ``.*(query|value)/kernel`` -> query, value.

    Raises:
      ConfigError: the regex selects none of them.
    """
    import re

    names = [n for n in _ENCODER_LINEARS if re.fullmatch(targets, f"encoder/layer_0/{n}/kernel")]
    if not names:
        raise ConfigError(
            f"lora.targets={targets!r} selects none of the encoder's {_ENCODER_LINEARS} "
            "kernels; the torch reference cannot mirror it."
        )
    return names


def check_reference_config(cfg: RunConfig) -> None:
    """The settings the reference can mirror; anything else is a ConfigError naming the field
    (before any run starts)."""
    from ffa_jax.workloads import resolve_family

    def need(ok: bool, field: str, value: Any, fix: str) -> None:
        if not ok:
            raise ConfigError(
                f"bench reference: {field}={value!r} is not supported by the torch reference; "
                f"{fix} (or use --reference none)."
            )

    need(resolve_family(cfg) == "encoder", "model.family", cfg.model.family, "use an encoder")
    need(cfg.model.dtype == "float32", "model.dtype", cfg.model.dtype, "use float32")
    need(cfg.lora.init_from is None, "lora.init_from", cfg.lora.init_from, "leave it unset")
    need(
        cfg.federated.clients_per_round is None,
        "federated.clients_per_round",
        cfg.federated.clients_per_round,
        "use null (every client in every round)",
    )
    need(
        cfg.server.optimizer in ("sgd", "momentum"),
        "server.optimizer",
        cfg.server.optimizer,
        "use sgd or momentum",
    )
    need(
        not cfg.privacy.enabled or cfg.privacy.unit == "sample",
        "privacy.unit",
        cfg.privacy.unit,
        "use sample-level DP",
    )
    need(
        cfg.privacy.noise_multiplier is None,
        "privacy.noise_multiplier",
        cfg.privacy.noise_multiplier,
        "calibrate to privacy.epsilon",
    )
    target_modules(cfg.lora.targets)


def eval_after_rounds(cfg: RunConfig) -> list[int]:
    """The 1-based rounds after which ``ffa-jax train`` evaluates: every ``eval.every``-th
    and the last."""
    rounds = cfg.federated.rounds
    every = cfg.eval.every
    return sorted({r for r in range(1, rounds + 1) if every and r % every == 0} | {rounds})


def reference_job(cfg: RunConfig, *, threads: int) -> dict[str, Any]:
    """The reference's ``JOB.json`` for ``cfg`` (see :mod:`ffa_jax.bench.torch_run`): the
    same task, split, partition, test cap, model folder, pooling, LoRA and training settings
    as ``ffa-jax train`` uses. Reads the raw texts (no model weights)."""
    from ffa_jax import perf as perf_lib
    from ffa_jax.data.clients import load_clients
    from ffa_jax.models.sources import resolve_model_dir
    from ffa_jax.models.weights import detect_pooling

    check_reference_config(cfg)
    model_dir = resolve_model_dir(cfg.model.name)
    data, parts = load_clients(cfg)
    test_texts, test_labels = list(data.test_texts), list(data.test_labels)
    if cfg.eval.max_examples is not None:
        test_texts = test_texts[: cfg.eval.max_examples]
        test_labels = test_labels[: cfg.eval.max_examples]
    pooling = cfg.model.pooling if cfg.model.pooling != AUTO else detect_pooling(model_dir)
    return {
        "model_dir": str(model_dir),
        "pooling": pooling,
        "num_labels": int(data.num_labels),
        "max_length": cfg.model.max_length,
        "train_head": cfg.model.train_head,
        "mode": cfg.lora.mode,
        "rank": cfg.lora.rank,
        "alpha": cfg.lora.alpha,
        "target_modules": target_modules(cfg.lora.targets),
        "train_texts": [str(t) for t in data.train_texts],
        "train_labels": [int(x) for x in data.train_labels],
        "client_indices": [[int(i) for i in p] for p in parts],
        "test_texts": [str(t) for t in test_texts],
        "test_labels": [int(x) for x in test_labels],
        "rounds": cfg.federated.rounds,
        "local_steps": cfg.federated.local_steps,
        "weighting": cfg.federated.weighting,
        "batch_size": cfg.client.batch_size,
        "client_optimizer": cfg.client.optimizer,
        "client_lr": cfg.client.learning_rate,
        "client_momentum": cfg.client.momentum,
        "server_lr": cfg.server.learning_rate,
        "server_momentum": cfg.server.momentum if cfg.server.optimizer == "momentum" else 0.0,
        "private": cfg.privacy.enabled,
        "epsilon": cfg.privacy.epsilon,
        "delta": cfg.privacy.delta,
        "clip_norm": cfg.privacy.clip_norm,
        "eval_after_rounds": eval_after_rounds(cfg),
        "eval_baseline": cfg.eval.baseline,
        "eval_batch_size": perf_lib.eval_batch_size(cfg),
        "seed": cfg.seed,
        "threads": threads or len(os.sched_getaffinity(0)),
    }


# -------------------------------------------------------------------------- measuring a child


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass  # the process exited while being listed: it has no children left to count
    return out


def tree_rss_mb(pid: int) -> float:
    """The summed resident set of ``pid`` and its descendants, MB (2^20 bytes); 0 once gone."""
    total, todo, page = 0, [pid], os.sysconf("SC_PAGE_SIZE")
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue
        todo += _children(p)
    return total / 2**20


def measure(cmd: list[str], *, env: dict[str, str], log_path: Path) -> dict[str, Any]:
    """Runs ``cmd`` to completion; its stdout + stderr go to ``log_path``.

    Returns ``wall_s``, ``cpu_s`` (user + system, with the children it waited for),
    ``peak_rss_mb`` (see the module docstring), ``returncode`` and the load average at start
    and end.
    """
    load_start = list(os.getloadavg())
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        peak = [0.0]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], tree_rss_mb(proc.pid))
                stop.wait(SAMPLE_PERIOD_S)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        # wait4, not Popen.wait: it also returns the child's rusage (max RSS, CPU time).
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        stop.set()
        sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_mb": max(peak[0], usage.ru_maxrss / 1024.0),
        "returncode": proc.returncode,
        "loadavg_start": load_start,
        "loadavg_end": list(os.getloadavg()),
    }


def child_env(choice: str, cache_dir: Path) -> dict[str, str]:
    """The environment of both sides: the same host allocator (preloaded here for the
    reference too; ``ffa-jax`` would re-execute itself onto it) and ffa_jax's compilation
    cache in ``cache_dir``, its memo of calibrated noise multipliers next to it (both cold in
    the first run, like a user's first run)."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    env[allocator.ENV_CHOICE] = choice
    env.pop(allocator.ENV_DONE, None)
    preloaded = allocator.preload_environ(env)
    if preloaded is not None:
        env = preloaded
    env["FFA_JAX_COMPILATION_CACHE"] = str(cache_dir)
    env["FFA_JAX_SIGMA_CACHE"] = str(cache_dir.with_name("sigma_cache"))
    return env


# ------------------------------------------------------------------------- per-run summaries


def round_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-round seconds of one run: ``first_round_s`` (round 1; ffa_jax compiles there),
    the median / min / max of the non-eval rounds after the first (``round_s``,
    ``round_min_s``, ``round_max_s``; ``round_s`` None when there are none), the eval rounds'
    median (``eval_round_s``), and the last evaluated accuracy (``accuracy``)."""
    train = [r for r in rows if r.get("round", 0) >= 1]
    plain = [r["seconds"] for r in train[1:] if "eval_accuracy" not in r]
    evals = [r["seconds"] for r in train if "eval_accuracy" in r]
    acc = [r["eval_accuracy"] for r in rows if "eval_accuracy" in r]
    return {
        "rounds": len(train),
        "first_round_s": train[0]["seconds"] if train else None,
        "round_s": statistics.median(plain) if plain else None,
        "round_min_s": min(plain) if plain else None,
        "round_max_s": max(plain) if plain else None,
        "eval_round_s": statistics.median(evals) if evals else None,
        "accuracy": acc[-1] if acc else None,
    }


def read_ffa_run(run_dir: Path) -> dict[str, Any]:
    """:func:`round_summary` of an ffa_jax run directory's ``metrics.jsonl``, plus its final
    ``epsilon``."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    last = [r for r in rows if r.get("round", 0) >= 1]
    return {**round_summary(rows), "epsilon": last[-1].get("epsilon") if last else None}


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


SUMMARY_KEYS = ("wall_s", "cpu_s", "peak_rss_mb", "first_round_s", "round_s", "accuracy")
RATIO_KEYS = ("wall_s", "cpu_s", "peak_rss_mb", "first_round_s", "round_s")


def summarize(ffa: list[dict[str, Any]], ref: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over runs of each side, and ratios ffa_jax / reference of the medians (None
    where a side has no value) and of every pair (``pairs``: ffa run i with reference run i).
    Failed runs (``returncode`` != 0) are left out."""
    ok_f = [r for r in ffa if r.get("returncode") == 0]
    ok_r = [r for r in ref if r.get("returncode") == 0]
    med_f = {k: _median(ok_f, k) for k in SUMMARY_KEYS}
    med_r = {k: _median(ok_r, k) for k in SUMMARY_KEYS}

    def ratio(a, b):
        return a / b if a is not None and b else None

    pairs = []
    for f, r in zip(ffa, ref, strict=False):
        if f.get("returncode") == 0 and r.get("returncode") == 0:
            pairs.append({k: ratio(f.get(k), r.get(k)) for k in RATIO_KEYS})
    return {
        "ffa_jax": med_f,
        "reference": med_r if ref else None,
        "ratio": {k: ratio(med_f[k], med_r[k]) for k in RATIO_KEYS} if ref else None,
        "pair_ratios": pairs,
        "failed_runs": len(ffa) - len(ok_f) + len(ref) - len(ok_r),
    }


# ------------------------------------------------------------------------------- the bench


def run_e2e(
    spec: E2ESpec, *, workdir: Path | None = None, log=print, on_run=None
) -> dict[str, Any]:
    """Runs the pairs (see the module docstring); returns the report (``summarize`` plus the
    per-run rows, the settings and the machine). Run directories, logs and the compilation
    cache go to ``workdir`` (default: a new temporary folder, kept for inspection).
    ``on_run(report)``: called with the report so far after every run (to save partial
    results of a long bench)."""
    from ffa_jax.config import load_config

    cfg = load_config(spec.config, spec.overrides)  # a bad config fails here, before any run
    workdir = Path(workdir or tempfile.mkdtemp(prefix="ffa_bench_e2e_"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = child_env(spec.allocator, workdir / "jax_cache")
    job_path = workdir / "reference_job.json"
    prepare_s = None
    if spec.reference:
        t0 = time.perf_counter()
        job = reference_job(cfg, threads=spec.threads)
        prepare_s = time.perf_counter() - t0
        atomic_write_text(job_path, json.dumps(job))
    ffa_runs: list[dict[str, Any]] = []
    ref_runs: list[dict[str, Any]] = []

    def report() -> dict[str, Any]:
        from ffa_jax.bench.core import machine_info

        machine = machine_info()
        machine["allocator"] = "tcmalloc" if "LD_PRELOAD" in env else "system"
        loads = [
            x for r in ffa_runs + ref_runs for x in (r["loadavg_start"][0], r["loadavg_end"][0])
        ]
        machine["loadavg_1min_range"] = [min(loads), max(loads)] if loads else None
        return {
            "kind": "e2e",
            "config": spec.config or "built-in defaults (the quickstart)",
            "config_name": cfg.name,
            "overrides": list(spec.overrides),
            "pairs": spec.pairs,
            "prepare_s": prepare_s,
            "workdir": str(workdir),
            "machine": machine,
            "ffa_jax_runs": ffa_runs,
            "reference_runs": ref_runs,
            **summarize(ffa_runs, ref_runs),
        }

    config_args = ["--config", str(spec.config)] if spec.config else []
    for i in range(spec.pairs):
        run_dir_root = workdir / f"ffa_{i}"
        cmd = [
            sys.executable, "-m", "ffa_jax.cli", "train", *config_args,
            *[a for o in spec.overrides for a in ("--set", o)],
            "--set", f"output_dir={run_dir_root}", "--set", "name=run",
            "--overwrite", "--no-progress",
        ]  # fmt: skip
        log(f"bench e2e: ffa_jax run {i + 1}/{spec.pairs} ...")
        m = measure(cmd, env=env, log_path=workdir / f"ffa_{i}.log")
        if m["returncode"] == 0:
            m.update(read_ffa_run(run_dir_root / "run"))
        m["compilation_cache"] = "cold" if i == 0 else "warm"
        ffa_runs.append(m)
        if on_run is not None:
            on_run(report())
        log(f"  wall {m['wall_s']:.1f} s, peak RSS {m['peak_rss_mb']:.0f} MB, rc {m['returncode']}")
        if spec.reference:
            out = workdir / f"ref_{i}.json"
            log(f"bench e2e: reference run {i + 1}/{spec.pairs} ...")
            cmd = [sys.executable, str(TORCH_RUN), str(job_path), str(out)]
            m = measure(cmd, env=env, log_path=workdir / f"ref_{i}.log")
            if m["returncode"] == 0:
                res = json.loads(out.read_text())
                m.update(round_summary(res["rounds"]))
                m.update(
                    setup_s=res["setup_seconds"],
                    noise_multipliers=res["noise_multipliers"],
                    empty_batches=res["empty_batches"],
                    threads=res["threads"],
                    versions=res["versions"],
                )
            ref_runs.append(m)
            if on_run is not None:
                on_run(report())
            log(
                f"  wall {m['wall_s']:.1f} s, peak RSS {m['peak_rss_mb']:.0f} MB, "
                f"rc {m['returncode']}"
            )
    return report()


# ------------------------------------------------------------------------------- the report


def _fmt(x, spec: str = ".1f", suffix: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{suffix}"


def _run_row(side: str, i: int, r: dict[str, Any]) -> str:
    rng = (
        f"{_fmt(r.get('round_s'), '.2f')} ({_fmt(r.get('round_min_s'), '.2f')}-"
        f"{_fmt(r.get('round_max_s'), '.2f')})"
    )
    load = f"{r['loadavg_start'][0]:.1f} -> {r['loadavg_end'][0]:.1f}"
    extra = r.get("compilation_cache", "")
    if r.get("noise_multipliers"):
        extra = "sigma " + "/".join(f"{s:.3f}" for s in r["noise_multipliers"])
    if r.get("epsilon") is not None:
        extra += f", eps {r['epsilon']:.3f}"
    return (
        f"| {side} {i + 1} | {_fmt(r['wall_s'])} | {_fmt(r['cpu_s'])} | "
        f"{_fmt(r['peak_rss_mb'], '.0f')} | {_fmt(r.get('first_round_s'), '.2f')} | {rng} | "
        f"{_fmt(r.get('eval_round_s'), '.2f')} | {_fmt(r.get('accuracy'), '.4f')} | {load} | "
        f"{extra} | {r['returncode']} |"
    )


def to_markdown(report: dict[str, Any]) -> str:
    """The report as markdown: settings, machine, one row per run, medians and ratios."""
    m = report["machine"]
    lo, hi = m.get("loadavg_1min_range") or (None, None)
    load_note = (
        f"1-minute load average {lo:.1f}-{hi:.1f} on {m['usable_cores']} usable cores"
        if lo is not None
        else "load not recorded"
    )
    lines = [
        f"# ffa-jax bench: whole run of `{report['config']}` vs the PyTorch reference",
        "",
        f"- command: `{report.get('command', 'n/a')}` at commit `{report.get('commit', 'n/a')}`",
        f"- config: `{report['config']}` (name `{report['config_name']}`), overrides "
        f"{report['overrides'] or 'none'}; {report['pairs']} pair(s), run alternately "
        "(ffa_jax, reference, ...), each a fresh subprocess",
        f"- machine: {m['platform']}, {m['usable_cores']} usable cores, jax {m['jax']} "
        f"({m['backend']}), host allocator {m['allocator']} on both sides; {load_note}",
        "- wall / CPU: the whole subprocess (CPU = user + system); peak RSS: the subprocess "
        "tree, MB = 2^20 bytes; round: seconds of the non-eval rounds after the first, median "
        "(range); ratios: ffa_jax / reference of the medians (< 1 = ffa_jax faster or smaller)",
    ]
    if report.get("prepare_s") is not None:
        lines.append(
            f"- the reference's raw texts were read and partitioned once by the bench "
            f"({report['prepare_s']:.1f} s, not in its wall time)"
        )
    if report["reference_runs"] and report["reference_runs"][0].get("versions"):
        v = report["reference_runs"][0]["versions"]
        lines.append(
            f"- reference: torch {v['torch']}, transformers {v['transformers']}, peft "
            f"{v['peft']}, opacus {v['opacus']}, {report['reference_runs'][0]['threads']} "
            "threads; sigma from Opacus's RDP accountant at the same epsilon and delta"
        )
    lines += [
        "",
        "| run | wall s | CPU s | peak RSS MB | round 1 s | round s | eval round s | "
        "accuracy | load 1-min | notes | rc |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(report["ffa_jax_runs"]):
        lines.append(_run_row("ffa_jax", i, r))
        if i < len(report["reference_runs"]):
            lines.append(_run_row("reference", i, report["reference_runs"][i]))
    if report.get("ratio"):
        f, r, q = report["ffa_jax"], report["reference"], report["ratio"]
        lines += [
            "",
            "| median | ffa_jax | reference | ffa_jax / reference |",
            "|---|---|---|---|",
        ]
        for key, title in (
            ("wall_s", "whole-run wall s"),
            ("cpu_s", "CPU s"),
            ("peak_rss_mb", "peak RSS MB"),
            ("first_round_s", "round 1 s"),
            ("round_s", "non-eval round s"),
        ):
            lines.append(
                f"| {title} | {_fmt(f[key], '.2f')} | {_fmt(r[key], '.2f')} | "
                f"**{_fmt(q[key], '.2f', 'x')}** |"
            )
        lines.append(
            f"| test accuracy | {_fmt(f['accuracy'], '.4f')} | {_fmt(r['accuracy'], '.4f')} | |"
        )
        if report["pair_ratios"]:
            per = "; ".join(
                f"pair {i + 1}: wall {_fmt(p['wall_s'], '.2f')}, round {_fmt(p['round_s'], '.2f')}"
                f", RSS {_fmt(p['peak_rss_mb'], '.2f')}"
                for i, p in enumerate(report["pair_ratios"])
            )
            lines += ["", f"Per pair: {per}."]
    if report.get("failed_runs"):
        lines += ["", f"**{report['failed_runs']} run(s) failed**: see the logs in the workdir."]
    return "\n".join(lines) + "\n"


def report_stem(report: dict[str, Any]) -> str:
    """``e2e_<config name>``: the report's file name."""
    return f"e2e_{report['config_name']}"


def write_report(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Writes ``<stem>.json`` and ``<stem>.md`` into ``out_dir`` (atomically)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = report_stem(report)
    j, md = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    atomic_write_text(j, json.dumps(report, indent=2))
    atomic_write_text(md, to_markdown(report))
    return j, md
