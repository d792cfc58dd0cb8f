"""Layers shared by the models. Their dense kernels may be plain arrays or LoRA nodes.

Mixed precision (``model.dtype: bfloat16``): the activations carry the compute dtype and each
matmul casts its weight to it (:func:`ffa_jax.lora.dense`); LayerNorm statistics, softmax
and logits are float32 (:func:`layer_norm`, the models' attention), and the trainable LoRA
factors stay float32, so their gradients, clipping and noise are float32.
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ffa_jax import lora

PyTree = Any


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
    """
    keep_re = re.compile(keep) if keep else None

    def cast(path, x):
        if x.ndim < 2 or not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        if keep_re is not None and keep_re.fullmatch(lora.path_str(path)):
            return x
        return jnp.asarray(x, dtype)

    return jax.tree_util.tree_map_with_path(cast, params)
