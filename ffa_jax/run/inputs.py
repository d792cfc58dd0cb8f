"""One round's inputs (a :class:`ScheduledRound` holding the round's
:class:`~ffa_jax.federated.round.RoundInputs`): its participants, their batches and weights,
and running a round on them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from ffa_jax.data import batching
from ffa_jax.federated import participation
from ffa_jax.federated.client import DpParams
from ffa_jax.federated.round import RoundInputs
from ffa_jax.federated.server import ServerDpParams
from ffa_jax.privacy import secret as secret_lib
from ffa_jax.run.setup import SAMPLER_PURPOSE, Prepared, client_weights, unit


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
    the sampled examples that did not fit B_max over all K clients. Under sample-level BandMF
    (``prep.sample_groups``) step s of round r samples only from group ``(r x local_steps +
    s) mod bands`` of each client, at the per-group rate.
    """
    cfg = prep.cfg
    rng = secret_lib.numpy_rng(prep.secret, SAMPLER_PURPOSE, round_idx)
    local_idx, mask, dropped = batching.poisson_batch_indices(
        rng,
        [len(p) for p in prep.client_indices],
        prep.sampling_rates,
        cfg.federated.local_steps,
        prep.max_batch_size,
        # Sample-level BandMF: cyclic Poisson over each client's groups, by its step number.
        groups=prep.sample_groups,
        first_step=round_idx * cfg.federated.local_steps,
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


class ScheduledRound(NamedTuple):
    """One round as the run schedules it: ``[P]`` slots (participants first, then dummies),
    the jitted round's :class:`~ffa_jax.federated.round.RoundInputs` for them, and host-side
    bookkeeping that never enters the round."""

    slots: np.ndarray  # [P] client of each slot, -1 = dummy
    inputs: RoundInputs  # batches [P, S, B_max, ...], weights, client ids, DP parameters
    dropped: int  # sampled examples that did not fit B_max


def round_inputs(prep: Prepared, round_idx: int) -> ScheduledRound:
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
    if unit(cfg) == "client":
        server_dp = ServerDpParams(
            clip_norm=np.float32(cfg.privacy.client_clip_norm),
            noise_multiplier=np.float32(plan.client_noise_multiplier),
            # Noise the sum, then divide by the FIXED expected number of participants (M).
            expected_clients=np.float32(plan.sampling.clients_per_round),
        )
    inputs = RoundInputs(batches, weights, client_ids, dp, server_dp)
    return ScheduledRound(slots, inputs, dropped)


def run_round(round_fn, prep: Prepared, state, inp: ScheduledRound, key: jax.Array, **extra):
    """``(new server state, RoundMetrics)``: one call of the jitted round (from
    :func:`build_round`) on ``inp.inputs`` (:func:`round_inputs`) with the run's training
    ``key``.

    ``extra``: the audit's canary inputs (the ``extra_grad_sums`` / ``extra_update_sum``
    fields of :class:`ffa_jax.federated.round.RoundInputs`); a training run passes none."""
    return round_fn(state, prep.frozen, inp.inputs._replace(**extra), key)
