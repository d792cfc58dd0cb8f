"""The ``vit`` workload: ViT image classification with a cross-entropy loss.

Model: a HF ViT folder (``ViTForImageClassification``, or a bare ``ViTModel`` such as
``google/vit-base-patch16-224-in21k``), e.g. the output of ``ffa-jax pretrain``; LoRA targets
the attention query/value projections by default. Tasks: ``mnist5k``, local ``.npz`` files and
folders, HF image datasets by name (see :mod:`ffa_jax.data.images`), resized once to the
model's input size (cached) and normalised inside the jitted loss with the model folder's
``preprocessor_config.json`` mean/std. Metric: accuracy on the (possibly capped) test split.
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
from ffa_jax.data import images
from ffa_jax.models.layers import cast_frozen_weights
from ffa_jax.models.sources import read_hf_config, resolve_model_dir
from ffa_jax.models.vit import (
    ViTClassifier,
    ViTConfig,
    image_classification_eval,
    image_classification_loss,
)
from ffa_jax.models.vit_weights import load_vit, read_image_processor
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


def _load_task(cfg: RunConfig) -> tuple[Any, images.ImageClassificationData]:
    """``(model folder, images resized to the model's input size)``; reads the model's
    config.json but no weights."""
    model_dir = resolve_model_dir(cfg.model.name)  # fails fast on missing files
    # The architecture first: the data are resized to its input size.
    arch = ViTConfig.from_hf(read_hf_config(model_dir), 1)
    data = images.load_for_config(
        cfg.data, image_size=arch.image_size, num_channels=arch.num_channels, seed=cfg.split_seed
    )
    return model_dir, data


def train_labels(cfg: RunConfig) -> tuple[np.ndarray, tuple[str, ...]]:
    """The task's training labels and label names (the model's config.json, no weights)."""
    _, data = _load_task(cfg)
    return np.asarray(data.train_labels), tuple(data.label_names)


def load(cfg: RunConfig, *, head_key: jax.Array) -> Workload:
    """Loads the ViT and the image task; checks the images against the model.

    Raises:
      ConfigError / DataError / WeightsError: bad input, before any training compute.
    """
    model_dir, data = _load_task(cfg)
    vit_cfg, base_params = load_vit(
        model_dir,
        data.num_labels,
        head_key=head_key,
        new_head=cfg.model.new_head,
        host=host_weights(cfg),
    )
    mean, std = read_image_processor(model_dir, vit_cfg.num_channels)
    dtype = compute_dtype(cfg)
    head_pattern = HEAD_PATTERN if cfg.model.train_head else None
    if dtype != jnp.float32:
        # bfloat16 storage of the frozen trunk; a trained head stays float32.
        base_params = cast_frozen_weights(base_params, dtype, keep=head_pattern)
    module = ViTClassifier(vit_cfg, dtype=dtype)

    test_x, test_y = data.test_images, data.test_labels
    if cfg.eval.max_examples is not None:
        test_x, test_y = test_x[: cfg.eval.max_examples], test_y[: cfg.eval.max_examples]
    for what, x, y in (
        (f"data.task={cfg.data.task!r} train split", data.train_images, data.train_labels),
        (f"data.task={cfg.data.task!r} test split", test_x, test_y),
    ):
        images.check_image_arrays(x, y, vit_cfg.input_shape, vit_cfg.num_labels, what)
    train_arrays = {"pixel_values": data.train_images, "label": data.train_labels}
    test_arrays = {"pixel_values": test_x, "label": test_y}

    eval_fn = image_classification_eval(eval_module(module, cfg), mean, std)

    batch_size = perf_lib.eval_batch_size(cfg)  # "auto" too: inference loads unresolved configs
    options = xla_options.compiler_options(cfg.perf.cpu_library_fusion, "vit")
    evaluate = classification_evaluator(eval_fn, test_arrays, batch_size, options)

    def split_evaluator(arrays):
        return classification_evaluator(eval_fn, arrays, batch_size, options, prefix="val")

    majority = float(np.bincount(test_y).max() / max(len(test_y), 1))

    def summary_fields(history: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if "eval_accuracy" not in history[-1]:  # eval.test=false: no test metrics
            return {"majority_accuracy": majority}
        out = {
            "test_accuracy": history[-1]["eval_accuracy"],
            "test_loss": history[-1]["eval_loss"],
            "majority_accuracy": majority,
            **classification_summary(history),
        }
        start = [h for h in history if h["round"] == 0]
        if start:
            out["start_accuracy"] = start[0]["eval_accuracy"]
        return out

    def result_rows(summary: dict[str, Any], history) -> list[tuple[str, str]]:
        if "test_accuracy" not in summary:
            return [("test split", "not evaluated (eval.test=false)")]
        rows = [("test accuracy", f"{summary['test_accuracy']:.4f}")]
        if "start_accuracy" in summary:
            rows.append(("test accuracy before fine-tuning", f"{summary['start_accuracy']:.4f}"))
        rows += [
            ("majority-class accuracy", f"{summary['majority_accuracy']:.4f}"),
            ("test loss", f"{summary['test_loss']:.4f}"),
        ]
        return rows

    head = "initialised from the seed" if cfg.model.new_head else "from the checkpoint if it fits"
    notes = (
        f"ViT {vit_cfg.num_layers}x{vit_cfg.hidden_size}, {vit_cfg.image_size}px images in "
        f"{vit_cfg.patch_size}px patches, {vit_cfg.num_channels} channel(s); classes "
        f"{list(data.label_names)}; head {head}"
        f"{', trained' if cfg.model.train_head else ', frozen'}.",
    )
    return Workload(
        family="vit",
        module=module,
        base_params=base_params,
        head_pattern=head_pattern,
        loss_fn=image_classification_loss(module, mean, std),
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
        notes=notes,
    )
