"""``ffa-jax pretrain``: central, non-private training of a small ViT from scratch on public data.

This stands in for the paper's "pretrained model" when no pretrained ViT is available offline:
the backbone is trained centrally on a *public* task and saved in the HF format that
:func:`ffa_jax.models.vit_weights.load_vit` (and transformers) read; ``ffa-jax train`` then
fine-tunes it with (FFA-)LoRA under DP across clients on a *private*, disjoint task. Nothing
here is private: no clipping, no noise, no accounting; only public data may be used.

Training: AdamW (linear warmup, cosine decay; weight decay on kernels only), cross-entropy,
shuffled fixed-size batches (one jitted step, never recompiled), optional random translations.
Writes ``<output_dir>/<name>/``: ``model.safetensors``, ``config.json``,
``preprocessor_config.json`` (the model folder), ``pretrain.yaml`` (the resolved config),
``metrics.jsonl`` (one line per epoch) and ``summary.json``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ffa_jax.config import PretrainConfig
from ffa_jax.data import images
from ffa_jax.errors import ConfigError
from ffa_jax.fileio import atomic_write_text
from ffa_jax.models.vit import (
    DEFAULT_IMAGE_MEAN,
    DEFAULT_IMAGE_STD,
    ViTClassifier,
    ViTConfig,
    image_classification_eval,
    image_classification_loss,
)
from ffa_jax.models.vit_weights import save_vit
from ffa_jax.types import PyTree
from ffa_jax.workloads import evaluate_arrays

KEY_INIT = 0
KEY_AUGMENT = 1


def random_shift(key: jax.Array, x: jax.Array, max_shift: int) -> jax.Array:
    """Translates each image of ``x`` (``[B, H, W, C]``) by independent integer offsets in
    ``[-max_shift, max_shift]`` per axis, filling with zeros (black, MNIST's background)."""
    b, h, w, _ = x.shape
    s = max_shift
    padded = jnp.pad(x, ((0, 0), (s, s), (s, s), (0, 0)))
    offsets = jax.random.randint(key, (b, 2), 0, 2 * s + 1)

    def crop(img, off):
        return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, x.shape[-1]))

    return jax.vmap(crop)(padded, offsets)


def _decay_mask(params: PyTree) -> PyTree:
    # Weight decay on dense kernels only: not on biases, LayerNorm, class token or positions.
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params
    )


def pretrain(
    cfg: PretrainConfig, *, overwrite: bool = False, progress: bool = True, log=print
) -> dict[str, Any]:
    """Trains a ViT on ``cfg.data`` and writes the model folder ``cfg.output_dir/cfg.name``.

    Returns:
      The summary: test accuracy/loss on the public task's held-out split, examples, epochs,
      steps, wall time, the model folder.

    Raises:
      ConfigError / DataError: bad config or data (before any training, nothing written).
    """
    t_start = time.time()
    out = Path(cfg.output_dir) / cfg.name
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(
            f"output folder {str(out)!r} already exists; pass --overwrite or choose another "
            "name with --set name=<new-name>."
        )
    m = cfg.model
    data = images.load_for_config(
        cfg.data, image_size=m.image_size, num_channels=m.num_channels, seed=cfg.seed
    )
    vit = ViTConfig(
        image_size=m.image_size,
        patch_size=m.patch_size,
        num_channels=m.num_channels,
        hidden_size=m.hidden_size,
        num_layers=m.num_layers,
        num_heads=m.num_heads,
        intermediate_size=m.intermediate_size,
        num_labels=data.num_labels,
    )
    o = cfg.optim
    n = len(data.train_labels)
    steps_per_epoch = n // o.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(
            f"optim.batch_size={o.batch_size} exceeds the {n} training images; use a smaller "
            "batch size."
        )
    for what, x, y in (
        ("train split", data.train_images, data.train_labels),
        ("test split", data.test_images, data.test_labels),
    ):
        images.check_image_arrays(
            x, y, (m.image_size, m.image_size, m.num_channels), vit.num_labels, what
        )
    total_steps = steps_per_epoch * o.epochs
    mean = [DEFAULT_IMAGE_MEAN] * m.num_channels
    std = [DEFAULT_IMAGE_STD] * m.num_channels

    module = ViTClassifier(vit)
    key = jax.random.key(cfg.seed)
    dummy = jnp.zeros((1, *data.image_shape), jnp.float32)
    params = module.init(jax.random.fold_in(key, KEY_INIT), dummy)["params"]
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, o.learning_rate, min(o.warmup_steps, total_steps - 1), total_steps, 0.0
    )
    optimizer = optax.adamw(schedule, weight_decay=o.weight_decay, mask=_decay_mask(params))
    opt_state = optimizer.init(params)
    loss_fn = image_classification_loss(module, mean, std)
    eval_fn = image_classification_eval(module, mean, std)
    aug_key = jax.random.fold_in(key, KEY_AUGMENT)
    # Every leaf is trained: the frozen tree of lora.split form is all None.
    no_frozen = jax.tree_util.tree_map(lambda _: None, params)

    @jax.jit
    def step(params, opt_state, pixels, labels, step_idx):
        if o.augment_shift:
            pixels = random_shift(jax.random.fold_in(aug_key, step_idx), pixels, o.augment_shift)

        def mean_loss(p):
            per_example = jax.vmap(
                lambda x, y: loss_fn(p, no_frozen, {"pixel_values": x, "label": y})
            )
            return jnp.mean(per_example(pixels, labels))

        loss, grads = jax.value_and_grad(mean_loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    test_arrays = {"pixel_values": data.test_images, "label": data.test_labels}
    log(
        f"pretrain: {vit.num_layers} layers x {vit.hidden_size} wide ViT "
        f"({sum(x.size for x in jax.tree_util.tree_leaves(params)):,} parameters) on "
        f"{cfg.data.task} classes {list(data.label_names)}: {n} train / "
        f"{len(data.test_labels)} test images, {o.epochs} epochs x {steps_per_epoch} steps"
    )
    history: list[dict[str, Any]] = []
    bar = None
    epochs = range(o.epochs)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(epochs, desc=f"{cfg.name} (pretrain)", unit="epoch")
        epochs = bar
    step_idx = 0
    for epoch in epochs:
        t0 = time.time()
        order = np.random.default_rng((cfg.seed, epoch)).permutation(n)
        losses = []
        for s in range(steps_per_epoch):
            idx = order[s * o.batch_size : (s + 1) * o.batch_size]
            params, opt_state, loss = step(
                params, opt_state, data.train_images[idx], data.train_labels[idx], step_idx
            )
            losses.append(loss)
            step_idx += 1
        ev = evaluate_arrays(eval_fn, params, test_arrays, 256)
        record = {
            "epoch": epoch + 1,
            "train_loss": float(np.mean(jax.device_get(losses))),
            "test_accuracy": ev["accuracy"],
            "test_loss": ev["loss"],
            "seconds": time.time() - t0,
        }
        history.append(record)
        if bar is not None:
            bar.set_postfix(loss=f"{record['train_loss']:.3f}", acc=f"{ev['accuracy']:.3f}")
    if bar is not None:
        bar.close()

    if overwrite and out.exists():
        shutil.rmtree(out)
    save_vit(params, vit, out, image_mean=mean, image_std=std, label_names=data.label_names)
    atomic_write_text(out / "pretrain.yaml", cfg.to_yaml())
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    summary = {
        "model_dir": str(out),
        "task": cfg.data.task,
        "classes": list(data.label_names),
        "test_accuracy": history[-1]["test_accuracy"],
        "test_loss": history[-1]["test_loss"],
        "train_examples": n,
        "test_examples": int(len(data.test_labels)),
        "epochs": o.epochs,
        "steps": total_steps,
        "wall_seconds": time.time() - t_start,
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
