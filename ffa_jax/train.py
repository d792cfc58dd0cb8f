"""The run loop: prepare everything (validating all input first), then rounds, eval, outputs.

``prepare(cfg)`` loads and checks the model files, the data (through the model family's
:class:`ffa_jax.workloads.Workload`: encoder text classification or LLaMA on GSM), the
partition and the privacy calibration before any training compute; ``train(cfg)`` runs the rounds and writes
``<output_dir>/<name>/`` (``config.yaml``, ``metrics.jsonl``, ``checkpoints/``,
``adapter.safetensors``, ``plots/metrics.png``, ``summary.md``). ``train(cfg, resume=True)``
(``ffa-jax train --resume RUN_DIR``) continues from the newest checkpoint, bit-identically to
an uninterrupted run (see :mod:`ffa_jax.checkpoint`).

Nothing is written before every input has been validated: a rejected config, data set, model
or checkpoint leaves no run directory behind, and a rejected resume changes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ffa_jax import allocator, distributed, lora, workloads, xla_options
from ffa_jax import checkpoint as ckpt_lib
from ffa_jax import perf as perf_lib
from ffa_jax.config import RunConfig, load_config
from ffa_jax.data import batching, partition
from ffa_jax.data.clients import partition_clients
from ffa_jax.errors import CheckpointError, ConfigError, DataError, FfaJaxError
from ffa_jax.federated import participation
from ffa_jax.federated.client import DpParams, make_client_optimizer, make_client_update
from ffa_jax.federated.round import (
    choose_devices,
    client_mesh,
    make_round,
    model_groups,
    place_frozen,
)
from ffa_jax.federated.server import ServerDpParams, make_server_optimizer, server_init
from ffa_jax.privacy import planner
from ffa_jax.privacy import secret as secret_lib
from ffa_jax.privacy.ledger import PrivacyLedger
from ffa_jax.report import metric_value

PyTree = Any

# Purposes; one per use so that no randomness is shared. Public ones are folded into the key
# of the public ``seed`` (root_key); secret ones derive from the run's secret
# (ffa_jax.privacy.secret), never from ``seed``.
KEY_LORA_A = 0  # public: the shared A (identical on every client)
KEY_HEAD = 1  # public: a randomly initialised classification head
# Evaluation outputs kept in the history (checkpointed, shown in summary.md) but not in
# metrics.jsonl: they are not scalars.
NON_METRIC_KEYS = ("eval_samples",)
KEY_TRAIN = 2  # secret: DP noise (round, client and step are folded in by the round)
SAMPLER_PURPOSE = 3  # secret: host-side Poisson sampling
# participation.PARTICIPATION_PURPOSE = 4: host-side draw of each round's clients
# privacy.audit_run.AUDIT_PURPOSE = 5: the privacy audit's canaries (ffa-jax audit)


class NonFiniteError(FfaJaxError, FloatingPointError):
    """A round produced a non-finite training loss, update or model; the run stopped before
    writing that round, so the metrics and the last checkpoint describe the last good round."""


@dataclasses.dataclass
class Prepared:
    """Everything a run needs, built and validated before any training compute.

    ``params`` and ``frozen`` share their frozen leaves with ``workload.base_params``. With
    ``perf.model_devices > 1`` those are numpy arrays in host memory (in ``model.dtype``,
    see :func:`ffa_jax.workloads.host_weights`) until :func:`build_round` places ``frozen``
    on the mesh, each device receiving only its shard, and rebuilds ``params`` from it; the
    workload keeps the host copy. At rest no device holds more than its shards.
    """

    cfg: RunConfig
    workload: workloads.Workload
    data: Any  # the task's data (workload.data)
    module: Any
    params: PyTree  # full tree with LoRA nodes at the targets
    trainable: PyTree
    frozen: PyTree
    train_arrays: dict[str, np.ndarray]
    test_arrays: dict[str, np.ndarray]
    client_indices: list[np.ndarray]
    # Noise, participants of every round, epsilon curves, ledger (None: prepare(plan_privacy=False)).
    plan: planner.PrivacyPlan | None
    sampling_rates: np.ndarray  # [K] q_k = batch_size / n_k
    noise_multipliers: np.ndarray  # [K] sigma_k (0 without sample-level DP)
    epsilon_curve: np.ndarray  # [rounds] epsilon spent after each round (max over units)
    max_batch_size: int
    partition_table: str
    target_paths: list[str]
    # The run's secret (ffa_jax.privacy.secret): noise, Poisson batches, participants. Kept
    # out of repr so that no log or traceback prints it; saved only in checkpoints.
    secret: int = dataclasses.field(repr=False, compare=False)
    # What perf.* "auto" resolved to (``cfg`` above already holds these integers).
    perf: perf_lib.ResolvedPerf | None = None


def root_key(cfg: RunConfig) -> jax.Array:
    """The key of the public ``seed``: public things only (frozen A, head init)."""
    return jax.random.key(cfg.seed)


def prepare(
    cfg: RunConfig,
    *,
    log=print,
    ledger: PrivacyLedger | None = None,
    plan_privacy: bool = True,
    secret: int | None = None,
) -> Prepared:
    """Loads model, tokenizer and data, partitions, builds the LoRA tree and calibrates noise.

    Args:
      cfg: the run config.
      secret: the run's secret (:mod:`ffa_jax.privacy.secret`; a resumed run's, from its
        checkpoint). None: ``privacy.noise_seed`` when set, else a fresh draw from the OS.
      ledger: a resumed run's privacy ledger: its noise multipliers (sigma_k, or the server's
        z) are used instead of calibrating new ones, and their epsilon is accounted.
      plan_privacy: calibrate the noise and account epsilon (seconds of host work). False
        leaves ``plan`` None and ``noise_multipliers`` / ``epsilon_curve`` NaN, for callers
        that plan one client themselves (a Flower client, see :mod:`ffa_jax.flower`) or need
        no privacy numbers (a Flower server).

    With ``perf.model_devices > 1`` the frozen leaves of ``params`` / ``frozen`` are host
    (numpy) arrays until :func:`build_round` shards them over the mesh (see
    :class:`Prepared`); the LoRA factors are small ``jax.Array`` leaves either way.

    Raises:
      ConfigError / DataError / WeightsError: bad input, before any training compute.
    """
    # perf.* "auto" -> concrete values, before anything is loaded (a bad combination is a
    # ConfigError here); from here on the run computes with ``prep.cfg`` (the resolved config).
    resolved = perf_lib.resolve(
        cfg.perf,
        expected_batch_size=cfg.client.batch_size,
        backend=jax.default_backend(),
        num_processes=jax.process_count(),
        eval_batch_size=cfg.eval.batch_size,
    )
    cfg = perf_lib.resolved_config(cfg, resolved)
    key = root_key(cfg)
    wl = workloads.load(cfg, head_key=jax.random.fold_in(key, KEY_HEAD))
    for note in wl.notes:
        log(note)
    parts = partition_clients(cfg, wl.train_labels, wl.num_labels)
    sizes = np.array([len(p) for p in parts])
    table = partition.partition_table(wl.train_labels, parts, wl.label_names)

    params = initial_params(cfg, wl.base_params)
    mask = lora.trainable_mask(params, cfg.lora.mode, extra=wl.head_pattern)
    trainable, frozen = lora.split(params, mask)

    # B_max: the Poisson bound padded to a multiple of the micro-batch; the planner accounts
    # for this final value (truncated Poisson sampling at B_max).
    max_batch = resolved.max_batch_size
    if secret is None:
        secret = secret_lib.resolve(cfg.privacy.noise_seed)
    if plan_privacy:
        plan = privacy_plan(cfg, sizes, max_batch, ledger, secret=secret)
        q, sigmas, eps_curve = plan.sampling_rates, plan.noise_multipliers, plan.epsilon_curve
    else:
        plan = None
        q = cfg.client.batch_size / sizes
        sigmas = np.full(len(sizes), np.nan)
        eps_curve = np.full(cfg.federated.rounds, np.nan)

    return Prepared(
        cfg=cfg,
        workload=wl,
        data=wl.data,
        module=wl.module,
        params=params,
        trainable=trainable,
        frozen=frozen,
        train_arrays=wl.train_arrays,
        test_arrays=wl.test_arrays,
        client_indices=parts,
        plan=plan,
        sampling_rates=q,
        noise_multipliers=sigmas,
        epsilon_curve=eps_curve,
        max_batch_size=max_batch,
        partition_table=table,
        target_paths=lora.target_paths(wl.base_params, cfg.lora.targets),
        secret=secret,
        perf=resolved,
    )


def initial_params(cfg: RunConfig, base_params: PyTree) -> PyTree:
    """The run's starting tree: LoRA nodes at ``lora.targets`` with A from the public seed and
    B = 0 (:func:`ffa_jax.lora.init`), or, with ``lora.init_from``, A, B and the saved head of
    that PEFT adapter (:func:`ffa_jax.models.peft.init_from_adapter`)."""
    params = lora.init(base_params, cfg.lora, jax.random.fold_in(root_key(cfg), KEY_LORA_A))
    if cfg.lora.init_from is not None:
        from ffa_jax.models.peft import init_from_adapter

        params = init_from_adapter(params, cfg.lora)
    return params


def privacy_plan(
    cfg: RunConfig,
    client_sizes: np.ndarray,
    max_batch_size: int,
    ledger: PrivacyLedger | None = None,
    *,
    secret: int | None = None,
) -> planner.PrivacyPlan:
    """The run's :class:`~ffa_jax.privacy.planner.PrivacyPlan` (what ``ffa-jax privacy``
    prints). With a resumed run's ``ledger``, the same accounting of the ledger's noise
    multipliers, so the curve of a resumed run equals the uninterrupted run's entry for entry.
    ``secret``: the run's secret (participants), see :func:`ffa_jax.privacy.planner.make_plan`.
    """
    return planner.make_plan(
        cfg,
        np.asarray(client_sizes, np.int64).tolist(),
        max_batch_size,
        ledger=ledger,
        secret=secret,
    )


def build_client_update(prep: Prepared):
    """The (unjitted) client update of a prepared run: local DP-SGD steps of one client, see
    :func:`ffa_jax.federated.client.make_client_update`."""
    cfg = prep.cfg
    return make_client_update(
        prep.workload.loss_fn,
        make_client_optimizer(cfg.client),
        # Client-level DP clips and noises whole updates at the server: clients run plain SGD.
        private=_unit(cfg) == "sample",
        microbatch_size=cfg.perf.microbatch_size or None,
    )


def train_compiler_options(prep: Prepared) -> dict[str, str] | None:
    """``jax.jit`` compile options of the run's training jits (``perf.cpu_library_fusion``,
    see :mod:`ffa_jax.xla_options`)."""
    return xla_options.compiler_options(prep.cfg.perf.cpu_library_fusion, prep.workload.family)


def train_key(prep: Prepared) -> jax.Array:
    """The run's secret training (noise) key: rounds, clients and local steps are folded into
    it (:func:`ffa_jax.federated.round.client_key`). Derived from ``prep.secret``, never from
    the public ``seed``."""
    return secret_lib.jax_key(prep.secret, KEY_TRAIN)


def client_weights(cfg: RunConfig, client_sizes) -> np.ndarray:
    """``[K]`` aggregation weights: ones (``uniform``) or ``n_k / n`` (``examples``)."""
    sizes = np.asarray(client_sizes, np.float32)
    if cfg.federated.weighting == "uniform":
        return np.ones(len(sizes), np.float32)
    return sizes / sizes.sum()


def build_round(prep: Prepared, *, return_deltas: bool = False):
    """The jitted round function and the server optimiser for a prepared run.

    ``return_deltas``: the round also returns what it releases
    (:class:`ffa_jax.federated.round.RoundReleases`), for the privacy audit.

    With ``perf.model_devices > 1`` this also places ``prep.frozen`` (and ``prep.params``)
    on the ``clients x model`` mesh, its large leaves sharded over ``model``, once: the
    frozen leaves go from host memory (where :func:`prepare` left them) straight to their
    shards, so no device holds a whole large leaf at rest, before or after a round or an
    evaluation (evaluation merges LoRA kernels into the same sharding); inside the jitted
    round and evaluation XLA gathers a weight where a layer needs it, transiently.

    In a multi-process run (:mod:`ffa_jax.distributed`) the round is wrapped by
    :func:`ffa_jax.distributed.global_round`: same signature, host (numpy) outputs. With
    ``perf.model_devices > 1`` each process then places ``prep.frozen`` on its own rows of
    the mesh (:func:`ffa_jax.distributed.local_mesh`; evaluation uses that copy) and the
    round reads the same buffers as one global array sharded over ``model``."""
    cfg = prep.cfg
    client_update = build_client_update(prep)
    server_opt = make_server_optimizer(cfg.server)
    chunk = cfg.perf.clients_per_chunk or prep.plan.sampling.max_clients
    model_devices = cfg.perf.model_devices
    multi = distributed.is_distributed()
    devices = choose_devices(chunk, cfg.perf.devices, model_devices)
    mesh = client_mesh(devices, model_devices) if devices * model_devices > 1 else None
    if multi:
        distributed.check_mesh(mesh)
    if model_devices > 1:
        # Several processes: each places the tree on its own model groups only (device_put
        # cannot reach other hosts' devices); the round's global arrays reuse those buffers.
        # From host memory (prepare's numpy leaves): each device receives only its slices.
        prep.frozen = place_frozen(prep.frozen, distributed.local_mesh(mesh) if multi else mesh)
        prep.params = lora.combine(prep.trainable, prep.frozen)  # the host leaves only in wl
    # jax takes compile options only on the outermost jit: global_round's when multi-process.
    options = train_compiler_options(prep)
    round_fn = make_round(
        client_update,
        server_opt,
        clients_per_chunk=cfg.perf.clients_per_chunk,
        mesh=mesh,
        client_level_dp=_unit(cfg) == "client",
        return_deltas=return_deltas,
        compiler_options=None if multi else options,
    )
    if multi:
        # Several processes: global inputs on the mesh spanning them, host outputs.
        round_fn = distributed.global_round(round_fn, mesh, compiler_options=options)
    return round_fn, server_opt


def _unit(cfg: RunConfig) -> str | None:
    """The privacy unit actually in force: ``sample``, ``client`` or None (not private)."""
    return cfg.privacy.unit if cfg.privacy.enabled else None


def client_batches(
    prep: Prepared, round_idx: int, slots: np.ndarray | list[int] | None = None
) -> dict[str, np.ndarray]:
    """Host-side Poisson sampling of the clients' batches for one round: ``[K, S, B_max, ...]``.

    Deterministic in ``(secret, round)`` (the run's secret, ``prep.secret``, never the public
    seed), so a resumed run, which reads the secret from its checkpoint, draws the same batches. The draw is
    made for all K clients, so client k's batches do not depend on who else takes part or is
    gathered (a Flower client gathers only its own, ``slots=[k]``). With ``slots`` (``[P]``
    client of each slot, -1 = dummy; see :func:`round_inputs`) only those batches are
    gathered, ``[P, S, B_max, ...]``, and dummy slots are fully masked. ``"_dropped"`` counts
    the sampled examples that did not fit B_max over all K clients.
    """
    cfg = prep.cfg
    rng = secret_lib.numpy_rng(prep.secret, SAMPLER_PURPOSE, round_idx)
    local_idx, mask, dropped = batching.poisson_batch_indices(
        rng,
        [len(p) for p in prep.client_indices],
        prep.sampling_rates,
        cfg.federated.local_steps,
        prep.max_batch_size,
    )
    parts = prep.client_indices
    if slots is not None:
        slots = np.asarray(slots, np.int64)
        real = slots >= 0
        pick = np.where(real, slots, 0)
        local_idx = np.where(real[:, None, None], local_idx[pick], 0)
        mask = mask[pick] & real[:, None, None]
        parts = [prep.client_indices[int(c)] for c in pick]
    out = batching.gather_client_batches(prep.train_arrays, parts, local_idx)
    out["mask"] = mask
    out["_dropped"] = dropped
    return out


class RoundInputs(NamedTuple):
    """The host-side inputs of one round, ``[P]`` slots (participants first, then dummies)."""

    slots: np.ndarray  # [P] client of each slot, -1 = dummy
    batches: dict[str, np.ndarray]  # [P, S, B_max, ...] with "mask"
    weights: np.ndarray  # [P] aggregation weights, 0 for dummies
    client_ids: np.ndarray  # [P] int32 global client ids (dummies: K + slot, unused by anyone)
    dp: DpParams  # [P] per-slot DP-SGD parameters
    server_dp: ServerDpParams | None  # client-level DP parameters (scalars)
    dropped: int  # sampled examples that did not fit B_max


def round_inputs(prep: Prepared, round_idx: int) -> RoundInputs:
    """Participants of round ``round_idx`` (from the plan), placed in fixed-size slots, and
    everything the jitted round needs for them. Same shapes every round: nothing recompiles."""
    cfg, plan = prep.cfg, prep.plan
    num_slots = plan.sampling.max_clients
    members = np.flatnonzero(plan.participation[round_idx])
    slots = participation.slots(members, num_slots, cfg.perf.clients_per_chunk)
    real = slots >= 0
    pick = np.where(real, slots, 0)
    batches = client_batches(prep, round_idx, slots)
    dropped = int(batches.pop("_dropped"))
    sizes = [len(p) for p in prep.client_indices]
    weights = np.where(real, client_weights(cfg, sizes)[pick], 0.0).astype(np.float32)
    client_ids = np.where(real, slots, len(sizes) + np.arange(num_slots)).astype(np.int32)
    dp = DpParams(
        clip_norm=np.full(num_slots, cfg.privacy.clip_norm, np.float32),
        noise_multiplier=np.where(real, prep.noise_multipliers[pick], 0.0).astype(np.float32),
        # Dummy slots divide by 1 (kept finite; their output is discarded).
        expected_batch_size=np.where(real, float(cfg.client.batch_size), 1.0).astype(np.float32),
    )
    server_dp = None
    if _unit(cfg) == "client":
        server_dp = ServerDpParams(
            clip_norm=np.float32(cfg.privacy.client_clip_norm),
            noise_multiplier=np.float32(plan.client_noise_multiplier),
            # Noise the sum, then divide by the FIXED expected number of participants (M).
            expected_clients=np.float32(plan.sampling.clients_per_round),
        )
    return RoundInputs(slots, batches, weights, client_ids, dp, server_dp, dropped)


def run_round(round_fn, prep: Prepared, state, inp: RoundInputs, key: jax.Array, **extra):
    """``(new server state, RoundMetrics)``: one call of the jitted round (from
    :func:`build_round`) on ``inp`` (:func:`round_inputs`) with the run's training ``key``.

    ``extra``: the audit's canary inputs (``extra_grad_sums`` / ``extra_update_sum`` of
    :func:`ffa_jax.federated.round.make_round`); a training run passes none."""
    return round_fn(
        state,
        prep.frozen,
        inp.batches,
        inp.weights,
        inp.client_ids,
        inp.dp,
        key,
        inp.server_dp,
        **extra,
    )


def evaluate(prep: Prepared, params: PyTree) -> dict[str, Any]:
    """The workload's test metrics (``eval_*`` keys, e.g. ``eval_accuracy`` or
    ``eval_exact_match``) of ``params`` (a tree that may hold LoRA nodes)."""
    return prep.workload.evaluate(params)


def run_dir(cfg: RunConfig) -> Path:
    return Path(cfg.output_dir) / cfg.name


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _bytes_of_one_client(tree: PyTree) -> int:
    return lora.tree_bytes(tree)


def resume_config(run_dir: str | Path, overrides=()) -> RunConfig:
    """The config to resume ``run_dir`` with: its ``config.yaml`` plus ``section.field=value``
    overrides, with ``output_dir``/``name`` pointing at ``run_dir`` (wherever it now lives).

    Raises:
      CheckpointError: ``run_dir`` is not a run directory (no ``config.yaml``).
      ConfigError: an override is invalid.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(
            f"--resume {str(run_dir)!r}: not a run directory (no config.yaml in it); pass the "
            "folder of a run started with ffa-jax train, e.g. runs/quickstart."
        )
    where = [f"output_dir={run_dir.parent}", f"name={run_dir.name}"]
    return load_config(run_dir / "config.yaml", [*overrides, *where])


def _check_restored(
    restored: ckpt_lib.Restored, prep: Prepared, like: PyTree, a_hash: str, d_hash: str
) -> None:
    """A restored checkpoint must belong to this model, data and seed, and its remaining
    rounds must fit the privacy budget. Raises CheckpointError / ConfigError."""
    cfg, where = prep.cfg, repr(str(restored.step_dir))
    ckpt_lib.check_leaves(restored, like)
    if restored.a_hash != a_hash:
        raise CheckpointError(
            f"checkpoint {where}: the frozen A matrices regenerated from seed={cfg.seed} differ "
            f"from the ones the run was trained with (SHA-256 {a_hash[:12]}... vs "
            f"{restored.a_hash[:12]}...): the LoRA init, the seed or the JAX PRNG changed. "
            "Resume with the seed and the ffa_jax/jax versions that wrote it, or start a new run."
        )
    led = restored.ledger
    sizes = tuple(int(len(p)) for p in prep.client_indices)
    if led.client_sizes != sizes or led.max_batch_size != prep.max_batch_size:
        raise CheckpointError(
            f"checkpoint {where}: the clients now hold {list(sizes)} examples (B_max "
            f"{prep.max_batch_size}), the checkpoint's clients held {list(led.client_sizes)} "
            f"(B_max {led.max_batch_size}): data.task's data changed, or perf.microbatch_size "
            "did (B_max is padded to a multiple of it). Restore the original data and "
            "perf.microbatch_size, or start a new run."
        )
    if restored.data_hash != d_hash:
        raise CheckpointError(
            f"checkpoint {where}: the tokenised data or the client partition differ from the "
            f"run's (data.task={cfg.data.task!r}, model {cfg.model.name!r} tokenizer): the data "
            "file or the tokenizer changed. Restore them, or start a new run."
        )
    if not cfg.privacy.enabled:
        return
    r = restored.round
    expected = tuple(int(c) for c in prep.plan.participation[:r].sum(axis=0))
    if (
        led.rounds_done != r
        or led.steps_per_round != cfg.federated.local_steps
        or led.rounds_participated != expected
        or led.unit != cfg.privacy.unit
    ):
        raise CheckpointError(
            f"checkpoint {where}: its privacy ledger ({led.unit}-level, {led.rounds_done} rounds "
            f"of {led.steps_per_round} steps, rounds taken part {list(led.rounds_participated)}) "
            f"does not match {r} rounds of this run's schedule ({list(expected)}); the "
            "checkpoint is inconsistent. Start a new run."
        )
    spent_now = float(prep.epsilon_curve[r - 1])
    final = float(prep.epsilon_curve[-1])
    if cfg.privacy.noise_multiplier is None and max(final, led.epsilon_spent) > cfg.privacy.epsilon:
        within = int(np.sum(prep.epsilon_curve <= cfg.privacy.epsilon))
        raise ConfigError(
            f"federated.rounds={cfg.federated.rounds}: resuming at round {r} (epsilon spent "
            f"{max(spent_now, led.epsilon_spent):.4f}) with the run's noise multipliers would "
            f"spend epsilon={final:.4f} by the last round, over the budget "
            f"privacy.epsilon={cfg.privacy.epsilon:g}. Use federated.rounds <= {max(within, r)} "
            "(the most rounds within the budget), or start a new run with a new budget."
        )


def train(
    cfg: RunConfig,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    log=print,
) -> dict[str, Any]:
    """Runs a whole federated fine-tuning job and writes its run directory.

    Args:
      cfg: the run config; the run directory is ``cfg.output_dir/cfg.name``.
      overwrite: replace an existing run directory.
      resume: continue the run in that directory from its newest checkpoint (from round 0 if
        it has none), bit-identically to an uninterrupted run; ``cfg`` must equal the
        checkpoint's config except for :data:`ffa_jax.checkpoint.RESUMABLE_FIELDS`. Metrics
        lines after the checkpoint's round are dropped and recomputed. A resumed run that is
        already complete only rewrites the final outputs.
      progress: show a progress bar.

    In a multi-process run (after :func:`ffa_jax.distributed.initialize`) every process calls
    ``train`` with the same arguments and computes the same run; process 0 alone writes the
    run directory, logs and shows progress. All return the same summary.

    Returns:
      The final summary (test accuracy, epsilon, bytes, wall time, run directory).

    Raises:
      ConfigError / DataError / WeightsError / CheckpointError: bad input; nothing written.
      NonFiniteError: a round produced a non-finite loss or update; the metrics and
        checkpoints written so far (up to the last good round) are left intact.
    """
    t_start = time.time()
    out = run_dir(cfg)
    ckpt_dir = ckpt_lib.checkpoint_dir(out)
    # Multi-process runs (ffa_jax.distributed): every process computes everything, process 0
    # alone writes files and reports.
    primary = distributed.is_primary()
    if not primary:
        progress, log = False, silent
    restored = None
    failure = None
    try:
        restored = _open_run_dir(cfg, out, ckpt_dir, overwrite=overwrite, resume=resume)
    except FfaJaxError as e:
        failure = e
    if distributed.is_distributed():
        _agree_on_start(out, failure, restored)
    if failure is not None:
        raise failure
    # Before loading anything: the model axis must fit each process's devices (the same
    # check, on the same device list, fails on every process alike).
    model_groups(jax.devices(), cfg.perf.model_devices)
    prep = prepare(
        cfg,
        log=log,
        ledger=restored.ledger if restored is not None else None,
        secret=run_secret(cfg, restored),
    )
    a_hash = ckpt_lib.a_matrices_hash(prep.params)
    d_hash = ckpt_lib.data_hash([prep.train_arrays, prep.test_arrays], prep.client_indices)
    round_fn, server_opt = build_round(prep)
    state = jax.device_get(server_init(prep.trainable, server_opt))
    history: list[dict[str, Any]] = []
    start = 0
    if restored is not None:
        _check_restored(restored, prep, state, a_hash, d_hash)
        state = ckpt_lib.restore_state(restored, state)
        history, start = restored.history, restored.round
    _check_budget(prep, restored)
    log(prep.partition_table)
    log(_privacy_line(prep))
    log(noise_line(cfg))
    log(allocator.describe(jax.default_backend()))
    log(prep.perf.describe())
    if cfg.perf.model_devices > 1:
        log(_frozen_line(prep))
    if resume:
        log(
            f"resuming {out} at round {start} of {cfg.federated.rounds}"
            + ("" if restored else " (no checkpoint yet)")
        )

    # Every input is valid: from here on the run directory is written (by process 0).
    metrics_path = out / "metrics.jsonl" if primary else Path(os.devnull)
    if primary:
        if overwrite and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write(out / "config.yaml", cfg.to_yaml() + _resolved_perf_comment(prep))
        # The checkpoint's history is the truth: later lines (rounds done after the last
        # checkpoint, or a torn line from a crash) are dropped and recomputed.
        _atomic_write(metrics_path, "".join(_metric_line(h) for h in history))

    key = train_key(prep)
    per_client_bytes = _bytes_of_one_client(prep.trainable)
    wl = prep.workload
    if cfg.eval.baseline and not any(h["round"] == 0 for h in history):
        # The pretrained model (B = 0, so the LoRA tree computes the base model), as round 0.
        t0 = time.time()
        record = {"round": 0, **evaluate(prep, prep.params), "seconds": time.time() - t0}
        history.append(record)
        with open(metrics_path, "a") as mf:
            mf.write(_metric_line(record))
        log(f"round 0 (pretrained model): {wl.metric_title} {record[wl.metric]:.4f}")

    rounds = range(start, cfg.federated.rounds)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            rounds,
            desc=f"{cfg.name} ({cfg.lora.mode})",
            unit="round",
            initial=start,
            total=cfg.federated.rounds,
        )
        rounds = bar
    last_saved = start if restored is not None else None
    with (
        ckpt_lib.Checkpointer(ckpt_dir, keep=cfg.checkpoint.keep)
        if primary
        else ckpt_lib.NoCheckpointer() as ckpt,
        open(metrics_path, "a") as mf,
    ):
        for r in rounds:
            t0 = time.time()
            inp = round_inputs(prep, r)
            new_state, m = run_round(round_fn, prep, state, inp, key)
            loss = float(m.loss)
            _check_finite(r, loss, float(m.update_norm), new_state.trainable, ckpt_dir, last_saved)
            # The state lives on the host between rounds, as after a restore: every round
            # (fresh or resumed) calls the same executable with the same input placement.
            state = jax.device_get(new_state)
            record = _round_record(prep, r, inp, m, loss, per_client_bytes)
            is_last = r + 1 == cfg.federated.rounds
            if is_last or (cfg.eval.every and (r + 1) % cfg.eval.every == 0):
                record.update(evaluate(prep, lora.combine(state.trainable, prep.frozen)))
            record["seconds"] = time.time() - t0
            history.append(record)
            mf.write(_metric_line(record))
            mf.flush()
            if is_last or (cfg.checkpoint.every and (r + 1) % cfg.checkpoint.every == 0):
                ckpt.save(
                    r + 1,
                    state,
                    cfg=cfg,
                    history=history,
                    ledger=prep.plan.ledger(r + 1),
                    a_hash=a_hash,
                    data_fingerprint=d_hash,
                    secret=prep.secret,
                )
                last_saved = r + 1
            if bar is not None:
                post = {"loss": f"{loss:.4f}", "eps": f"{record['epsilon']:.2f}"}
                if wl.metric in record:
                    post[wl.metric_short] = f"{record[wl.metric]:.3f}"
                bar.set_postfix(post)
    if bar is not None:
        bar.close()

    final_params = lora.combine(state.trainable, prep.frozen)
    if primary:
        save_adapter(out / "adapter.safetensors", final_params, cfg, head_pattern=wl.head_pattern)
    summary = {
        "run_dir": str(out),
        **wl.summary_fields(history),
        "epsilon": history[-1]["epsilon"],
        "epsilon_pld": history[-1].get("epsilon_pld"),
        "epsilon_rdp": history[-1].get("epsilon_rdp"),
        "delta": history[-1]["delta"],
        "privacy_unit": _unit(cfg) or "none",
        "uplink_bytes_total": sum(metric_value(h, "uplink_bytes", 0) for h in history),
        "uplink_bytes_per_client_per_round": per_client_bytes,
        "wall_seconds": time.time() - t_start,
        "rounds": cfg.federated.rounds,
        "noise": noise_note(cfg),
        # What perf.* "auto" became on this machine (speed only; see ffa_jax.perf).
        "perf_resolved": prep.perf.as_dict(),
    }
    if primary:
        from ffa_jax.report import write_plots, write_summary

        write_plots(out / "plots", history)
        write_summary(out / "summary.md", cfg, prep, history, summary)
    return _json_safe(summary)


def _resolved_perf_comment(prep: Prepared) -> str:
    """YAML comment lines recording what ``perf.*: auto`` resolved to in this run. The config
    keeps ``auto`` (a rerun elsewhere resolves for its own backend); B_max does not depend on
    the backend, so a resume on another machine accounts the same privacy."""
    r = prep.perf
    return (
        f"# resolved for this run ({r.backend}, ffa_jax.perf): perf.microbatch_size: "
        f"{r.microbatch_size}, perf.clients_per_chunk: {r.clients_per_chunk}, "
        f"B_max: {r.max_batch_size}, eval.batch_size: {r.eval_batch_size}\n"
    )


def run_secret(cfg: RunConfig, restored: ckpt_lib.Restored | None) -> int:
    """The secret of this run (:mod:`ffa_jax.privacy.secret`): a resumed run's from its
    checkpoint; else ``privacy.noise_seed`` when set; else a fresh draw from the OS.

    In a multi-process run every process must use the same secret: process 0 draws it and
    broadcasts it (a collective, on every process) over the processes' own channel, the
    jax.distributed coordination service; it is never written outside the checkpoints.
    """
    if restored is not None:
        return restored.secret
    if cfg.privacy.noise_seed is not None:
        return int(cfg.privacy.noise_seed)
    drawn = secret_lib.draw()
    if distributed.is_distributed():
        # 16-bit words fit gather_ints' int32; every process takes process 0's.
        words = [(drawn >> (16 * i)) & 0xFFFF for i in range(secret_lib.SECRET_BITS // 16)]
        rows = distributed.gather_ints(*words)
        drawn = sum(int(w) << (16 * i) for i, w in enumerate(rows[0]))
    return drawn


def noise_note(cfg: RunConfig) -> str:
    """What every output of the run says about where its noise comes from."""
    if cfg.privacy.noise_seed is None:
        return secret_lib.SECRET_NOTE
    return secret_lib.REPRODUCIBLE_WARNING


def noise_line(cfg: RunConfig) -> str:
    """The log line about the noise's source (a warning when ``privacy.noise_seed`` is set)."""
    if cfg.privacy.noise_seed is None:
        return (
            "noise, Poisson batches and client sampling: a 256-bit secret drawn from the OS, "
            "kept only in checkpoints/ (owner-only files; protect them like the data)"
        )
    return "WARNING: " + secret_lib.REPRODUCIBLE_WARNING


def silent(*args, **kwargs) -> None:
    """A ``log`` that prints nothing: processes other than 0 of a multi-process run (process
    0 reports), and Flower's per-message prepares."""


def _open_run_dir(
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


def _agree_on_start(out: Path, failure: Exception | None, restored) -> None:
    """Multi-process runs: every process learns whether all accepted the run directory and
    resume from the same round, so that none is left waiting in a collective for a process
    that stopped. Raises (on the processes that accepted) ConfigError / CheckpointError."""
    rows = distributed.gather_ints(failure is None, -1 if restored is None else restored.round)
    if failure is not None:
        return  # this process raises its own error
    bad = [i for i, (ok, _) in enumerate(rows) if not ok]
    if bad:
        raise ConfigError(
            f"process(es) {bad} rejected the run (their error is printed in their log); "
            "every process stops."
        )
    rounds = sorted({int(r) for _, r in rows})
    if len(rounds) > 1:
        raise CheckpointError(
            f"--resume {str(out)!r}: the processes found different checkpoints (rounds "
            f"{rounds}, -1 = none); a multi-process run must keep output_dir on a filesystem "
            "every host shares (NFS, GCS Fuse)."
        )


def _metric_line(record: dict[str, Any]) -> str:
    scalars = {k: v for k, v in record.items() if k not in NON_METRIC_KEYS}
    return json.dumps(_json_safe(scalars)) + "\n"


def _round_record(prep: Prepared, r: int, inp: RoundInputs, m, loss, per_client_bytes) -> dict:
    """One metrics line of round ``r`` (0-based): averages over the round's participants.

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
        "grad_norm": part_mean(c.grad_norm) if _unit(cfg) == "sample" else None,
        "examples": int(np.sum(c.num_examples)),
        "dropped_examples": inp.dropped,
        # L2 norm of the participants' updates before any client-level clipping (to choose S).
        "client_update_norm": part_mean(c.delta_norm),
    }
    counts = {
        "participants": n_part,
        "uplink_bytes": per_client_bytes * n_part,
        "downlink_bytes": per_client_bytes * n_part,
    }
    if _unit(cfg) == "client":
        norms = np.asarray(c.delta_norm)[real]
        diag["client_clipped_fraction"] = (
            float(np.mean(norms > cfg.privacy.client_clip_norm)) if n_part else 0.0
        )
    # Client-level DP hides who took part; the realised count would reveal it.
    (diag if _unit(cfg) == "client" and not plan.sampling.full else record).update(counts)
    record["diagnostics"] = diag
    return record


def _frozen_line(prep: Prepared) -> str:
    """How much of the frozen tree one device holds (``perf.model_devices > 1``)."""
    leaves = jax.tree_util.tree_leaves(prep.frozen)
    held = sum(x.addressable_shards[0].data.nbytes for x in leaves)
    total = sum(x.nbytes for x in leaves)
    return (
        f"frozen weights: {held / 2**20:.2f} MiB per device of {total / 2**20:.2f} MiB "
        f"(sharded over perf.model_devices={prep.cfg.perf.model_devices})"
    )


def _privacy_line(prep: Prepared) -> str:
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


def _check_budget(prep: Prepared, restored: ckpt_lib.Restored | None) -> None:
    """``privacy.max_epsilon``: a run (or the rest of a resumed run) that would spend more
    refuses to start, before anything is written. Raises ConfigError."""
    cfg, plan = prep.cfg, prep.plan
    cap = cfg.privacy.max_epsilon
    if cap is None or not cfg.privacy.enabled:
        return
    if restored is not None and restored.ledger.epsilon_spent > cap:
        raise ConfigError(
            f"privacy.max_epsilon={cap:g}: the checkpoint {str(restored.step_dir)!r} has already "
            f"spent epsilon={restored.ledger.epsilon_spent:.4f} ({restored.ledger.accountant}) "
            f"after {restored.round} rounds, over the cap. Nothing was changed; the run cannot "
            "continue under this cap (start a new run for a new budget)."
        )
    if plan.epsilon > cap:
        within = int(np.sum(plan.epsilon_curve <= cap))
        start = restored.round if restored is not None else 0
        raise ConfigError(
            f"privacy.max_epsilon={cap:g}: this run would spend epsilon={plan.epsilon:.4f} "
            f"({cfg.privacy.accountant}) by round {plan.rounds}, over the cap. Use "
            f"federated.rounds <= {max(within, start)} (the most rounds within the cap), a "
            "larger privacy.noise_multiplier, or calibrate to privacy.epsilon <= the cap."
        )


def _check_finite(r, loss, update_norm, trainable, ckpt_dir: Path, last_saved) -> None:
    """Raises :class:`NonFiniteError` if round ``r`` (0-based) went non-finite."""
    finite_tree = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(trainable))
    bad = [
        name
        for name, ok in (
            (f"the training loss is {loss}", math.isfinite(loss)),
            (f"the averaged update's norm is {update_norm}", math.isfinite(update_norm)),
            ("the updated trainable tree has non-finite entries", finite_tree),
        )
        if not ok
    ]
    if not bad:
        return
    where = (
        f"the last good checkpoint is {str(ckpt_dir / str(last_saved))!r} (round {last_saved})"
        if last_saved
        else "no checkpoint had been saved yet"
    )
    raise NonFiniteError(
        f"round {r + 1}: {'; '.join(bad)}. The run stopped before writing round {r + 1}; {where}, "
        "and metrics.jsonl ends at the last good round. Lower client.learning_rate (or "
        "server.learning_rate), or check the data, and start a new run."
    )


def _json_safe(d: dict[str, Any]) -> dict[str, Any]:
    # Strict JSON has no infinity: a non-private run's epsilon is written as null.
    def safe(v):
        if isinstance(v, dict):
            return {k: safe(x) for k, x in v.items()}
        return None if isinstance(v, float) and not math.isfinite(v) else v

    return {k: safe(v) for k, v in d.items()}


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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)


__all__ = [
    "NonFiniteError",
    "Prepared",
    "prepare",
    "privacy_plan",
    "initial_params",
    "save_adapter",
    "build_client_update",
    "build_round",
    "client_batches",
    "client_weights",
    "round_inputs",
    "run_round",
    "train_key",
    "run_secret",
    "metric_value",
    "noise_note",
    "evaluate",
    "resume_config",
    "train",
    "DataError",
]
