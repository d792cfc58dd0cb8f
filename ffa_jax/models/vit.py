"""Vision Transformer (ViT) image classifier in Flax linen: a pure function of a parameter tree.

The architecture of HF ``ViTForImageClassification`` (Dosovitskiy et al., 2021): non-overlapping
``P x P`` patches linearly embedded, a learned class token prepended, learned absolute position
embeddings added, pre-norm transformer blocks (``x + attn(LN(x))``, ``x + mlp(LN(x))``), a final
LayerNorm, and a linear head on the class token. Inference is deterministic (no dropout),
matching a PyTorch model in ``eval()`` mode.

Images are channels-last (the JAX convention): ``pixel_values`` is ``float32 [B, H, W, C]``,
already normalised (see :func:`normalise`); HF's PyTorch models take ``[B, C, H, W]``. The
patch projection is a :class:`~ffa_jax.models.layers.Dense` over flattened ``(C, P, P)``
patches, which is exactly HF's stride-``P`` ``Conv2d`` (the weight table in
:mod:`ffa_jax.models.vit_weights` reshapes the conv kernel).

Every dense projection is an :class:`ffa_jax.models.layers.Dense`, whose kernel may be a
:class:`ffa_jax.lora.LoRAWeight`; the default LoRA targets ``.*(query|value)/kernel`` hit
exactly the attention query and value projections. The parameter tree mirrors HF's weight
names (linen module names)::

    embeddings/cls_token                       [1, 1, hidden]
    embeddings/position_embeddings             [1, num_patches + 1, hidden]
    embeddings/patch_embeddings/projection/{kernel [C*P*P, hidden], bias}
    encoder/layer_{i}/layernorm_before/{scale,bias}
    encoder/layer_{i}/attention/attention/{query,key,value}/{kernel,bias}
    encoder/layer_{i}/attention/output/dense/{kernel,bias}
    encoder/layer_{i}/layernorm_after/{scale,bias}
    encoder/layer_{i}/intermediate/dense/{kernel,bias}
    encoder/layer_{i}/output/dense/{kernel,bias}
    layernorm/{scale,bias}
    classifier/{kernel,bias}

Example:
    >>> import jax, jax.numpy as jnp
    >>> cfg = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16,
    ...                 num_layers=1, num_heads=2, intermediate_size=32, num_labels=3)
    >>> model = ViTClassifier(cfg)
    >>> x = jnp.zeros((2, 8, 8, 1))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> model.apply({"params": params}, x).shape
    (2, 3)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from ffa_jax import lora
from ffa_jax.errors import ConfigError, DataError, WeightsError
from ffa_jax.models.layers import ACTIVATIONS, Dense, activation, layer_norm
from ffa_jax.models.objectives import classification_sums
from ffa_jax.types import PyTree

# ViTImageProcessor defaults: pixels rescaled to [0, 1], then (x - 0.5) / 0.5.
DEFAULT_IMAGE_MEAN = 0.5
DEFAULT_IMAGE_STD = 0.5


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"ViTConfig.{name}={value!r} is invalid: must be a positive integer.")


def _square(name: str, value: Any) -> int:
    """HF allows ``image_size``/``patch_size`` as ``[h, w]``; only square ones are supported."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise WeightsError(
                f"config.json {name}={list(value)!r} is not supported: only square images and "
                "patches (one integer, or [n, n]) are implemented."
            )
        return value[0]
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class ViTConfig:
    """Architecture of a ViT image classifier (HF ``ViTConfig`` field meanings).

    Attributes:
      image_size: input height = width in pixels.
      patch_size: patch height = width; must divide ``image_size``.
      num_channels: input channels (1 grayscale, 3 RGB).
      hidden_size, num_layers, num_heads, intermediate_size: HF's ``hidden_size``,
        ``num_hidden_layers``, ``num_attention_heads``, ``intermediate_size``.
      num_labels: classifier outputs.
      layer_norm_eps: LayerNorm epsilon (HF default 1e-12).
      hidden_act: ``"gelu"`` (exact erf), ``"gelu_new"``/``"gelu_pytorch_tanh"`` or ``"relu"``.
      qkv_bias: query/key/value projections have biases (HF default True).
      initializer_range: std of the normal init of new weights.

    Raises:
      ConfigError: on construction, naming the bad field.
    """

    image_size: int
    patch_size: int
    num_channels: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    num_labels: int
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    qkv_bias: bool = True
    initializer_range: float = 0.02

    def __post_init__(self):
        for name in (
            "image_size",
            "patch_size",
            "num_channels",
            "hidden_size",
            "num_layers",
            "num_heads",
            "intermediate_size",
            "num_labels",
        ):
            _positive_int(name, getattr(self, name))
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"ViTConfig.patch_size={self.patch_size} does not divide image_size="
                f"{self.image_size}; pick a patch size that tiles the image."
            )
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"ViTConfig.hidden_size={self.hidden_size} is not divisible by "
                f"num_heads={self.num_heads}; pick a head count that divides it."
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(
                f"ViTConfig.hidden_act={self.hidden_act!r} is not supported: use one of "
                f"{ACTIVATIONS}."
            )
        if not isinstance(self.qkv_bias, bool):
            raise ConfigError(f"ViTConfig.qkv_bias={self.qkv_bias!r} must be true or false.")
        for name in ("layer_norm_eps", "initializer_range"):
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if not ok or v <= 0:
                raise ConfigError(f"ViTConfig.{name}={v!r} must be a positive finite number.")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of one image."""
        return (self.image_size, self.image_size, self.num_channels)

    @classmethod
    def from_hf(cls, hf_config: Mapping[str, Any], num_labels: int) -> ViTConfig:
        """Builds the config from a HF ``config.json`` dict (``model_type: vit``).

        Args:
          hf_config: the parsed ``config.json``.
          num_labels: classifier outputs (the checkpoint's own label count may differ; the
            loader then initialises a new head).

        Raises:
          WeightsError: not a ViT, unsupported features (non-square sizes, an unknown
            activation), or a required field missing.
          ConfigError: a field value is invalid.
        """
        model_type = hf_config.get("model_type")
        if model_type != "vit":
            raise WeightsError(
                f"config.json model_type={model_type!r} is not supported by the ViT: expected "
                "'vit' (ViTModel / ViTForImageClassification checkpoints)."
            )
        act = hf_config.get("hidden_act", "gelu")
        if act not in ACTIVATIONS:
            raise WeightsError(
                f"config.json hidden_act={act!r} is not supported: use a model with one of "
                f"{ACTIVATIONS}."
            )
        required = {
            "image_size": "image_size",
            "patch_size": "patch_size",
            "hidden_size": "hidden_size",
            "num_layers": "num_hidden_layers",
            "num_heads": "num_attention_heads",
            "intermediate_size": "intermediate_size",
        }
        missing = [hf for hf in required.values() if hf not in hf_config]
        if missing:
            raise WeightsError(f"config.json lacks the required fields {missing}.")
        kwargs = {ours: hf_config[hf] for ours, hf in required.items()}
        kwargs["image_size"] = _square("image_size", kwargs["image_size"])
        kwargs["patch_size"] = _square("patch_size", kwargs["patch_size"])
        return cls(
            num_channels=hf_config.get("num_channels", 3),
            num_labels=num_labels,
            layer_norm_eps=float(hf_config.get("layer_norm_eps", 1e-12)),
            hidden_act=act,
            qkv_bias=bool(hf_config.get("qkv_bias", True)),
            initializer_range=float(hf_config.get("initializer_range", 0.02)),
            **kwargs,
        )

    def to_hf(self, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The HF ``config.json`` dict (``ViTForImageClassification``); fields of ``base``
        (label names...) are kept unless this config overrides them."""
        out = dict(base or {})
        id2label = out.get("id2label")
        if not isinstance(id2label, Mapping) or len(id2label) != self.num_labels:
            id2label = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
        out.update(
            architectures=["ViTForImageClassification"],
            model_type="vit",
            image_size=self.image_size,
            patch_size=self.patch_size,
            num_channels=self.num_channels,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            hidden_act=self.hidden_act,
            layer_norm_eps=self.layer_norm_eps,
            qkv_bias=self.qkv_bias,
            initializer_range=self.initializer_range,
            encoder_stride=self.patch_size,
            id2label={str(k): v for k, v in id2label.items()},
            label2id={v: int(k) for k, v in id2label.items()},
        )
        out.setdefault("hidden_dropout_prob", 0.0)
        out.setdefault("attention_probs_dropout_prob", 0.0)
        return out


def check_pixel_shape(shape: tuple[int, ...], config: ViTConfig, what: str = "pixel_values"):
    """Raises :class:`DataError` unless ``shape`` is ``[..., H, W, C]`` of ``config``."""
    want = config.input_shape
    if len(shape) < 4 or tuple(shape[-3:]) != want:
        got_c = shape[-1] if len(shape) >= 1 else None
        hint = (
            f"the channel count {got_c} differs from the model's num_channels={want[2]}"
            if len(shape) >= 4 and tuple(shape[-3:-1]) == want[:2]
            else f"images must be {want[0]}x{want[1]} with {want[2]} channel(s), channels last"
        )
        raise DataError(
            f"{what} has shape {tuple(shape)}; the ViT expects [batch, {want[0]}, {want[1]}, "
            f"{want[2]}]: {hint}. Load images with ffa_jax.data.images, which resizes and "
            "converts them for the model."
        )


def normalise(images: jax.Array, mean, std) -> jax.Array:
    """``uint8`` (or float in ``[0, 255]``) pixels ``[..., C]`` -> ``(x / 255 - mean) / std``.

    ``mean`` and ``std`` are scalars or per-channel ``[C]`` (ViTImageProcessor's
    ``image_mean``/``image_std``; its ``rescale_factor`` is 1/255).
    """
    x = images.astype(jnp.float32) * (1.0 / 255.0)
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    return (x - mean) / std


def _dense(c: ViTConfig, features: int, name: str, use_bias: bool = True) -> Dense:
    init = nn.initializers.normal(c.initializer_range)
    return Dense(features, use_bias=use_bias, kernel_init=init, name=name)


def _layer_norm(c: ViTConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=c.layer_norm_eps, name=name)


def patchify(pixel_values: jax.Array, patch_size: int) -> jax.Array:
    """``[..., H, W, C]`` -> ``[..., (H/P)*(W/P), C*P*P]``, patches in row-major grid order,
    each flattened in ``(C, P, P)`` order (the order of a PyTorch ``Conv2d`` weight)."""
    *lead, h, w, c = pixel_values.shape
    p = patch_size
    x = pixel_values.reshape(*lead, h // p, p, w // p, p, c)
    n = len(lead)
    # [..., gh, p, gw, p, c] -> [..., gh, gw, c, p, p]
    x = jnp.transpose(x, (*range(n), n, n + 2, n + 4, n + 1, n + 3))
    return x.reshape(*lead, (h // p) * (w // p), c * p * p)


class PatchEmbeddings(nn.Module):
    """Flattened ``(C, P, P)`` patches -> ``hidden``: HF's stride-``P`` ``Conv2d`` as a Dense."""

    config: ViTConfig

    @nn.compact
    def __call__(self, pixel_values):
        c = self.config
        return _dense(c, c.hidden_size, "projection")(patchify(pixel_values, c.patch_size))


class Embeddings(nn.Module):
    config: ViTConfig

    @nn.compact
    def __call__(self, pixel_values):
        c = self.config
        init = nn.initializers.normal(c.initializer_range)
        x = PatchEmbeddings(c, name="patch_embeddings")(pixel_values)
        cls = self.param("cls_token", init, (1, 1, c.hidden_size), jnp.float32)
        pos = self.param(
            "position_embeddings", init, (1, c.num_patches + 1, c.hidden_size), jnp.float32
        )
        cls = jnp.broadcast_to(cls[0].astype(x.dtype), (*x.shape[:-2], 1, c.hidden_size))
        x = jnp.concatenate([cls, x], axis=-2)
        return x + pos[0].astype(x.dtype)


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention over all tokens (no mask: every image is full)."""

    config: ViTConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        heads = x.shape[:-1] + (c.num_heads, c.head_dim)
        q = _dense(c, c.hidden_size, "query", c.qkv_bias)(x).reshape(heads)
        k = _dense(c, c.hidden_size, "key", c.qkv_bias)(x).reshape(heads)
        v = _dense(c, c.hidden_size, "value", c.qkv_bias)(x).reshape(heads)
        # [..., L, heads, d] -> [..., heads, L, d] so the two matmuls are batched dot_generals.
        q, k, v = (jnp.swapaxes(t, -2, -3) for t in (q, k, v))
        q = q * jnp.asarray(1.0 / math.sqrt(c.head_dim), q.dtype)
        # The softmax is float32 whatever the compute dtype.
        scores = (q @ jnp.swapaxes(k, -1, -2)).astype(jnp.float32)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.swapaxes(probs @ v, -2, -3)
        return out.reshape(x.shape)


class _DenseBlock(nn.Module):
    """One ``dense`` projection under a named scope (HF ``attention.output``,
    ``intermediate``, ``output``), optionally followed by the activation."""

    config: ViTConfig
    features: int
    act: bool = False

    @nn.compact
    def __call__(self, x):
        y = _dense(self.config, self.features, "dense")(x)
        return activation(self.config.hidden_act)(y) if self.act else y


class Attention(nn.Module):
    config: ViTConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        h = SelfAttention(c, name="attention")(x)
        return _DenseBlock(c, c.hidden_size, name="output")(h)


class Layer(nn.Module):
    """Pre-norm block: ``x + attn(LN(x))``, then ``x + mlp(LN(x))``."""

    config: ViTConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        x = x + Attention(c, name="attention")(layer_norm(_layer_norm(c, "layernorm_before"), x))
        h = _DenseBlock(c, c.intermediate_size, act=True, name="intermediate")(
            layer_norm(_layer_norm(c, "layernorm_after"), x)
        )
        return x + _DenseBlock(c, c.hidden_size, name="output")(h)


class Encoder(nn.Module):
    config: ViTConfig

    @nn.compact
    def __call__(self, x):
        for i in range(self.config.num_layers):
            x = Layer(self.config, name=f"layer_{i}")(x)
        return x


class ViTClassifier(nn.Module):
    """ViT image classifier: ``float32 [B, H, W, C]`` -> logits ``float32 [B, num_labels]``.

    Methods (``module.apply({"params": params}, pixel_values, method=...)``):
      ``__call__``: logits ``[B, num_labels]`` (HF ``logits``).
      ``encode``: the final LayerNorm's output ``[B, 1 + num_patches, hidden]`` (HF
        ``last_hidden_state``).
      ``features``: the class token's final state ``[B, hidden]``, what the head reads.

    A ``pixel_values`` shape other than ``[..., image_size, image_size, num_channels]`` raises
    a :class:`ffa_jax.errors.DataError` at trace time.

    Attributes:
      config: the architecture.
      dtype: compute dtype of the activations and matmuls (weights are cast per matmul, see
        :func:`ffa_jax.models.layers.cast_frozen_weights` to also store them so);
        ``jnp.bfloat16`` for speed on TPU/GPU. LayerNorm, softmax and logits are float32.
    """

    config: ViTConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.embeddings = Embeddings(c)
        self.encoder = Encoder(c)
        self.layernorm = _layer_norm(c, None)
        self.classifier = _dense(c, c.num_labels, None)

    def encode(self, pixel_values) -> jax.Array:
        check_pixel_shape(pixel_values.shape, self.config)
        x = self.embeddings(pixel_values.astype(self.dtype))
        return layer_norm(self.layernorm, self.encoder(x))

    def features(self, pixel_values) -> jax.Array:
        return self.encode(pixel_values)[..., 0, :]

    def __call__(self, pixel_values) -> jax.Array:
        return self.classifier(self.features(pixel_values)).astype(jnp.float32)


def image_classification_loss(
    module: ViTClassifier, image_mean, image_std
) -> Callable[[PyTree, PyTree, dict[str, jax.Array]], jax.Array]:
    """Per-example cross-entropy ``loss_fn(trainable, frozen, example) -> scalar``.

    ``example`` holds ``pixel_values`` (uint8 ``[H, W, C]``, normalised here with
    ``image_mean``/``image_std``, see :func:`normalise`) and ``label`` (int32 scalar).
    Gradients flow only into ``trainable`` (see :func:`ffa_jax.lora.split`).
    """

    def loss_fn(trainable, frozen, example):
        params = lora.combine(trainable, frozen)
        x = normalise(example["pixel_values"], image_mean, image_std)[None]
        logits = module.apply({"params": params}, x)[0]
        return optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), example["label"]
        )

    return loss_fn


def image_classification_eval(
    module: ViTClassifier, image_mean, image_std
) -> Callable[[PyTree, dict[str, jax.Array], jax.Array], dict]:
    """Jitted ``eval_fn(params, batch, mask) -> {"correct", "loss_sum", "count"}`` sums over
    the real examples of a batch (``pixel_values`` uint8 ``[B, H, W, C]``, ``label`` ``[B]``,
    ``mask`` bool ``[B]``), plus per-row ``"probs"`` ``[B, C]`` (softmax) and ``"pred"``
    ``[B]`` (argmax) for the balanced metrics. LoRA nodes are merged first."""

    @jax.jit
    def eval_fn(params, batch, mask):
        x = normalise(batch["pixel_values"], image_mean, image_std)
        logits = module.apply({"params": lora.merge(params)}, x).astype(jnp.float32)
        return classification_sums(logits, batch["label"], mask)

    return eval_fn
