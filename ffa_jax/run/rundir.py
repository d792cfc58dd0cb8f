"""The run directory's one owner: ``config.yaml``, ``metrics.jsonl`` (one line per round) and
its TensorBoard event file, ``adapter.safetensors`` and the printed lines that describe a run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import secrets
import shutil
import struct
import sys
from collections.abc import Iterator
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
from ffa_jax.run.inputs import ScheduledRound
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
# Permission bits of the run directory, whatever the umask: the owner writes, the group (e.g. a
# team sharing a machine) reads, others nothing. checkpoints/ is owner-only (0700/0600): it
# holds the run's noise secret (ffa_jax.checkpoint).
FILE_MODE = 0o640
DIR_MODE = 0o750
# TensorBoard's event files sit next to metrics.jsonl (``tensorboard --logdir <output_dir>``
# shows every run by its name); tensorboardX names them events.out.tfevents.<time>.<host>.
EVENTS_GLOB = "events.out.tfevents.*"
# TensorBoard tags: metrics.jsonl's top-level keys under RELEASE_TAG, its ``diagnostics``
# object under DIAGNOSTICS_TAG -- the same split, so that a dashboard never mixes them.
RELEASE_TAG = "release"
DIAGNOSTICS_TAG = "diagnostics"
DIAGNOSTICS_NOTE = (
    "Computed from the clients' private data WITHOUT noise: outside the run's (epsilon, delta) "
    "guarantee. Do not publish; see docs/threat_model.md."
)
RELEASE_NOTE = (
    "Release-safe: the privacy accounting, and post-processing of the noised releases "
    "(update norm, held-out evaluation) or public counts."
)


def make_dir(path: Path) -> None:
    """Creates the run directory ``path`` (or a folder in it) with :data:`DIR_MODE` (its
    parents, e.g. ``output_dir``, keep the umask's)."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, DIR_MODE)


def group_readable(path: Path) -> None:
    """``chmod`` an existing run-directory file to :data:`FILE_MODE`."""
    os.chmod(path, FILE_MODE)


def start_run_dir(
    out: Path, cfg: RunConfig, prep: Prepared, history: list[dict], *, overwrite: bool
) -> None:
    """Process 0, once every input is valid: (re)creates ``out`` and writes ``config.yaml``
    (with what ``perf.*`` "auto" became as a comment) and ``metrics.jsonl`` (the lines of
    ``history``), atomically."""
    if overwrite and out.exists():
        shutil.rmtree(out)
    make_dir(out)
    atomic_write_text(
        out / CONFIG_FILE, cfg.to_yaml() + resolved_perf_comment(prep), mode=FILE_MODE
    )
    # The checkpoint's history is the truth: later lines (rounds done after the last
    # checkpoint, or a torn line from a crash) are dropped and recomputed.
    atomic_write_text(out / METRICS_FILE, "".join(metric_line(h) for h in history), mode=FILE_MODE)


def write_reports(
    out: Path, cfg: RunConfig, prep: Prepared, history: list[dict], summary: dict[str, Any]
) -> None:
    """Process 0, at the end: ``plots/metrics.png`` and ``summary.md`` (group-readable)."""
    from ffa_jax.run.report import write_plots, write_summary

    make_dir(out / PLOTS_DIR)
    write_plots(out / PLOTS_DIR, history, mode=FILE_MODE)
    write_summary(out / SUMMARY_FILE, cfg, prep, history, summary, mode=FILE_MODE)


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
        f"{r.microbatch_size} (tail micro-batch {r.tail_microbatch_size}), "
        f"perf.clients_per_chunk: {r.clients_per_chunk}, "
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


class MetricsLog:
    """Appends a run's records: one ``metrics.jsonl`` line and the same scalars as TensorBoard
    events (step = the record's ``round``) per :meth:`write`. A context manager; writes nothing
    unless ``primary`` (only process 0 owns the run directory).

    The TensorBoard tags split a record as ``metrics.jsonl`` does: top-level numbers under
    ``release/<key>``, the ``diagnostics`` object under ``diagnostics/<key>`` (described as
    outside the DP guarantee). Non-numeric and non-finite values (a non-private run's infinite
    epsilon, ``None``) are not plotted. ``first_step`` is the first round this log will write:
    events of that round and later left by an interrupted attempt are purged from TensorBoard's
    view (a resumed run recomputes them).
    """

    def __init__(self, out: Path, *, primary: bool, first_step: int = 0):
        self.out, self.primary, self.first_step = Path(out), primary, first_step
        self.lines = None
        self.events = None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def write(self, record: dict[str, Any]) -> None:
        """Appends ``record`` (flushed: a crash loses no finished round)."""
        if not self.primary:
            return
        if self.lines is None:
            self.lines = open(self.out / METRICS_FILE, "a", encoding="utf-8")
            group_readable(self.out / METRICS_FILE)
            self.events = summary_writer(self.out, purge_step=self.first_step)
            self.events.flush()  # creates the event file
            for path in self.out.glob(EVENTS_GLOB):
                group_readable(path)
        self.lines.write(metric_line(record))
        self.lines.flush()
        step = int(record["round"])
        for tag, value, note in tensorboard_scalars(record):
            self.events.add_scalar(tag, value, step, summary_description=note)
        self.events.flush()

    def close(self) -> None:
        if self.lines is not None:
            self.lines.close()
            self.events.close()
            self.lines = self.events = None


def tensorboard_scalars(record: dict[str, Any]) -> Iterator[tuple[str, float, str]]:
    """``(tag, value, description)`` of every finite number in ``record`` (a metrics line):
    ``release/<key>`` for top-level keys, ``diagnostics/<key>`` for the ``diagnostics``
    object, nested dicts joined with ``/``; ``round`` is the step, not a scalar."""

    def walk(prefix: str, d: dict[str, Any], note: str):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from walk(f"{prefix}/{k}", v, note)
            elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                yield f"{prefix}/{k}", float(v), note

    scalars = {k: v for k, v in record.items() if k not in NON_METRIC_KEYS + ("round",)}
    diag = scalars.pop("diagnostics", None) or {}
    yield from walk(RELEASE_TAG, scalars, RELEASE_NOTE)
    yield from walk(DIAGNOSTICS_TAG, diag, DIAGNOSTICS_NOTE)


def summary_writer(logdir: Path, *, purge_step: int):
    """A ``tensorboardX.SummaryWriter`` on ``logdir`` (no TensorFlow needed).

    tensorboardX imports torch when it is installed (to accept torch tensors); ffa_jax hands
    it floats only, so the import is hidden while tensorboardX loads: a run does not pay
    torch's seconds of import time and memory in a JAX process."""
    if "tensorboardX" not in sys.modules and "torch" not in sys.modules:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError
        try:
            import tensorboardX
        finally:
            del sys.modules["torch"]
    import tensorboardX

    # tensorboardX names the file by the second and the host and opens it "wb": a random
    # suffix keeps a resume within the same second from truncating the earlier attempt's file.
    return tensorboardX.SummaryWriter(
        logdir=str(logdir),
        purge_step=purge_step,
        flush_secs=30,
        filename_suffix=f".{secrets.token_hex(4)}",
    )


def read_events(out: Path) -> dict[str, list[tuple[int, float]]]:
    """The scalars of the TensorBoard event files in ``out``: ``{tag: [(step, value), ...]}``
    in file order, read with tensorboardX's protobuf (no TensorFlow or tensorboard needed).
    The records are TFRecord-framed (u64 length, u32 CRC, payload, u32 CRC)."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(out).glob(EVENTS_GLOB)):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                if v.WhichOneof("value") == "simple_value":
                    scalars.setdefault(v.tag, []).append((int(event.step), v.simple_value))
    return scalars


def metric_line(record: dict[str, Any]) -> str:
    """One ``metrics.jsonl`` line of ``record``: its scalars (not :data:`NON_METRIC_KEYS`),
    strict JSON (a non-finite epsilon becomes ``null``), newline-terminated."""
    scalars = {k: v for k, v in record.items() if k not in NON_METRIC_KEYS}
    return json.dumps(json_safe(scalars)) + "\n"


def round_record(
    prep: Prepared,
    r: int,
    inp: ScheduledRound,
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
    what = "DP-SGD"
    if plan.mechanism == "banded_mf":
        what = (
            f"BandMF DP-SGD ({plan.bands} bands, correlated noise over each client's steps, "
            "cyclic Poisson batches; q = rate within a group)"
        )
    return (
        f"sample-level {what} per client: {who}, "
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
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta), mode=FILE_MODE)
