"""Resume checks: the config to resume with, what a restored checkpoint must agree with, the
privacy budget, and agreement of every process on where to start.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ffa_jax import checkpoint as ckpt_lib
from ffa_jax import distributed
from ffa_jax.config import RunConfig, load_config
from ffa_jax.errors import CheckpointError, ConfigError
from ffa_jax.run.setup import Prepared
from ffa_jax.types import PyTree


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


def check_restored(
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


def agree_on_start(out: Path, failure: Exception | None, restored) -> None:
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


def check_budget(prep: Prepared, restored: ckpt_lib.Restored | None) -> None:
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
