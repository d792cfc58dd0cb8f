"""Correlated noise from a banded matrix factorization (BandMF) for client-level DP over rounds.

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
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax_privacy.noise_addition
import numpy as np
from jax_privacy.matrix_factorization import banded

from ffa_jax.errors import ConfigError
from ffa_jax.types import PyTree

# jax-privacy's default number of optimiser iterations for banded strategies.
STRATEGY_OPTIMIZER_STEPS = 100


def check_bands(steps: int, bands: int) -> None:
    """Raises ConfigError unless ``1 <= bands <= steps`` (both integers)."""
    for name, v in (("federated.rounds", steps), ("privacy.bands", bands)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{name}={v!r} is invalid: must be an integer >= 1.")
    if bands > steps:
        raise ConfigError(
            f"privacy.bands={bands} is invalid: must be <= federated.rounds={steps} (the "
            "strategy matrix is rounds x rounds)."
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
