"""What ``perf.microbatch_size: auto`` and ``perf.clients_per_chunk: auto`` mean for one run.

A Poisson batch of expected size ``b`` (``client.batch_size``) has a fixed capacity B_max
(:func:`ffa_jax.data.batching.physical_batch_size`, e.g. 105 for ``b = 64``) so that the round
never recompiles; the slots past the sampled size are padding. How much the padding costs
depends on two knobs:

* ``perf.microbatch_size = m``: per-example gradients are computed ``m`` at a time under
  ``lax.scan`` and a micro-batch without a real example is skipped (``lax.cond``), so a step
  costs ``ceil(sampled / m) * m`` examples instead of B_max.
  On a CPU the last, partly filled micro-batch is then split further (the *tail
  micro-batch*, :func:`tail_microbatch_size`: 4 for ``m = 16``), so a step costs
  ``floor(sampled / m) m + ceil((sampled mod m) / t) t`` examples.
* ``perf.clients_per_chunk = c``: ``c`` clients are ``vmap``ped together. With ``c > 1`` the
  skip turns into a select (``vmap`` of ``cond`` computes both branches), so only ``c = 1``
  lets padding cost nothing.

``auto`` (the default of both) resolves them once, before any compute, with
:func:`resolve`: a pure function of the backend, the expected batch, B_max, the process count and
the device layout.

* CPU (one process): ``microbatch_size = AUTO_MICROBATCH`` (16) and ``clients_per_chunk = 1``.
  The cores are busy with one client's micro-batch already; padded slots cost nothing, and one
  client's activations are alive at a time (the issue-22 measurement: the quickstart at 6.7-8.7
  s per round with ``clients_per_chunk=1, microbatch_size=15`` against 11.9-13.5 s with whole
  batches of all clients vmapped, peak RSS 1.3 GB against 3.8 GB).
* GPU / TPU, multi-process runs, and runs with an explicit ``perf.devices > 1`` or
  ``perf.model_devices > 1``: the whole padded batch at once and all clients vmapped (the
  accelerator is filled; a mesh spreads the clients over devices), as before ``auto`` existed.

B_max is then padded UP to a multiple of the micro-batch (:func:`max_batch_size`) instead of
requiring the micro-batch to divide it. For ``auto`` the padding uses :data:`AUTO_MICROBATCH`
whatever the backend, so the privacy accounting (which sees B_max: truncated Poisson sampling,
see :mod:`ffa_jax.privacy.accounting`) is the same on every machine and ``ffa-jax privacy``
prints the epsilon that ``ffa-jax train`` spends. Raising B_max only lowers the probability
that a sampled batch is truncated; the quickstart's 105 -> 112 leaves its epsilon unchanged to
the printed precision (docs/performance.md).

Results: micro-batching and chunking change the order of float summations only (the same
per-example gradients, clipped alike, summed in another grouping), so ``auto`` equals the
explicit whole-batch setting up to float rounding, not bit for bit; a given resolved setting is
deterministic and resumes bit-identically.
"""

from __future__ import annotations

import dataclasses
import math

from ffa_jax.config import AUTO, PerfConfig, RunConfig
from ffa_jax.data.batching import physical_batch_size
from ffa_jax.errors import ConfigError

# The CPU micro-batch of ``auto``: small enough that a step costs about the sampled batch
# (at most 15 padded slots computed), large enough that each matmul has 16 x seq_len rows.
# Issue 22 measured 15 on the quickstart; 16 keeps B_max a multiple of 16 (105 -> 112).
AUTO_MICROBATCH = 16


def tail_microbatch_size(microbatch_size: int) -> int:
    """The CPU tail micro-batch for a micro-batch of ``m`` examples: the largest divisor of
    ``m`` that is at most ``m / 4`` (4 for 16), or 0 (no split) below ``m = 8``.

    Why ``m / 4``: MiniLM's DP step at 64 tokens on 2 cores costs, per example, 1.03x at a
    micro-batch of 8, 1.14x at 4, 1.35x at 2 and 1.82x at 1 what it costs at 16
    (``experiments/bench_dp_step.py --batch 16 --seq 64 --microbatch 16 8 4 2 1``). With the
    remainder ``r = sampled mod 16`` about uniform, blocks of 4 compute
    ``1.14 E[ceil(r / 4) 4] = 10.3`` example-costs for the last micro-batch against 15 for a
    whole padded one, the least of the single sizes (8: 12.4, 2: 10.8).
    """
    if microbatch_size < 8:
        return 0
    return max(d for d in range(1, microbatch_size // 4 + 1) if microbatch_size % d == 0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResolvedPerf:
    """The concrete speed settings of a run (what ``auto`` became).

    Attributes:
      microbatch_size: per-example gradients this many at a time; 0 = the whole batch.
      clients_per_chunk: clients vmapped together; 0 = all client slots at once.
      max_batch_size: B_max, the padded Poisson batch capacity (a multiple of
        ``microbatch_size`` when that is > 0).
      base_max_batch_size: B_max before padding to the micro-batch (the Poisson tail bound).
      backend: the JAX backend it was resolved for (``cpu``, ``gpu``, ``tpu``).
      eval_batch_size: ``eval.batch_size`` (the largest evaluation batch): B_max for ``auto``.
      tail_microbatch_size: the last, partly filled micro-batch in micro-batches of this size
        (:func:`tail_microbatch_size`; sequential CPU runs only); 0 = not split.
    """

    microbatch_size: int
    clients_per_chunk: int
    max_batch_size: int
    base_max_batch_size: int
    backend: str
    eval_batch_size: int
    tail_microbatch_size: int = 0

    def describe(self) -> str:
        """One log line, e.g. ``perf (cpu): perf.microbatch_size=16 ...``."""
        mb = self.microbatch_size or "whole batch"
        chunk = self.clients_per_chunk or "all"
        pad = (
            f" (Poisson bound {self.base_max_batch_size}, padded to a multiple of the micro-batch)"
            if self.max_batch_size != self.base_max_batch_size
            else ""
        )
        tail = f" (tail in {self.tail_microbatch_size}s)" if self.tail_microbatch_size else ""
        return (
            f"perf ({self.backend}): perf.microbatch_size={mb}{tail}, "
            f"perf.clients_per_chunk={chunk}, "
            f"B_max={self.max_batch_size}{pad}, eval.batch_size<={self.eval_batch_size}"
        )

    def as_dict(self) -> dict[str, int | str]:
        return dataclasses.asdict(self)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def padded_batch_size(base: int, microbatch_size: int) -> int:
    """B_max for a Poisson bound ``base`` and a micro-batch ``m`` (0 = whole batch): ``base``
    rounded up to a multiple of ``m`` when ``0 < m < base``, else ``base`` (one chunk)."""
    if 0 < microbatch_size < base:
        return _round_up(base, microbatch_size)
    return base


# The per-step probability that a Poisson batch overflows B_max, unless RDP asks for less.
OVERFLOW_PROBABILITY = 1e-6


def batch_overflow_probability(cfg: RunConfig) -> float:
    """The per-step overflow probability that a run's B_max is sized for: 1e-6, or, for a
    sample-level run calibrated to an epsilon target under ``privacy.accountant: rdp``, small
    enough that the truncation costs at most 1% of ``privacy.delta``
    (:func:`ffa_jax.privacy.accounting.rdp_overflow_target`), so the run holds the delta it
    was asked for. (PLD accounts the truncation exactly in epsilon and needs no margin.) The
    quickstart under RDP: B_max 128 instead of 112; padded slots are skipped on CPU."""
    p = cfg.privacy
    if not (
        p.accountant == "rdp"
        and p.unit == "sample"
        and p.noise_multiplier is None
        and math.isfinite(p.epsilon)
    ):
        return OVERFLOW_PROBABILITY
    from ffa_jax.privacy.accounting import rdp_overflow_target

    steps = cfg.federated.rounds * cfg.federated.local_steps
    target = rdp_overflow_target(p.epsilon, p.delta, steps)
    return min(OVERFLOW_PROBABILITY, target) if target > 0 else OVERFLOW_PROBABILITY


def max_batch_size(
    perf: PerfConfig, expected_batch_size: float, overflow_probability: float = OVERFLOW_PROBABILITY
) -> int:
    """The run's B_max: the Poisson tail bound of ``expected_batch_size`` at
    ``overflow_probability`` (:func:`batch_overflow_probability` of the run) padded up to a
    multiple of the micro-batch (:data:`AUTO_MICROBATCH` for ``auto``). It does not depend on
    the backend, so the privacy plan is the same wherever the run goes."""
    base = physical_batch_size(expected_batch_size, overflow_probability)
    return padded_batch_size(base, _padding_microbatch(perf))


def _padding_microbatch(perf: PerfConfig) -> int:
    """The micro-batch that B_max is padded to a multiple of (:data:`AUTO_MICROBATCH` for
    ``auto``, whatever the backend)."""
    return AUTO_MICROBATCH if perf.microbatch_size == AUTO else perf.microbatch_size


def eval_batch_size(cfg: RunConfig) -> int:
    """``cfg.eval.batch_size`` as a number: B_max (:func:`max_batch_size`) for ``auto``."""
    if cfg.eval.batch_size == AUTO:
        return max_batch_size(cfg.perf, cfg.client.batch_size, batch_overflow_probability(cfg))
    return cfg.eval.batch_size


def resolve(
    perf: PerfConfig,
    *,
    expected_batch_size: float,
    backend: str,
    num_processes: int = 1,
    eval_batch_size: int | str = AUTO,
    overflow_probability: float = OVERFLOW_PROBABILITY,
    max_batch_size_of_run: int | None = None,
) -> ResolvedPerf:
    """The concrete ``microbatch_size`` / ``clients_per_chunk`` / B_max of a run.

    Pure: depends only on its arguments (no device query), so the choice is testable and
    logged. Explicit values are kept as they are (B_max still padded to their multiple).

    Args:
      perf: the ``perf`` section (``auto`` or explicit integers).
      expected_batch_size: ``client.batch_size`` (the Poisson mean).
      backend: ``jax.default_backend()`` (``cpu``, ``gpu``, ``tpu``, ...).
      num_processes: ``jax.process_count()``; a multi-process round's clients mesh must
        span the processes, so ``auto`` keeps all clients in one chunk there.
      eval_batch_size: ``eval.batch_size``; ``auto`` becomes B_max (a forward pass of the
        training batch capacity: it fits wherever a training step of that batch does).
      overflow_probability: the run's :func:`batch_overflow_probability` (B_max's Poisson
        tail).
      max_batch_size_of_run: a resumed run's B_max (its privacy ledger's). It is kept when
        it is still a multiple of the micro-batch (and at least the Poisson bound at 1e-6), so a
        run extended in rounds or budget keeps its batch shape, which RDP's B_max depends on
        (:func:`batch_overflow_probability`); the planner then accounts that B_max.

    Raises:
      ConfigError: an explicit ``perf.clients_per_chunk`` that ``perf.devices`` does not
        divide (checked here too for the resolved value).
    """
    base = physical_batch_size(expected_batch_size, overflow_probability)
    b_max = max_batch_size(perf, expected_batch_size, overflow_probability)
    if max_batch_size_of_run is not None and max_batch_size_of_run != b_max:
        kept = max_batch_size_of_run
        # Kept when already padded to the micro-batch and not below the plain 1e-6 bound.
        if kept >= max_batch_size(perf, expected_batch_size) and kept == padded_batch_size(
            kept, _padding_microbatch(perf)
        ):
            b_max, base = kept, min(base, kept)
    # Sequential micro-batches pay off where one client's batch already fills the machine
    # and the skipped padding is saved compute: a single CPU process without an explicit
    # device layout.
    sequential = (
        backend == "cpu" and num_processes == 1 and perf.devices <= 1 and perf.model_devices == 1
    )
    if perf.microbatch_size == AUTO:
        mb = AUTO_MICROBATCH if sequential and AUTO_MICROBATCH < b_max else 0
    else:
        mb = perf.microbatch_size
    if perf.clients_per_chunk == AUTO:
        chunk = 1 if sequential else 0
    else:
        chunk = perf.clients_per_chunk
    if chunk and perf.devices and chunk % perf.devices:
        raise ConfigError(
            f"perf.devices={perf.devices} is invalid: must divide perf.clients_per_chunk="
            f"{chunk} (resolved from {perf.clients_per_chunk!r}); set perf.clients_per_chunk "
            "to a multiple of perf.devices."
        )
    # The tail split pays where cost is per example (a CPU running one client's micro-batches
    # in sequence); on an accelerator a small micro-batch costs about as much as a full one.
    tail = tail_microbatch_size(mb) if sequential and 0 < mb < b_max else 0
    return ResolvedPerf(
        microbatch_size=mb,
        tail_microbatch_size=tail,
        clients_per_chunk=chunk,
        max_batch_size=b_max,
        base_max_batch_size=base,
        backend=backend,
        eval_batch_size=b_max if eval_batch_size == AUTO else eval_batch_size,
    )


def resolved_config(cfg: RunConfig, resolved: ResolvedPerf) -> RunConfig:
    """``cfg`` with the resolved integers in place of ``auto`` (``perf.microbatch_size``,
    ``perf.clients_per_chunk``, ``eval.batch_size``): what the run computes with."""
    perf = dataclasses.replace(
        cfg.perf,
        microbatch_size=resolved.microbatch_size,
        clients_per_chunk=resolved.clients_per_chunk,
    )
    evaluation = dataclasses.replace(cfg.eval, batch_size=resolved.eval_batch_size)
    return dataclasses.replace(cfg, perf=perf, eval=evaluation)
