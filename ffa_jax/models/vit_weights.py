"""HF ViT checkpoints (``config.json`` + safetensors) <-> :class:`ViTClassifier` parameter trees.

One explicit table, :func:`vit_key_table`, drives both directions through the engine
:mod:`ffa_jax.models.convert`: every HF tensor name maps to one parameter path with a per-key
layout change and the shape implied by the config:

* ``linear``: PyTorch ``Linear.weight`` ``[out, in]`` <-> Flax kernel ``[in, out]`` (transpose);
* ``conv``: the patch ``Conv2d.weight`` ``[hidden, C, P, P]`` <-> the Dense kernel
  ``[C*P*P, hidden]`` over ``(C, P, P)``-flattened patches (reshape + transpose);
* ``plain``: biases, LayerNorm parameters, ``cls_token`` ``[1, 1, hidden]`` and
  ``position_embeddings`` ``[1, N + 1, hidden]`` (unchanged).

Loading fails with a :class:`ffa_jax.errors.WeightsError` listing *every* unmapped key,
missing key, shape mismatch, non-float dtype and non-finite tensor (and the files read). Both
``ViTForImageClassification`` checkpoints (``vit.`` prefix, ``classifier.*``) and bare
``ViTModel`` checkpoints such as ``google/vit-base-patch16-224-in21k`` (no prefix, a pooler that
the classifier does not use, no head) load; a head that is absent or has another label count is
initialised from ``head_key``, or always when ``new_head=True``.

Saved folders (:func:`save_vit`) hold ``model.safetensors`` with HF names, ``config.json`` and
``preprocessor_config.json`` (ViTImageProcessor: size, mean, std); they load with
:func:`load_vit` and with transformers' ``ViTForImageClassification.from_pretrained``.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ffa_jax.errors import WeightsError
from ffa_jax.models import convert
from ffa_jax.models.convert import KeyEntry
from ffa_jax.models.sources import read_hf_config, resolve_model_dir
from ffa_jax.models.vit import DEFAULT_IMAGE_MEAN, DEFAULT_IMAGE_STD, ViTConfig
from ffa_jax.types import PyTree

PREFIX = "vit."
PREPROCESSOR_FILE = "preprocessor_config.json"
# HF keys that are not weights of the classifier (``fullmatch`` after removing the prefix):
# ViTModel's pooler (unused by ViTForImageClassification), the masked-image-modeling token and
# decoder.
IGNORED = (r"pooler\..*", r"embeddings\.mask_token", r"decoder\..*")


def vit_key_table(config: ViTConfig) -> tuple[KeyEntry, ...]:
    """The HF <-> parameter-tree table of ``config``'s model, in a fixed order.

    ``hf`` names are without the ``vit.`` prefix, which every row but the classifier's carries
    in ``ViTForImageClassification`` checkpoints (``prefix``); the classifier is ``optional``
    (initialised when absent) with a ``label_dim``.
    """
    c = config
    H, Iz, N, P, C = c.hidden_size, c.intermediate_size, c.num_labels, c.patch_size, c.num_channels
    pre = PREFIX
    emb = ("embeddings",)
    n = c.num_patches + 1
    proj = (*emb, "patch_embeddings", "projection")
    rows = [
        convert.plain("embeddings.cls_token", (*emb, "cls_token"), (1, 1, H), prefix=pre),
        convert.plain(
            "embeddings.position_embeddings", (*emb, "position_embeddings"), (1, n, H), prefix=pre
        ),
        KeyEntry(
            "embeddings.patch_embeddings.projection.weight",
            (*proj, "kernel"),
            (C * P * P, H),
            (H, C, P, P),
            "conv",
            prefix=pre,
        ),
        convert.plain(
            "embeddings.patch_embeddings.projection.bias", (*proj, "bias"), (H,), prefix=pre
        ),
    ]
    for i in range(c.num_layers):
        hf, p = f"encoder.layer.{i}", ("encoder", f"layer_{i}")
        rows += convert.layer_norm(
            f"{hf}.layernorm_before", (*p, "layernorm_before"), H, prefix=pre
        )
        for name in ("query", "key", "value"):
            rows += convert.linear(
                f"{hf}.attention.attention.{name}",
                (*p, "attention", "attention", name),
                H,
                H,
                bias=c.qkv_bias,
                prefix=pre,
            )
        rows += convert.linear(
            f"{hf}.attention.output.dense", (*p, "attention", "output", "dense"), H, H, prefix=pre
        )
        rows += convert.layer_norm(f"{hf}.layernorm_after", (*p, "layernorm_after"), H, prefix=pre)
        rows += convert.linear(
            f"{hf}.intermediate.dense", (*p, "intermediate", "dense"), H, Iz, prefix=pre
        )
        rows += convert.linear(f"{hf}.output.dense", (*p, "output", "dense"), Iz, H, prefix=pre)
    rows += convert.layer_norm("layernorm", ("layernorm",), H, prefix=pre)
    rows += convert.linear("classifier", ("classifier",), H, N, optional=True, label_dim=True)
    return tuple(rows)


# --------------------------------------------------------------------------- load


def read_image_processor(model_dir: str | os.PathLike, num_channels: int) -> tuple[list, list]:
    """``(image_mean, image_std)`` (per channel) of a model folder's
    ``preprocessor_config.json``; ViTImageProcessor's defaults (0.5, 0.5) when it is absent.

    Raises:
      WeightsError: the file is not valid JSON or its mean/std do not fit ``num_channels``.
    """
    path = pathlib.Path(model_dir) / PREPROCESSOR_FILE
    mean: Any = DEFAULT_IMAGE_MEAN
    std: Any = DEFAULT_IMAGE_STD
    if path.is_file():
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise WeightsError(f"{str(path)!r} is not valid JSON ({e}); fix or remove it.") from e
        if cfg.get("do_normalize", True):
            mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
        else:
            mean, std = 0.0, 1.0
        if cfg.get("do_rescale", True) is False:
            raise WeightsError(
                f"{str(path)!r} has do_rescale=false: only processors that rescale pixels by "
                "1/255 are supported."
            )
    out = []
    for name, v in (("image_mean", mean), ("image_std", std)):
        vals = [float(v)] * num_channels if isinstance(v, (int, float)) else [float(x) for x in v]
        if len(vals) == 3 and num_channels == 1:
            vals = [float(np.mean(vals))]  # a grayscale model with an RGB processor
        if len(vals) != num_channels or (name == "image_std" and min(vals) <= 0):
            raise WeightsError(
                f"{str(path)!r}: {name}={v!r} does not fit num_channels={num_channels} "
                "(one positive value per channel expected)."
            )
        out.append(vals)
    return out[0], out[1]


def load_vit(
    name_or_path: str | os.PathLike,
    num_labels: int,
    *,
    head_key: jax.Array,
    new_head: bool = False,
    host: bool = False,
) -> tuple[ViTConfig, dict]:
    """Loads a HF ViT checkpoint as ``(config, params)`` for :class:`ViTClassifier`.

    Args:
      name_or_path: a local HF model folder (``config.json`` + ``model.safetensors``) or a hub
        id such as ``google/vit-base-patch16-224-in21k`` (needs internet).
      num_labels: classifier outputs.
      head_key: PRNG key of any head weights not taken from the checkpoint (``normal(
        initializer_range)`` kernel, zero bias, as HF).
      new_head: initialise the head even when the checkpoint has one with ``num_labels``
        outputs (a new task with the same label count).
      host: float32 numpy leaves in host memory instead of ``jax.Array`` leaves on the
        default device (see :func:`ffa_jax.models.weights.load_encoder`).

    Returns:
      ``(config, params)``: float32 ``jax.Array`` leaves (numpy with ``host``).

    Raises:
      WeightsError: the folder or config is unusable, or the weights do not match the table
        (every problem is listed).
      ConfigError: ``num_labels`` is invalid.
    """
    model_dir = resolve_model_dir(name_or_path)
    config = ViTConfig.from_hf(read_hf_config(model_dir), num_labels)
    source, problems = convert.safetensors_source(model_dir, lambda k: k.removeprefix(PREFIX))
    table = vit_key_table(config)
    init = convert.modules_to_init(
        table, source.shapes, all_optional=new_head, num_labels=num_labels, where=str(model_dir)
    )
    params = convert.import_tree(
        table,
        source,
        what="ViT",
        leaf=convert.leaf_converter(jnp.float32, host),
        ignored=IGNORED,
        init=dict.fromkeys(
            init, lambda e: convert.init_leaf(e, head_key, config.initializer_range)
        ),
        problems=problems,
    )
    return config, params


# --------------------------------------------------------------------------- save


def vit_to_hf_state_dict(params: PyTree, config: ViTConfig) -> dict[str, np.ndarray]:
    """``{HF name: float32 numpy}`` in ``ViTForImageClassification`` layout; LoRA nodes are
    merged first.

    Raises:
      WeightsError: ``params`` does not have exactly the table's paths and shapes.
    """
    return convert.export_state_dict(params, vit_key_table(config), what="ViT")


def save_vit(
    params: PyTree,
    config: ViTConfig,
    out_dir: str | os.PathLike,
    *,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    label_names: Sequence[str] | None = None,
    base_hf_config: Mapping[str, Any] | None = None,
) -> pathlib.Path:
    """Writes ``model.safetensors``, ``config.json`` and ``preprocessor_config.json``.

    The inverse of :func:`load_vit`; each file is written to a temporary name and atomically
    renamed. LoRA nodes are merged.

    Args:
      params: the parameter tree (plain or with LoRA nodes).
      config: its architecture.
      out_dir: created if needed.
      image_mean, image_std: per-channel normalisation the model was trained with (default
        ViTImageProcessor's 0.5 / 0.5).
      label_names: written as ``id2label``.
      base_hf_config: a source ``config.json`` whose other fields are kept.

    Raises:
      WeightsError: ``params`` does not match ``config``.
    """
    state = vit_to_hf_state_dict(params, config)
    base = dict(base_hf_config or {})
    if label_names is not None:
        base["id2label"] = {str(i): str(n) for i, n in enumerate(label_names)}
    hf_config = config.to_hf(base)
    c = config.num_channels
    processor = {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": config.image_size, "width": config.image_size},
        "resample": 2,  # PIL bilinear
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(image_mean) if image_mean is not None else [DEFAULT_IMAGE_MEAN] * c,
        "image_std": list(image_std) if image_std is not None else [DEFAULT_IMAGE_STD] * c,
    }
    return convert.write_hf_folder(
        out_dir, state, {"config.json": hf_config, PREPROCESSOR_FILE: processor}
    )
