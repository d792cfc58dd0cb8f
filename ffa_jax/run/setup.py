"""Prepare a run: validate every input, load the model, data and partition, plan the privacy;
the run's keys (public purposes from ``seed``, secret ones from the run's secret); the jitted
client update and round.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from ffa_jax import checkpoint as ckpt_lib
from ffa_jax import distributed, lora, workloads, xla_options
from ffa_jax import perf as perf_lib
from ffa_jax.config import RunConfig
from ffa_jax.data import partition
from ffa_jax.data.batching import cyclic_partition
from ffa_jax.data.clients import client_splits
from ffa_jax.errors import ConfigError
from ffa_jax.federated import modes
from ffa_jax.federated.client import make_client_optimizer, make_client_update
from ffa_jax.federated.round import (
    SERVER_KEY_ID,
    banded_noise_key,
    choose_devices,
    client_mesh,
    make_round,
    place_frozen,
)
from ffa_jax.federated.server import ServerState, make_server_optimizer, server_init
from ffa_jax.privacy import secret as secret_lib
from ffa_jax.privacy.correlated import BandedNoise, client_noise_init
from ffa_jax.privacy.ledger import PrivacyLedger
from ffa_jax.run import planner
from ffa_jax.types import PyTree

# Purposes; one per use so that no randomness is shared. Public ones are folded into the key
# of the public ``seed`` (root_key); secret ones derive from the run's secret
# (ffa_jax.privacy.secret), never from ``seed``.
KEY_LORA_A = 0  # public: the shared A (identical on every client)


KEY_HEAD = 1  # public: a randomly initialised classification head


KEY_TRAIN = 2  # secret: DP noise (round, client and step are folded in by the round)


SAMPLER_PURPOSE = 3  # secret: host-side Poisson sampling
# participation.PARTICIPATION_PURPOSE = 4: host-side draw of each round's clients
# run.audit.AUDIT_PURPOSE = 5: the privacy audit's canaries (ffa-jax audit)
CYCLIC_PARTITION_PURPOSE = 6  # secret: sample-level BandMF's split of each client into groups

# Second fold-in of the per-client BandMF noise streams' keys (after SERVER_KEY_ID, never a
# round index): distinct from the server's stream (SERVER_KEY_ID, SERVER_KEY_ID).
CLIENT_STREAMS_ID = SERVER_KEY_ID - 1


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
    # ``[N_val]`` indices of train_arrays held out as the validation split (data.validation_fraction;
    # empty: none) and its evaluator (``evaluate(params) -> {"val_*": ...}``, None: none).
    validation_indices: np.ndarray | None = None
    evaluate_validation: Any = None
    # Sample-level BandMF with bands b > 1: each client's cyclic Poisson groups, ``[b, n_k //
    # b]`` client-local indices (from the run's secret); None: every example every step.
    sample_groups: list[np.ndarray] | None = dataclasses.field(default=None, repr=False)


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
        overflow_probability=perf_lib.batch_overflow_probability(cfg),
        max_batch_size_of_run=ledger.max_batch_size if ledger is not None else None,
    )
    cfg = perf_lib.resolved_config(cfg, resolved)
    modes.check_config(cfg)
    key = root_key(cfg)
    wl = workloads.load(cfg, head_key=jax.random.fold_in(key, KEY_HEAD))
    for note in wl.notes:
        log(note)
    splits = client_splits(cfg, wl.train_labels, wl.num_labels)
    parts = splits.train
    evaluate_validation = None
    if len(splits.validation):
        if wl.split_evaluator is None:
            raise ConfigError(
                f"data.validation_fraction={cfg.data.validation_fraction}: the {wl.family} "
                "workload has no validation evaluator; use data.validation_fraction=0."
            )
        evaluate_validation = wl.split_evaluator(
            {name: a[splits.validation] for name, a in wl.train_arrays.items()}
        )
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

    sample_groups = None
    if sample_banded_noise(cfg) is not None and cfg.privacy.bands > 1:
        sample_groups = [
            cyclic_partition(
                secret_lib.numpy_rng(secret, CYCLIC_PARTITION_PURPOSE, k),
                int(n),
                cfg.privacy.bands,
            )
            for k, n in enumerate(sizes)
        ]
    return Prepared(
        sample_groups=sample_groups,
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
        validation_indices=splits.validation,
        evaluate_validation=evaluate_validation,
    )


def lora_key(cfg: RunConfig) -> jax.Array:
    """The shared, public LoRA key (A's init; FLoRA's re-initialisations fold in the round)."""
    return jax.random.fold_in(root_key(cfg), KEY_LORA_A)


def initial_params(cfg: RunConfig, base_params: PyTree) -> PyTree:
    """The run's starting tree: LoRA nodes at ``lora.targets`` with A from the public seed and
    B = 0 (:func:`ffa_jax.lora.init`), or, with ``lora.init_from``, A, B and the saved head of
    that PEFT adapter (:func:`ffa_jax.models.peft.init_from_adapter`)."""
    params = lora.init(base_params, cfg.lora, lora_key(cfg))
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
    """The run's :class:`~ffa_jax.run.planner.PrivacyPlan` (what ``ffa-jax privacy``
    prints). With a resumed run's ``ledger``, the same accounting of the ledger's noise
    multipliers, so the curve of a resumed run equals the uninterrupted run's entry for entry.
    ``secret``: the run's secret (participants), see :func:`ffa_jax.run.planner.make_plan`.
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
        private=unit(cfg) == "sample",
        microbatch_size=cfg.perf.microbatch_size or None,
        tail_microbatch_size=prep.perf.tail_microbatch_size or None,
        banded_noise=sample_banded_noise(cfg),
        # The workloads' models call lora.dense, which the book-keeping tape does not see:
        # skip the probe trace that "auto" would make only to fall back to this.
        clipping="vmap",
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
    server_opt = make_server_optimizer(cfg.server, cfg.federated.rounds)
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

    def make(update, releases):
        fn = make_round(
            update,
            server_opt,
            clients_per_chunk=cfg.perf.clients_per_chunk,
            mesh=mesh,
            client_level_dp=unit(cfg) == "client",
            return_deltas=releases,
            compiler_options=None if multi else options,
            banded_noise=banded_noise(cfg),
        )
        if multi:
            # Several processes: global inputs on the mesh spanning them, host outputs.
            fn = distributed.global_round(fn, mesh, compiler_options=options)
        return fn

    # lora.mode: which factors the clients train and send in each round (ffa_jax.federated.modes).
    fn = modes.mode_round(
        cfg.lora.mode,
        prep.trainable,
        make,
        client_update,
        return_deltas=return_deltas,
        lora_key=lora_key(cfg),
        a_init=cfg.lora.a_init,
        client_ranks=cfg.lora.client_ranks,
        client_noise=sample_banded_noise(cfg) is not None,
    )
    return fn, server_opt


def banded_noise(cfg: RunConfig) -> BandedNoise | None:
    """The run's correlated server noise (``privacy.mechanism=banded_mf`` under client-level
    DP: a strategy for ``federated.rounds`` rounds and ``privacy.bands`` bands), else None."""
    if unit(cfg) == "client" and cfg.privacy.mechanism == "banded_mf":
        return BandedNoise(cfg.federated.rounds, cfg.privacy.bands)
    return None


def sample_banded_noise(cfg: RunConfig) -> BandedNoise | None:
    """Each client's correlated DP-SGD noise (``privacy.mechanism=banded_mf`` under
    sample-level DP: a strategy for ``federated.rounds x federated.local_steps`` steps and
    ``privacy.bands`` bands), else None."""
    if unit(cfg) == "sample" and cfg.privacy.mechanism == "banded_mf":
        return BandedNoise(cfg.federated.rounds * cfg.federated.local_steps, cfg.privacy.bands)
    return None


def client_noise_keys(key: jax.Array, num_clients: int) -> jax.Array:
    """``[num_clients]`` initial keys of the clients' sample-level BandMF noise streams, from
    the run's training ``key`` (its secret): client k's is ``fold_in(fold_in(fold_in(key,
    SERVER_KEY_ID), CLIENT_STREAMS_ID), k)``, shared with no round, client step or server
    stream (those fold a round index < SERVER_KEY_ID first, or SERVER_KEY_ID twice)."""
    base = jax.random.fold_in(jax.random.fold_in(key, SERVER_KEY_ID), CLIENT_STREAMS_ID)
    return jax.vmap(lambda k: jax.random.fold_in(base, k))(jax.numpy.arange(num_clients))


def init_server_state(prep: Prepared, server_opt) -> ServerState:
    """The server state before round 0 (on the host). Under ``banded_mf`` it holds the
    correlated-noise state, keyed from the run's secret (:func:`train_key`), never ``seed``:
    the server's stream (``unit=client``), or (``unit=sample``) every client's own stream
    stacked on a client axis (leaves ``[N, ...]``; in a simulation the run holds them for
    the clients, as FedSA-LoRA's own B: never aggregated, never sent, saved only in the
    owner-only checkpoints)."""
    noise = banded_noise(prep.cfg)
    per_client = sample_banded_noise(prep.cfg)
    if noise is not None:
        state = noise.init(prep.trainable, banded_noise_key(train_key(prep)))
    elif per_client is not None:
        keys = client_noise_keys(train_key(prep), len(prep.client_indices))
        state = client_noise_init(per_client, prep.trainable, keys)
    else:
        state = ()
    # lora.mode's extra server state (FedEx/FLoRA base deltas, FedSVD's A, FedSA's client B).
    return jax.device_get(
        modes.init_state(
            prep.cfg.lora.mode,
            server_init(prep.trainable, server_opt, state),
            prep.params,
            num_clients=len(prep.client_indices),
        )
    )


def unit(cfg: RunConfig) -> str | None:
    """The privacy unit actually in force: ``sample``, ``client`` or None (not private)."""
    return cfg.privacy.unit if cfg.privacy.enabled else None


def evaluate(prep: Prepared, params: PyTree) -> dict[str, Any]:
    """The workload's test metrics (``eval_*`` keys, e.g. ``eval_accuracy`` or
    ``eval_exact_match``) of ``params`` (a tree that may hold LoRA nodes)."""
    return prep.workload.evaluate(params)


def evaluate_splits(prep: Prepared, params: PyTree, *, test: bool) -> dict[str, Any]:
    """The evaluations of one metrics line: the validation split's ``val_*`` metrics (when the
    run has one), the test split's ``eval_*`` metrics when ``test``, and ``eval_splits``
    naming the splits evaluated (``["validation", "test"]``, ``["test"]``, ...); ``{}`` when
    there is nothing to evaluate."""
    out: dict[str, Any] = {}
    splits = []
    if prep.evaluate_validation is not None:
        out.update(prep.evaluate_validation(params))
        splits.append("validation")
    if test:
        out.update(evaluate(prep, params))
        splits.append("test")
    if splits:
        out["eval_splits"] = splits
    return out


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
