"""Correlated noise from a banded matrix factorization (BandMF): client-level DP over rounds
and sample-level DP over each client's local steps (see "Sample level" below).

The mechanism (Choquette-Choo et al., "(Amplified) Banded Matrix Factorization: A unified
approach to private training", NeurIPS 2023; Denisov et al., NeurIPS 2022): write the T
rounds' sums of clipped client updates as the rows of ``X`` (``[T, d]``). The workload is
their running sum ``A X`` (A = lower-triangular ones: the model after round t is a function
of the first t sums). Factor ``A = B C`` with a lower-triangular, column-normalised, b-banded
strategy matrix C and release ``C X + z S W`` (W i.i.d. standard normal); the server applies
``C^{-1}`` and gets, for round t,

    ``x_t + z S (C^{-1} W)_t``:  noise with covariance ``(z S)^2 C^{-1} C^{-T}`` over rounds,

independent across coordinates. The correlation lets later rounds cancel part of earlier
rounds' noise, so the noise of the *accumulated* update has less variance than with
independent noise of the same privacy (per-round noise is larger; its sum is smaller).

Everything numeric comes from jax-privacy 2.0:

* the strategy C: ``jax_privacy.matrix_factorization.banded.optimize`` for (T, b), minimising
  the mean squared error of the prefix sums (:func:`strategy`, cached per (T, b));
* the noise: ``jax_privacy.noise_addition.matrix_factorization_privatizer`` with C^{-1} as a
  streaming matrix (state: the PRNG key and the last b noise vectors), see
  :class:`BandedNoise`;
* the accounting: the amplified BandMF reduction with cyclic Poisson client sampling in
  :mod:`ffa_jax.privacy.client_level` (``cycle_length = b``), equal to
  ``jax_privacy.accounting.DpsgdTrainingAccountant`` with ``cycle_length`` (tests check it).

Formal guarantee (client-level, add/remove one client): with cyclic Poisson sampling of
cycle length b (a client can take part at most once every b rounds) and a column-normalised
b-banded C, one client's participations change ``C X`` by at most S in L2 norm per
participation, on disjoint coordinates of the b-separated rows, so releasing ``C X + z S W``
is the Poisson-subsampled Gaussian mechanism composed ceil(T / b) times on groups of N // b
clients (Theorem 4 of the paper); everything the server does after is post-processing. The
server is trusted with the clipped updates, as in DP-FedAvg.

The noise keys come from the run's secret (:func:`ffa_jax.federated.round.banded_noise_key`),
never from the public seed. Nothing here knows a model or a round.

Sample level (``privacy.unit=sample``, amplified BandMF inside every client; Choquette-Choo et
al., NeurIPS 2023, Section 4 and Theorem 4): the rows of ``X`` are client k's T = rounds x
local_steps sums of per-example clipped gradients (clip norm C), one per local step, in the
order the client takes them over the whole run, and the client adds the t-th row of ``z C
C^{-1} W`` (:class:`BandedNoise` for (T, b), the same strategy cache and privatizer as the
server's) to its t-th sum before dividing by the fixed expected batch size. Each client's
stream state (its PRNG key and the last b noise vectors) is SECRET client state: it persists
across rounds, is never sent or aggregated, and is saved only in the owner-only checkpoints.

Batches (cyclic Poisson within each client, :func:`ffa_jax.data.batching.cyclic_partition`):
the client's n_k examples are split once per run into b groups of ``m_k = n_k // b`` (a uniformly
random permutation drawn from the run's secret, cut into equal parts; the ``n_k mod b``
left-over examples are never sampled: jax-privacy's ``PartitionType.EQUAL_SPLIT``), and step t
samples each example of group ``t mod b`` independently with probability ``p_k = B / m_k``
(B = ``client.batch_size``, so the expected batch is unchanged; ``p_k = b q_k`` when b divides
n_k), truncated to the fixed physical batch B_max (a uniformly random subset is kept; the
dropped count is reported as for Gaussian DP-SGD).

What the accountant assumes: ``truncated_amplified_bandmf_event`` (PLD; the truncated Poisson
sampled Gaussian on a group of m_k examples, composed ceil(T / b) times) or
``amplified_bandmf_event`` (RDP, untruncated; the truncation goes into delta as in
:func:`ffa_jax.privacy.accounting.rdp_delta_curve`), both from jax-privacy
(:func:`sample_event`). Equal, public-size groups are what these events need (the truncated
event is defined for a known group size); jax-privacy pairs EQUAL_SPLIT with the *zero-out*
relation (``REPLACE_SPECIAL``: one example of one client replaced by a null example that adds
nothing to any gradient sum; n_k stays fixed, as ffa_jax's truncated accounting already treats
it as public) and refuses add/remove with it (``_validate_adjacency_relation`` of
``jax_privacy.experimental.execution_plan``), so that is the relation stated for b > 1. For
these events dp-accounting's epsilon under zero-out equals its add/remove epsilon (tested).
The analysis lets the adversary know every group, so the partition need not be hidden; it is
drawn from the run's secret all the same, like every batch. With b = 1 the mechanism is
exactly Gaussian DP-SGD (C is the identity, one group of n_k, p_k = q_k) and is accounted by
the same code as ``mechanism=gaussian``.

Formal guarantee (sample level, b > 1): if client k's examples are split as above and each
step's clipped sum (per-example norm <= C) gets the row of ``z C C^{-1} W`` of a
column-normalised b-banded C, then one example changes ``C X`` only in the steps of its group
(at most once in every b consecutive steps), each by at most C, so the client's T released
noisy sums are (epsilon, delta)-DP under zero-out of one of its examples with epsilon the
accountant's for ``sample_event``; the server and every later use are post-processing.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import dp_accounting
import jax
import jax.numpy as jnp
import jax_privacy.noise_addition
import numpy as np
from jax_privacy.experimental import accounting as jp_accounting
from jax_privacy.matrix_factorization import banded

from ffa_jax.errors import ConfigError
from ffa_jax.types import PyTree

# jax-privacy's default number of optimiser iterations for banded strategies.
STRATEGY_OPTIMIZER_STEPS = 100


def check_bands(steps: int, bands: int, steps_field: str = "federated.rounds") -> None:
    """Raises ConfigError unless ``1 <= bands <= steps`` (both integers); ``steps_field``
    names what ``steps`` counts (rounds, or a client's rounds x local steps)."""
    for name, v in ((steps_field, steps), ("privacy.bands", bands)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{name}={v!r} is invalid: must be an integer >= 1.")
    if bands > steps:
        raise ConfigError(
            f"privacy.bands={bands} is invalid: must be <= {steps_field}={steps} (the "
            "strategy matrix is steps x steps)."
        )


@functools.lru_cache(maxsize=16)
def strategy(steps: int, bands: int) -> banded.ColumnNormalizedBanded:
    """The column-normalised b-banded strategy matrix C (``[T, T]``, T = ``steps``) that
    minimises the mean squared error of the T prefix sums, from
    ``jax_privacy.matrix_factorization.banded.optimize`` (cached per (steps, bands): the
    optimisation takes seconds to tens of seconds for hundreds of steps on a CPU).

    ``bands=1`` is the identity (independent noise); no optimisation runs.
    Computed on the CPU backend so that a run and its resume (on any accelerator) get the
    same matrix bit for bit.
    """
    check_bands(steps, bands)
    # Eager even when first called while a round is being traced (no tracer may be cached).
    with jax.ensure_compile_time_eval(), jax.default_device(jax.devices("cpu")[0]):
        if bands == 1:
            return banded.ColumnNormalizedBanded.default(int(steps), 1)
        return banded.optimize(
            int(steps), bands=int(bands), max_optimizer_steps=STRATEGY_OPTIMIZER_STEPS
        )


def noise_covariance(steps: int, bands: int) -> np.ndarray:
    """``[T, T]`` covariance over rounds of the unit-std noise, ``C^{-1} C^{-T}`` (float64)."""
    c = np.asarray(strategy(steps, bands).materialize(), np.float64)
    c_inv = np.linalg.inv(c)
    return c_inv @ c_inv.T


def prefix_sum_error(steps: int, bands: int) -> np.ndarray:
    """``[T]`` variance (per coordinate, unit std, unit sensitivity) of the noise summed over
    rounds 1..t: the row norms squared of ``A C^{-1}`` (jax-privacy's ``per_query_error``).
    For ``bands=1`` this is ``t``."""
    if bands == 1:
        return np.arange(1, int(steps) + 1, dtype=np.float64)
    with jax.ensure_compile_time_eval(), jax.default_device(jax.devices("cpu")[0]):
        return np.asarray(banded.per_query_error(strategy(steps, bands)), np.float64)


def summed_noise_std(noise_multiplier: float, steps: int, bands: int) -> dict[str, float]:
    """Expected error of the accumulated noise, in units of the clip norm S (per coordinate of
    the SUM of clipped updates; divide by M for the averaged model update):

    ``final``: std of the noise summed over all T rounds; ``rms``: root of its variance
    averaged over t = 1..T (what ``banded.optimize`` minimises); ``per_round``: std of one
    round's noise (the largest over rounds)."""
    err = prefix_sum_error(steps, bands)
    per_round = 1.0
    if bands > 1:
        per_round = float(np.sqrt(np.max(np.diag(noise_covariance(steps, bands)))))
    z = float(noise_multiplier)
    return {
        "final": z * float(np.sqrt(err[-1])),
        "rms": z * float(np.sqrt(np.mean(err))),
        "per_round": z * per_round,
    }


class BandedNoise(NamedTuple):
    """BandMF noise for a run of ``steps`` rounds with ``bands`` bands: jax-privacy's
    ``matrix_factorization_privatizer`` driven by C^{-1} (:func:`strategy`) as a streaming
    matrix. Hashable and static (close over it in a jitted function); its state is a pytree.

    State (:meth:`init`): ``(key uint32[2], tree)`` where each leaf of the noised tree becomes
    ``(index int32, buffers)``, ``buffers`` the leaf with a leading axis of size ``bands``:
    memory ``bands x |tree|``. It must be
    threaded through every round and saved in checkpoints (a resumed run continues the same
    noise stream bit for bit).
    """

    steps: int
    bands: int

    def _privatizer(self, key: jax.Array):
        c = strategy(int(self.steps), int(self.bands))
        return jax_privacy.noise_addition.matrix_factorization_privatizer(
            c.inverse_as_streaming_matrix(), stddev=1.0, prng_key=key, dtype=jnp.float32
        )

    def init(self, like: PyTree, key: jax.Array) -> PyTree:
        """The noise state before round 0, for sums shaped like ``like``.

        Args:
          like: a tree like the noised sums (float leaves; values unused).
          key: the run's BandMF key (from its secret); typed or raw, stored raw (uint32).
        """
        raw = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
        like32 = jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), like)
        return self._privatizer(raw).init(like32)

    def next(self, like: PyTree, stddev: jax.Array | float, state: PyTree) -> tuple[PyTree, PyTree]:
        """This round's correlated noise, ``stddev (C^{-1} W)_t`` (float32 leaves shaped like
        ``like``), and the next state. Jittable; ``stddev`` may be traced."""
        zeros = jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), like)
        # The key is read from the state; the one given here is never used.
        unit_noise, new_state = self._privatizer(state[0]).update(zeros, state)
        s = jnp.asarray(stddev, jnp.float32)
        return jax.tree.map(lambda n: n * s, unit_noise), new_state


def noise_stream(steps: int, bands: int, like: PyTree, key: jax.Array, count: int) -> Any:
    """``count`` consecutive unit-std noise trees stacked on a leading axis (for tests and
    diagnostics: the noise a run would add in rounds 0..count-1)."""
    mech = BandedNoise(int(steps), int(bands))
    state = mech.init(like, key)

    def body(st, _):
        n, st = mech.next(like, 1.0, st)
        return st, n

    _, out = jax.lax.scan(body, state, None, length=int(count))
    return out


def client_noise_init(mech: BandedNoise, like: PyTree, keys: jax.Array) -> PyTree:
    """Sample level: every client's noise state before its first step, stacked on a leading
    client axis (leaves ``[N, ...]``; memory ``N x bands x |like|``). ``keys``: ``[N]``
    per-client keys from the run's secret (``ffa_jax.run.setup.client_noise_keys``)."""
    return jax.vmap(lambda k: mech.init(like, k))(keys)


# ----------------------------------------------------------------------------- sample level


def group_size(client_size: int, bands: int) -> int:
    """m_k = n_k // b: the examples of each of a client's b cyclic Poisson groups."""
    return int(client_size) // int(bands)


def group_rate(batch_size: float, client_size: int, bands: int) -> float:
    """p_k = B / m_k: the per-step inclusion probability within the step's group, so that
    the expected batch is B (= b q_k when b divides n_k; q_k itself when b = 1)."""
    return float(batch_size) / group_size(client_size, bands)


def check_sample_bands(batch_size: float, client_sizes, bands: int, steps: int) -> None:
    """Sample-level BandMF's data-dependent checks (when the partition is known, before any
    compute): ``1 <= bands <= steps`` and every client's group holds at least
    ``client.batch_size`` examples (p_k <= 1).

    Raises:
      ConfigError: naming ``privacy.bands`` (or ``client.batch_size``) and the fix.
    """
    check_bands(int(steps), int(bands), "federated.rounds x federated.local_steps")
    sizes = [int(n) for n in client_sizes]
    small = [k for k, n in enumerate(sizes) if group_size(n, bands) < batch_size]
    if small:
        k = small[0]
        most = max(1, min(sizes) // max(int(batch_size), 1))
        raise ConfigError(
            f"privacy.bands={bands} is invalid for sample-level banded_mf: client {k} has "
            f"{sizes[k]} examples, so its {bands} cyclic Poisson groups hold "
            f"{group_size(sizes[k], bands)} each, fewer than client.batch_size={batch_size} "
            "(a step samples its expected batch from one group, with probability batch_size / "
            f"group size <= 1). Use privacy.bands <= {most}, or a smaller client.batch_size."
        )


def compositions(steps: int, bands: int) -> int:
    """ceil(steps / b): how many of ``steps`` consecutive steps one example can be in."""
    return -(-int(steps) // int(bands))


def sample_event(
    noise_multiplier: float,
    steps: int,
    *,
    bands: int,
    rate: float,
    group: int,
    max_batch_size: int,
    accountant: str = "pld",
) -> dp_accounting.DpEvent:
    """jax-privacy's DpEvent of ``steps`` steps of one client's sample-level BandMF:
    ``truncated_amplified_bandmf_event`` (PLD: the truncation at B_max accounted exactly) or
    ``amplified_bandmf_event`` (RDP: untruncated; add the truncation to delta with
    :func:`ffa_jax.privacy.accounting.rdp_delta_curve`). Both reduce to ceil(steps / b)
    compositions of the (truncated) Poisson(p_k) sampled Gaussian on a group of m_k.

    Args:
      noise_multiplier: z (noise std z C on each step's clipped sum, C column-normalised).
      steps: local steps taken so far (>= 0).
      bands: b; rate: p_k (:func:`group_rate`); group: m_k (:func:`group_size`);
      max_batch_size: B_max.

    Formal guarantee: see the module docstring (zero-out of one example of the client).
    """
    if accountant == "pld":
        return jp_accounting.truncated_amplified_bandmf_event(
            float(noise_multiplier),
            int(steps),
            num_bands=int(bands),
            sampling_prob=float(rate),
            largest_group_size=int(group),
            truncated_batch_size=int(max_batch_size),
        )
    return jp_accounting.amplified_bandmf_event(
        float(noise_multiplier), int(steps), num_bands=int(bands), sampling_prob=float(rate)
    )
