"""One federated round as one ``jax.jit``: all clients' local training, aggregation, server step.

Clients are stacked on a leading axis of size K. They run in chunks of ``clients_per_chunk``
clients: inside a chunk the client update is ``vmap``ped (and the chunk's client axis is
sharded over the ``clients`` axis of a device mesh); chunks run one after another under
``lax.map``, so activation memory grows with the chunk size, not with K. Results do not depend
on the chunk size. When K is not a multiple of the chunk size, zero-weight dummy clients (all
examples masked out) pad the last chunk; they contribute nothing to the average. A chunk whose
clients all have weight 0 (dummies, or clients not taking part this round) is skipped with
``lax.cond``: its deltas and metrics are zeros, and it costs no compute. With partial
participation, :func:`ffa_jax.federated.participation.slots` fills whole chunks first.

Big models: the mesh may have a second axis, ``model`` (:func:`client_mesh`), over which the
frozen base weights are sharded fsdp-style (:func:`frozen_partition_spec`); each device then
holds ``1 / model_devices`` of every large frozen leaf and XLA's GSPMD partitioner inserts the
all-gathers where a layer needs the whole weight. Client inputs, per-client deltas and
metrics are sharded over ``clients`` only (replicated over ``model``); the trainable tree and
the optimizer state are replicated. Results equal the unsharded round's up to float
reassociation. A ``model`` group is always made of one process's devices
(:func:`model_groups`): in a multi-host run (:mod:`ffa_jax.distributed`) the weights are
sharded within each host and the ``clients`` axis spans the hosts.

PRNG: the round key is ``fold_in(key, round)``; client k's key is ``fold_in(round_key,
client_id[k])``; local step s folds ``s`` and the noise purpose into it (see
:mod:`ffa_jax.federated.client`). No two (round, client, step) triples share a noise key.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ffa_jax.errors import ConfigError
from ffa_jax.federated.client import ClientMetrics, DpParams
from ffa_jax.federated.server import ServerDpParams, ServerState, server_step
from ffa_jax.types import PyTree

CLIENTS_AXIS = "clients"
MODEL_AXIS = "model"
# Frozen leaves below this many elements (1 MiB in float32) stay replicated on the model axis.
MIN_SHARDED_ELEMENTS = 2**18


class RoundMetrics(NamedTuple):
    """Metrics of one round. ``clients`` fields are ``[K]`` (padding removed)."""

    clients: ClientMetrics
    loss: jax.Array  # weighted mean of the clients' training losses
    update_norm: jax.Array  # L2 norm of the averaged delta


class RoundReleases(NamedTuple):
    """What a round releases (``make_round(return_deltas=True)``): the clients' uploads,
    leaves ``[K, ...]`` (unclipped; under sample-level DP each is already private), and the
    aggregated update the server applies (noisy under client-level DP)."""

    deltas: PyTree
    mean_delta: PyTree
    # Per-client state the clients keep (``client_state`` of the round; leaves ``[K, ...]``,
    # None without): never aggregated, it stays with its client (e.g. FedSA-LoRA's own B).
    client_states: PyTree = None


class RoundInputs(NamedTuple):
    """Everything one round needs besides the server state, the frozen tree and the key: a
    pytree (a NamedTuple), passed whole to the jitted ``round_fn(state, frozen, inputs, key)``.

    K is the number of client slots of the round (participants first, then zero-weight
    dummies), S the local steps, B_max the fixed batch capacity. Every array is a runtime
    value: a new round with the same shapes never recompiles. A field left None has no
    leaves, so the round traces exactly as if the field did not exist.

    Attributes:
      batches: dict of ``[K, S, B_max, ...]`` arrays with ``"mask"`` ``[K, S, B_max]`` (bool).
      weights: ``[K]`` float32 aggregation weights (0 for dummy or non-participating clients;
        participation indicators in {0, 1} under client-level DP).
      client_ids: ``[K]`` int32 global client ids (fold into the PRNG key).
      dp: :class:`~ffa_jax.federated.client.DpParams` with ``[K]`` leaves (sample-level DP).
      server_dp: :class:`~ffa_jax.federated.server.ServerDpParams` (scalar leaves), required
        by a round built with ``client_level_dp``; ignored without.
      extra_grad_sums: tree like ``state.trainable`` with leaves ``[K, S, ...]``, added to
        each client's clipped gradient sum of each local step before its noise (the audit's
        gradient canaries, see :func:`ffa_jax.federated.client.make_client_update`).
      extra_update_sum: tree like ``state.trainable`` (no client axis), added to the sum of
        clipped client updates before the server's noise (``client_level_dp`` only: the
        audit's canary client updates, see :func:`ffa_jax.federated.server.server_step`).
      client_state: per-client state, leaves ``[K, ...]`` (what each participant keeps
        between rounds, e.g. FedSA-LoRA's own B, see :mod:`ffa_jax.federated.modes`):
        passed to the client update as its last argument, whose third output (the client's
        new state) comes back in ``RoundReleases.client_states`` (``return_deltas``). It
        is never aggregated.
    """

    batches: dict[str, jax.Array]
    weights: jax.Array
    client_ids: jax.Array
    dp: DpParams
    server_dp: ServerDpParams | None = None
    extra_grad_sums: PyTree = None
    extra_update_sum: PyTree = None
    client_state: PyTree = None


def client_mesh(num_devices: int | None = None, model_devices: int = 1) -> Mesh:
    """A ``clients x model`` mesh: ``num_devices`` rows of ``model_devices`` devices each.

    Args:
      num_devices: devices on the ``clients`` axis (``perf.devices``); None = all rows
        (``len(jax.devices()) // model_devices``).
      model_devices: devices on the ``model`` axis (``perf.model_devices``) over which the
        frozen weights are sharded; 1 = every device holds the whole frozen tree.

    Returns:
      A 2-D mesh, shape ``(num_devices, model_devices)``, axes ``("clients", "model")``.
      A row (one ``model`` group) is ``model_devices`` consecutive devices of ONE process
      (:func:`model_groups`): weight shards and the per-layer all-gathers never cross hosts
      (on TPU/GPU the fastest links). The rows are taken process by process, so in a
      multi-process run the ``clients`` axis spans the processes (and each process's
      remaining local groups). With one process this is ``jax.devices()`` in order.

    Raises:
      ConfigError: the mesh needs more devices than there are, or (several processes)
        ``model_devices`` does not divide a process's device count.
    """
    devices = jax.devices()
    m = model_devices
    if m < 1:
        raise ConfigError(f"perf.model_devices={m} must be >= 1.")
    rows = model_groups(devices, m)
    n = len(rows) if num_devices is None else num_devices
    if n < 1 or n > len(rows):
        raise ConfigError(
            f"perf.devices={n} x perf.model_devices={m} = {n * m} devices, but only "
            f"{len(devices)} are available; lower perf.devices or perf.model_devices so that "
            f"their product is at most {len(devices)}."
        )
    grid = np.asarray(rows[:n], dtype=object).reshape(n, m)
    return Mesh(grid, (CLIENTS_AXIS, MODEL_AXIS))


def model_groups(devices: list[Any], model_devices: int) -> list[list[Any]]:
    """``devices`` cut into groups (mesh rows) of ``model_devices`` devices of one process
    each, process by process (each process's devices in their given order).

    With one process: consecutive groups, devices that do not fill a group left out. With
    several, ``model_devices`` must divide every process's device count (a group spanning two
    hosts would all-gather every layer's weights over the slow inter-host network).

    Raises:
      ConfigError: several processes and ``model_devices`` does not divide the device count
        of one of them (checked before any compute; the message names the fix).
    """
    m = model_devices
    by_process: dict[int, list[Any]] = {}
    for d in devices:
        by_process.setdefault(d.process_index, []).append(d)
    if len(by_process) > 1:
        bad = {p: len(ds) for p, ds in sorted(by_process.items()) if len(ds) % m}
        if bad:
            counts = sorted({len(ds) for ds in by_process.values()})
            divisors = [d for d in range(1, min(counts) + 1) if all(c % d == 0 for c in counts)]
            raise ConfigError(
                f"perf.model_devices={m} must divide the device count of every process "
                f"(--distributed: the model axis stays within one host), but process(es) "
                f"{sorted(bad)} have {sorted(set(bad.values()))} local devices. Set "
                f"perf.model_devices to one of {divisors}."
            )
    rows = []
    for _, local in sorted(by_process.items()):
        rows += [local[i : i + m] for i in range(0, len(local) - m + 1, m)]
    return rows


def choose_devices(chunk: int, requested: int = 0, model_devices: int = 1) -> int:
    """Devices on the clients axis: ``requested``, or the most that divide the chunk size
    and fit next to a ``model_devices``-wide model axis."""
    if requested:
        return requested
    n = max(len(jax.devices()) // model_devices, 1)
    return max(d for d in range(1, min(n, chunk) + 1) if chunk % d == 0)


def frozen_partition_spec(shape: tuple[int, ...], model_size: int, min_elements: int) -> P:
    """The sharding rule of one frozen leaf over the ``model`` axis (fsdp-style).

    A leaf with at least ``min_elements`` elements is split along its largest dimension that
    ``model_size`` divides (the first of equal ones), e.g. an embedding ``[vocab, hidden]``
    along ``vocab``, a kernel ``[d_in, d_out]`` along the larger side. Smaller leaves
    (biases, norms, LoRA ``a`` of small rank) and leaves with no divisible dimension stay
    replicated: gathering them would cost more latency than their memory is worth.

    Args:
      shape: the leaf's shape.
      model_size: devices on the ``model`` axis.
      min_elements: size threshold in elements (not bytes).

    Returns:
      A ``PartitionSpec`` over ``("model",)`` or the replicated ``P()``.
    """
    if model_size <= 1 or math.prod(shape) < min_elements:
        return P()
    divisible = [i for i, d in enumerate(shape) if d % model_size == 0]
    if not divisible:
        return P()
    axis = max(divisible, key=lambda i: (shape[i], -i))
    return P(*([None] * axis + [MODEL_AXIS]))


def frozen_shardings(frozen: PyTree, mesh: Mesh, min_elements: int | None = None) -> PyTree:
    """``NamedSharding`` of every leaf of ``frozen`` by :func:`frozen_partition_spec`
    (all replicated when ``mesh`` has no ``model`` axis or it has size 1). ``min_elements``
    defaults to :data:`MIN_SHARDED_ELEMENTS`."""
    if min_elements is None:
        min_elements = MIN_SHARDED_ELEMENTS
    model_size = dict(mesh.shape).get(MODEL_AXIS, 1)
    return jax.tree_util.tree_map(
        lambda x: NamedSharding(
            mesh, frozen_partition_spec(tuple(x.shape), model_size, min_elements)
        ),
        frozen,
    )


def place_frozen(frozen: PyTree, mesh: Mesh, min_elements: int | None = None) -> PyTree:
    """``frozen`` on ``mesh``, each leaf sharded by :func:`frozen_shardings` (one transfer;
    pass the result to every round so the weights are not moved again).

    Pass host (numpy) leaves for models that do not fit one device: ``jax.device_put`` of a
    numpy array with a ``NamedSharding`` copies each device only its slice, so the whole
    leaf never exists on any device (``jax.Array`` leaves on one device work too, but that
    device held the whole leaf first).
    """
    return jax.device_put(frozen, frozen_shardings(frozen, mesh, min_elements))


# Reserved fold-in value for the server's noise key; client ids must stay below it.
SERVER_KEY_ID = 0xFFFFFFFF


def server_noise_key(key: jax.Array, round_idx: jax.Array | int) -> jax.Array:
    """The server's (client-level DP) noise key of round ``round_idx``."""
    return jax.random.fold_in(jax.random.fold_in(key, round_idx), SERVER_KEY_ID)


def banded_noise_key(key: jax.Array) -> jax.Array:
    """The initial key of the server's correlated (BandMF) noise stream of a run with training
    key ``key``. SERVER_KEY_ID is never a round index, so it shares no key with
    :func:`server_noise_key` or :func:`client_key`."""
    return jax.random.fold_in(jax.random.fold_in(key, SERVER_KEY_ID), SERVER_KEY_ID)


def client_key(key: jax.Array, round_idx: jax.Array | int, client_id: jax.Array | int) -> jax.Array:
    """Client ``client_id``'s key in round ``round_idx`` (0-based) of a run with training key ``key``."""
    return jax.random.fold_in(jax.random.fold_in(key, round_idx), client_id)


def _pad_clients(tree: PyTree, pad: int, value=0) -> PyTree:
    if pad == 0:
        return tree
    return jax.tree_util.tree_map(
        lambda x: jnp.concatenate([x, jnp.full((pad,) + x.shape[1:], value, x.dtype)]), tree
    )


def _to_chunks(tree: PyTree, chunk: int) -> PyTree:
    # [K] -> [K/chunk, chunk]: client i goes to (i % n_chunks, i // n_chunks) so that the
    # chunk axis keeps the contiguous block sharding of the original client axis.
    def f(x):
        n_chunks = x.shape[0] // chunk
        return jnp.swapaxes(x.reshape((chunk, n_chunks) + x.shape[1:]), 0, 1)

    return jax.tree_util.tree_map(f, tree)


def _from_chunks(tree: PyTree) -> PyTree:
    def f(x):
        y = jnp.swapaxes(x, 0, 1)
        return y.reshape((y.shape[0] * y.shape[1],) + y.shape[2:])

    return jax.tree_util.tree_map(f, tree)


def make_round(
    client_update: Callable[..., tuple[PyTree, ClientMetrics]],
    server_optimizer: optax.GradientTransformation,
    *,
    clients_per_chunk: int = 0,
    mesh: Mesh | None = None,
    client_level_dp: bool = False,
    return_deltas: bool = False,
    min_sharded_elements: int | None = None,
    compiler_options: dict[str, str] | None = None,
    banded_noise: Any = None,
) -> Callable[..., tuple[ServerState, RoundMetrics]]:
    """Builds the jitted ``round_fn``.

    ``round_fn(state, frozen, inputs, key) -> (state, RoundMetrics)``, or
    ``(state, RoundMetrics, RoundReleases)`` with ``return_deltas`` (what an adversary
    observes, for the privacy audit).

    Args (of ``round_fn``):
      state: :class:`ServerState`.
      frozen: the frozen tree (shared by all clients, never stacked); on a mesh with a
        ``model`` axis its large leaves are sharded over it (:func:`frozen_shardings`; place
        it once with :func:`place_frozen` to avoid a transfer per round).
      inputs: :class:`RoundInputs` (the clients' batches, weights, ids and DP parameters,
        leading axis K, and the optional fields). With ``client_level_dp`` its
        ``server_dp`` is required: each client's update is clipped to
        ``server_dp.clip_norm`` and the server noises the sum (DP-FedAvg, see
        :func:`ffa_jax.federated.server.server_step`); ``weights`` must then be
        participation indicators in {0, 1}.
      key: the run's training key (the round number is folded in here).

    ``clients_per_chunk`` (0 = all K at once) and ``mesh`` (from :func:`client_mesh`) change
    memory and speed only; ``min_sharded_elements`` is the size threshold of
    :func:`frozen_partition_spec`. ``compiler_options`` go to ``jax.jit`` (e.g.
    :func:`ffa_jax.xla_options.compiler_options`; speed only). ``banded_noise`` (a
    :class:`ffa_jax.privacy.correlated.BandedNoise`, with ``client_level_dp``): the server's
    noise is correlated over rounds (BandMF) and its state is ``state.noise``.
    """

    def round_fn(state: ServerState, frozen, inputs: RoundInputs, key):
        batches, weights, dp = inputs.batches, inputs.weights, inputs.dp
        client_ids, server_dp = inputs.client_ids, inputs.server_dp
        extra_grad_sums, extra_update_sum = inputs.extra_grad_sums, inputs.extra_update_sum
        client_state = inputs.client_state
        num_clients = weights.shape[0]
        chunk = clients_per_chunk or num_clients
        pad = (-num_clients) % chunk
        keys = jax.vmap(lambda i: client_key(key, state.round, i))(client_ids)

        client_args = (
            _pad_clients(batches, pad),
            _pad_clients(dp, pad, 1),  # expected batch 1 keeps dummy clients finite
            _pad_clients(keys, pad),
        )
        if extra_grad_sums is not None or client_state is not None:
            extra = None if extra_grad_sums is None else _pad_clients(extra_grad_sums, pad)
            client_args = (*client_args, extra)
        if client_state is not None:
            client_args = (*client_args, _pad_clients(client_state, pad))
        weights_p = _pad_clients(weights, pad)
        if mesh is not None:
            client_args = jax.lax.with_sharding_constraint(
                client_args, NamedSharding(mesh, P(CLIENTS_AXIS))
            )
            # Replicated, or fsdp-sharded over the model axis: GSPMD gathers each weight
            # where it is used, so no device ever holds the whole frozen tree at rest.
            frozen = jax.lax.with_sharding_constraint(
                frozen, frozen_shardings(frozen, mesh, min_sharded_elements)
            )

        if chunk == 1:
            # One client at a time without vmap: the client's own conditionals (skipping
            # empty micro-batches) stay real branches instead of becoming selects.
            def run_chunk(trainable, frozen_, *xs):
                one = jax.tree_util.tree_map(lambda x: x[0], xs)
                out = client_update(trainable, frozen_, *one)
                return jax.tree_util.tree_map(lambda x: x[None], out)
        else:
            run_chunk = jax.vmap(client_update, in_axes=(None, None) + (0,) * len(client_args))
        if chunk == num_clients + pad:
            outs = run_chunk(state.trainable, frozen, *client_args)
        else:
            chunked = _to_chunks(client_args, chunk)
            if mesh is not None:
                chunked = jax.lax.with_sharding_constraint(
                    chunked, NamedSharding(mesh, P(None, CLIENTS_AXIS))
                )
            chunk_weights = _to_chunks(weights_p, chunk)
            # The zeros branch below needs the chunk's output shapes. Tracing the whole client
            # update once for them (eval_shape) and once more for the branch cost ~1 s of a
            # quickstart run's first round; through one jitted function the branch reuses the
            # eval_shape trace (jit's cache: same function, same argument types).
            run_chunk = jax.jit(run_chunk)
            out_shape = jax.eval_shape(
                run_chunk,
                state.trainable,
                frozen,
                *jax.tree_util.tree_map(lambda x: x[0], chunked),
            )

            def one_chunk(args):
                xs, w = args
                # Chunks of non-participants only are skipped (their outputs are unused).
                return jax.lax.cond(
                    jnp.any(w > 0),
                    lambda xs: run_chunk(state.trainable, frozen, *xs),
                    lambda xs: jax.tree_util.tree_map(
                        lambda s: jnp.zeros(s.shape, s.dtype), out_shape
                    ),
                    xs,
                )

            outs = _from_chunks(jax.lax.map(one_chunk, (chunked, chunk_weights)))
        # (delta, metrics) or, with client_state, (delta, metrics, new client state).
        deltas, metrics = outs[0], outs[1]
        new_client_states = outs[2] if client_state is not None else None

        if client_level_dp and server_dp is None:
            raise ValueError("client_level_dp=True needs server_dp=ServerDpParams(...).")
        if not client_level_dp and extra_update_sum is not None:
            raise ValueError("extra_update_sum needs client_level_dp=True.")
        # Without client_level_dp any server_dp is ignored (the round is not client-level DP).
        banded = banded_noise if client_level_dp else None
        gaussian = client_level_dp and banded is None
        new_state, mean_delta, _ = server_step(
            state,
            deltas,
            weights_p,
            server_optimizer,
            server_dp=server_dp if client_level_dp else None,
            noise_key=server_noise_key(key, state.round) if gaussian else None,
            banded_noise=banded,
            extra_update_sum=extra_update_sum,
        )
        metrics = jax.tree_util.tree_map(lambda x: x[:num_clients], metrics)
        w = weights / jnp.maximum(jnp.sum(weights), 1e-12)
        update_norm = optax.tree.norm(mean_delta)
        round_metrics = RoundMetrics(
            clients=metrics, loss=jnp.sum(w * metrics.loss), update_norm=update_norm
        )
        if return_deltas:
            deltas, new_client_states = jax.tree_util.tree_map(
                lambda x: x[:num_clients], (deltas, new_client_states)
            )
            return new_state, round_metrics, RoundReleases(deltas, mean_delta, new_client_states)
        return new_state, round_metrics

    return jax.jit(round_fn, compiler_options=compiler_options)
