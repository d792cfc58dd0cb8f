"""The two halves of a round, as a Flower deployment runs them, without Flower.

:class:`ClientNode` is what one client (one SuperNode) computes in a round; :class:`ServerRun`
is what the server computes from the clients' deltas. They are built on the functions of the
in-process simulation (:func:`ffa_jax.run.train`): the same :func:`ffa_jax.run.prepare`,
batches (:func:`ffa_jax.run.client_batches`), client update
(:func:`ffa_jax.federated.client.make_client_update`), PRNG keys
(:func:`ffa_jax.federated.round.client_key`), and server step (aggregation and Optax step,
:func:`ffa_jax.federated.server.server_step`). With the same config and
``privacy.noise_seed`` (a reproducible research run, not a private one), a distributed run
computes what :func:`ffa_jax.run.train` computes, up to float32 rounding (one client is
``jit``-compiled on its own instead of ``vmap``-ped with the others).

Client k regenerates the shared frozen A from the public config seed, and draws its noise and
Poisson batches from **its own secret**: a 256-bit draw from its operating system, kept in its
node state, never sent (with ``privacy.noise_seed`` set and the node's consent, that seed, as
in the simulation). It calibrates its own noise multiplier sigma_k from its own sampling rate
(the simulation calibrates each client independently, so the numbers are identical). Only the
trainable tree (B under FFA-LoRA) travels: the server sends it, each client returns its
noised delta and public counts (:data:`PUBLIC_METRICS`); its diagnostics
(:data:`DIAGNOSTICS`) stay on the client unless ``flower.send_diagnostics`` is set.

This module does not import flwr; :mod:`ffa_jax.flower.client_app` and
:mod:`ffa_jax.flower.server_app` wrap it in a Flower ``ClientApp`` and ``ServerApp``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ffa_jax import lora
from ffa_jax.config import RunConfig
from ffa_jax.errors import ConfigError, FederationError
from ffa_jax.federated.client import DpParams
from ffa_jax.federated.round import client_key, server_noise_key
from ffa_jax.federated.server import (
    ServerDpParams,
    make_server_optimizer,
    server_init,
    server_step,
)
from ffa_jax.flower import wire
from ffa_jax.run import (
    Prepared,
    build_client_update,
    client_batches,
    client_weights,
    evaluate_splits,
    noise_note,
    planner,
    prepare,
    silent,
    train_compiler_options,
    train_key,
)
from ffa_jax.types import PyTree

#: What a client's ``metrics`` MetricRecord holds: public numbers only (the configured
#: expected example count, never the realised Poisson one; epsilon; sigma_k; byte counts).
PUBLIC_METRICS = (
    "partition_id",
    "round",
    "rounds_trained",
    "num-examples",
    "epsilon",
    "delta",
    "noise_multiplier",
    "uplink_payload_bytes",
    "uplink_serialized_bytes",
    "downlink_payload_bytes",
)
#: Computed from the client's private data without noise: NOT covered by epsilon. Sent (as a
#: separate ``diagnostics`` MetricRecord) only with ``flower.send_diagnostics: true``.
DIAGNOSTICS = ("loss", "realised_examples", "clipped_fraction", "grad_norm")


@dataclasses.dataclass(frozen=True)
class ClientPrivacy:
    """One client's DP-SGD plan, computed by the client itself.

    Attributes:
      noise_multiplier: sigma_k (0 without DP).
      sampling_rate: q_k = client.batch_size / n_k.
      epsilon_curve: ``[rounds]`` epsilon this client has spent after each round (inf
        without DP).
      delta_curve: ``[rounds]`` the delta that holds with it (RDP: the target plus the
        truncation's term; empty: the target).
    """

    noise_multiplier: float
    sampling_rate: float
    epsilon_curve: tuple[float, ...]
    delta_curve: tuple[float, ...] = ()


def privacy_from_json(data: dict[str, Any]) -> ClientPrivacy:
    """A :class:`ClientPrivacy` from its ``dataclasses.asdict`` (JSON) form."""
    return ClientPrivacy(
        noise_multiplier=float(data["noise_multiplier"]),
        sampling_rate=float(data["sampling_rate"]),
        epsilon_curve=tuple(float(e) for e in data["epsilon_curve"]),
        delta_curve=tuple(float(d) for d in data.get("delta_curve", ())),
    )


def plan_client_privacy(prep: Prepared, client_id: int) -> ClientPrivacy:
    """Client ``client_id``'s own privacy plan: sigma_k calibrated to ``privacy.epsilon``.

    Under client-level DP (``privacy.unit: client``) the client adds no noise (sigma_k = 0,
    infinite own epsilon): the server clips and noises the updates, see :class:`ServerRun`.

    This is :func:`ffa_jax.privacy.planner.sample_level_plan` on this client's size alone;
    the simulation calibrates every client the same way, one at a time, so sigma_k and the
    epsilon curve are the simulation's k-th entries.

    Formal guarantee: with this sigma_k, client k's local training over all
    ``rounds x local_steps`` DP-SGD steps is (epsilon, delta)-DP with respect to adding or
    removing one of its examples; the client adds the noise itself, so this holds whatever
    the server does.
    """
    cfg = prep.cfg
    if cfg.privacy.enabled and cfg.privacy.unit == "client":
        # Client-level DP: the server clips and noises whole updates; the client runs plain
        # SGD and its own epsilon is not a sample-level one (the server reports the run's).
        n = len(prep.client_indices[client_id])
        return ClientPrivacy(
            noise_multiplier=0.0,
            sampling_rate=cfg.client.batch_size / n,
            epsilon_curve=(math.inf,) * cfg.federated.rounds,
        )
    plan = planner.sample_level_plan(
        client_sizes=[len(prep.client_indices[client_id])],
        batch_size=cfg.client.batch_size,
        max_batch_size=prep.max_batch_size,
        rounds=cfg.federated.rounds,
        local_steps=cfg.federated.local_steps,
        epsilon=cfg.privacy.epsilon,
        delta=cfg.privacy.delta,
        accountant=cfg.privacy.accountant,
        noise_multiplier=cfg.privacy.noise_multiplier,
    )
    return ClientPrivacy(
        noise_multiplier=float(plan.noise_multipliers[0]),
        sampling_rate=float(plan.sampling_rates[0]),
        epsilon_curve=tuple(float(e) for e in plan.epsilon_curve),
        delta_curve=tuple(
            float(plan.delta_after(r + 1) or cfg.privacy.delta) for r in range(plan.rounds)
        ),
    )


def check_partition(cfg: RunConfig, partition_id: Any, num_partitions: Any) -> int:
    """The client id of a node from its Flower node config (``partition-id``,
    ``num-partitions``), checked against ``federated.clients``.

    Raises:
      FederationError: naming the node-config key and the fix.
    """
    k = cfg.federated.clients
    if num_partitions is not None and (
        isinstance(num_partitions, bool) or not isinstance(num_partitions, int)
    ):
        raise FederationError(
            f"node config num-partitions={num_partitions!r} must be an integer "
            f'(flower-supernode --node-config "partition-id=0 num-partitions={k}").'
        )
    if num_partitions is not None and num_partitions != k:
        raise FederationError(
            f"node config num-partitions={num_partitions} but the run has "
            f"federated.clients={k}; start {k} SuperNodes with --node-config "
            f'"partition-id=<0..{k - 1}> num-partitions={k}".'
        )
    if isinstance(partition_id, bool) or not isinstance(partition_id, int):
        raise FederationError(
            f"node config partition-id={partition_id!r} must be an integer in [0, {k - 1}] "
            f'(flower-supernode --node-config "partition-id=0 num-partitions={k}").'
        )
    if not 0 <= partition_id < k:
        raise FederationError(
            f"node config partition-id={partition_id} is outside [0, {k - 1}] "
            f"(federated.clients={k}); give each SuperNode a distinct id in that range."
        )
    return partition_id


def _frozen_on_device(prep: Prepared) -> Prepared:
    """A Flower node computes on one device: host (numpy) frozen leaves, which ``prepare``
    leaves with ``perf.model_devices > 1`` for :func:`ffa_jax.run.build_round` to shard,
    are put on the default device once (Flower has no ``model`` mesh)."""
    if any(isinstance(x, np.ndarray) for x in jax.tree.leaves(prep.frozen)):
        prep.frozen = jax.device_put(prep.frozen)
        prep.params = lora.combine(prep.trainable, prep.frozen)
    return prep


class ClientNode:
    """One client of a federation: its data partition, the model, and a jitted update.

    Args:
      cfg: the run config (identical on every node).
      client_id: this client's partition id k in ``[0, federated.clients)``.
      privacy: this client's plan from an earlier round (a Flower client keeps it in its
        node state); planned with :func:`plan_client_privacy` when None.
      prep: an already prepared run (tests share one); prepared here when None.
    """

    def __init__(
        self,
        cfg: RunConfig,
        client_id: int,
        *,
        privacy: ClientPrivacy | None = None,
        prep: Prepared | None = None,
        secret: int | None = None,
    ):
        self.cfg = cfg
        self.client_id = check_partition(cfg, client_id, None)
        if prep is None:
            prep = prepare(cfg, plan_privacy=False, log=silent, secret=secret)
        elif secret is not None:
            prep = dataclasses.replace(prep, secret=secret)
        self.prep = _frozen_on_device(prep)
        self.privacy = privacy or plan_client_privacy(self.prep, client_id)
        self._update = jax.jit(
            build_client_update(self.prep), compiler_options=train_compiler_options(self.prep)
        )
        self._key = train_key(self.prep)
        self.dp = DpParams(
            clip_norm=jnp.float32(cfg.privacy.clip_norm),
            noise_multiplier=jnp.float32(self.privacy.noise_multiplier),
            expected_batch_size=jnp.float32(cfg.client.batch_size),
        )

    @property
    def num_examples(self) -> int:
        return len(self.prep.client_indices[self.client_id])

    def train_round(
        self,
        trainable: PyTree,
        round_idx: int,
        rounds_done: int = 0,
        last_round: int | None = None,
    ) -> tuple[PyTree, dict[str, float], dict[str, float]]:
        """Runs this client's local steps of round ``round_idx`` (0-based) from ``trainable``.

        ``rounds_done``: rounds this client has already trained; ``last_round``: the index of
        the last one (None: ``rounds_done - 1``), both from its node state. A round at or
        before the last one trained is refused (a repeated round reuses the key and batches:
        two uploads would differ by a noise-free amount), so every step taken is a step
        accounted. With every client in every round, only the next round is trained
        (``round_idx == rounds_done``); under partial participation
        (``federated.clients_per_round``) a client skips the rounds it is not sampled for,
        which only the server knows.

        Returns:
          ``(delta, public, diagnostics)``: the noised delta of the trainable tree (numpy
          leaves); public metrics (:data:`PUBLIC_METRICS` without the byte counts: epsilon
          spent over the ``rounds_done + 1`` rounds trained, sigma_k, the configured expected
          number of examples); diagnostics (:data:`DIAGNOSTICS`, not covered by epsilon).

        Raises:
          FederationError: the round is a replay, from the past, or skips ahead with every
            client in every round (naming it).

        Formal guarantee: see :func:`plan_client_privacy`; the delta is post-processing of
        this client's DP-SGD steps.
        """
        rounds = self.cfg.federated.rounds
        if not 0 <= round_idx < rounds:
            raise FederationError(
                f"the server asked for round index {round_idx}, outside [0, {rounds - 1}] "
                f"(federated.rounds={rounds}); server and clients must run the same config."
            )
        last = rounds_done - 1 if last_round is None else last_round
        partial = self.cfg.federated.partial
        if round_idx <= last or (not partial and round_idx != rounds_done):
            what = (
                "a replay (a round at or before the last one it trained)"
                if round_idx <= last
                else "out of order (it skips ahead)"
            )
            nxt = f"{last + 1} or later" if partial else f"{rounds_done}"
            raise FederationError(
                f"client {self.client_id} refuses round index {round_idx}: {what}; it has "
                f"trained {rounds_done} round(s), the last one round index {last}, and trains "
                f"only round index {nxt} next. A repeated round would reuse its noise and "
                "batches."
                + (
                    " If the ServerApp was resumed (a new Flower run, whose node state is "
                    'empty), start the SuperNodes with --node-config "... state-dir=<folder>" '
                    "so that they keep their secret and rounds across Flower runs."
                    if round_idx > last
                    else ""
                )
            )
        batches = client_batches(self.prep, round_idx, slots=[self.client_id])
        batches.pop("_dropped")
        batches = {k: v[0] for k, v in batches.items()}
        key = client_key(self._key, round_idx, self.client_id)
        delta, m = self._update(trainable, self.prep.frozen, batches, self.dp, key)
        delta = jax.device_get(delta)
        # Accounted: every round this client has trained, this one included.
        eps = self.privacy.epsilon_curve[rounds_done]
        public = {
            "partition_id": float(self.client_id),
            "round": float(round_idx),
            "rounds_trained": float(rounds_done + 1),
            # The configured expected count, never the realised Poisson one (which leaks).
            "num-examples": float(self.cfg.client.batch_size * self.cfg.federated.local_steps),
            "epsilon": eps if math.isfinite(eps) else -1.0,  # -1: not private
            "delta": (
                self.privacy.delta_curve[rounds_done]
                if self.privacy.delta_curve
                else self.cfg.privacy.delta
            ),
            "noise_multiplier": self.privacy.noise_multiplier,
        }
        diagnostics = {
            "loss": float(m.loss),
            "realised_examples": float(m.num_examples),
            "clipped_fraction": float(m.clipped_fraction),
            "grad_norm": float(m.grad_norm),
        }
        return delta, public, diagnostics


class ServerRun:
    """The server of a federation: global trainable tree, Optax server optimiser, the
    participants of every round, client-level DP, evaluation.

    It holds the test split for evaluation (``prepare`` loads the task); it never sees the
    clients' batches, only their deltas. Aggregation weights come from the partition sizes
    (``federated.weighting``), as in the simulation.

    The server has its own secret (``secret``; drawn from the OS, or ``privacy.noise_seed``
    for a reproducible research run, or a resumed run's from its checkpoint), from which it
    draws the participants of every round (:attr:`participants`, the simulation's schedule,
    :func:`ffa_jax.privacy.planner.make_plan`) and, under client-level DP, its noise. The
    secret is never sent: a client learns only that it was sampled, in the round it is.

    Under client-level DP (``privacy.unit: client``) each round is the simulation's
    DP-FedAvg step, :func:`ffa_jax.federated.server.server_step` with ``server_dp`` (the same
    function the simulation's round calls): clip each participant's whole update to
    ``privacy.client_clip_norm`` S, add ``N(0, (z S)^2 I)`` to their sum with the server's
    noise key of the round (:func:`ffa_jax.federated.round.server_noise_key`), divide by the
    expected number of participants; then the Optax server step. The epsilon, delta and the
    ledger (checkpoints) are the server's plan's, as in the simulation.

    Args:
      cfg: the run config.
      prep: an already prepared run (its secret is replaced by ``secret`` when given).
      secret: the server's secret; None: ``privacy.noise_seed`` when set, else a fresh draw.
      ledger: a resumed run's privacy ledger (its noise multipliers are kept).
    """

    def __init__(
        self,
        cfg: RunConfig,
        *,
        prep: Prepared | None = None,
        secret: int | None = None,
        ledger=None,
    ):
        self.cfg = cfg
        if cfg.privacy.mechanism == "banded_mf":
            raise ConfigError(
                "privacy.mechanism=banded_mf is not available in the Flower server yet (its "
                "correlated noise state would have to live in the ServerApp's checkpoints); "
                "run it with ffa-jax train, or use privacy.mechanism=gaussian with Flower."
            )
        if prep is None:
            prep = prepare(cfg, log=silent, secret=secret, ledger=ledger)
        elif secret is not None:
            prep = dataclasses.replace(prep, secret=secret)
        self.prep = _frozen_on_device(prep)
        self.plan = self.prep.plan
        self.server_opt = make_server_optimizer(cfg.server, cfg.federated.rounds)
        self.state = jax.device_get(server_init(self.prep.trainable, self.server_opt))
        self.weights = client_weights(cfg, [len(p) for p in self.prep.client_indices])
        self.client_level = cfg.privacy.enabled and cfg.privacy.unit == "client"
        self._key = train_key(self.prep)
        opt = self.server_opt

        def aggregate(state, stacked, weights, dp=None, key=None):
            # The simulation's server step (same function, same noise key of the round).
            new_state, mean_delta, norms = server_step(
                state, stacked, weights, opt, server_dp=dp, noise_key=key
            )
            return new_state, optax.tree.norm(mean_delta), jnp.zeros(0) if norms is None else norms

        self._aggregate = jax.jit(aggregate)

    @property
    def secret(self) -> int:
        """The server's secret (participants, client-level noise); never sent."""
        return self.prep.secret

    @property
    def trainable_bytes(self) -> int:
        """Analytic bytes of one copy of the trainable tree (one client's uplink per round)."""
        return lora.tree_bytes(self.prep.trainable)

    def participants(self, round_idx: int) -> list[int]:
        """The client ids sampled for round ``round_idx`` (0-based), ascending: the
        simulation's schedule from the server's secret (every client without
        ``federated.clients_per_round``)."""
        return [int(c) for c in np.flatnonzero(self.plan.participation[round_idx])]

    def ledger(self, rounds_done: int):
        """The privacy ledger after ``rounds_done`` rounds (for checkpoints)."""
        return self.plan.ledger(rounds_done)

    def decode(self, arrays, sender: str) -> PyTree:
        """A client's delta from its named arrays (checked, see :func:`wire.arrays_to_tree`)."""
        return wire.arrays_to_tree(arrays, self.state.trainable, sender=sender)

    def apply_round(
        self,
        round_idx: int,
        deltas: list[PyTree],
        client_metrics: list[dict[str, float]],
        client_diagnostics: list[dict[str, float]] | None = None,
    ) -> dict[str, Any]:
        """Aggregates the round's participants' deltas (in :meth:`participants` order) and
        takes the server step.

        The aggregation weights are the server's own (public partition sizes,
        ``federated.weighting``), never a count a client reports. Under client-level DP the
        updates are clipped and the server adds the noise (see the class docstring).

        Returns the round's metrics record (the release-safe keys of ``metrics.jsonl`` of
        :func:`ffa_jax.run.train`), with the workload's ``eval_*`` metrics on eval rounds
        and, when the clients sent them (``flower.send_diagnostics``), a ``diagnostics``
        object (training loss, clipped fraction, gradient norm, realised examples). Under
        client-level DP the ``diagnostics`` hold the participants' pre-clipping update
        norms' mean and the clipped fraction (and, with partial participation, the realised
        number of participants, which the noise does not hide).
        """
        cfg = self.cfg
        members = self.participants(round_idx)
        if len(deltas) != len(members) or len(client_metrics) != len(members):
            raise FederationError(
                f"round {round_idx + 1}: {len(deltas)} client deltas for the "
                f"{len(members)} participants {members}."
            )
        if int(self.state.round) != round_idx:
            raise FederationError(
                f"round index {round_idx} but the server has done {int(self.state.round)} rounds."
            )
        stacked = jax.tree.map(lambda *xs: np.stack(xs), *deltas)
        weights = self.weights[np.asarray(members, np.int64)]
        if self.client_level:
            dp = ServerDpParams(
                clip_norm=np.float32(cfg.privacy.client_clip_norm),
                noise_multiplier=np.float32(self.plan.client_noise_multiplier),
                # Noise the sum, then divide by the FIXED expected number of participants.
                expected_clients=np.float32(self.plan.sampling.clients_per_round),
            )
            key = server_noise_key(self._key, round_idx)
            new_state, update_norm, norms = self._aggregate(self.state, stacked, weights, dp, key)
        else:
            new_state, update_norm, norms = self._aggregate(self.state, stacked, weights)
        self.state = jax.device_get(new_state)
        w = weights / max(float(weights.sum()), 1e-12)
        record: dict[str, Any] = {"round": round_idx + 1}
        if self.client_level or not cfg.privacy.enabled:
            record["epsilon"] = float(self.plan.epsilon_curve[round_idx])
            record["delta"] = (
                float(self.plan.delta_after(round_idx + 1)) if cfg.privacy.enabled else 0.0
            )
        else:
            record["epsilon"] = max(m["epsilon"] for m in client_metrics)
            record["delta"] = max(m["delta"] for m in client_metrics)
        record.update(
            update_norm=float(update_norm),
            noise_multipliers=[m["noise_multiplier"] for m in client_metrics],
            noise=noise_note(cfg),
        )
        if self.client_level:
            record["client_noise_multiplier"] = float(self.plan.client_noise_multiplier)
        diag: dict[str, Any] = {}
        if client_diagnostics:
            d = client_diagnostics
            diag.update(
                train_loss=float(np.sum(w * np.array([m["loss"] for m in d]))),
                clipped_fraction=float(np.mean([m["clipped_fraction"] for m in d])),
                grad_norm=(
                    float(np.mean([m["grad_norm"] for m in d])) if cfg.privacy.enabled else None
                ),
                examples=int(sum(m["realised_examples"] for m in d)),
            )
        if self.client_level:
            norms = np.asarray(norms)
            diag["client_update_norm"] = float(np.mean(norms))
            diag["client_clipped_fraction"] = float(np.mean(norms > cfg.privacy.client_clip_norm))
        counts = {"participants": len(members)}
        # Client-level DP hides who took part; the realised count would reveal it.
        (diag if self.client_level and cfg.federated.partial else record).update(counts)
        if diag:
            record["diagnostics"] = diag
        is_last = round_idx + 1 == cfg.federated.rounds
        # As the simulation's metrics lines: the validation split (if any) every round, the
        # test split after the last round and every eval.every rounds (never with eval.test
        # false: a tuning run reads the validation split only).
        test = cfg.eval.test and (
            is_last or bool(cfg.eval.every and (round_idx + 1) % cfg.eval.every == 0)
        )
        params = lora.combine(self.state.trainable, self.prep.frozen)
        record.update(evaluate_splits(self.prep, params, test=test))
        return record
