"""The run loop: prepare everything (validating all input first), then rounds, eval, outputs.

``prepare(cfg)`` loads and checks the model files, the data, the partition and the privacy
calibration before any training compute; ``train(cfg)`` runs the rounds and writes
``<output_dir>/<name>/`` (``config.yaml``, ``metrics.jsonl``, ``adapter.safetensors``,
``plots/metrics.png``, ``summary.md``).
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

from ffa_jax import lora
from ffa_jax.config import RunConfig
from ffa_jax.data import batching, partition, tasks
from ffa_jax.errors import ConfigError, DataError
from ffa_jax.federated.client import DpParams, make_client_optimizer, make_client_update
from ffa_jax.federated.round import choose_devices, client_mesh, make_round
from ffa_jax.federated.server import make_server_optimizer, server_init
from ffa_jax.models import encoder as encoder_lib
from ffa_jax.models import weights as weights_lib
from ffa_jax.models.objectives import classification_eval, classification_loss
from ffa_jax.privacy import accounting

PyTree = Any

# Purposes folded into the root key; one per use so that no randomness is shared.
KEY_LORA_A = 0  # the shared A (identical on every client)
KEY_HEAD = 1  # a randomly initialised classification head
KEY_TRAIN = 2  # DP noise (round, client and step are folded in by the round)
SAMPLER_PURPOSE = 3  # host-side Poisson sampling


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


def prepare(cfg: RunConfig, *, log=print) -> Prepared:
    """Loads model, tokenizer and data, partitions, builds the LoRA tree and calibrates noise.

    Raises:
      ConfigError / DataError / WeightsError: bad input, before any training compute.
    """
    key = root_key(cfg)
    model_dir = weights_lib.resolve_model_dir(cfg.model.name)  # fails fast on missing files
    data = tasks.load_text_classification(
        cfg.data.task,
        test_fraction=cfg.data.test_fraction,
        seed=cfg.seed,
        text_field=cfg.data.text_field,
        label_field=cfg.data.label_field,
        max_examples=cfg.data.max_train_examples,
    )
    if cfg.federated.clients > len(data.train_labels):
        raise ConfigError(
            f"federated.clients={cfg.federated.clients} exceeds the {len(data.train_labels)} training "
            "examples of data.task; use fewer clients."
        )
    parts = partition.partition(
        data.train_labels,
        cfg.federated.clients,
        cfg.data.partition,
        seed=cfg.seed,
        num_labels=data.num_labels,
        label_mix=cfg.data.label_mix if cfg.data.partition == "label_mix" else None,
        dirichlet_alpha=cfg.data.dirichlet_alpha,
    )
    sizes = np.array([len(p) for p in parts])
    if cfg.client.batch_size > sizes.min():
        raise ConfigError(
            f"client.batch_size={cfg.client.batch_size} exceeds the smallest client's {sizes.min()} "
            "examples (the sampling rate batch_size/n_k must be <= 1); use a smaller batch size or fewer clients."
        )
    table = partition.partition_table(data.train_labels, parts, data.label_names)

    enc_cfg, base_params = weights_lib.load_encoder(
        str(model_dir),
        data.num_labels,
        head_key=jax.random.fold_in(key, KEY_HEAD),
        pooling=cfg.model.pooling,
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

    q = cfg.client.batch_size / sizes
    steps = cfg.federated.rounds * cfg.federated.local_steps
    if cfg.privacy.enabled:
        if cfg.privacy.noise_multiplier is not None:
            sigmas = np.full(len(sizes), float(cfg.privacy.noise_multiplier))
        else:
            sigmas = np.array(
                [
                    accounting.calibrate_noise_multiplier(
                        cfg.privacy.epsilon,
                        cfg.privacy.delta,
                        float(qk),
                        steps,
                        accountant=cfg.privacy.accountant,
                    )
                    for qk in q
                ]
            )
        curves = np.stack(
            [
                accounting.epsilon_curve(
                    float(s),
                    float(qk),
                    cfg.federated.local_steps,
                    cfg.federated.rounds,
                    cfg.privacy.delta,
                    accountant=cfg.privacy.accountant,
                )
                for s, qk in zip(sigmas, q, strict=True)
            ]
        )
        eps_curve = curves.max(axis=0)
    else:
        sigmas = np.zeros(len(sizes))
        eps_curve = np.full(cfg.federated.rounds, math.inf)

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
        max_batch_size=batching.physical_batch_size(cfg.client.batch_size),
        partition_table=table,
        target_paths=lora.target_paths(base_params, cfg.lora.targets),
    )


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
    os.replace(tmp, path)


def _bytes_of_one_client(tree: PyTree) -> int:
    return lora.tree_bytes(tree)


def train(
    cfg: RunConfig, *, overwrite: bool = False, progress: bool = True, log=print
) -> dict[str, Any]:
    """Runs a whole federated fine-tuning job and writes its run directory.

    Returns:
      The final summary (test accuracy, epsilon, bytes, wall time, run directory).
    """
    out = run_dir(cfg)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(
            f"run directory {str(out)!r} already exists; pass --overwrite, or choose another "
            "name with --set name=<new-name>."
        )
    t_start = time.time()
    prep = prepare(cfg, log=log)
    log(prep.partition_table)
    if cfg.privacy.enabled:
        log(
            f"DP-SGD per client: sigma={np.round(prep.noise_multipliers, 4).tolist()} "
            f"q={np.round(prep.sampling_rates, 5).tolist()} steps={cfg.federated.rounds * cfg.federated.local_steps} "
            f"-> epsilon={prep.epsilon_curve[-1]:.3f} at delta={cfg.privacy.delta:g} ({cfg.privacy.accountant})"
        )
    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "config.yaml", cfg.to_yaml())

    round_fn, server_opt = build_round(prep)
    state = server_init(prep.trainable, server_opt)
    key = jax.random.fold_in(root_key(cfg), KEY_TRAIN)
    K = cfg.federated.clients
    sizes = np.array([len(p) for p in prep.client_indices], np.float32)
    weights = (
        np.ones(K, np.float32) if cfg.federated.weighting == "uniform" else sizes / sizes.sum()
    )
    client_ids = np.arange(K, dtype=np.int32)
    dp = DpParams(
        clip_norm=jnp.full((K,), cfg.privacy.clip_norm, jnp.float32),
        noise_multiplier=jnp.asarray(prep.noise_multipliers, jnp.float32),
        expected_batch_size=jnp.full((K,), float(cfg.client.batch_size), jnp.float32),
    )
    per_client_bytes = _bytes_of_one_client(prep.trainable)
    eval_fn = classification_eval(prep.module)

    metrics_path = out / "metrics.jsonl"
    history: list[dict[str, Any]] = []
    rounds = range(cfg.federated.rounds)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(rounds, desc=f"{cfg.name} ({cfg.lora.mode})", unit="round")
        rounds = bar
    with open(metrics_path, "w") as mf:
        for r in rounds:
            t0 = time.time()
            batches = client_batches(prep, r)
            dropped = int(batches.pop("_dropped"))
            state, m = round_fn(state, prep.frozen, batches, weights, client_ids, dp, key)
            loss = float(m.loss)
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"round {r + 1}: the training loss is {loss}; lower client.learning_rate or check the data."
                )
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
            mf.write(json.dumps(_json_safe(record)) + "\n")
            mf.flush()
            if bar is not None:
                post = {"loss": f"{loss:.4f}", "eps": f"{record['epsilon']:.2f}"}
                if "eval_accuracy" in record:
                    post["acc"] = f"{record['eval_accuracy']:.3f}"
                bar.set_postfix(post)

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


__all__ = ["Prepared", "prepare", "build_round", "client_batches", "evaluate", "train", "DataError"]
