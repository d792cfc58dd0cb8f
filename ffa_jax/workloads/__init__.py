"""Workloads: what a run needs from a model family and its task.

The run layer (:mod:`ffa_jax.run`) is family-agnostic: it partitions the training set, builds
the LoRA tree, calibrates the noise, runs DP-SGD + FedAvg rounds, checkpoints and reports.
Everything that depends on the model family and its task comes from a :class:`Workload`, built
by the family's ``load(cfg, head_key=...)`` after the pure config checks of its ``check(cfg)``:

* ``encoder`` (:mod:`ffa_jax.workloads.text_classification`): BERT/RoBERTa text
  classification (SpamAssassin, GLUE, local files); metric ``eval_accuracy``.
* ``llama`` (:mod:`ffa_jax.workloads.gsm`): a LLaMA-family causal LM on a GSM task
  (answer-only loss, greedy exact match); metric ``eval_exact_match``.
* ``vit`` (:mod:`ffa_jax.workloads.image_classification`): ViT image classification (MNIST
  5k, local arrays/folders, HF image datasets); metric ``eval_accuracy``.

Adding a family: write a module with ``check(cfg)`` (no I/O), ``load(cfg, *, head_key)``
returning a :class:`Workload` and ``train_labels(cfg)`` (labels without the weights), list it in :data:`FAMILIES` and in
``ffa_jax.config.MODEL_FAMILIES``, and teach :func:`resolve_family` to detect it (or require
``model.family``).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ffa_jax.config import RunConfig
from ffa_jax.errors import WeightsError
from ffa_jax.types import PyTree

# family -> module implementing check(cfg) and load(cfg, *, head_key) -> Workload
FAMILIES = {
    "encoder": "ffa_jax.workloads.text_classification",
    "llama": "ffa_jax.workloads.gsm",
    "vit": "ffa_jax.workloads.image_classification",
}


@dataclasses.dataclass(frozen=True)
class Workload:
    """A loaded, validated model + task, ready for federated training.

    Attributes:
      family: ``"encoder"``, ``"llama"``, ...
      module: the Flax module (``module.apply({"params": params}, ...)``).
      base_params: the pretrained parameter tree, without LoRA nodes: ``jax.Array`` leaves
        on the default device, or with ``perf.model_devices > 1`` (:func:`host_weights`)
        numpy leaves in host memory, so that no device ever holds the whole tree (the frozen
        leaves reach the devices only as shards, in :func:`ffa_jax.run.build_round`).
      head_pattern: regex of non-LoRA leaves trained as well (a classification head with
        ``model.train_head``), or ``None``.
      loss_fn: per-example loss ``loss_fn(trainable, frozen, example) -> scalar`` (``example``
        holds one row of every ``train_arrays`` entry).
      evaluate: ``evaluate(params) -> {"eval_<metric>": float, ...}`` on the test split
        (``params`` may hold LoRA nodes); an ``"eval_samples"`` entry (a list of dicts, e.g.
        generations) goes to the summary, not to ``metrics.jsonl``.
      train_arrays: ``{name: [N, ...] array}``, the fixed-shape training examples.
      train_labels: ``[N]`` int labels the partitioner uses (all 0 when the task has none).
      label_names: names of those labels (partition table columns).
      test_arrays: fixed-shape arrays describing the test split (fingerprinted in
        checkpoints so that a resume on changed data is refused).
      data: the task's data object (e.g. ``TextClassificationData``, ``GSMData``).
      metric: the headline metric key of ``evaluate`` (``"eval_accuracy"``).
      metric_title: its human name (``"test accuracy"``).
      metric_short: its progress-bar name (``"acc"``).
      summary_fields: ``summary_fields(history) -> dict``: the task's entries of the run
        summary (``train`` returns them), e.g. ``test_accuracy``.
      result_rows: ``result_rows(summary, history) -> [(name, value)]``: the task's rows of
        the result table in ``summary.md``.
      notes: human-readable remarks about the data (logged and written to ``summary.md``).
      split_evaluator: ``split_evaluator(arrays) -> evaluate(params) -> {"val_<metric>": ...}``
        for rows of ``train_arrays`` held out as the validation split
        (``data.validation_fraction``); ``None`` where the family has none (then a
        validation split is refused by its ``check``).
    """

    family: str
    module: Any
    base_params: PyTree
    head_pattern: str | None
    loss_fn: Callable[[PyTree, PyTree, dict], jax.Array]
    evaluate: Callable[[PyTree], dict[str, Any]]
    train_arrays: dict[str, np.ndarray]
    train_labels: np.ndarray
    label_names: tuple[str, ...]
    test_arrays: dict[str, np.ndarray]
    data: Any
    metric: str
    metric_title: str
    metric_short: str
    summary_fields: Callable[[Sequence[dict[str, Any]]], dict[str, Any]]
    result_rows: Callable[[dict[str, Any], Sequence[dict[str, Any]]], list[tuple[str, str]]]
    notes: tuple[str, ...] = ()
    split_evaluator: (
        Callable[[dict[str, np.ndarray]], Callable[[PyTree], dict[str, Any]]] | None
    ) = None

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def compute_dtype(cfg: RunConfig):
    """``model.dtype`` as a JAX dtype: the storage dtype of the frozen weights and the
    compute dtype of the model (LoRA factors, gradients and noise stay float32)."""
    return jnp.bfloat16 if cfg.model.dtype == "bfloat16" else jnp.float32


def eval_module(module: Any, cfg: RunConfig) -> Any:
    """The module a classifier's evaluation runs: ``module`` itself, or for
    ``eval.dtype=bfloat16`` a bfloat16 copy of it (``module.clone(dtype=...)``), which reads
    the same weights."""
    if cfg.eval.dtype == "bfloat16" and compute_dtype(cfg) != jnp.bfloat16:
        return module.clone(dtype=jnp.bfloat16)
    return module


def host_weights(cfg: RunConfig) -> bool:
    """Whether the pretrained weights stay in host memory (numpy leaves, in their storage
    dtype: ``model.dtype``) until they are placed: with ``perf.model_devices > 1`` the frozen
    tree is sharded over the ``model`` axis by
    :func:`ffa_jax.federated.round.place_frozen`, which transfers each device only its shard
    of a host array; loading it onto one device first would need the whole tree in that
    device's memory (LLaMA-7B in bfloat16, 13.5 GB, on a 16 GB chip). With one model device
    the weights are ``jax.Array`` leaves on the default device, as always."""
    return cfg.perf.model_devices > 1


def balanced_eval_batch(num_examples: int, max_batch_size: int) -> int:
    """The evaluation batch: as few batches as ``max_batch_size`` allows, of equal size, so
    the last one is padded by fewer than ``num_batches`` rows (e.g. 1,209 test e-mails and a
    cap of 112: 11 batches of 110, one padded row, instead of 1,232 rows computed)."""
    if num_examples <= 0:
        return max(1, max_batch_size)
    num_batches = -(-num_examples // max_batch_size)
    return -(-num_examples // num_batches)


def evaluate_arrays(
    eval_fn: Callable, params: PyTree, arrays: dict[str, np.ndarray], batch_size: int
) -> dict[str, Any]:
    """``{"accuracy", "loss"}`` of a classifier over a whole set in fixed-size batches
    (``batch_size`` rows, the last padded and masked): ``eval_fn(params, batch, mask)``
    returns the batch's ``correct``, ``loss_sum`` and ``count``; loss is the mean per
    example. When ``eval_fn`` also returns per-row ``probs`` ``[B, C]`` and ``pred`` ``[B]``,
    the result also holds ``balanced_accuracy``, ``macro_f1``, ``recall_per_class`` and, for
    two classes, ``auc`` (:func:`ffa_jax.workloads.metrics.classification_metrics`)."""
    from ffa_jax.data import batching
    from ffa_jax.workloads.metrics import classification_metrics

    totals = {"correct": 0.0, "loss_sum": 0.0, "count": 0.0}
    probs, preds, labels = [], [], []
    for batch, mask in batching.eval_batches(arrays, batch_size):
        out = eval_fn(params, batch, mask)
        for k in totals:
            totals[k] += float(out[k])
        if "probs" in out:
            probs.append(np.asarray(out["probs"])[mask])
            preds.append(np.asarray(out["pred"])[mask])
            labels.append(np.asarray(batch["label"])[mask])
    n = max(totals["count"], 1.0)
    res: dict[str, Any] = {"accuracy": totals["correct"] / n, "loss": totals["loss_sum"] / n}
    if probs:
        m = classification_metrics(
            np.concatenate(labels), np.concatenate(probs), np.concatenate(preds)
        )
        m.pop("accuracy")  # the same number, summed on device above
        res.update(m)
    return res


def classification_evaluator(
    eval_fn: Callable,
    test_arrays: dict[str, np.ndarray],
    batch_size: int,
    compiler_options: dict[str, str] | None = None,
    *,
    prefix: str = "eval",
) -> Callable[[Any], dict[str, Any]]:
    """``evaluate(params) -> {"<prefix>_accuracy", "<prefix>_loss", ...}`` over ``test_arrays``
    in batches of at most ``batch_size`` (:func:`balanced_eval_batch`), for classifiers whose
    ``eval_fn(params, batch, mask)`` returns the batch's ``correct``, ``loss_sum`` and
    ``count`` (masked padding excluded) and may return per-row ``probs`` ``[B, C]`` and
    ``pred`` ``[B]``: then the result also holds ``<prefix>_balanced_accuracy``,
    ``<prefix>_macro_f1``, ``<prefix>_recall_per_class`` (a list) and, for two classes,
    ``<prefix>_auc`` (:func:`ffa_jax.workloads.metrics.classification_metrics`).

    ``prefix``: ``eval`` for the test split (the historical key names), ``val`` for the
    validation split carved from the clients' training data (``data.validation_fraction``).

    Every batch has one shape (the last is padded and masked), so ``eval_fn`` compiles once
    per process (and is loaded from the persistent compilation cache after that, see
    :func:`ffa_jax.xla_options.enable_compilation_cache`). ``compiler_options``: those of the
    training jits (:func:`ffa_jax.xla_options.compiler_options`; speed only)."""
    n = len(next(iter(test_arrays.values()))) if test_arrays else 0
    size = balanced_eval_batch(n, batch_size)
    # jax takes compile options on the outermost jit; the inner jit is inlined into it.
    fn = jax.jit(eval_fn, compiler_options=compiler_options) if compiler_options else eval_fn

    def evaluate(params) -> dict[str, Any]:
        r = evaluate_arrays(fn, params, test_arrays, size)
        return {f"{prefix}_{k}": v for k, v in r.items()}

    return evaluate


def classification_summary(history: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The balanced test metrics of the last evaluation in ``history`` (the summary's
    ``test_balanced_accuracy``, ``test_macro_f1``, ``test_auc``; absent keys are left out)."""
    last = history[-1]
    return {
        f"test_{k}": last[f"eval_{k}"]
        for k in ("balanced_accuracy", "macro_f1", "auc")
        if f"eval_{k}" in last
    }


def _encoder_model_types() -> tuple[str, ...]:
    from ffa_jax.models.encoder import MODEL_TYPES

    return tuple(MODEL_TYPES)


def _llama_model_types() -> tuple[str, ...]:
    from ffa_jax.models.llama import MODEL_TYPES

    return MODEL_TYPES


def resolve_family(cfg: RunConfig) -> str:
    """``cfg.model.family``, or for ``auto`` the family detected from ``cfg.model.name``
    without any download: ``llama`` for ``smollm2``, ``.gguf`` files and local folders whose
    ``config.json`` has a LLaMA-family ``model_type``; ``vit`` for local folders with
    ``model_type: vit``; ``encoder`` otherwise (hub ids included: set ``model.family: llama``
    or ``vit`` for a hub LLaMA or ViT).

    Raises:
      WeightsError: a local folder's ``config.json`` names an architecture no family
        supports (e.g. ``gpt2``).
    """
    if cfg.model.family != "auto":
        return cfg.model.family
    name = cfg.model.name
    if name == "smollm2" or name.lower().endswith(".gguf"):
        return "llama"
    config_json = pathlib.Path(os.path.expanduser(name)) / "config.json"
    if config_json.is_file():
        try:
            model_type = json.loads(config_json.read_text()).get("model_type")
        except (OSError, ValueError, AttributeError):
            model_type = None  # the family's loader reports the broken file
        if model_type in _llama_model_types():
            return "llama"
        if model_type == "vit":
            return "vit"
        if isinstance(model_type, str) and model_type not in _encoder_model_types():
            raise WeightsError(
                f"model.name={name!r}: config.json has model_type={model_type!r}, which no model "
                f"family supports: encoders {sorted(_encoder_model_types())} (BERT/RoBERTa text "
                f"classification), LLaMA-family decoders {list(_llama_model_types())} (GSM) or "
                "'vit' (image classification). Use a checkpoint of one of these architectures."
            )
    return "encoder"


def family_module(cfg: RunConfig):
    return importlib.import_module(FAMILIES[resolve_family(cfg)])


def check(cfg: RunConfig) -> str:
    """Checks that ``cfg`` suits its model family, without reading any file beyond
    ``config.json`` of a local model folder (a dry validation). Returns the family.

    Raises:
      ConfigError: a field the family cannot use (the message names it and the fix).
    """
    family_module(cfg).check(cfg)
    return resolve_family(cfg)


def load(cfg: RunConfig, *, head_key: jax.Array) -> Workload:
    """Loads and validates the model, tokenizer and data of ``cfg``'s family.

    Args:
      cfg: the run config.
      head_key: PRNG key for a randomly initialised head (encoders without a trained one).

    Raises:
      ConfigError / DataError / WeightsError: bad input, before any training compute.
    """
    mod = family_module(cfg)
    mod.check(cfg)
    return mod.load(cfg, head_key=head_key)


def train_labels(cfg: RunConfig) -> tuple[np.ndarray, tuple[str, ...]]:
    """``(labels [N], label_names)`` of the training examples ``load`` would keep, without
    loading model weights (tokenizer and data only): what planning (``ffa-jax privacy``)
    needs to partition the clients.

    Raises:
      ConfigError / DataError / WeightsError: as :func:`load`.
    """
    mod = family_module(cfg)
    mod.check(cfg)
    return mod.train_labels(cfg)


__all__ = ["FAMILIES", "Workload", "check", "load", "resolve_family", "train_labels"]
