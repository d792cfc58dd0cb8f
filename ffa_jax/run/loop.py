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

import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ffa_jax import allocator, distributed, lora
from ffa_jax import checkpoint as ckpt_lib
from ffa_jax.config import RunConfig
from ffa_jax.errors import FfaJaxError
from ffa_jax.federated import modes
from ffa_jax.federated.round import model_groups
from ffa_jax.fileio import json_safe
from ffa_jax.run.inputs import round_inputs, run_round
from ffa_jax.run.report import metric_value
from ffa_jax.run.resume import agree_on_start, check_budget, check_restored
from ffa_jax.run.rundir import (
    ADAPTER_FILE,
    MetricsLog,
    frozen_line,
    noise_line,
    open_run_dir,
    privacy_line,
    round_record,
    run_dir,
    save_adapter,
    start_run_dir,
    write_reports,
)
from ffa_jax.run.setup import (
    build_round,
    evaluate,
    evaluate_splits,
    init_server_state,
    noise_note,
    prepare,
    run_secret,
    train_key,
    unit,
)


class NonFiniteError(FfaJaxError, FloatingPointError):
    """A round produced a non-finite training loss, update or model; the run stopped before
    writing that round, so the metrics and the last checkpoint describe the last good round.

    Attributes:
      selected: what :meth:`RoundSelector.summary` gives for the rounds before the
        divergence (the validation-selected round and its test metrics; ``{}`` without a
        validation split), set by :func:`train`.
    """

    selected: dict[str, Any] = {}


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
        restored = open_run_dir(cfg, out, ckpt_dir, overwrite=overwrite, resume=resume)
    except FfaJaxError as e:
        failure = e
    if distributed.is_distributed():
        agree_on_start(out, failure, restored)
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
    state = init_server_state(prep, server_opt)
    history: list[dict[str, Any]] = []
    start = 0
    if restored is not None:
        check_restored(restored, prep, state, a_hash, d_hash)
        state = ckpt_lib.restore_state(restored, state)
        history, start = restored.history, restored.round
    check_budget(prep, restored)
    log(prep.partition_table)
    log(privacy_line(prep))
    log(noise_line(cfg))
    log(allocator.describe(jax.default_backend()))
    log(prep.perf.describe())
    if cfg.perf.model_devices > 1:
        log(frozen_line(prep))
    if resume:
        log(
            f"resuming {out} at round {start} of {cfg.federated.rounds}"
            + ("" if restored else " (no checkpoint yet)")
        )

    # Every input is valid: from here on the run directory is written (by process 0).
    if primary:
        start_run_dir(out, cfg, prep, history, overwrite=overwrite)
    # metrics.jsonl lines and TensorBoard events (rounds after the history's are recomputed).
    first_step = history[-1]["round"] + 1 if history else 0
    mlog = MetricsLog(out, primary=primary, first_step=first_step)

    key = train_key(prep)
    # One client's upload per round (the mean over an alternating mode's cycle, e.g. RoLoRA).
    per_client_bytes = modes.mean_uplink_bytes(cfg.lora.mode, prep.trainable)
    wl = prep.workload
    if cfg.eval.baseline and not any(h["round"] == 0 for h in history):
        # The pretrained model (B = 0, so the LoRA tree computes the base model), as round 0.
        t0 = time.time()
        record = {
            "round": 0,
            **evaluate_splits(prep, prep.params, test=cfg.eval.test),
            "seconds": time.time() - t0,
        }
        history.append(record)
        mlog.write(record)
        if wl.metric in record:
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
    # The validation-selected round (eval.select_metric, earliest on ties) and its trainable
    # tree (host arrays, the size of the adapter): its test metrics are read once at the end.
    selector = RoundSelector(f"val_{cfg.eval.select_metric}", history)
    # The selected round's state (the mode's extra state included) is read on test once: at
    # the end, or at a divergence (None: eval.test is false).
    test_selected = (
        (lambda st: evaluate(prep, modes.model_params(st, prep.frozen))) if cfg.eval.test else None
    )
    with (
        ckpt_lib.Checkpointer(ckpt_dir, keep=cfg.checkpoint.keep)
        if primary
        else ckpt_lib.NoCheckpointer() as ckpt,
        mlog,
    ):
        for r in rounds:
            t0 = time.time()
            inp = round_inputs(prep, r)
            new_state, m = run_round(round_fn, prep, state, inp, key)
            loss = float(m.loss)
            try:
                check_finite(
                    r, loss, float(m.update_norm), new_state.trainable, ckpt_dir, last_saved
                )
            except NonFiniteError as e:
                # Early stopping on the validation split still has a model: the selected round
                # before the divergence, read on test as a finished run's would be (so that a
                # grid does not lose the runs that diverged late: no survivorship bias).
                e.selected = selector.summary(history, test_selected)
                raise
            # The state lives on the host between rounds, as after a restore: every round
            # (fresh or resumed) calls the same executable with the same input placement.
            state = jax.device_get(new_state)
            record = round_record(
                prep,
                r,
                inp,
                m,
                loss,
                modes.uplink_bytes(cfg.lora.mode, prep.trainable, r),
                **round_bytes(prep, r, inp.slots),
            )
            is_last = r + 1 == cfg.federated.rounds
            # The validation split (if any) every round; the test split after the last round
            # and every eval.every rounds.
            test = cfg.eval.test and (
                is_last or bool(cfg.eval.every and (r + 1) % cfg.eval.every == 0)
            )
            record.update(evaluate_splits(prep, modes.model_params(state, prep.frozen), test=test))
            if test and modes.spec(cfg.lora.mode).client_state is not None:
                record["eval_clients"] = personal_metrics(prep, state)
            record["seconds"] = time.time() - t0
            selector.offer(record, state)
            history.append(record)
            mlog.write(record)
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

    final_params = modes.model_params(state, prep.frozen)
    selected = selector.summary(history, test_selected)
    if primary and modes.spec(cfg.lora.mode).peft:
        # Fed-SB's r x r matrix folded into B: a plain LoRA adapter (W0 + s B A).
        save_adapter(
            out / ADAPTER_FILE, lora.fold_mid(final_params), cfg, head_pattern=wl.head_pattern
        )
    elif primary:
        log(modes.no_adapter_note(cfg.lora.mode))
    summary = {
        "run_dir": str(out),
        **wl.summary_fields(history),
        "epsilon": history[-1]["epsilon"],
        "epsilon_pld": history[-1].get("epsilon_pld"),
        "epsilon_rdp": history[-1].get("epsilon_rdp"),
        "delta": history[-1]["delta"],
        "privacy_unit": unit(cfg) or "none",
        "uplink_bytes_total": sum(metric_value(h, "uplink_bytes", 0) for h in history),
        "uplink_bytes_per_client_per_round": per_client_bytes,
        "wall_seconds": time.time() - t_start,
        "rounds": cfg.federated.rounds,
        "noise": noise_note(cfg),
        # What perf.* "auto" became on this machine (speed only; see ffa_jax.perf).
        "perf_resolved": prep.perf.as_dict(),
        **selected,
    }
    if primary:
        write_reports(out, cfg, prep, history, summary)
    return json_safe(summary)


def round_bytes(prep, r: int, slots) -> dict[str, int]:
    """Round ``r``'s byte counts for :func:`ffa_jax.run.rundir.round_record`: all uploads
    together (``uplink_total``; clients of ``lora.client_ranks`` upload their own rank) and
    what the server sends each participant (``downlink_bytes``), by the analytic counts of
    :mod:`ffa_jax.federated.modes` for ``lora.mode``."""
    cfg = prep.cfg
    mode, ranks = cfg.lora.mode, cfg.lora.client_ranks
    members = [int(c) for c in np.asarray(slots) if c >= 0]
    own = [None] * len(members) if ranks is None else [ranks[c] for c in members]
    return {
        "uplink_total": sum(modes.uplink_bytes(mode, prep.trainable, r, rank=k) for k in own),
        "downlink_bytes": modes.downlink_bytes(
            mode,
            prep.params,
            prep.trainable,
            r,
            len(members),
            participant_ranks=None if ranks is None else own,
        ),
    }


def personal_metrics(prep, state) -> list[float]:
    """FedSA-LoRA: the workload's headline metric (e.g. accuracy) of every client's
    personalised model (the shared A, the client's own B) on the held-out split."""
    metric = prep.workload.metric
    return [
        float(evaluate(prep, modes.personal_params(state, prep.frozen, k))[metric])
        for k in range(len(prep.client_indices))
    ]


class RoundSelector:
    """Keeps the round with the best validation ``key`` (e.g. ``val_balanced_accuracy``;
    higher is better, the earliest round wins ties; round 0, the pretrained model, is not a
    candidate) and what the loop offers with it (the server state), so that the selected
    round's model is read on the test split once, at the end. Runs without a validation split
    select nothing."""

    def __init__(self, key: str, history: list[dict[str, Any]]):
        self.key = key
        self.round, self.score, self.tree = None, -math.inf, None
        # A resumed run: rounds before the restart compete, but their trees are gone.
        for h in history:
            self.offer(h, None)

    def offer(self, record: dict[str, Any], tree) -> None:
        score = record.get(self.key)
        if record["round"] >= 1 and score is not None and score > self.score:
            self.round, self.score, self.tree = record["round"], float(score), tree

    def summary(self, history: list[dict[str, Any]], evaluate_tree) -> dict[str, Any]:
        """``selected_round``, ``selected_<key>`` and ``selected_test_*`` (the test metrics
        of the selected round's model: the last record's when it is the last round, else one
        evaluation of the kept tree; none when ``evaluate_tree`` is None, i.e. ``eval.test``
        is false); ``{}`` without a validation split."""
        if self.round is None:
            return {}
        out: dict[str, Any] = {"selected_round": self.round, f"selected_{self.key}": self.score}
        if evaluate_tree is None:
            return out
        last = history[-1]
        tested = {k: v for k, v in last.items() if k.startswith("eval_") and k != "eval_splits"}
        if self.round == last["round"] and tested:
            test = tested
        elif self.tree is not None:
            test = evaluate_tree(self.tree)
        else:
            out["selected_note"] = "selected before a resume: its model was not kept"
            return out
        out.update({"selected_test_" + k.removeprefix("eval_"): v for k, v in test.items()})
        return out


def silent(*args, **kwargs) -> None:
    """A ``log`` that prints nothing: processes other than 0 of a multi-process run (process
    0 reports), and Flower's per-message prepares."""


def check_finite(r, loss, update_norm, trainable, ckpt_dir: Path, last_saved) -> None:
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
