"""Multi-host runs: one SPMD program over the devices of every process (``--distributed``).

Every process (one per TPU VM host, GPU node or, for the CPU demo, local process) runs the same
``ffa-jax train`` command. :func:`initialize` joins them with ``jax.distributed.initialize``
*before any other JAX use*; ``jax.devices()`` then lists the devices of all processes, and the
round's ``clients`` mesh axis spans hosts.

What runs where:

* Host-side preparation (tokenisation, partition, privacy calibration, Poisson sampling of
  every round's batches) is cheap and seeded, so every process computes all of it itself,
  identically; nothing is sent between hosts but the round's collectives.
* The jitted round runs SPMD on global arrays (:func:`global_round`): each process builds
  from its (identical) host copy only the shards its own devices hold
  (``jax.make_array_from_callback``); the outputs (new server state, metrics) are replicated
  on every device, so each process reads them from a local shard, with no extra gather.
* Frozen weights sharded over a ``model`` axis (``perf.model_devices > 1``): every model
  group (mesh row) is made of one process's devices
  (:func:`ffa_jax.federated.round.model_groups`), so weight shards and the per-layer
  all-gathers stay within a host and only the round's client collectives cross hosts; the
  ``clients`` axis runs over the processes and each process's remaining groups.
  ``model_devices`` must divide every process's device count (``ConfigError`` before
  anything is loaded). Each process places the frozen tree on its own rows
  (:func:`local_mesh`, from its host copy) and :func:`global_round` uses those same device
  buffers as the global arrays of the round, sharded over ``model``; the trainable tree and
  the optimizer state are replicated.
* Evaluation runs on each process's own devices: its default device, or with
  ``perf.model_devices > 1`` its own model groups holding the sharded frozen tree (the same
  deterministic compute everywhere, so every process holds the same history).
* Files: only process 0 (:func:`is_primary`) writes the run directory (config, metrics,
  checkpoints, adapter, plots, summary). Resuming reads the checkpoint on every process, so
  ``output_dir`` must then be on a filesystem all hosts share (NFS, GCS Fuse).

Single-process runs never touch this module's global-array path: their results are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ffa_jax.errors import ConfigError
from ffa_jax.federated.round import CLIENTS_AXIS, MODEL_AXIS, frozen_shardings, model_groups


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Joins this process to the run's other processes (``jax.distributed.initialize``).

    Must be called before any other JAX use (no array, no ``jax.devices()``). With no
    arguments JAX detects the cluster itself: Cloud TPU VMs (every worker of the slice),
    SLURM (``srun``), Open MPI (``mpirun``); the coordinator may also come from
    ``JAX_COORDINATOR_ADDRESS``. Elsewhere (the CPU loopback demo, a hand-started GPU
    cluster) pass all three: the coordinator ``host:port`` (process 0's host; the port must be
    free there), the number of processes and this process's id in ``0..num_processes-1``.

    On CPU, cross-process collectives use gloo (set here in case a JAX version defaults to
    none).

    Raises:
      ConfigError: incomplete arguments, or JAX could not join the cluster (the message says
        which arguments to pass).
    """
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit) and None in explicit:
        raise ConfigError(
            "--distributed: pass all of --coordinator HOST:PORT, --num-processes N and "
            "--process-id I (got coordinator="
            f"{coordinator_address!r}, num_processes={num_processes!r}, "
            f"process_id={process_id!r}), or none of them on Cloud TPU VMs / SLURM / Open MPI, "
            "where JAX detects them."
        )
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise ConfigError(
            f"--process-id {process_id} must be in 0..{num_processes - 1} "
            f"(--num-processes {num_processes})."
        )
    if jax.config.jax_cpu_collectives_implementation in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
    except (ValueError, RuntimeError) as e:
        raise ConfigError(
            f"--distributed: jax.distributed.initialize failed ({e}). Outside Cloud TPU VMs, "
            "SLURM and Open MPI pass --coordinator HOST:PORT --num-processes N --process-id I "
            "on every process (the same coordinator everywhere: process 0's host)."
        ) from e


def is_distributed() -> bool:
    """True when this process is one of several (after :func:`initialize`)."""
    return jax.process_count() > 1


def is_primary() -> bool:
    """True on process 0, the only process that writes files (True in single-process runs)."""
    return jax.process_index() == 0


def check_mesh(mesh: Mesh | None) -> Mesh:
    """The round's mesh must hold devices of every process: a process without a device in it
    could not read the round's outputs, and its devices would idle. Raises ConfigError."""
    if mesh is None:
        have = set()
    else:
        have = {d.process_index for d in mesh.devices.flat}
    missing = sorted(set(range(jax.process_count())) - have)
    if missing:
        n = 0 if mesh is None else mesh.devices.size
        m = 1 if mesh is None else dict(mesh.shape).get(MODEL_AXIS, 1)
        devices = jax.devices()
        rows = model_groups(devices, m)
        # The mesh takes its rows (model groups) process by process.
        need = 1 + min(i for i, row in enumerate(rows) if row[0].process_index == missing[-1])
        what = "devices" if m == 1 else f"model groups of perf.model_devices={m} devices"
        raise ConfigError(
            f"perf.devices / perf.clients_per_chunk: the round's clients mesh has {n} of the "
            f"{len(devices)} devices of the {jax.process_count()} processes, none of "
            f"process(es) {missing}. Make the clients of a chunk (perf.clients_per_chunk; 0 = "
            "all clients of a round: federated.clients or federated.clients_per_round) a "
            f"multiple of {len(rows)} (the {what}), or set perf.devices to a divisor of it "
            f">= {need}."
        )
    return mesh


def local_mesh(mesh: Mesh) -> Mesh:
    """The rows (model groups) of ``mesh`` that are this process's devices, as a mesh with the
    same axes: where each process keeps its own sharded copy of the frozen tree (for eval),
    whose device buffers :func:`global_round` reuses for the round's global arrays."""
    me = jax.process_index()
    rows = [row for row in mesh.devices if row[0].process_index == me]
    if not rows or any(d.process_index != me for row in rows for d in row):
        raise ConfigError(
            f"process {me}: the round's mesh has no model group made of this process's devices "
            "alone (see ffa_jax.federated.round.client_mesh)."
        )
    return Mesh(np.asarray(rows, dtype=object), mesh.axis_names)


def _global(x: Any, sharding: NamedSharding) -> jax.Array:
    """A global array from this process's full host copy ``x`` (the same on every process):
    only the shards of this process's devices are materialised."""
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def _global_frozen(x: Any, sharding: NamedSharding) -> jax.Array:
    """A global frozen leaf. When ``x`` already lies on this process's devices of
    ``sharding`` with the same shards (placed by ``place_frozen`` on :func:`local_mesh`),
    its device buffers are reused: no transfer, no second copy. Otherwise it is built
    from the host copy (:func:`_global`)."""
    if isinstance(x, jax.Array):
        want = sharding.addressable_devices_indices_map(x.shape)
        have = {s.device: s for s in x.addressable_shards}
        if all(d in have and _same_index(have[d].index, idx, x.shape) for d, idx in want.items()):
            return jax.make_array_from_single_device_arrays(
                x.shape, sharding, [have[d].data for d in want]
            )
    return _global(x, sharding)


def _same_index(a: tuple, b: tuple, shape: tuple[int, ...]) -> bool:
    return all(sa.indices(n) == sb.indices(n) for sa, sb, n in zip(a, b, shape, strict=True))


def _client_sharded(mesh: Mesh, x: Any) -> NamedSharding:
    # Per-client inputs ([P, ...]) are split over the clients axis when it divides P; the
    # round reshards them anyway (with_sharding_constraint), so this only saves memory.
    shape = np.shape(x)
    if shape and shape[0] % mesh.shape[CLIENTS_AXIS] == 0:
        return NamedSharding(mesh, P(CLIENTS_AXIS))
    return NamedSharding(mesh, P())


def global_round(
    round_fn: Callable[..., Any],
    mesh: Mesh,
    min_sharded_elements: int | None = None,
    compiler_options: dict[str, str] | None = None,
) -> Callable[..., Any]:
    """Wraps the jitted round (:func:`ffa_jax.federated.round.make_round`, same signature) for
    a multi-process run: host inputs become global arrays on ``mesh``, and the outputs come
    back as host numpy trees (replicated on every device, read from a local shard).

    Every process must call the wrapper with the same values in the same order (the round's
    collectives pair up by call order). The frozen tree is placed once and reused while the
    caller passes the same object: each leaf as a global array sharded by
    :func:`ffa_jax.federated.round.frozen_shardings` (over the ``model`` axis when the mesh
    has one of size > 1, with ``min_sharded_elements`` as in ``make_round``; else
    replicated). The server state (trainable tree, optimizer state) is replicated.
    ``compiler_options`` go to the outer ``jax.jit`` (the one that is compiled; pass the
    round's own, see :func:`ffa_jax.run.train_compiler_options`).
    """
    check_mesh(mesh)
    replicated = NamedSharding(mesh, P())

    def inner(state, frozen, inputs, key_data, impl):
        # The key travels as its raw uint32 data (a plain array any process can build).
        key = jax.random.wrap_key_data(key_data, impl=impl)
        return round_fn(state, frozen, inputs, key)

    jitted = jax.jit(
        inner,
        out_shardings=replicated,
        static_argnums=4,
        compiler_options=compiler_options,
    )
    frozen_cache: list[Any] = [None, None]  # (host tree, its global copy)

    def to_host(x):
        return np.asarray(x.addressable_data(0))

    def wrapped(state, frozen, inputs, key):
        if frozen_cache[0] is not frozen:
            shardings = frozen_shardings(frozen, mesh, min_sharded_elements)
            frozen_cache[:] = [frozen, jax.tree_util.tree_map(_global_frozen, frozen, shardings)]

        def rep(tree):
            return jax.tree_util.tree_map(lambda x: _global(x, replicated), tree)

        def per_client(tree):
            return jax.tree_util.tree_map(lambda x: _global(x, _client_sharded(mesh, x)), tree)

        out = jitted(
            rep(state),
            frozen_cache[1],
            # Per-client fields ([P, ...]) split over the clients axis; the rest replicated.
            inputs._replace(
                batches=per_client(inputs.batches),
                weights=per_client(inputs.weights),
                client_ids=per_client(inputs.client_ids),
                dp=per_client(inputs.dp),
                server_dp=rep(inputs.server_dp),
                extra_grad_sums=per_client(inputs.extra_grad_sums),
                extra_update_sum=rep(inputs.extra_update_sum),
                client_state=per_client(inputs.client_state),
            ),
            rep(jax.random.key_data(key)),
            jax.random.key_impl(key),
        )
        return jax.tree_util.tree_map(to_host, out)

    return wrapped


def gather_ints(*values: int) -> np.ndarray:
    """``[process_count, len(values)]``: every process's ``values`` (a collective: every
    process must call it, with as many values)."""
    from jax.experimental import multihost_utils

    row = np.asarray([int(v) for v in values], np.int32)
    return np.asarray(multihost_utils.process_allgather(row)).reshape(jax.process_count(), -1)


__all__ = [
    "initialize",
    "is_distributed",
    "is_primary",
    "check_mesh",
    "local_mesh",
    "global_round",
    "gather_ints",
]
