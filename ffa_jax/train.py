"""The run loop: prepare everything (validating all input first), then rounds, eval, outputs.

``prepare(cfg)`` loads and checks the model files, the data, the partition and the privacy
calibration before any training compute; ``train(cfg)`` runs the rounds and writes
``<output_dir>/<name>/`` (``config.yaml``, ``metrics.jsonl``, ``checkpoints/``,
``adapter.safetensors``, ``plots/metrics.png``, ``summary.md``). ``train(cfg, resume=True)``
(``ffa-jax train --resume RUN_DIR``) continues from the newest checkpoint, bit-identically to
an uninterrupted run (see :mod:`ffa_jax.checkpoint`).

Nothing is written before every input has been validated: a rejected config, data set, model
or checkpoint leaves no run directory behind, and a rejected resume changes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ffa_jax import checkpoint as ckpt_lib
from ffa_jax import lora
from ffa_jax.config import RunConfig, load_config
from ffa_jax.data import batching, partition, tasks
from ffa_jax.data.clients import load_clients
from ffa_jax.errors import CheckpointError, ConfigError, DataError, FfaJaxError
from ffa_jax.federated.client import DpParams, make_client_optimizer, make_client_update
from ffa_jax.federated.round import choose_devices, client_mesh, make_round
from ffa_jax.federated.server import make_server_optimizer, server_init
from ffa_jax.models import encoder as encoder_lib
from ffa_jax.models import weights as weights_lib
from ffa_jax.models.objectives import classification_eval, classification_loss
from ffa_jax.privacy import accounting, planner

PyTree = Any

# Purposes folded into the root key; one per use so that no randomness is shared.
KEY_LORA_A = 0  # the shared A (identical on every client)
KEY_HEAD = 1  # a randomly initialised classification head
KEY_TRAIN = 2  # DP noise (round, client and step are folded in by the round)
SAMPLER_PURPOSE = 3  # host-side Poisson sampling


class NonFiniteError(FfaJaxError, FloatingPointError):
    """A round produced a non-finite training loss, update or model; the run stopped before
    writing that round, so the metrics and the last checkpoint describe the last good round."""


@dataclasses.dataclass
class Prepared:
    """Everything a run needs, built and validated before any training compute."""

    cfg: RunConfig
    data: tasks.TextClassificationData
    module: Any
    params: PyTree  # full tree with LoRA nodes at the targets
    trainable: PyTree
    frozen: PyTree
    train_arrays: dict[str, np.ndarray]
    test_arrays: dict[str, np.ndarray]
    client_indices: list[np.ndarray]
    sampling_rates: np.ndarray  # [K] q_k = batch_size / n_k
    noise_multipliers: np.ndarray  # [K] sigma_k (0 without DP)
    epsilon_curve: np.ndarray  # [rounds] epsilon spent after each round (max over clients)
    max_batch_size: int
    partition_table: str
    target_paths: list[str]


def root_key(cfg: RunConfig) -> jax.Array:
    return jax.random.key(cfg.seed)


def prepare(cfg: RunConfig, *, log=print, noise_multipliers: np.ndarray | None = None) -> Prepared:
    """Loads model, tokenizer and data, partitions, builds the LoRA tree and calibrates noise.

    Args:
      cfg: the run config.
      noise_multipliers: ``[K]`` sigma_k to use instead of calibrating them (a resumed run
        keeps the sigmas it started with); epsilon is then accounted for these sigmas.

    Raises:
      ConfigError / DataError / WeightsError: bad input, before any training compute.
    """
    key = root_key(cfg)
    model_dir = weights_lib.resolve_model_dir(cfg.model.name)  # fails fast on missing files
    data, parts = load_clients(cfg)
    sizes = np.array([len(p) for p in parts])
    table = partition.partition_table(data.train_labels, parts, data.label_names)

    enc_cfg, base_params = weights_lib.load_encoder(
        str(model_dir),
        data.num_labels,
        head_key=jax.random.fold_in(key, KEY_HEAD),
        pooling=cfg.model.pooling,
    )
    if cfg.model.max_length > enc_cfg.max_length:
        raise ConfigError(
            f"model.max_length={cfg.model.max_length} exceeds the {enc_cfg.max_length} positions "
            f"of the model {cfg.model.name!r}; use model.max_length <= {enc_cfg.max_length}."
        )
    module = encoder_lib.EncoderClassifier(enc_cfg)
    params = lora.init(base_params, cfg.lora, jax.random.fold_in(key, KEY_LORA_A))
    head = _head_pattern(enc_cfg) if cfg.model.train_head else None
    mask = lora.trainable_mask(params, cfg.lora.mode, extra=head)
    trainable, frozen = lora.split(params, mask)

    tokenizer = weights_lib.load_tokenizer(str(model_dir))
    train_arrays = batching.tokenize(data.train_texts, tokenizer, cfg.model.max_length)
    train_arrays["label"] = np.asarray(data.train_labels, np.int32)
    test_texts, test_labels = data.test_texts, data.test_labels
    if cfg.eval.max_examples is not None:
        test_texts, test_labels = (
            test_texts[: cfg.eval.max_examples],
            test_labels[: cfg.eval.max_examples],
        )
    test_arrays = batching.tokenize(test_texts, tokenizer, cfg.model.max_length)
    test_arrays["label"] = np.asarray(test_labels, np.int32)

    max_batch = batching.physical_batch_size(cfg.client.batch_size)
    q, sigmas, eps_curve = privacy_plan(cfg, sizes, max_batch, noise_multipliers)

    return Prepared(
        cfg=cfg,
        data=data,
        module=module,
        params=params,
        trainable=trainable,
        frozen=frozen,
        train_arrays=train_arrays,
        test_arrays=test_arrays,
        client_indices=parts,
        sampling_rates=q,
        noise_multipliers=sigmas,
        epsilon_curve=eps_curve,
        max_batch_size=max_batch,
        partition_table=table,
        target_paths=lora.target_paths(base_params, cfg.lora.targets),
    )


def privacy_plan(
    cfg: RunConfig,
    client_sizes: np.ndarray,
    max_batch_size: int,
    noise_multipliers: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(q [K], sigma [K], epsilon after each round [rounds])`` of a run.

    Without ``noise_multipliers`` this is :func:`ffa_jax.privacy.planner.sample_level_plan`
    (what ``ffa-jax privacy`` prints); with them (a resumed run), the same accounting
    (truncated-Poisson PLD, or RDP) of those sigmas, so the curve of a resumed run equals the
    uninterrupted run's entry for entry.
    """
    sizes = np.asarray(client_sizes, np.int64)
    fed, priv = cfg.federated, cfg.privacy
    if noise_multipliers is None or not priv.enabled:
        plan = planner.sample_level_plan(
            client_sizes=sizes.tolist(),
            batch_size=cfg.client.batch_size,
            max_batch_size=max_batch_size,
            rounds=fed.rounds,
            local_steps=fed.local_steps,
            epsilon=priv.epsilon,
            delta=priv.delta,
            accountant=priv.accountant,
            noise_multiplier=priv.noise_multiplier,
        )
        return plan.sampling_rates, plan.noise_multipliers, plan.epsilon_curve
    sigmas = np.asarray(noise_multipliers, np.float64)
    q = cfg.client.batch_size / sizes
    curves = np.stack(
        [
            accounting.epsilon_curve(
                float(s),
                float(qk),
                fed.local_steps,
                fed.rounds,
                priv.delta,
                priv.accountant,
                truncation=accounting.Truncation(int(n), int(max_batch_size)),
            )
            for s, qk, n in zip(sigmas, q, sizes, strict=True)
        ]
    )
    return q, sigmas, curves.max(axis=0)


def _head_pattern(enc_cfg) -> str:
    return r"classifier/.*"


def build_round(prep: Prepared):
    """The jitted round function and the server optimiser for a prepared run."""
    cfg = prep.cfg
    loss_fn = classification_loss(prep.module)
    client_update = make_client_update(
        loss_fn,
        make_client_optimizer(cfg.client),
        private=cfg.privacy.enabled,
        microbatch_size=cfg.perf.microbatch_size or None,
    )
    server_opt = make_server_optimizer(cfg.server)
    chunk = cfg.perf.clients_per_chunk or cfg.federated.clients
    devices = choose_devices(chunk, cfg.perf.devices)
    mesh = client_mesh(devices) if devices > 1 else None
    return make_round(
        client_update, server_opt, clients_per_chunk=cfg.perf.clients_per_chunk, mesh=mesh
    ), server_opt


def client_batches(prep: Prepared, round_idx: int) -> dict[str, np.ndarray]:
    """Host-side Poisson sampling of every client's batches for one round: ``[K, S, B_max, ...]``.

    Deterministic in ``(seed, round)``, so a resumed run draws the same batches.
    """
    cfg = prep.cfg
    rng = np.random.default_rng([cfg.seed, SAMPLER_PURPOSE, round_idx])
    local_idx, mask, dropped = batching.poisson_batch_indices(
        rng,
        [len(p) for p in prep.client_indices],
        prep.sampling_rates,
        cfg.federated.local_steps,
        prep.max_batch_size,
    )
    out = batching.gather_client_batches(prep.train_arrays, prep.client_indices, local_idx)
    out["mask"] = mask
    out["_dropped"] = dropped
    return out


def train_key(cfg: RunConfig) -> jax.Array:
    """The run's training key (DP noise); the round folds in the round and client ids."""
    return jax.random.fold_in(root_key(cfg), KEY_TRAIN)


def round_inputs(prep: Prepared) -> tuple[np.ndarray, np.ndarray, DpParams]:
    """``(weights [K], client_ids [K], DpParams with [K] leaves)``: the per-client arguments
    :func:`train` passes to every call of the round function (aggregation weights 1/K or
    n_k/n before normalisation, global client ids, clip norm / sigma_k / expected batch)."""
    cfg = prep.cfg
    K = cfg.federated.clients
    sizes = np.array([len(p) for p in prep.client_indices], np.float32)
    weights = (
        np.ones(K, np.float32) if cfg.federated.weighting == "uniform" else sizes / sizes.sum()
    )
    dp = DpParams(
        clip_norm=jnp.full((K,), cfg.privacy.clip_norm, jnp.float32),
        noise_multiplier=jnp.asarray(prep.noise_multipliers, jnp.float32),
        expected_batch_size=jnp.full((K,), float(cfg.client.batch_size), jnp.float32),
    )
    return weights, np.arange(K, dtype=np.int32), dp


def evaluate(prep: Prepared, params: PyTree, eval_fn=None) -> dict[str, float]:
    """Accuracy and mean loss on the (possibly capped) test split."""
    eval_fn = eval_fn or classification_eval(prep.module)
    totals = {"correct": 0.0, "loss_sum": 0.0, "count": 0.0}
    for batch, mask in batching.eval_batches(prep.test_arrays, prep.cfg.eval.batch_size):
        out = eval_fn(params, batch, mask)
        for k in totals:
            totals[k] += float(out[k])
    n = max(totals["count"], 1.0)
    return {
        "accuracy": totals["correct"] / n,
        "loss": totals["loss_sum"] / n,
        "examples": int(totals["count"]),
    }


def run_dir(cfg: RunConfig) -> Path:
    return Path(cfg.output_dir) / cfg.name


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _bytes_of_one_client(tree: PyTree) -> int:
    return lora.tree_bytes(tree)


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


def _check_restored(
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
            f"(B_max {led.max_batch_size}): data.task's data changed. Restore the original data "
            "or start a new run."
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
    if led.steps_done != r * cfg.federated.local_steps:
        raise CheckpointError(
            f"checkpoint {where}: its privacy ledger counts {led.steps_done} local steps after "
            f"{r} rounds of {cfg.federated.local_steps}; the checkpoint is inconsistent. Start a "
            "new run."
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
    restored = None
    if resume:
        if overwrite:
            raise ConfigError("--resume and --overwrite exclude each other; pass one of them.")
        if not (out / "config.yaml").is_file():
            raise CheckpointError(
                f"cannot resume {str(out)!r}: not a run directory (no config.yaml); start the "
                "run without --resume."
            )
        restored = ckpt_lib.read_latest(ckpt_dir, cfg)
        if restored is not None and cfg.federated.rounds < restored.round:
            raise ConfigError(
                f"federated.rounds={cfg.federated.rounds} is below the {restored.round} rounds "
                f"the checkpoint {str(restored.step_dir)!r} has done; use "
                f"federated.rounds >= {restored.round}."
            )
    elif out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(
            f"run directory {str(out)!r} already exists; pass --overwrite, --resume "
            f"{str(out)!r} to continue it, or choose another name with --set name=<new-name>."
        )
    sigmas = None
    if restored is not None and restored.ledger.private:
        sigmas = np.asarray(restored.ledger.noise_multipliers, np.float64)
    prep = prepare(cfg, log=log, noise_multipliers=sigmas)
    a_hash = ckpt_lib.a_matrices_hash(prep.params)
    d_hash = ckpt_lib.data_hash([prep.train_arrays, prep.test_arrays], prep.client_indices)
    round_fn, server_opt = build_round(prep)
    state = jax.device_get(server_init(prep.trainable, server_opt))
    history: list[dict[str, Any]] = []
    start = 0
    if restored is not None:
        _check_restored(restored, prep, state, a_hash, d_hash)
        state = ckpt_lib.restore_state(restored, state)
        history, start = restored.history, restored.round
    log(prep.partition_table)
    if cfg.privacy.enabled:
        log(
            f"DP-SGD per client: sigma={np.round(prep.noise_multipliers, 4).tolist()} "
            f"q={np.round(prep.sampling_rates, 5).tolist()} steps={cfg.federated.rounds * cfg.federated.local_steps} "
            f"-> epsilon={prep.epsilon_curve[-1]:.3f} at delta={cfg.privacy.delta:g} ({cfg.privacy.accountant})"
        )
    if resume:
        log(
            f"resuming {out} at round {start} of {cfg.federated.rounds}"
            + ("" if restored else " (no checkpoint yet)")
        )

    # Every input is valid: from here on the run directory is written.
    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "config.yaml", cfg.to_yaml())
    metrics_path = out / "metrics.jsonl"
    # The checkpoint's history is the truth: later lines (rounds done after the last
    # checkpoint, or a torn line from a crash) are dropped and recomputed.
    _atomic_write(metrics_path, "".join(_metric_line(h) for h in history))

    key = train_key(cfg)
    K = cfg.federated.clients
    weights, client_ids, dp = round_inputs(prep)
    per_client_bytes = _bytes_of_one_client(prep.trainable)
    eval_fn = classification_eval(prep.module)

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
    with (
        ckpt_lib.Checkpointer(ckpt_dir, keep=cfg.checkpoint.keep) as ckpt,
        open(metrics_path, "a") as mf,
    ):
        for r in rounds:
            t0 = time.time()
            batches = client_batches(prep, r)
            dropped = int(batches.pop("_dropped"))
            new_state, m = round_fn(state, prep.frozen, batches, weights, client_ids, dp, key)
            loss = float(m.loss)
            _check_finite(r, loss, float(m.update_norm), new_state.trainable, ckpt_dir, last_saved)
            # The state lives on the host between rounds, as after a restore: every round
            # (fresh or resumed) calls the same executable with the same input placement.
            state = jax.device_get(new_state)
            record: dict[str, Any] = {
                "round": r + 1,
                "train_loss": loss,
                "epsilon": float(prep.epsilon_curve[r]),
                "delta": cfg.privacy.delta if cfg.privacy.enabled else 0.0,
                "uplink_bytes": per_client_bytes * K,
                "downlink_bytes": per_client_bytes * K,
                "uplink_bytes_per_client": per_client_bytes,
                "clipped_fraction": float(np.mean(m.clients.clipped_fraction)),
                # Per-example norms are only computed under DP (clipping needs them).
                "grad_norm": float(np.mean(m.clients.grad_norm)) if cfg.privacy.enabled else None,
                "update_norm": float(m.update_norm),
                "examples": int(np.sum(m.clients.num_examples)),
                "dropped_examples": dropped,
            }
            is_last = r + 1 == cfg.federated.rounds
            if is_last or (cfg.eval.every and (r + 1) % cfg.eval.every == 0):
                ev = evaluate(prep, lora.combine(state.trainable, prep.frozen), eval_fn)
                record["eval_accuracy"] = ev["accuracy"]
                record["eval_loss"] = ev["loss"]
            record["seconds"] = time.time() - t0
            history.append(record)
            mf.write(_metric_line(record))
            mf.flush()
            if is_last or (cfg.checkpoint.every and (r + 1) % cfg.checkpoint.every == 0):
                ckpt.save(
                    r + 1,
                    state,
                    cfg=cfg,
                    history=history,
                    ledger=_ledger(prep, r + 1),
                    a_hash=a_hash,
                    data_fingerprint=d_hash,
                )
                last_saved = r + 1
            if bar is not None:
                post = {"loss": f"{loss:.4f}", "eps": f"{record['epsilon']:.2f}"}
                if "eval_accuracy" in record:
                    post["acc"] = f"{record['eval_accuracy']:.3f}"
                bar.set_postfix(post)
    if bar is not None:
        bar.close()

    final_params = lora.combine(state.trainable, prep.frozen)
    save_adapter(out / "adapter.safetensors", final_params, cfg)
    summary = {
        "run_dir": str(out),
        "test_accuracy": history[-1]["eval_accuracy"],
        "test_loss": history[-1]["eval_loss"],
        "majority_accuracy": _majority(prep.test_arrays["label"]),
        "epsilon": history[-1]["epsilon"],
        "delta": history[-1]["delta"],
        "uplink_bytes_total": sum(h["uplink_bytes"] for h in history),
        "uplink_bytes_per_client_per_round": per_client_bytes,
        "wall_seconds": time.time() - t_start,
        "rounds": cfg.federated.rounds,
    }
    from ffa_jax.report import write_plots, write_summary

    write_plots(out / "plots", history)
    write_summary(out / "summary.md", cfg, prep, history, summary)
    return _json_safe(summary)


def _metric_line(record: dict[str, Any]) -> str:
    return json.dumps(_json_safe(record)) + "\n"


def _ledger(prep: Prepared, rounds_done: int) -> ckpt_lib.PrivacyLedger:
    cfg = prep.cfg
    return ckpt_lib.PrivacyLedger(
        private=cfg.privacy.enabled,
        accountant=cfg.privacy.accountant,
        delta=cfg.privacy.delta,
        noise_multipliers=tuple(float(s) for s in prep.noise_multipliers),
        sampling_rates=tuple(float(q) for q in prep.sampling_rates),
        client_sizes=tuple(int(len(p)) for p in prep.client_indices),
        max_batch_size=int(prep.max_batch_size),
        steps_per_round=cfg.federated.local_steps,
        steps_done=rounds_done * cfg.federated.local_steps,
        epsilon_spent=float(prep.epsilon_curve[rounds_done - 1]),
    )


def _check_finite(r, loss, update_norm, trainable, ckpt_dir: Path, last_saved) -> None:
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


def _majority(labels: np.ndarray) -> float:
    return float(np.bincount(labels).max() / max(len(labels), 1))


def _json_safe(d: dict[str, Any]) -> dict[str, Any]:
    # Strict JSON has no infinity: a non-private run's epsilon is written as null.
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def save_adapter(path: Path, params: PyTree, cfg: RunConfig) -> None:
    """Writes every LoRA node's ``a`` ``[d_in, r]`` and ``b`` ``[r, d_out]`` (and trained head
    leaves) to one safetensors file, atomically. A is included so the file is self-contained."""
    from safetensors.numpy import save_file

    tensors = {}
    for p, node in lora.lora_nodes(params).items():
        tensors[f"{p}/a"] = np.asarray(node.a)
        tensors[f"{p}/b"] = np.asarray(node.b)
    meta = {"lora": json.dumps(dataclasses.asdict(cfg.lora)), "model": cfg.model.name}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)


__all__ = [
    "NonFiniteError",
    "Prepared",
    "prepare",
    "privacy_plan",
    "build_round",
    "client_batches",
    "round_inputs",
    "train_key",
    "evaluate",
    "resume_config",
    "train",
    "DataError",
]
