"""HF ViT checkpoints (``config.json`` + safetensors) <-> :class:`ViTClassifier` parameter trees.

One explicit table, :func:`vit_key_table`, drives both directions: every HF tensor name maps to
one parameter path with a per-key layout change and the shape implied by the config:

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

import dataclasses
import json
import logging
import os
import pathlib
import re
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ffa_jax.errors import WeightsError
from ffa_jax.models import weights as weights_lib
from ffa_jax.models.vit import DEFAULT_IMAGE_MEAN, DEFAULT_IMAGE_STD, ViTConfig

log = logging.getLogger(__name__)

PREFIX = "vit."
PREPROCESSOR_FILE = "preprocessor_config.json"
# HF keys that are not weights of the classifier (``fullmatch`` after removing the prefix):
# ViTModel's pooler (unused by ViTForImageClassification), the masked-image-modeling token and
# decoder.
IGNORED = (r"pooler\..*", r"embeddings\.mask_token", r"decoder\..*")

PyTree = Any


@dataclasses.dataclass(frozen=True)
class ViTKeyEntry:
    """One row of the HF <-> Flax table.

    Attributes:
      hf: HF tensor name without the ``vit.`` prefix.
      path: parameter-tree path.
      shape: shape in the parameter tree.
      hf_shape: shape of the HF tensor.
      kind: ``"plain"``, ``"linear"`` (transpose) or ``"conv"`` (reshape + transpose).
      head: part of the classification head (initialised when absent; saved unprefixed).
    """

    hf: str
    path: tuple[str, ...]
    shape: tuple[int, ...]
    hf_shape: tuple[int, ...]
    kind: str = "plain"
    head: bool = False

    def to_tree(self, value: np.ndarray) -> np.ndarray:
        if self.kind == "linear":
            return value.T
        if self.kind == "conv":
            return value.reshape(value.shape[0], -1).T
        return value

    def to_hf(self, value: np.ndarray) -> np.ndarray:
        if self.kind == "linear":
            return value.T
        if self.kind == "conv":
            return value.T.reshape(self.hf_shape)
        return value


def vit_key_table(config: ViTConfig) -> tuple[ViTKeyEntry, ...]:
    """The HF <-> parameter-tree table of ``config``'s model, in a fixed order."""
    c = config
    H, Iz, N, P, C = c.hidden_size, c.intermediate_size, c.num_labels, c.patch_size, c.num_channels
    rows: list[ViTKeyEntry] = []

    def linear(hf, path, d_in, d_out, *, bias=True, head=False):
        rows.append(
            ViTKeyEntry(
                f"{hf}.weight", (*path, "kernel"), (d_in, d_out), (d_out, d_in), "linear", head
            )
        )
        if bias:
            rows.append(ViTKeyEntry(f"{hf}.bias", (*path, "bias"), (d_out,), (d_out,), head=head))

    def layer_norm(hf, path):
        rows.append(ViTKeyEntry(f"{hf}.weight", (*path, "scale"), (H,), (H,)))
        rows.append(ViTKeyEntry(f"{hf}.bias", (*path, "bias"), (H,), (H,)))

    emb = ("embeddings",)
    rows.append(ViTKeyEntry("embeddings.cls_token", (*emb, "cls_token"), (1, 1, H), (1, 1, H)))
    n = c.num_patches + 1
    rows.append(
        ViTKeyEntry(
            "embeddings.position_embeddings", (*emb, "position_embeddings"), (1, n, H), (1, n, H)
        )
    )
    proj = (*emb, "patch_embeddings", "projection")
    rows.append(
        ViTKeyEntry(
            "embeddings.patch_embeddings.projection.weight",
            (*proj, "kernel"),
            (C * P * P, H),
            (H, C, P, P),
            "conv",
        )
    )
    rows.append(
        ViTKeyEntry("embeddings.patch_embeddings.projection.bias", (*proj, "bias"), (H,), (H,))
    )
    for i in range(c.num_layers):
        hf, p = f"encoder.layer.{i}", ("encoder", f"layer_{i}")
        layer_norm(f"{hf}.layernorm_before", (*p, "layernorm_before"))
        for name in ("query", "key", "value"):
            linear(
                f"{hf}.attention.attention.{name}",
                (*p, "attention", "attention", name),
                H,
                H,
                bias=c.qkv_bias,
            )
        linear(f"{hf}.attention.output.dense", (*p, "attention", "output", "dense"), H, H)
        layer_norm(f"{hf}.layernorm_after", (*p, "layernorm_after"))
        linear(f"{hf}.intermediate.dense", (*p, "intermediate", "dense"), H, Iz)
        linear(f"{hf}.output.dense", (*p, "output", "dense"), Iz, H)
    layer_norm("layernorm", ("layernorm",))
    linear("classifier", ("classifier",), H, N, head=True)
    return tuple(rows)


# --------------------------------------------------------------------------- load


def _set(tree: dict, path: Sequence[str], value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _head_init(config: ViTConfig, entry: ViTKeyEntry, key: jax.Array) -> np.ndarray:
    if entry.path[-1] == "bias":
        return np.zeros(entry.shape, np.float32)
    # Per-path key: the init does not depend on which other entries were initialised.
    k = jax.random.fold_in(key, zlib.crc32("/".join(entry.path).encode()) & 0x7FFFFFFF)
    return np.asarray(config.initializer_range * jax.random.normal(k, entry.shape, jnp.float32))


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
    model_dir = weights_lib.resolve_model_dir(name_or_path)
    config = ViTConfig.from_hf(weights_lib.read_hf_config(model_dir), num_labels)
    raw, source = weights_lib.read_safetensors(model_dir)
    errors: list[str] = []
    tensors: dict[str, np.ndarray] = {}
    for key, value in raw.items():
        k = key.removeprefix(PREFIX)
        if k in tensors:
            errors.append(f"duplicate key: {key!r} and {k!r} both present")
            continue
        tensors[k] = value
    table = vit_key_table(config)
    head = [e for e in table if e.head]
    present = [e for e in head if e.hf in tensors]
    init_head = new_head or not present
    if present and not new_head and len(present) == len(head):
        got = {e.hf: tuple(tensors[e.hf].shape) for e in head}
        rows = {s[0] for s in got.values()}
        same_in = tuple(tensors["classifier.weight"].shape[1:]) == (config.hidden_size,)
        if len(rows) == 1 and same_in and rows != {num_labels}:
            log.warning(
                "%s: checkpoint head has %d labels, %d requested; initialised from head_key",
                model_dir,
                rows.pop(),
                num_labels,
            )
            init_head = True
    params: dict = {}
    used: set[str] = set()
    for e in table:
        if e.head and init_head:
            _set(params, e.path, _head_init(config, e, head_key))
            used.add(e.hf)
            continue
        value = weights_lib.checked_tensor(tensors, e.hf, e.hf_shape, e.path, errors, used)
        if value is not None:
            _set(params, e.path, e.to_tree(value))
    ignored = [re.compile(p) for p in IGNORED]
    for k in tensors:
        if k not in used and not any(p.fullmatch(k) for p in ignored):
            errors.append(f"unmapped key: {k!r}")
    if errors:
        files = sorted(set(source.values()))
        raise WeightsError(
            f"cannot load ViT weights from {str(model_dir)!r} (files {files}), "
            f"{len(errors)} problem(s):\n  " + "\n  ".join(errors)
        )
    return config, weights_lib.float32_leaves(params, host)


# --------------------------------------------------------------------------- save


def vit_to_hf_state_dict(params: PyTree, config: ViTConfig) -> dict[str, np.ndarray]:
    """``{HF name: float32 numpy}`` in ``ViTForImageClassification`` layout; LoRA nodes are
    merged first.

    Raises:
      WeightsError: ``params`` does not have exactly the table's paths and shapes.
    """
    from ffa_jax import lora

    flat = {
        tuple(lora.path_str([k]) for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(lora.merge(params))
    }
    errors, out = [], {}
    table = vit_key_table(config)
    for e in table:
        if e.path not in flat:
            errors.append(f"missing parameter {'/'.join(e.path)}")
            continue
        value = np.asarray(flat[e.path], np.float32)
        if value.shape != e.shape:
            errors.append(f"parameter {'/'.join(e.path)} expected {e.shape}, got {value.shape}")
            continue
        out[e.hf if e.head else PREFIX + e.hf] = np.ascontiguousarray(e.to_hf(value))
    errors += [
        f"unexpected parameter {'/'.join(p)}" for p in sorted(set(flat) - {e.path for e in table})
    ]
    if errors:
        raise WeightsError("cannot export the ViT parameters:\n  " + "\n  ".join(errors))
    return out


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
    from safetensors.numpy import save_file

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
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights_lib._atomic_write(
        out / weights_lib.SINGLE_FILE, lambda tmp: save_file(state, tmp, metadata={"format": "pt"})
    )
    for name, obj in (("config.json", hf_config), (PREPROCESSOR_FILE, processor)):

        def write_json(tmp, obj=obj):
            with open(tmp, "w") as f:
                json.dump(obj, f, indent=2, sort_keys=True)
                f.write("\n")

        weights_lib._atomic_write(out / name, write_json)
    return out
