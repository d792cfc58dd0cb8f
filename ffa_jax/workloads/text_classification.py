"""The ``encoder`` workload: BERT/RoBERTa sequence classification with a cross-entropy loss.

Tasks: SpamAssassin (shipped), GLUE by name, local files, HF datasets (see
:mod:`ffa_jax.data.tasks`). Metric: accuracy on the (possibly capped) test split.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ffa_jax import perf as perf_lib
from ffa_jax import xla_options
from ffa_jax.config import RunConfig
from ffa_jax.data import batching, tasks
from ffa_jax.errors import ConfigError
from ffa_jax.models import encoder as encoder_lib
from ffa_jax.models import weights as weights_lib
from ffa_jax.models.layers import cast_frozen_weights
from ffa_jax.models.objectives import classification_eval, classification_loss
from ffa_jax.models.sources import load_encoding_tokenizer, resolve_model_dir
from ffa_jax.workloads import (
    Workload,
    classification_evaluator,
    classification_summary,
    compute_dtype,
    eval_module,
    host_weights,
)

HEAD_PATTERN = r"classifier/.*"


def check(cfg: RunConfig) -> None:
    """Pure config checks (no I/O): none beyond the config's own validation."""


def _load_task(cfg: RunConfig) -> tasks.TextClassificationData:
    return tasks.load_text_classification(
        cfg.data.task,
        test_fraction=cfg.data.test_fraction,
        seed=cfg.split_seed,
        text_field=cfg.data.text_field,
        label_field=cfg.data.label_field,
        max_examples=cfg.data.max_train_examples,
    )


def train_labels(cfg: RunConfig) -> tuple[np.ndarray, tuple[str, ...]]:
    """The task's training labels and label names (no model files are read)."""
    data = _load_task(cfg)
    return np.asarray(data.train_labels), tuple(data.label_names)


def load(cfg: RunConfig, *, head_key: jax.Array) -> Workload:
    """Loads the encoder, its tokenizer and the task; tokenizes train and (capped) test.

    Raises:
      ConfigError / DataError / WeightsError: bad input, before any training compute.
    """
    model_dir = resolve_model_dir(cfg.model.name)  # fails fast on missing files
    data = _load_task(cfg)
    enc_cfg, base_params = weights_lib.load_encoder(
        str(model_dir),
        data.num_labels,
        head_key=head_key,
        pooling=cfg.model.pooling,
        host=host_weights(cfg),
    )
    if cfg.model.max_length > enc_cfg.max_length:
        raise ConfigError(
            f"model.max_length={cfg.model.max_length} exceeds the {enc_cfg.max_length} positions "
            f"of the model {cfg.model.name!r}; use model.max_length <= {enc_cfg.max_length}."
        )
    dtype = compute_dtype(cfg)
    head_pattern = HEAD_PATTERN if cfg.model.train_head else None
    if dtype != jnp.float32:
        # bfloat16 storage of the frozen trunk; a trained head stays float32.
        base_params = cast_frozen_weights(base_params, dtype, keep=head_pattern)
    module = encoder_lib.EncoderClassifier(enc_cfg, dtype=dtype)

    tokenizer = load_encoding_tokenizer(model_dir)
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

    eval_fn = classification_eval(eval_module(module, cfg))

    batch_size = perf_lib.eval_batch_size(cfg)  # "auto" too: inference loads unresolved configs
    options = xla_options.compiler_options(cfg.perf.cpu_library_fusion, "encoder")
    evaluate = classification_evaluator(eval_fn, test_arrays, batch_size, options)

    def split_evaluator(arrays):
        return classification_evaluator(eval_fn, arrays, batch_size, options, prefix="val")

    majority = float(np.bincount(test_arrays["label"]).max() / max(len(test_arrays["label"]), 1))

    def summary_fields(history: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if "eval_accuracy" not in history[-1]:  # eval.test=false: no test metrics
            return {"majority_accuracy": majority}
        return {
            "test_accuracy": history[-1]["eval_accuracy"],
            "test_loss": history[-1]["eval_loss"],
            "majority_accuracy": majority,
            **classification_summary(history),
        }

    def result_rows(summary: dict[str, Any], history) -> list[tuple[str, str]]:
        if "test_accuracy" not in summary:
            return [("test split", "not evaluated (eval.test=false)")]
        return [
            ("test accuracy", f"{summary['test_accuracy']:.4f}"),
            ("majority-class accuracy", f"{summary['majority_accuracy']:.4f}"),
            ("test loss", f"{summary['test_loss']:.4f}"),
        ]

    return Workload(
        family="encoder",
        module=module,
        base_params=base_params,
        head_pattern=head_pattern,
        loss_fn=classification_loss(module),
        evaluate=evaluate,
        train_arrays=train_arrays,
        train_labels=np.asarray(data.train_labels),
        label_names=tuple(data.label_names),
        test_arrays=test_arrays,
        data=data,
        metric="eval_accuracy",
        metric_title="test accuracy",
        metric_short="acc",
        summary_fields=summary_fields,
        result_rows=result_rows,
        split_evaluator=split_evaluator,
    )
