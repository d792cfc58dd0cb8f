"""The public Python API: ``ffa_jax.finetune`` (a whole run from a config) and
``ffa_jax.finetune_model`` (private federated rounds on your own Flax model and arrays).

Both take the run config (a :class:`~ffa_jax.config.RunConfig`, a YAML path or a nested dict)
plus *section overrides* as keyword arguments, one per config section, each a dict of that
section's fields (top-level fields such as ``seed`` or ``name`` take their value)::

    ffa_jax.finetune("configs/quickstart.yaml", federated={"rounds": 1}, privacy={"epsilon": 3})

The field names are those of the YAML files and of ``--set section.field=value``
(``docs/configuration.md`` lists them all).
"""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ffa_jax import config as config_lib
from ffa_jax import lora
from ffa_jax import perf as perf_lib
from ffa_jax.config import RunConfig
from ffa_jax.errors import ConfigError, DataError
from ffa_jax.types import PyTree

# Purpose folded into the public seed for the shared LoRA A (finetune_model); the secret
# randomness (noise, Poisson batches) never comes from the public seed.
LORA_A_PURPOSE = 1


def _merge_sections(base: dict[str, Any], sections: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for name, value in sections.items():
        if isinstance(value, Mapping):
            if name in out and not isinstance(out[name], dict):
                raise ConfigError(f"{name} is a field, not a section; pass {name}=<value>.")
            out[name] = {**out.get(name, {}), **value}
        else:
            out[name] = value
    return out


def make_config(config: RunConfig | str | Path | Mapping[str, Any] | None = None, **sections):
    """A validated :class:`RunConfig` from ``config`` (a RunConfig, a YAML path, a nested dict
    or None for the defaults) with ``sections`` applied: ``lora={"rank": 4}`` sets
    ``lora.rank``; a top-level field takes its value (``seed=3``).

    Raises:
      ConfigError: unknown section or field, or an invalid value (the message names the field
        and the fix), before any compute.
    """
    if config is None:
        data: dict[str, Any] = {}
    elif isinstance(config, RunConfig):
        data = config.to_dict()
    elif isinstance(config, (str, Path)):
        data = config_lib.load_config(config).to_dict()
    elif isinstance(config, Mapping):
        data = dict(config)
    else:
        raise ConfigError(f"config={config!r} must be a RunConfig, a YAML path, a dict or None.")
    return config_lib.from_dict(RunConfig, _merge_sections(data, sections))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Run:
    """What :func:`finetune` leaves behind.

    Attributes:
      config: the run's config.
      run_dir: ``output_dir/name``: ``config.yaml``, ``metrics.jsonl``, ``summary.md``,
        ``plots/``, ``checkpoints/``.
      metrics: one dict per round, as in ``metrics.jsonl`` (``round``, ``loss``, ``epsilon``,
        ``delta``, ``uplink_bytes``, eval metrics on eval rounds, ...).
      summary: the final summary (test metric, epsilon, bytes, wall time).
      adapter_path: ``run_dir/adapter.safetensors``, the trained LoRA factors.
      adapter: ``{"<kernel path>/a": [d_in, r], "<kernel path>/b": [r, d_out]}`` numpy arrays
        read from that file: the final trained factors (the base model is unchanged).
    """

    config: RunConfig
    run_dir: Path
    metrics: tuple[dict[str, Any], ...]
    summary: dict[str, Any]
    adapter_path: Path
    adapter: dict[str, np.ndarray]


def finetune(
    config: RunConfig | str | Path | Mapping[str, Any] | None = None,
    *,
    overwrite: bool = False,
    progress: bool = False,
    log: Callable[..., None] | None = None,
    **sections,
) -> Run:
    """Runs a whole private federated fine-tuning job (what ``ffa-jax train`` runs) and
    returns its :class:`Run`.

    Args:
      config: a :class:`RunConfig`, a YAML path (e.g. ``"configs/quickstart.yaml"``), a
        nested dict, or None for the defaults.
      overwrite: replace an existing run directory (otherwise an existing one is refused).
      progress: show a progress bar.
      log: where progress lines go (default: nowhere).
      **sections: section overrides, e.g. ``federated={"rounds": 1}``, ``seed=3``.

    Raises:
      ConfigError / DataError / WeightsError / CheckpointError: bad input; nothing written.
    """
    from safetensors.numpy import load_file

    from ffa_jax import run as train_lib

    cfg = make_config(config, **sections)
    summary = train_lib.train(
        cfg, overwrite=overwrite, progress=progress, log=log or train_lib.silent
    )
    run_dir = Path(summary["run_dir"])
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    adapter_path = run_dir / "adapter.safetensors"
    return Run(
        config=cfg,
        run_dir=run_dir,
        metrics=tuple(json.loads(line) for line in lines if line.strip()),
        summary=summary,
        adapter_path=adapter_path,
        adapter=dict(load_file(str(adapter_path))),
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelRun:
    """What :func:`finetune_model` returns.

    Attributes:
      config: the config it ran (its ``lora``, ``federated``, ``client``, ``server``,
        ``privacy``, ``perf.microbatch_size`` and ``seed`` fields are used).
      metrics: one dict per round: ``round``, ``loss`` (weighted mean training loss),
        ``epsilon`` (spent so far, per client, by the configured accountant), ``delta``,
        ``uplink_bytes`` (all clients), ``clipped_fraction``, ``update_norm``, ``seconds``.
      params: the final parameter tree, LoRA nodes included (``lora.merge`` gives plain
        kernels for ``model.apply``).
      trainable: its trainable part (B under FFA-LoRA).
      apply: ``apply(params, *args) -> model.apply({"params": params}, *args)`` with LoRA.
      noise_multipliers: ``[K]`` sigma of every client (0 without DP), calibrated by the
        accountant to spend ``privacy.epsilon`` over the run.
    """

    config: RunConfig
    metrics: tuple[dict[str, Any], ...]
    params: PyTree
    trainable: PyTree
    apply: Callable[..., Any]
    noise_multipliers: np.ndarray


def _check_arrays(arrays: Mapping[str, Any], inputs: str) -> dict[str, np.ndarray]:
    if not isinstance(arrays, Mapping) or not arrays:
        raise DataError(
            f"arrays must be a non-empty dict of [N, ...] arrays, e.g. {{'x': x, 'y': y}}; "
            f"got {type(arrays).__name__}."
        )
    out = {str(k): np.asarray(v) for k, v in arrays.items()}
    sizes = {k: (v.shape[0] if v.ndim else None) for k, v in out.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise DataError(f"arrays have leading sizes {sizes}; all must be [N, ...] with one N.")
    if inputs not in out:
        raise DataError(
            f"inputs={inputs!r} is not a key of arrays {sorted(out)}; name the model's input."
        )
    return out


def finetune_model(
    model: Any,
    params: PyTree,
    arrays: Mapping[str, Any],
    loss: Callable[[Any, dict[str, Any]], jax.Array],
    *,
    config: RunConfig | str | Path | Mapping[str, Any] | None = None,
    inputs: str = "x",
    secret_seed: int | None = None,
    **sections,
) -> ModelRun:
    """Private federated LoRA / FFA-LoRA rounds on your own ``flax.linen`` model and arrays.

    The examples are split IID over ``federated.clients`` clients (from the public ``seed``).
    LoRA is attached to the stock ``Dense`` / ``DenseGeneral`` / ``Einsum`` kernels whose
    paths ``lora.targets`` fullmatches (:func:`ffa_jax.lora.attach`; A from the public seed,
    B = 0). Every round each client runs ``federated.local_steps`` DP-SGD steps on Poisson
    batches (rate ``client.batch_size / n_k``), per-example clipping to ``privacy.clip_norm``
    and Gaussian noise; the server averages the clients' B deltas (FedAvg with
    ``server.*``). sigma_k is calibrated by the dp-accounting accountant so that every client
    spends ``privacy.epsilon`` (at ``privacy.delta``) over the run, exactly as ``ffa-jax
    train`` calibrates it (:func:`ffa_jax.run.planner.sample_level_plan`).

    Args:
      model: a ``flax.linen.Module``; it is applied to ONE example with a leading batch axis
        of 1: ``model.apply({"params": p}, arrays[inputs][i][None])``.
      params: its ``"params"`` collection.
      arrays: ``{name: [N, ...]}`` numpy arrays (features, labels, ...).
      loss: ``loss(output, example) -> scalar``: the per-example loss of the model's output
        for that example (``output`` without the batch axis; ``example`` holds one row of
        every array).
      config: base config (default: the defaults); see :func:`make_config`.
      inputs: the key of ``arrays`` fed to the model.
      secret_seed: seeds the DP noise and the Poisson batches. None (the default) draws it
        from the operating system (``secrets``): nobody can rebuild the noise. Pass an int
        only for reproducible research runs (then the noise is as secret as that int).
      **sections: section overrides, e.g. ``federated={"rounds": 1}``, ``lora={"rank": 4}``.

    Returns:
      A :class:`ModelRun`.

    Raises:
      ConfigError: a config field this function cannot honour (``privacy.unit: client``,
        partial participation) or a bad value, before any compute.
      DataError: arrays of different lengths, a missing ``inputs`` key, fewer examples than
        clients.

    Formal guarantee:
      With a finite ``privacy.epsilon``, each client's contribution over the whole run is
      (epsilon, delta)-DP with respect to adding or removing one of its examples (sample-level
      DP, PLD or RDP accounting of the Poisson-subsampled Gaussian mechanism, fixed-size
      padding accounted); the server only receives noised deltas. This assumes the secret
      seed stays secret and the model's loss depends on one example only (no batch
      statistics such as BatchNorm in training mode).
    """
    from ffa_jax import run as train_lib
    from ffa_jax.data import batching
    from ffa_jax.federated.client import DpParams, make_client_optimizer, make_client_update
    from ffa_jax.federated.round import RoundInputs, make_round
    from ffa_jax.federated.server import make_server_optimizer, server_init
    from ffa_jax.run import planner

    cfg = make_config(config, **sections)
    if cfg.lora.mode not in ("ffa", "lora"):
        raise ConfigError(
            f"lora.mode={cfg.lora.mode!r}: finetune_model runs the paper's modes (ffa, lora) "
            "on a stock Flax model; the federated variants (docs/variants.md) run with "
            "ffa-jax train."
        )
    if cfg.privacy.unit != "sample":
        raise ConfigError(
            f"privacy.unit={cfg.privacy.unit!r}: finetune_model runs sample-level DP only; "
            "set privacy.unit to 'sample' (ffa-jax train runs client-level DP)."
        )
    k = cfg.federated.clients
    if cfg.federated.clients_per_round not in (None, k):
        raise ConfigError(
            f"federated.clients_per_round={cfg.federated.clients_per_round}: finetune_model "
            f"runs every client every round; leave it unset (null) or set it to {k}."
        )
    data = _check_arrays(arrays, inputs)
    n = len(data[inputs])
    if n < k:
        raise DataError(f"{n} examples cannot be split over federated.clients={k} clients.")

    # Public: the partition and the shared A come from the public seed.
    perm = np.random.default_rng([cfg.seed, 0]).permutation(n)
    parts = [np.sort(p) for p in np.array_split(perm, k)]
    sizes = np.array([len(p) for p in parts])
    sample = data[inputs][:1]
    lora_key = jax.random.fold_in(jax.random.key(cfg.seed), LORA_A_PURPOSE)
    full = lora.attach(model, params, cfg.lora, lora_key, sample)
    trainable, frozen = lora.split(full, lora.trainable_mask(full, cfg.lora.mode))
    apply = lora.linen_apply(model, cfg.lora.mode)

    def loss_fn(tr, fr, example):
        out = apply(lora.combine(tr, fr), example[inputs][None])
        return loss(jax.tree_util.tree_map(lambda o: o[0], out), example)

    # perf.* "auto" -> concrete values; B_max padded to a multiple of the micro-batch.
    speed = perf_lib.resolve(
        cfg.perf,
        expected_batch_size=cfg.client.batch_size,
        backend=jax.default_backend(),
        num_processes=jax.process_count(),
        overflow_probability=perf_lib.batch_overflow_probability(cfg),
    )
    max_batch = speed.max_batch_size
    rounds, steps = cfg.federated.rounds, cfg.federated.local_steps
    plan = planner.sample_level_plan(
        client_sizes=sizes.tolist(),
        batch_size=cfg.client.batch_size,
        max_batch_size=max_batch,
        rounds=rounds,
        local_steps=steps,
        epsilon=cfg.privacy.epsilon,
        delta=cfg.privacy.delta,
        accountant=cfg.privacy.accountant,
        noise_multiplier=cfg.privacy.noise_multiplier,
    )
    client_update = make_client_update(
        loss_fn,
        make_client_optimizer(cfg.client),
        private=plan.private,
        microbatch_size=speed.microbatch_size or None,
        tail_microbatch_size=speed.tail_microbatch_size or None,
    )
    server_opt = make_server_optimizer(cfg.server, cfg.federated.rounds)
    round_fn = make_round(client_update, server_opt, clients_per_chunk=speed.clients_per_chunk)
    state = server_init(trainable, server_opt)

    # Secret: the noise key and the Poisson sampler, from the OS unless a seed is given.
    seed = secrets.randbits(63) if secret_seed is None else int(secret_seed)
    key = jax.random.key(seed)
    sampler = np.random.default_rng([seed, 1])
    weights = train_lib.client_weights(cfg, sizes).astype(np.float32)
    dp = DpParams(
        clip_norm=np.full(k, cfg.privacy.clip_norm, np.float32),
        noise_multiplier=np.asarray(plan.noise_multipliers, np.float32),
        expected_batch_size=np.full(k, float(cfg.client.batch_size), np.float32),
    )
    client_ids = np.arange(k, dtype=np.int32)
    uplink = k * lora.tree_bytes(trainable)
    curve = plan.curves[cfg.privacy.accountant]
    metrics = []
    for r in range(rounds):
        t0 = time.time()
        local_idx, mask, _ = batching.poisson_batch_indices(
            sampler, sizes, plan.sampling_rates, steps, max_batch
        )
        batches = batching.gather_client_batches(data, parts, local_idx)
        batches["mask"] = mask
        state, m = round_fn(state, frozen, RoundInputs(batches, weights, client_ids, dp), key)
        eps = float(curve[r])
        metrics.append(
            {
                "round": r + 1,
                "loss": float(m.loss),
                "epsilon": eps if math.isfinite(eps) else None,
                "delta": cfg.privacy.delta,
                "uplink_bytes": uplink,
                "clipped_fraction": float(np.mean(m.clients.clipped_fraction)),
                "update_norm": float(m.update_norm),
                "seconds": time.time() - t0,
            }
        )
    trained = state.trainable
    return ModelRun(
        config=cfg,
        metrics=tuple(metrics),
        params=lora.combine(trained, frozen),
        trainable=trained,
        apply=apply,
        noise_multipliers=np.asarray(plan.noise_multipliers),
    )


__all__ = ["ModelRun", "Run", "finetune", "finetune_model", "make_config"]
