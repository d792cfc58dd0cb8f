"""Per-example losses and batched evaluation for the model families."""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from ffa_jax import lora
from ffa_jax.types import PyTree


def classification_loss(
    module: nn.Module,
) -> Callable[[PyTree, PyTree, dict[str, jax.Array]], jax.Array]:
    """Per-example cross-entropy ``loss_fn(trainable, frozen, example) -> scalar``.

    ``example`` holds ``input_ids`` and ``attention_mask`` (``[L]`` int32), optionally
    ``token_type_ids`` (``[L]``, sentence pairs) and ``label`` (int32 scalar). Gradients flow
    only into ``trainable`` (see :func:`ffa_jax.lora.split`).
    """

    def loss_fn(trainable, frozen, example):
        params = lora.combine(trainable, frozen)
        types = example.get("token_type_ids")
        logits = module.apply(
            {"params": params},
            example["input_ids"][None],
            example["attention_mask"][None],
            None if types is None else types[None],
        )[0]
        return optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), example["label"]
        )

    return loss_fn


def classification_eval(
    module: nn.Module,
) -> Callable[[PyTree, dict[str, jax.Array], jax.Array], dict]:
    """Jitted ``eval_fn(params, batch, mask) -> {"correct", "loss_sum", "count"}`` sums over
    the real examples of a batch, plus per-row ``"probs"`` ``[B, C]`` (softmax) and ``"pred"``
    ``[B]`` (argmax) for the balanced metrics (padded rows are dropped by the caller's mask).

    ``params`` may hold LoRA nodes; they are merged first (one ``d_in x d_out`` add per target)
    so the forward pass costs the same as the base model's.
    """

    @jax.jit
    def eval_fn(params, batch, mask):
        merged = lora.merge(params)
        logits = module.apply(
            {"params": merged},
            batch["input_ids"],
            batch["attention_mask"],
            batch.get("token_type_ids"),
        ).astype(jnp.float32)
        return classification_sums(logits, batch["label"], mask)

    return eval_fn


def classification_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> dict:
    """What a classifier's ``eval_fn`` returns for one batch: ``correct``, ``loss_sum`` and
    ``count`` summed over the real rows (``mask``), and per-row ``probs`` ``[B, C]``
    (softmax) and ``pred`` ``[B]`` (argmax). ``logits`` float32 ``[B, C]``, ``labels``
    ``[B]``."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    pred = jnp.argmax(logits, -1)
    correct = (pred == labels) & mask
    return {
        "correct": jnp.sum(correct),
        "loss_sum": jnp.sum(jnp.where(mask, losses, 0.0)),
        "count": jnp.sum(mask),
        "probs": jax.nn.softmax(logits, -1),
        "pred": pred,
    }
