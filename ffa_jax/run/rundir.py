"""The run directory's one owner: ``config.yaml``, ``metrics.jsonl`` (one line per round),
``adapter.safetensors`` and the printed lines that describe a run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ffa_jax import checkpoint as ckpt_lib
from ffa_jax import distributed, lora
from ffa_jax.config import RunConfig
from ffa_jax.errors import CheckpointError, ConfigError
from ffa_jax.fileio import atomic_write, atomic_write_text, json_safe
from ffa_jax.privacy import secret as secret_lib
from ffa_jax.run.inputs import RoundInputs
from ffa_jax.run.setup import Prepared, noise_note, unit
from ffa_jax.types import PyTree

# Evaluation outputs kept in the history (checkpointed, shown in summary.md) but not in
# metrics.jsonl: they are not scalars.
NON_METRIC_KEYS = ("eval_samples",)

# The run directory's files; this module is their one writer (checkpoints/ belongs to
# ffa_jax.checkpoint, which this module's callers hand the folder).
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
ADAPTER_FILE = "adapter.safetensors"
SUMMARY_FILE = "summary.md"
PLOTS_DIR = "plots"


def metrics_path(out: Path, primary: bool) -> Path:
    """Where this process appends metric lines: ``out/metrics.jsonl`` on process 0, the null
    device elsewhere (only process 0 owns the run directory)."""
    return out / METRICS_FILE if primary else Path(os.devnull)


def start_run_dir(
    out: Path, cfg: RunConfig, prep: Prepared, history: list[dict], *, overwrite: bool
) -> None:
    """Process 0, once every input is valid: (re)creates ``out`` and writes ``config.yaml``
    (with what ``perf.*`` "auto" became as a comment) and ``metrics.jsonl`` (the lines of
    ``history``), atomically."""
    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / CONFIG_FILE, cfg.to_yaml() + resolved_perf_comment(prep))
    # The checkpoint's history is the truth: later lines (rounds done after the last
    # checkpoint, or a torn line from a crash) are dropped and recomputed.
    atomic_write_text(out / METRICS_FILE, "".join(metric_line(h) for h in history))


def write_reports(
    out: Path, cfg: RunConfig, prep: Prepared, history: list[dict], summary: dict[str, Any]
) -> None:
    """Process 0, at the end: ``plots/metrics.png`` and ``summary.md``."""
    from ffa_jax.run.report import write_plots, write_summary

    write_plots(out / PLOTS_DIR, history)
    write_summary(out / SUMMARY_FILE, cfg, prep, history, summary)


def run_dir(cfg: RunConfig) -> Path:
    """The run directory of ``cfg``: ``<output_dir>/<name>``."""
    return Path(cfg.output_dir) / cfg.name


def bytes_of_one_client(tree: PyTree) -> int:
    """Bytes one client uploads per round: the trainable tree (``float32`` B, and a head)."""
    return lora.tree_bytes(tree)


def resolved_perf_comment(prep: Prepared) -> str:
    """YAML comment lines recording what ``perf.*: auto`` resolved to in this run. The config
    keeps ``auto`` (a rerun elsewhere resolves for its own backend); B_max does not depend on
    the backend, so a resume on another machine accounts the same privacy."""
    r = prep.perf
    return (
        f"# resolved for this run ({r.backend}, ffa_jax.perf): perf.microbatch_size: "
        f"{r.microbatch_size}, perf.clients_per_chunk: {r.clients_per_chunk}, "
        f"B_max: {r.max_batch_size}, eval.batch_size: {r.eval_batch_size}\n"
    )


def noise_line(cfg: RunConfig) -> str:
    """The log line about the noise's source (a warning when ``privacy.noise_seed`` is set)."""
    if cfg.privacy.noise_seed is None:
        return (
            "noise, Poisson batches and client sampling: a 256-bit secret drawn from the OS, "
            "kept only in checkpoints/ (owner-only files; protect them like the data)"
        )
    return "WARNING: " + secret_lib.REPRODUCIBLE_WARNING


def open_run_dir(
    cfg: RunConfig, out: Path, ckpt_dir: Path, *, overwrite: bool, resume: bool
) -> ckpt_lib.Restored | None:
    """Checks the run directory before anything is computed; the checkpoint to resume from.

    In a multi-process run only process 0 owns the directory, so the others skip the
    "already exists" check (process 0 may already have created it); a resume reads the
    checkpoint on every process. Raises ConfigError / CheckpointError.
    """
    if resume:
        if overwrite:
            raise ConfigError("--resume and --overwrite exclude each other; pass one of them.")
        if not (out / "config.yaml").is_file():
            raise CheckpointError(
                f"cannot resume {str(out)!r}: not a run directory (no config.yaml); start the "
                "run without --resume."
            )
        restored = ckpt_lib.read_latest(ckpt_dir, cfg)
        if restored is not None and cfg.federated.rounds < restored.round:
            raise ConfigError(
                f"federated.rounds={cfg.federated.rounds} is below the {restored.round} rounds "
                f"the checkpoint {str(restored.step_dir)!r} has done; use "
                f"federated.rounds >= {restored.round}."
            )
        return restored
    if distributed.is_primary() and out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(
            f"run directory {str(out)!r} already exists; pass --overwrite, --resume "
            f"{str(out)!r} to continue it, or choose another name with --set name=<new-name>."
        )
    return None


def metric_line(record: dict[str, Any]) -> str:
    """One ``metrics.jsonl`` line of ``record``: its scalars (not :data:`NON_METRIC_KEYS`),
    strict JSON (a non-finite epsilon becomes ``null``), newline-terminated."""
    scalars = {k: v for k, v in record.items() if k not in NON_METRIC_KEYS}
    return json.dumps(json_safe(scalars)) + "\n"


def round_record(
    prep: Prepared,
    r: int,
    inp: RoundInputs,
    m,
    loss,
    per_client_bytes,
    *,
    downlink_bytes: int | None = None,
    uplink_total: int | None = None,
) -> dict:
    """One metrics line of round ``r`` (0-based): averages over the round's participants.

    ``per_client_bytes``: one client's upload this round; ``downlink_bytes``: what the server
    sends each participant (None: the same as the upload); ``uplink_total``: the round's
    uploads together when clients upload different sizes (None: ``per_client_bytes`` times the
    participants).

    Top-level keys are release-safe: epsilon and delta, the norm of the averaged (noised)
    update, byte counts, evaluation on the held-out split, and the note on the noise's source
    (``noise``). Everything computed from the clients' private data *without* noise --
    training loss, gradient norms, clipped fractions, realised (Poisson) batch sizes, the
    pre-noise ``client_update_norm`` -- sits in the ``diagnostics`` object, which epsilon does
    NOT cover (see docs/threat_model.md). Under client-level DP with partial participation the
    realised number of participants (and the bytes that count it) is a diagnostic too.
    """
    cfg, plan = prep.cfg, prep.plan
    real = inp.slots >= 0
    n_part = int(real.sum())
    c = m.clients

    def part_mean(x):
        return float(np.mean(np.asarray(x)[real])) if n_part else 0.0

    private = cfg.privacy.enabled
    record: dict[str, Any] = {
        "round": r + 1,
        "epsilon": float(plan.epsilon_curve[r]),
        "epsilon_pld": plan.epsilon_after(r + 1, "pld") if private else None,
        "epsilon_rdp": plan.epsilon_after(r + 1, "rdp") if private else None,
        # The delta that really holds with "epsilon" (RDP: with the truncation's term).
        "delta": plan.delta_after(r + 1) if private else 0.0,
        "delta_rdp": plan.delta_after(r + 1, "rdp") if private else None,
        "uplink_bytes_per_client": per_client_bytes,
        # The averaged update is the noised release (post-processing of it).
        "update_norm": float(m.update_norm),
        "noise": noise_note(cfg),
    }
    diag: dict[str, Any] = {
        "train_loss": loss,
        "clipped_fraction": part_mean(c.clipped_fraction),
        # Per-example norms are only computed under sample-level DP (clipping needs them).
        "grad_norm": part_mean(c.grad_norm) if unit(cfg) == "sample" else None,
        "examples": int(np.sum(c.num_examples)),
        "dropped_examples": inp.dropped,
        # L2 norm of the participants' updates before any client-level clipping (to choose S).
        "client_update_norm": part_mean(c.delta_norm),
    }
    counts = {
        "participants": n_part,
        "uplink_bytes": per_client_bytes * n_part if uplink_total is None else uplink_total,
        "downlink_bytes": (per_client_bytes if downlink_bytes is None else downlink_bytes) * n_part,
    }
    if unit(cfg) == "client":
        norms = np.asarray(c.delta_norm)[real]
        diag["client_clipped_fraction"] = (
            float(np.mean(norms > cfg.privacy.client_clip_norm)) if n_part else 0.0
        )
    # Client-level DP hides who took part; the realised count would reveal it.
    (diag if unit(cfg) == "client" and not plan.sampling.full else record).update(counts)
    record["diagnostics"] = diag
    return record


def frozen_line(prep: Prepared) -> str:
    """How much of the frozen tree one device holds (``perf.model_devices > 1``)."""
    leaves = jax.tree_util.tree_leaves(prep.frozen)
    held = sum(x.addressable_shards[0].data.nbytes for x in leaves)
    total = sum(x.nbytes for x in leaves)
    return (
        f"frozen weights: {held / 2**20:.2f} MiB per device of {total / 2**20:.2f} MiB "
        f"(sharded over perf.model_devices={prep.cfg.perf.model_devices})"
    )


def privacy_line(prep: Prepared) -> str:
    """The log line of the run's privacy plan: unit, noise, sampling and epsilon."""
    cfg, plan = prep.cfg, prep.plan
    smp = plan.sampling
    who = (
        f"all {smp.num_clients} clients per round"
        if smp.full
        else f"{smp.clients_per_round} of {smp.num_clients} clients per round ({smp.sampling})"
    )
    if not cfg.privacy.enabled:
        return f"no DP (epsilon = inf); {who}"
    eps = (
        f"epsilon={plan.epsilon:.3f} at delta={plan.delta_after(plan.rounds):.3g} "
        f"({cfg.privacy.accountant}; "
        + ", ".join(
            f"{a}: {'n/a' if plan.epsilon_after(plan.rounds, a) is None else f'{plan.epsilon_after(plan.rounds, a):.3f}'}"
            for a in ("pld", "rdp")
        )
        + ")"
    )
    if plan.unit == "client":
        return (
            f"client-level DP (DP-FedAvg): {who}, z={plan.client_noise_multiplier:.4f}, "
            f"S={cfg.privacy.client_clip_norm:g}, {plan.rounds} rounds -> {eps}"
        )
    return (
        f"sample-level DP-SGD per client: {who}, "
        f"sigma={np.round(plan.noise_multipliers, 4).tolist()} "
        f"q={np.round(plan.sampling_rates, 5).tolist()} "
        f"rounds taken part={plan.rounds_participated.tolist()} x {cfg.federated.local_steps} "
        f"steps -> {eps}"
    )


def save_adapter(
    path: Path, params: PyTree, cfg: RunConfig, *, head_pattern: str | None = None
) -> None:
    """Writes every LoRA node's ``a`` ``[d_in, r]`` and ``b`` ``[r, d_out]`` (``<path>/a``,
    ``<path>/b``) and the trained head leaves (non-LoRA leaves whose path fullmatches
    ``head_pattern``, under their path, e.g. ``classifier/kernel``) to one safetensors file,
    atomically. A is included so the file is self-contained."""
    from safetensors.numpy import save_file

    tensors = {}
    for p, node in lora.lora_nodes(params).items():
        tensors[f"{p}/a"] = np.asarray(node.a)
        tensors[f"{p}/b"] = np.asarray(node.b)
    if head_pattern is not None:
        for kp, leaf in jax.tree_util.tree_leaves_with_path(params, is_leaf=lora.is_lora):
            p = lora.path_str(kp)
            if not lora.is_lora(leaf) and re.fullmatch(head_pattern, p):
                tensors[p] = np.asarray(leaf, np.float32)
    meta = {"lora": json.dumps(dataclasses.asdict(cfg.lora)), "model": cfg.model.name}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
