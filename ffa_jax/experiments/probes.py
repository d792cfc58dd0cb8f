"""Measurements inside a run that ``ffa-jax train`` does not log: the paper's Figure 1 noise
terms and Theorem 1's trajectory equivalence. Both drive the same prepared run, jitted round
and per-round inputs as :func:`ffa_jax.run.train` (so the trained model is the one ``train``
would produce for the same config) and only *read* the state between rounds.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ffa_jax import lora
from ffa_jax.config import RunConfig, replace
from ffa_jax.federated.round import RoundMetrics
from ffa_jax.federated.server import ServerState, server_init
from ffa_jax.privacy import secret as secret_lib
from ffa_jax.privacy.noise import privatize_grad_sum
from ffa_jax.run import (
    Prepared,
    build_round,
    evaluate,
    prepare,
    round_inputs,
    run_round,
    train_key,
)
from ffa_jax.types import PyTree

PROBE_PURPOSE = 99  # from a secret derived for the probe: never reuses a training key


def iterate_rounds(prep: Prepared) -> Iterator[tuple[int, ServerState, RoundMetrics]]:
    """Yields ``(round (1-based), server state after it, metrics)`` for every round, computed
    exactly as :func:`ffa_jax.run.train` computes them (same round function, batches,
    weights, DP parameters and keys)."""
    round_fn, server_opt = build_round(prep)
    state = jax.device_get(server_init(prep.trainable, server_opt))
    key = train_key(prep)
    for r in range(prep.cfg.federated.rounds):
        state, m = run_round(round_fn, prep, state, round_inputs(prep, r), key)
        state = jax.device_get(state)
        yield r + 1, state, m


def merged_targets(trainable: PyTree, frozen: PyTree) -> dict[str, np.ndarray]:
    """``{target path: W0 + (alpha/r) a b}`` ``[d_in, d_out]`` of every LoRA target."""
    nodes = lora.lora_nodes(lora.combine(trainable, frozen))
    return {p: np.asarray(n.merged()) for p, n in nodes.items()}


@jax.jit
def _noise_norms(trainable, frozen, clip_norm, sigma, expected_batch, lr, key):
    # One DP-SGD step's update noise: lr * N(0, (sigma C)^2) / B on every trainable leaf.
    zeros = jax.tree_util.tree_map(jnp.zeros_like, trainable)
    noise = privatize_grad_sum(
        zeros,
        clip_norm=clip_norm,
        noise_multiplier=sigma,
        expected_batch_size=expected_batch,
        key=key,
    )
    noise = jax.tree_util.tree_map(lambda z: lr * z, noise)
    params = lora.lora_nodes(lora.combine(trainable, frozen))
    xi = lora.lora_nodes(noise)
    sq = {"xiB_A": 0.0, "B_xiA": 0.0, "xiB_xiA": 0.0}
    for path, node in params.items():
        s = node.scale
        n = xi[path]
        # Paper layout W = B A; ours W = a b (a [d_in, r], b [r, d_out]): xi_B A == a xi_b.
        sq["xiB_A"] += jnp.sum(jnp.square(s * node.a @ n.b))
        if n.a is not None:
            sq["B_xiA"] += jnp.sum(jnp.square(s * n.a @ node.b))
            sq["xiB_xiA"] += jnp.sum(jnp.square(s * n.a @ n.b))
    return {k: jnp.sqrt(v) for k, v in sq.items()}


def noise_terms(prep: Prepared, trainable: PyTree, key: jax.Array) -> dict[str, float]:
    """Frobenius norms (summed in quadrature over all target matrices) of the noise terms of
    one local DP-SGD update taken from ``trainable``, averaged over clients (each with its own
    sigma_k): ``xiB_A`` = ||(alpha/r) xi_B A||, and for LoRA also ``B_xiA`` and ``xiB_xiA``
    (0 under FFA-LoRA, where A gets no noise). Units: the merged weight W's entries.
    """
    cfg = prep.cfg
    out: dict[str, list[float]] = {}
    for k, sigma in enumerate(prep.noise_multipliers):
        norms = _noise_norms(
            trainable,
            prep.frozen,
            jnp.float32(cfg.privacy.clip_norm),
            jnp.float32(sigma),
            jnp.float32(cfg.client.batch_size),
            jnp.float32(cfg.client.learning_rate),
            jax.random.fold_in(key, k),
        )
        for name, v in norms.items():
            out.setdefault(name, []).append(float(v))
    return {name: float(np.mean(v)) for name, v in out.items()}


def _tree_sq_dist(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum(np.square(a[p] - b[p])) for p in a)))


def noise_amplification(cfg: RunConfig, *, log=print) -> dict[str, Any]:
    """Trains ``cfg`` and, before every round, measures the noise terms of one DP update from
    the current server state (:func:`noise_terms`), plus the norm of the round's actual change
    of the merged weights (the signal the noise competes with).

    Returns:
      ``{"history": [per-round dicts], "test_accuracy", "majority_accuracy", ...}``.
    """
    t0 = time.time()
    prep = prepare(cfg, log=log)
    probe_key = secret_lib.jax_key(secret_lib.derive(prep.secret, "probe"), PROBE_PURPOSE)
    history = []
    trainable = prep.trainable
    before = merged_targets(trainable, prep.frozen)
    for r, state, m in iterate_rounds(prep):
        rec = {"round": r, **noise_terms(prep, trainable, jax.random.fold_in(probe_key, r))}
        after = merged_targets(state.trainable, prep.frozen)
        rec["update_W"] = _tree_sq_dist(after, before)
        rec["b_norm"] = float(
            np.sqrt(sum(np.sum(np.square(n.b)) for n in lora.lora_nodes(state.trainable).values()))
        )
        rec["train_loss"] = float(m.loss)
        history.append(rec)
        trainable, before = state.trainable, after
    ev = evaluate(prep, lora.combine(trainable, prep.frozen))
    labels = prep.test_arrays["label"]
    return {
        "history": history,
        "test_accuracy": ev["eval_accuracy"],
        "test_loss": ev["eval_loss"],
        "majority_accuracy": float(np.bincount(labels).max() / len(labels)),
        "epsilon": float(prep.epsilon_curve[-1]),
        "noise_multipliers": [float(s) for s in prep.noise_multipliers],
        "wall_seconds": time.time() - t0,
    }


def theorem1_configs(cfg: RunConfig, reference_alpha: float) -> tuple[RunConfig, RunConfig]:
    """``(reference, scaled)``: ``cfg`` at ``reference_alpha`` with its lr and clip norm, and
    ``cfg``'s alpha' with ``lr * (alpha/alpha')^2`` and ``C * alpha'/alpha`` (Theorem 1)."""
    a1, a2 = float(reference_alpha), float(cfg.lora.alpha)
    ref = replace(cfg, [f"lora.alpha={a1}"])
    scaled = replace(
        cfg,
        [
            f"client.learning_rate={cfg.client.learning_rate * (a1 / a2) ** 2!r}",
            f"privacy.clip_norm={cfg.privacy.clip_norm * a2 / a1!r}",
        ],
    )
    return ref, scaled


def theorem1(cfg: RunConfig, *, reference_alpha: float, log=print) -> dict[str, Any]:
    """Runs the two configs of :func:`theorem1_configs` and compares the merged weights of
    every target after every round: the gap ``||W_ref - W_scaled||_F`` (over all targets)
    relative to how far the reference moved, ``||W_ref - W0||_F``. Theorem 1 says the gap is
    0 (float rounding) for FFA-LoRA; LoRA has no such equivalence.
    """
    t0 = time.time()
    ref_cfg, scaled_cfg = theorem1_configs(cfg, reference_alpha)
    trajectories = []
    # Both runs draw the same noise and batches (one secret), so only alpha differs.
    secret = secret_lib.resolve(cfg.privacy.noise_seed)
    for c in (ref_cfg, scaled_cfg):
        prep = prepare(c, log=log, secret=secret)
        w0 = {p: np.asarray(n.w0) for p, n in lora.lora_nodes(prep.params).items()}
        trajectories.append(
            [merged_targets(s.trainable, prep.frozen) for _, s, _ in iterate_rounds(prep)]
        )
    history = []
    for r, (a, b) in enumerate(zip(*trajectories, strict=True), start=1):
        moved = _tree_sq_dist(a, w0)
        gap = _tree_sq_dist(a, b)
        max_abs = max(float(np.max(np.abs(a[p] - b[p]))) for p in a)
        history.append(
            {
                "round": r,
                "gap": gap,
                "moved": moved,
                "relative_gap": gap / max(moved, 1e-30),
                "max_abs_gap": max_abs,
            }
        )
    return {
        "history": history,
        "relative_gap": history[-1]["relative_gap"],
        "max_abs_gap": max(h["max_abs_gap"] for h in history),
        "reference": {
            "alpha": ref_cfg.lora.alpha,
            "lr": ref_cfg.client.learning_rate,
            "clip_norm": ref_cfg.privacy.clip_norm,
        },
        "scaled": {
            "alpha": scaled_cfg.lora.alpha,
            "lr": scaled_cfg.client.learning_rate,
            "clip_norm": scaled_cfg.privacy.clip_norm,
        },
        "wall_seconds": time.time() - t0,
    }
