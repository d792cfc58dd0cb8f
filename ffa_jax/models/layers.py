"""Layers shared by the models. Their dense kernels may be plain arrays or LoRA nodes.

Mixed precision (``model.dtype: bfloat16``): the activations carry the compute dtype and each
matmul casts its weight to it (:func:`ffa_jax.lora.dense`); LayerNorm statistics, softmax
and logits are float32 (:func:`layer_norm`, the models' attention), and the trainable LoRA
factors stay float32, so their gradients, clipping and noise are float32.
"""

from __future__ import annotations

import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ffa_jax import lora
from ffa_jax.types import PyTree


class Dense(nn.Module):
    """``y = x @ kernel + bias`` where ``kernel`` may be a :class:`ffa_jax.lora.LoRAWeight`.

    Parameter names and layout follow ``flax.linen.Dense`` (``kernel`` is ``[d_in, d_out]``), so
    LoRA is applied by transforming the parameter tree, not by changing the module.
    """

    features: int
    use_bias: bool = True
    kernel_init: nn.initializers.Initializer = nn.initializers.normal(0.02)
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
        if self.dtype is not None:
            x = x.astype(self.dtype)
        y = lora.dense(x, kernel)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            y = y + bias.astype(y.dtype)
        return y


# HF ``hidden_act`` names of the activations below ("gelu" is the exact, erf GELU of BERT,
# RoBERTa and ViT).
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _gelu_grad(x: jax.Array, approximate: bool) -> jax.Array:
    """``d gelu(x) / dx``, computed in float32 from ``x`` alone."""
    x = x.astype(jnp.float32)
    if approximate:
        t = jnp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x**3))
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (
            1.0 + 3 * 0.044715 * x * x
        )
    cdf = 0.5 * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))
    return cdf + x * jnp.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))


def _gelu_vjp(approximate: bool):
    # jax.nn.gelu's autodiff keeps ~6 activation-sized intermediates per call alive until the
    # backward pass (erf/tanh pieces); with a custom VJP only the input is kept and the
    # derivative is recomputed (as PyTorch does). On a 2-core CPU this cut the encoder's DP
    # step by ~10% and its XLA temp memory by ~20% (ffa-jax bench, MiniLM 32 x 128).
    @jax.custom_vjp
    def gelu(x):
        return jax.nn.gelu(x, approximate=approximate)

    def fwd(x):
        return gelu(x), x

    def bwd(x, g):
        return ((g.astype(jnp.float32) * _gelu_grad(x, approximate)).astype(g.dtype),)

    gelu.defvjp(fwd, bwd)
    return gelu


gelu_exact = _gelu_vjp(approximate=False)
gelu_tanh = _gelu_vjp(approximate=True)


def activation(name: str):
    """The elementwise activation of an HF ``hidden_act`` name (see :data:`ACTIVATIONS`).

    The GELUs have hand-written VJPs that keep only their input for the backward pass; values
    and gradients equal ``jax.nn.gelu``'s to float rounding (tests/unit/models/test_layers.py).
    Reverse mode only: ``jax.jvp`` through them is not supported.

    Raises:
      ValueError: unknown name (model configs validate ``hidden_act`` before this).
    """
    if name == "gelu":
        return gelu_exact
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return gelu_tanh
    if name == "relu":
        return jax.nn.relu
    raise ValueError(f"hidden_act={name!r} is not supported: use one of {ACTIVATIONS}.")


def layer_norm(norm: nn.LayerNorm, x: jax.Array) -> jax.Array:
    """``norm(x)`` computed in float32 (statistics of bfloat16 activations lose too many
    bits), returned in ``x``'s dtype. A no-op cast for float32 models."""
    return norm(x.astype(jnp.float32)).astype(x.dtype)


def cast_frozen_weights(params: PyTree, dtype: Any, keep: str | None = None) -> PyTree:
    """The pretrained tree with its matrices and embeddings (floating leaves of rank >= 2)
    stored in ``dtype``, e.g. ``jnp.bfloat16`` to halve their memory.

    Vectors (biases, LayerNorm scales) stay float32: they are tiny and feed float32 norms.
    ``keep`` is a regular expression of ``/``-joined paths left unchanged, e.g. a head that is
    trained (``classifier/.*``): trainable leaves must stay float32. Call it before
    :func:`ffa_jax.lora.init`, whose LoRA factors are float32 whatever ``w0`` is.

    Host (numpy) leaves are cast on the host and stay numpy (bfloat16 as
    ``ml_dtypes.bfloat16``); ``jax.Array`` leaves are cast on their device.
    """
    keep_re = re.compile(keep) if keep else None

    def cast(path, x):
        if x.ndim < 2 or not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        if keep_re is not None and keep_re.fullmatch(lora.path_str(path)):
            return x
        if isinstance(x, np.ndarray):
            return np.ascontiguousarray(x, np.dtype(dtype))
        return jnp.asarray(x, dtype)

    return jax.tree_util.tree_map_with_path(cast, params)
