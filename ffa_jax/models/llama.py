"""LLaMA-family causal language models in Flax linen: a pure function of a parameter tree.

Covers LLaMA-2/3, SmolLM/SmolLM2, Mistral without sliding windows and similar HF
``LlamaForCausalLM`` checkpoints: RMSNorm, rotary position embeddings (configurable theta, with
``linear`` and ``llama3`` frequency scaling), grouped-query attention, a SwiGLU MLP, tied or
untied input/output embeddings, a causal mask combined with a padding mask, and an explicit
key/value cache for generation (see :mod:`ffa_jax.models.generate`). Inference is
deterministic (no dropout), matching a PyTorch model in ``eval()`` mode.

Every projection is an :class:`ffa_jax.models.layers.Dense`, whose kernel may be a
:class:`ffa_jax.lora.LoRAWeight`, so LoRA is applied by transforming the parameter tree; the
default targets ``.*(query|value|q_proj|v_proj)/kernel`` hit exactly the query and value
projections. The parameter tree (HF name in brackets)::

    embed_tokens/embedding                          [V, H]     (model.embed_tokens.weight)
    layers_{i}/input_layernorm/scale                [H]        (model.layers.{i}.input_layernorm.weight)
    layers_{i}/self_attn/q_proj/kernel              [H, Nq*D]  (....self_attn.q_proj.weight, transposed)
    layers_{i}/self_attn/k_proj/kernel              [H, Nkv*D]
    layers_{i}/self_attn/v_proj/kernel              [H, Nkv*D]
    layers_{i}/self_attn/o_proj/kernel              [Nq*D, H]
    layers_{i}/self_attn/{q,k,v,o}_proj/bias        only with attention_bias
    layers_{i}/post_attention_layernorm/scale       [H]
    layers_{i}/mlp/{gate_proj,up_proj}/kernel       [H, I]
    layers_{i}/mlp/down_proj/kernel                 [I, H]
    layers_{i}/mlp/{gate,up,down}_proj/bias         only with mlp_bias
    norm/scale                                      [H]        (model.norm.weight)
    lm_head/kernel                                  [H, V]     (lm_head.weight; untied models only)

Positions: by default each token's position is the number of real (``attention_mask == 1``)
tokens before it, so a left-padded row gives the same outputs as the unpadded row (this is
what HF ``generate`` does; HF's plain forward uses ``0..L-1`` whatever the padding, which agrees
for right padding). Pass ``positions`` to override.

Example:
    >>> import jax, jax.numpy as jnp
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=4,
    ...                   num_kv_heads=2, intermediate_size=32)
    >>> model = LlamaForCausalLM(cfg)
    >>> ids = jnp.ones((2, 8), jnp.int32)
    >>> params = model.init(jax.random.key(0), ids, jnp.ones_like(ids))["params"]
    >>> model.apply({"params": params}, ids, jnp.ones_like(ids)).shape
    (2, 8, 64)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ffa_jax import lora
from ffa_jax.errors import ConfigError, WeightsError
from ffa_jax.models.layers import Dense
from ffa_jax.types import PyTree

# HF ``model_type`` values with LLaMA's architecture and weight names.
MODEL_TYPES = ("llama", "mistral")
ROPE_TYPES = ("default", "linear", "llama3")
ACTIVATIONS = ("silu",)


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"LlamaConfig.{name}={value!r} is invalid: must be a positive integer.")


def _positive_float(name: str, value: Any) -> None:
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(
            f"LlamaConfig.{name}={value!r} is invalid: must be a positive finite number."
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Rotary frequency scaling (HF ``rope_scaling`` / ``rope_parameters``).

    Attributes:
      rope_type: ``"linear"`` (every frequency divided by ``factor``) or ``"llama3"``
        (LLaMA-3.1: low frequencies divided by ``factor``, high ones kept, smooth in between).
      factor: the scaling factor.
      low_freq_factor, high_freq_factor, original_max_position_embeddings: ``llama3`` only.
    """

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in ("linear", "llama3"):
            raise ConfigError(
                f"RopeScaling.rope_type={self.rope_type!r} is not supported: use 'linear' or "
                "'llama3' (or no scaling)."
            )
        _positive_float("rope_scaling.factor", self.factor)
        if self.rope_type == "llama3":
            _positive_float("rope_scaling.low_freq_factor", self.low_freq_factor)
            _positive_float("rope_scaling.high_freq_factor", self.high_freq_factor)
            _positive_int(
                "rope_scaling.original_max_position_embeddings",
                self.original_max_position_embeddings,
            )
            if self.high_freq_factor <= self.low_freq_factor:
                raise ConfigError(
                    f"rope_scaling.high_freq_factor={self.high_freq_factor} must exceed "
                    f"low_freq_factor={self.low_freq_factor}."
                )


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Architecture of a LLaMA-family decoder.

    Attributes:
      vocab_size, hidden_size, num_layers, num_heads, intermediate_size: as HF's
        ``vocab_size``, ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``,
        ``intermediate_size``.
      num_kv_heads: key/value heads (grouped-query attention); must divide ``num_heads``.
        Defaults to ``num_heads`` (multi-head attention).
      head_dim: per-head width; defaults to ``hidden_size // num_heads``.
      max_position_embeddings: the context length the model was trained for (generation
        refuses longer sequences).
      rms_norm_eps: RMSNorm epsilon.
      rope_theta: rotary base frequency.
      rope_scaling: optional :class:`RopeScaling`.
      tie_word_embeddings: the output projection is the transposed input embedding.
      attention_bias: q/k/v/o projections have biases; mlp_bias: the MLP projections do.
      bos_token_id, eos_token_ids, pad_token_id: special token ids (``eos_token_ids`` is a
        tuple: LLaMA-3 instruct models stop on several).
      initializer_range: std of the normal init of new weights.

    Raises:
      ConfigError: on construction, naming the bad field.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if isinstance(self.eos_token_ids, int) and not isinstance(self.eos_token_ids, bool):
            object.__setattr__(self, "eos_token_ids", (self.eos_token_ids,))
        elif isinstance(self.eos_token_ids, list):
            object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))
        self.validate()

    def validate(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "intermediate_size",
            "max_position_embeddings",
        ):
            _positive_int(name, getattr(self, name))
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ConfigError(
                    f"LlamaConfig.hidden_size={self.hidden_size} is not divisible by "
                    f"num_heads={self.num_heads}; pick a head count that divides it or set head_dim."
                )
        else:
            _positive_int("head_dim", self.head_dim)
        if self.head_dim_ % 2:
            raise ConfigError(
                f"LlamaConfig.head_dim={self.head_dim_} is odd; rotary embeddings need an even "
                "head dimension."
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"LlamaConfig.num_kv_heads={self.num_kv_heads} does not divide "
                f"num_heads={self.num_heads}; grouped-query attention needs a divisor."
            )
        for name in ("rms_norm_eps", "rope_theta", "initializer_range"):
            _positive_float(name, getattr(self, name))
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ConfigError(
                f"LlamaConfig.rope_scaling={self.rope_scaling!r} must be a RopeScaling or None."
            )
        for name in ("bos_token_id", "pad_token_id"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise ConfigError(f"LlamaConfig.{name}={v!r} must be None or an integer >= 0.")
        if not isinstance(self.eos_token_ids, tuple) or any(
            not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in self.eos_token_ids
        ):
            raise ConfigError(
                f"LlamaConfig.eos_token_ids={self.eos_token_ids!r} must be a tuple of integers >= 0."
            )

    @property
    def head_dim_(self) -> int:
        """The resolved per-head width."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def num_params(self) -> int:
        """Number of weights (embeddings counted once when tied)."""
        H, V, F, D = self.hidden_size, self.vocab_size, self.intermediate_size, self.head_dim_
        q, kv = self.num_heads * D, self.num_kv_heads * D
        attn = H * (q + 2 * kv) + q * H
        if self.attention_bias:
            attn += q + 2 * kv + H
        mlp = 3 * H * F + (2 * F + H if self.mlp_bias else 0)
        per_layer = attn + mlp + 2 * H
        head = 0 if self.tie_word_embeddings else H * V
        return V * H + self.num_layers * per_layer + H + head

    @classmethod
    def from_hf(cls, hf_config: Mapping[str, Any]) -> LlamaConfig:
        """Builds the config from a HF ``config.json`` dict (transformers 4 or 5 layout).

        Raises:
          WeightsError: the architecture is not supported (``model_type`` not in
            :data:`MODEL_TYPES`, an activation other than SiLU, sliding-window attention, a
            rotary scaling other than linear/llama3, partial rotary embeddings), or a required
            field is missing. The message names the field and the value.
        """
        model_type = hf_config.get("model_type")
        if model_type not in MODEL_TYPES:
            archs = hf_config.get("architectures")
            raise WeightsError(
                f"config.json model_type={model_type!r} (architectures={archs}) is not supported by "
                f"the LLaMA decoder: supported model types are {list(MODEL_TYPES)} "
                "(LlamaForCausalLM-style checkpoints: LLaMA-2/3, SmolLM2, Mistral without sliding "
                "windows)."
            )
        act = hf_config.get("hidden_act", "silu")
        if act not in ACTIVATIONS:
            raise WeightsError(
                f"config.json hidden_act={act!r} is not supported: the LLaMA decoder implements "
                f"SwiGLU with {ACTIVATIONS}."
            )
        if model_type == "mistral" and hf_config.get("sliding_window") is not None:
            raise WeightsError(
                f"config.json sliding_window={hf_config['sliding_window']!r} is not supported: "
                "only full causal attention is implemented (sliding_window must be null)."
            )
        if hf_config.get("partial_rotary_factor", 1.0) != 1.0:
            raise WeightsError(
                f"config.json partial_rotary_factor={hf_config['partial_rotary_factor']!r} is not "
                "supported: rotary embeddings cover the whole head."
            )
        required = {
            "vocab_size": "vocab_size",
            "hidden_size": "hidden_size",
            "num_layers": "num_hidden_layers",
            "num_heads": "num_attention_heads",
            "intermediate_size": "intermediate_size",
        }
        missing = [hf for hf in required.values() if hf not in hf_config]
        if missing:
            raise WeightsError(f"config.json lacks the required fields {missing}.")
        kwargs = {ours: hf_config[hf] for ours, hf in required.items()}

        # transformers 5 nests theta and scaling in ``rope_parameters``; 4.x has top-level
        # ``rope_theta`` and ``rope_scaling``.
        rope = dict(hf_config.get("rope_parameters") or {})
        theta = rope.get("rope_theta", hf_config.get("rope_theta", 10000.0))
        scaling = dict(hf_config.get("rope_scaling") or {})
        scaling.update({k: v for k, v in rope.items() if k != "rope_theta"})
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise WeightsError(
                f"config.json rope scaling type {rope_type!r} is not supported: use one of "
                f"{list(ROPE_TYPES)}."
            )
        rope_scaling = None
        if rope_type != "default":
            try:
                extra = {}
                if rope_type == "llama3":
                    extra = dict(
                        low_freq_factor=float(scaling["low_freq_factor"]),
                        high_freq_factor=float(scaling["high_freq_factor"]),
                        original_max_position_embeddings=int(
                            scaling["original_max_position_embeddings"]
                        ),
                    )
                rope_scaling = RopeScaling(
                    rope_type=rope_type, factor=float(scaling["factor"]), **extra
                )
            except KeyError as e:
                raise WeightsError(
                    f"config.json rope scaling {scaling!r} lacks the field {e.args[0]!r}."
                ) from e
        eos = hf_config.get("eos_token_id")
        eos = () if eos is None else (tuple(eos) if isinstance(eos, list) else (eos,))
        return cls(
            num_kv_heads=hf_config.get("num_key_value_heads") or hf_config["num_attention_heads"],
            head_dim=hf_config.get("head_dim"),
            max_position_embeddings=int(hf_config.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
            attention_bias=bool(hf_config.get("attention_bias", False)),
            mlp_bias=bool(hf_config.get("mlp_bias", False)),
            bos_token_id=hf_config.get("bos_token_id"),
            eos_token_ids=eos,
            pad_token_id=hf_config.get("pad_token_id"),
            initializer_range=float(hf_config.get("initializer_range", 0.02)),
            **kwargs,
        )

    def to_hf(self) -> dict[str, Any]:
        """The HF ``config.json`` dict (transformers 4.x layout, also read by 5.x)."""
        out: dict[str, Any] = dict(
            architectures=["LlamaForCausalLM"],
            model_type="llama",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim_,
            intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=None
            if self.rope_scaling is None
            else dataclasses.asdict(self.rope_scaling),
            tie_word_embeddings=self.tie_word_embeddings,
            attention_bias=self.attention_bias,
            mlp_bias=self.mlp_bias,
            hidden_act="silu",
            bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_ids)
            if len(self.eos_token_ids) != 1
            else self.eos_token_ids[0],
            pad_token_id=self.pad_token_id,
            initializer_range=self.initializer_range,
        )
        return out


# --------------------------------------------------------------------------- building blocks


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """Rotary inverse frequencies ``[head_dim // 2]`` (float32), with any scaling applied.

    Matches transformers' ``ROPE_INIT_FUNCTIONS`` (``default``, ``linear``, ``llama3``).
    """
    d = config.head_dim_
    inv = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))
    inv = inv.astype(np.float32)
    s = config.rope_scaling
    if s is None:
        return inv
    if s.rope_type == "linear":
        return (inv / s.factor).astype(np.float32)
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotates ``x`` ``[B, S, heads, D]`` by ``positions`` ``[B, S]`` (HF ``rotate_half`` layout:
    the first and second halves of each head are the two coordinates of each rotation)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, S, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[..., None, :]  # [B, S, 1, D]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class RMSNorm(nn.Module):
    """``scale * x / sqrt(mean(x^2) + eps)``, computed in float32 (as HF ``LlamaRMSNorm``)."""

    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + self.eps)
        return (scale.astype(x.dtype) * h.astype(x.dtype)).astype(x.dtype)


class LayerCache(NamedTuple):
    """Keys and values of one layer for every cache slot: ``[B, num_kv_heads, T, head_dim]``."""

    k: jax.Array
    v: jax.Array


def init_cache(
    config: LlamaConfig, batch: int, length: int, dtype: Any = jnp.float32
) -> tuple[LayerCache, ...]:
    """An all-zero key/value cache of ``length`` slots for ``batch`` rows, one entry per layer."""
    shape = (batch, config.num_kv_heads, length, config.head_dim_)
    return tuple(
        LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
        for _ in range(config.num_layers)
    )


def _attention_mask(kv_mask: jax.Array, seq_len: int, cache_index: jax.Array | int) -> jax.Array:
    """``[B, S, T]`` bool: query ``s`` (in slot ``cache_index + s``) sees slot ``t`` iff
    ``t <= cache_index + s`` and ``kv_mask[b, t]``."""
    T = kv_mask.shape[-1]
    q_slot = jnp.arange(seq_len)[:, None] + cache_index
    causal = jnp.arange(T)[None, :] <= q_slot  # [S, T]
    return causal[None] & (kv_mask[:, None, :] > 0)


def _dense(config: LlamaConfig, features: int, bias: bool, name: str | None = None) -> Dense:
    init = nn.initializers.normal(config.initializer_range)
    return Dense(features, use_bias=bias, kernel_init=init, name=name)


class Attention(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, positions, mask, cache: LayerCache | None, cache_index):
        c = self.config
        B, S = x.shape[:2]
        D, Nq, Nkv = c.head_dim_, c.num_heads, c.num_kv_heads
        G = Nq // Nkv
        inv_freq = rope_inv_freq(c)
        q = _dense(c, Nq * D, c.attention_bias, "q_proj")(x).reshape(B, S, Nq, D)
        k = _dense(c, Nkv * D, c.attention_bias, "k_proj")(x).reshape(B, S, Nkv, D)
        v = _dense(c, Nkv * D, c.attention_bias, "v_proj")(x).reshape(B, S, Nkv, D)
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
        k = jnp.transpose(k, (0, 2, 1, 3))  # [B, Nkv, S, D]
        v = jnp.transpose(v, (0, 2, 1, 3))
        if cache is not None:
            idx = (0, 0, cache_index, 0)
            k = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), idx)
            v = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), idx)
            new_cache = LayerCache(k, v)
            k, v = k.astype(x.dtype), v.astype(x.dtype)
        else:
            new_cache = None
        T = k.shape[2]
        # Query head h uses key/value head h // G (HF repeat_kv): group the G query heads of
        # each kv head so that both products are plain batched matmuls over [B, Nkv].
        q = q.reshape(B, S, Nkv, G, D).transpose(0, 2, 3, 1, 4).reshape(B, Nkv, G * S, D)
        scores = jnp.matmul(q, jnp.swapaxes(k, -1, -2)).astype(jnp.float32) * (D**-0.5)
        scores = scores.reshape(B, Nkv, G, S, T)
        # A finite fill value: rows with no visible key (left padding) give uniform weights
        # instead of NaN, and their outputs are ignored downstream.
        scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(B, Nkv, G * S, T)
        out = jnp.matmul(probs, v).reshape(B, Nkv, G, S, D).transpose(0, 3, 1, 2, 4)
        out = out.reshape(B, S, Nq * D)
        return _dense(c, c.hidden_size, c.attention_bias, "o_proj")(out), new_cache


class MLP(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        gate = _dense(c, c.intermediate_size, c.mlp_bias, "gate_proj")(x)
        up = _dense(c, c.intermediate_size, c.mlp_bias, "up_proj")(x)
        return _dense(c, c.hidden_size, c.mlp_bias, "down_proj")(jax.nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, positions, mask, cache, cache_index):
        c = self.config
        h, new_cache = Attention(c, name="self_attn")(
            RMSNorm(c.rms_norm_eps, name="input_layernorm")(x), positions, mask, cache, cache_index
        )
        x = x + h
        x = x + MLP(c, name="mlp")(RMSNorm(c.rms_norm_eps, name="post_attention_layernorm")(x))
        return x, new_cache


def default_positions(attention_mask: jax.Array) -> jax.Array:
    """Position of each token = number of real tokens before it (``[..., L]`` int32)."""
    m = (attention_mask > 0).astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(m, axis=-1) - 1, 0)


class LlamaForCausalLM(nn.Module):
    """LLaMA causal LM: ``int32 [B, L]`` -> float32 logits ``[B, L, vocab_size]``.

    Attributes:
      config: the architecture.
      dtype: computation dtype (parameters keep their own dtype and are cast per matmul);
        ``jnp.bfloat16`` for large models. Norms, softmax and logits are float32.
      remat: rematerialise each decoder layer in the backward pass (``jax.checkpoint``):
        less activation memory for a second forward pass; results are identical.

    Methods (use with ``module.apply({"params": params}, ..., method=...)``):
      ``__call__(input_ids, attention_mask=None, positions=None)``: logits ``[B, L, V]``.
      ``hidden_states(...)``: final normalised hidden states ``[B, L, H]``.
      ``logits(h)``: the output projection of hidden states ``[..., H] -> [..., V]``.
      ``decode(input_ids, positions, kv_mask, cache, cache_index)``: one cached step, see
        :meth:`decode`.
    """

    config: LlamaConfig
    dtype: Any = jnp.float32
    remat: bool = False

    def setup(self):
        c = self.config
        self.embed_tokens = nn.Embed(
            c.vocab_size,
            c.hidden_size,
            embedding_init=nn.initializers.normal(c.initializer_range),
            param_dtype=jnp.float32,
        )
        layer_cls = nn.remat(DecoderLayer) if self.remat else DecoderLayer
        self.layers = [layer_cls(c) for _ in range(c.num_layers)]
        self.norm = RMSNorm(c.rms_norm_eps)
        if not c.tie_word_embeddings:
            self.lm_head = _dense(c, c.vocab_size, False)

    def _embed(self, input_ids):
        return jnp.take(self.embed_tokens.embedding, input_ids, axis=0).astype(self.dtype)

    def _run(self, input_ids, positions, mask, cache, cache_index):
        x = self._embed(input_ids)
        new_cache = []
        for i, layer in enumerate(self.layers):
            x, layer_cache = layer(
                x, positions, mask, None if cache is None else cache[i], cache_index
            )
            new_cache.append(layer_cache)
        return self.norm(x), (None if cache is None else tuple(new_cache))

    def hidden_states(self, input_ids, attention_mask=None, positions=None) -> jax.Array:
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if positions is None:
            positions = default_positions(attention_mask)
        mask = _attention_mask(attention_mask, input_ids.shape[-1], 0)
        return self._run(input_ids, positions, mask, None, 0)[0]

    def logits(self, h: jax.Array) -> jax.Array:
        if self.config.tie_word_embeddings:
            w = self.embed_tokens.embedding
            out = jnp.matmul(h, w.T.astype(h.dtype))
        else:
            out = self.lm_head(h)
        return out.astype(jnp.float32)

    def __call__(self, input_ids, attention_mask=None, positions=None) -> jax.Array:
        return self.logits(self.hidden_states(input_ids, attention_mask, positions))

    def decode(self, input_ids, positions, kv_mask, cache, cache_index):
        """Runs ``input_ids`` ``[B, S]`` through the model with a key/value cache.

        The tokens' keys and values are written to cache slots ``cache_index ..
        cache_index + S - 1`` (the same slots for every row); query ``s`` attends to slots
        ``t <= cache_index + s`` with ``kv_mask[b, t] == 1``. Rotary positions come from
        ``positions``, not from slots, so rows may have holes (padding) in the cache.

        Args:
          input_ids: ``int32 [B, S]``.
          positions: ``int32 [B, S]`` rotary positions.
          kv_mask: ``[B, T]``: 1 for cache slots holding (or about to hold) real tokens.
          cache: from :func:`init_cache` with ``T`` slots.
          cache_index: int32 scalar (may be traced).

        Returns:
          ``(hidden [B, S, H], new_cache)``; apply :meth:`logits` to the rows you need.
        """
        mask = _attention_mask(kv_mask, input_ids.shape[-1], cache_index)
        return self._run(input_ids, positions, mask, cache, cache_index)


def init_params(config: LlamaConfig, key: jax.Array) -> PyTree:
    """Random parameters (normal(initializer_range) kernels, unit norms) for ``config``."""
    ids = jnp.zeros((1, 2), jnp.int32)
    init = jax.jit(LlamaForCausalLM(config).init)  # jitted: eager linen init is slow
    return init(key, ids, jnp.ones_like(ids))["params"]


# --------------------------------------------------------------------------- objectives


def token_log_likelihoods(logits: jax.Array, input_ids: jax.Array) -> jax.Array:
    """``log p(input_ids[t] | input_ids[:t])`` from logits ``[..., L, V]``: ``[..., L - 1]``
    (entry ``t - 1`` scores token ``t``)."""
    return -optax.softmax_cross_entropy_with_integer_labels(
        logits[..., :-1, :].astype(jnp.float32), input_ids[..., 1:]
    )


def causal_lm_loss(
    module: LlamaForCausalLM,
) -> Callable[[PyTree, PyTree, dict[str, jax.Array]], jax.Array]:
    """Per-example causal-LM loss ``loss_fn(trainable, frozen, example) -> scalar``.

    ``example`` holds ``input_ids``, ``attention_mask`` and ``loss_mask`` (``[L]`` int32);
    ``loss_mask[t] == 1`` marks token ``t`` as a *target* (predicted from tokens ``< t``),
    e.g. the answer tokens of a prompt/answer pair (see :mod:`ffa_jax.data.gsm`). The loss is
    the mean negative log-likelihood over the target tokens (0 when there are none, so padded
    examples are harmless). ``loss_mask[0]`` is ignored (nothing predicts the first token).
    Gradients flow only into ``trainable`` (see :func:`ffa_jax.lora.split`); under FFA-LoRA
    that is the B matrices.
    """

    def loss_fn(trainable, frozen, example):
        params = lora.combine(trainable, frozen)
        ids = example["input_ids"][None]
        logits = module.apply({"params": params}, ids, example["attention_mask"][None])[0]
        ll = token_log_likelihoods(logits, ids[0])
        w = (example["loss_mask"][1:] > 0).astype(jnp.float32)
        return -jnp.sum(ll * w) / jnp.maximum(jnp.sum(w), 1.0)

    return loss_fn


def causal_lm_eval(module: LlamaForCausalLM) -> Callable[[PyTree, dict, jax.Array], dict]:
    """Jitted teacher-forced ``eval_fn(params, batch, mask) -> {"nll_sum", "tokens",
    "correct_tokens", "count"}`` (sums over real examples; ``batch`` as in
    :func:`causal_lm_loss` with a leading batch axis, ``mask`` ``[B]`` bool). LoRA nodes are
    merged first. ``nll_sum / tokens`` is the mean target-token loss; ``correct_tokens /
    tokens`` the greedy next-token accuracy on targets.
    """

    @jax.jit
    def eval_fn(params, batch, mask):
        merged = lora.merge(params)
        ids = batch["input_ids"]
        logits = module.apply({"params": merged}, ids, batch["attention_mask"])
        ll = token_log_likelihoods(logits, ids)
        w = (batch["loss_mask"][:, 1:] > 0) & mask[:, None]
        hit = jnp.argmax(logits[:, :-1], axis=-1) == ids[:, 1:]
        return {
            "nll_sum": -jnp.sum(jnp.where(w, ll, 0.0)),
            "tokens": jnp.sum(w),
            "correct_tokens": jnp.sum(w & hit),
            "count": jnp.sum(mask),
        }

    return eval_fn
