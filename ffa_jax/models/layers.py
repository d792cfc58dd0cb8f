"""Layers shared by the models. Their dense kernels may be plain arrays or LoRA nodes."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ffa_jax import lora


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
