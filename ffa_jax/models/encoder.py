"""BERT / RoBERTa sequence classifiers in Flax linen: a pure function of a parameter tree.

One module serves both families; they differ only in the embeddings (RoBERTa's position ids
start after ``pad_token_id`` and there is a single token type) and in the classification head
(BERT: ``pooler`` then ``classifier``; RoBERTa: ``classifier/dense`` then
``classifier/out_proj``, as ``RobertaClassificationHead``). Inference is deterministic (no
dropout), matching a PyTorch model in ``eval()`` mode.

Every dense projection is an :class:`ffa_jax.models.layers.Dense`, whose kernel may be a
:class:`ffa_jax.lora.LoRAWeight`; LoRA is applied by transforming the parameter tree, and the
default targets ``.*(query|value)/kernel`` hit exactly the query and value projections. The
parameter tree (linen module names)::

    embeddings/{word_embeddings,position_embeddings,token_type_embeddings}/embedding
    embeddings/LayerNorm/{scale,bias}
    encoder/layer_{i}/attention/self/{query,key,value}/{kernel,bias}
    encoder/layer_{i}/attention/output/dense/{kernel,bias}
    encoder/layer_{i}/attention/output/LayerNorm/{scale,bias}
    encoder/layer_{i}/intermediate/dense/{kernel,bias}
    encoder/layer_{i}/output/dense/{kernel,bias}
    encoder/layer_{i}/output/LayerNorm/{scale,bias}
    BERT:    pooler/dense/{kernel,bias}, classifier/{kernel,bias}
    RoBERTa: classifier/dense/{kernel,bias}, classifier/out_proj/{kernel,bias}

Inputs are ``int32 [B, L]``; callers that need per-example functions ``jax.vmap`` over a
leading example axis and pass ``[1, L]`` slices. Nothing depends on a fixed batch rank: any
leading shape ``[..., L]`` works.

Example:
    >>> import jax, jax.numpy as jnp
    >>> cfg = EncoderConfig(family="bert", vocab_size=50, hidden_size=16, num_layers=1,
    ...                     num_heads=2, intermediate_size=32, max_position_embeddings=16,
    ...                     type_vocab_size=2, layer_norm_eps=1e-12, pad_token_id=0, num_labels=3)
    >>> model = EncoderClassifier(cfg)
    >>> ids = jnp.ones((2, 8), jnp.int32)
    >>> params = model.init(jax.random.key(0), ids, jnp.ones_like(ids))["params"]
    >>> model.apply({"params": params}, ids, jnp.ones_like(ids)).shape
    (2, 3)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ffa_jax.errors import ConfigError, WeightsError
from ffa_jax.models.layers import ACTIVATIONS, Dense, activation, layer_norm

FAMILIES = ("bert", "roberta")
POOLINGS = ("cls", "mean")
# HF ``model_type`` -> family. XLM-RoBERTa has RoBERTa's architecture and weight names.
MODEL_TYPES = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta"}


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"EncoderConfig.{name}={value!r} is invalid: must be a positive integer.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EncoderConfig:
    """Architecture of a BERT/RoBERTa encoder with a sequence-classification head.

    Attributes:
      family: ``"bert"`` or ``"roberta"``.
      vocab_size, hidden_size, num_layers, num_heads, intermediate_size: as HF's
        ``vocab_size``, ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``,
        ``intermediate_size``.
      max_position_embeddings: rows of the position table (RoBERTa: includes the
        ``pad_token_id + 1`` offset, e.g. 514).
      type_vocab_size: rows of the token-type table (RoBERTa: 1).
      layer_norm_eps: LayerNorm epsilon.
      pad_token_id: padding token id (RoBERTa positions start at ``pad_token_id + 1``).
      hidden_act: ``"gelu"`` (exact erf), ``"gelu_new"`` / ``"gelu_pytorch_tanh"`` (tanh
        approximation) or ``"relu"``.
      num_labels: classifier outputs.
      initializer_range: std of the normal init of new weights (HF convention, default 0.02).
      pooling: what the classification head reads: ``"cls"`` (the first token, through BERT's
        pooler or RoBERTa's ``classifier.dense``; HF's ``*ForSequenceClassification``) or
        ``"mean"`` (the mask-weighted mean of the last hidden states, the pooling
        sentence-transformers checkpoints such as all-MiniLM-L6-v2 were trained with; BERT's
        pooler is then unused).

    Raises:
      ConfigError: on construction, naming the bad field.
    """

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    pad_token_id: int
    hidden_act: str = "gelu"
    num_labels: int = 2
    initializer_range: float = 0.02
    pooling: str = "cls"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.pooling not in POOLINGS:
            raise ConfigError(
                f"EncoderConfig.pooling={self.pooling!r} is invalid: use one of {POOLINGS}."
            )
        if self.family not in FAMILIES:
            raise ConfigError(
                f"EncoderConfig.family={self.family!r} is invalid: use one of {FAMILIES}."
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
            "num_labels",
        ):
            _positive_int(name, getattr(self, name))
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"EncoderConfig.hidden_size={self.hidden_size} is not divisible by "
                f"num_heads={self.num_heads}; pick a head count that divides it."
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(
                f"EncoderConfig.hidden_act={self.hidden_act!r} is not supported: use one of {ACTIVATIONS}."
            )
        if (
            not isinstance(self.pad_token_id, int)
            or isinstance(self.pad_token_id, bool)
            or self.pad_token_id < 0
        ):
            raise ConfigError(
                f"EncoderConfig.pad_token_id={self.pad_token_id!r} is invalid: must be an integer >= 0."
            )
        if self.family == "roberta" and self.pad_token_id + 1 >= self.max_position_embeddings:
            raise ConfigError(
                f"EncoderConfig.max_position_embeddings={self.max_position_embeddings} leaves no positions "
                f"after RoBERTa's offset pad_token_id + 1 = {self.pad_token_id + 1}; it must be larger."
            )
        for name in ("layer_norm_eps", "initializer_range"):
            v = getattr(self, name)
            if (
                not isinstance(v, (int, float))
                or isinstance(v, bool)
                or not math.isfinite(v)
                or v <= 0
            ):
                raise ConfigError(
                    f"EncoderConfig.{name}={v!r} is invalid: must be a positive finite number."
                )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def max_length(self) -> int:
        """Longest input sequence the position table supports."""
        if self.family == "roberta":
            return self.max_position_embeddings - self.pad_token_id - 1
        return self.max_position_embeddings

    @classmethod
    def from_hf(cls, hf_config: Mapping[str, Any], num_labels: int) -> EncoderConfig:
        """Builds the config from a HF ``config.json`` dict.

        Args:
          hf_config: the parsed ``config.json``.
          num_labels: classifier outputs (the checkpoint's own ``id2label`` is ignored).

        Raises:
          WeightsError: if the checkpoint's architecture is not supported (``model_type`` not
            in :data:`MODEL_TYPES`, non-absolute position embeddings, a decoder, an unknown
            activation) or a required field is missing.
          ConfigError: if ``num_labels`` (or a field value) is invalid.
        """
        model_type = hf_config.get("model_type")
        if model_type not in MODEL_TYPES:
            raise WeightsError(
                f"config.json model_type={model_type!r} is not supported by the encoder: supported "
                f"model types are {sorted(MODEL_TYPES)} (BERT/RoBERTa-style encoders)."
            )
        pos = hf_config.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise WeightsError(
                f"config.json position_embedding_type={pos!r} is not supported: only 'absolute' "
                "position embeddings are implemented."
            )
        if hf_config.get("is_decoder") or hf_config.get("add_cross_attention"):
            raise WeightsError(
                "config.json describes a decoder (is_decoder/add_cross_attention); "
                "only bidirectional encoders are supported."
            )
        act = hf_config.get("hidden_act", "gelu")
        if act not in ACTIVATIONS:
            raise WeightsError(
                f"config.json hidden_act={act!r} is not supported: use a model with one of {ACTIVATIONS}."
            )
        family = MODEL_TYPES[model_type]
        required = {
            "vocab_size": "vocab_size",
            "hidden_size": "hidden_size",
            "num_layers": "num_hidden_layers",
            "num_heads": "num_attention_heads",
            "intermediate_size": "intermediate_size",
            "max_position_embeddings": "max_position_embeddings",
        }
        missing = [hf for hf in required.values() if hf not in hf_config]
        if missing:
            raise WeightsError(f"config.json lacks the required fields {missing}.")
        kwargs = {ours: hf_config[hf] for ours, hf in required.items()}
        defaults = {"bert": (2, 1e-12, 0), "roberta": (1, 1e-5, 1)}[family]
        type_vocab = hf_config.get("type_vocab_size", defaults[0])
        eps = hf_config.get("layer_norm_eps", defaults[1])
        pad = hf_config.get("pad_token_id")
        return cls(
            family=family,
            type_vocab_size=type_vocab,
            layer_norm_eps=float(eps),
            pad_token_id=defaults[2] if pad is None else pad,
            hidden_act=act,
            num_labels=num_labels,
            initializer_range=float(hf_config.get("initializer_range", 0.02)),
            **kwargs,
        )


def _layer_norm(config: EncoderConfig) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=config.layer_norm_eps, name="LayerNorm")


def _dense(config: EncoderConfig, features: int, name: str | None = None) -> Dense:
    # In ``setup`` the attribute name is the module name, so ``name`` must stay None there.
    init = nn.initializers.normal(config.initializer_range)
    return Dense(features, kernel_init=init, name=name)


class Embeddings(nn.Module):
    config: EncoderConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids):
        c = self.config
        init = nn.initializers.normal(c.initializer_range)
        if input_ids.shape[-1] > c.max_length:
            # Out-of-range position ids would silently read NaN/clamped rows: fail at trace time.
            raise ConfigError(
                f"input length {input_ids.shape[-1]} exceeds the {c.max_length} positions of this "
                f"{c.family} model (max_position_embeddings={c.max_position_embeddings}); "
                "truncate inputs, e.g. set model.max_length lower."
            )
        if c.family == "roberta":
            # HF create_position_ids_from_input_ids; additionally treats masked tokens as
            # padding, so positions stay in range whatever id a caller pads with.
            mask = ((input_ids != c.pad_token_id) & (attention_mask > 0)).astype(jnp.int32)
            position_ids = jnp.cumsum(mask, axis=-1) * mask + c.pad_token_id
            token_type_ids = jnp.zeros_like(input_ids)
        else:
            position_ids = jnp.broadcast_to(
                jnp.arange(input_ids.shape[-1], dtype=jnp.int32), input_ids.shape
            )
            if token_type_ids is None:
                token_type_ids = jnp.zeros_like(input_ids)
        word = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=init, name="word_embeddings")
        position = nn.Embed(
            c.max_position_embeddings,
            c.hidden_size,
            embedding_init=init,
            name="position_embeddings",
        )
        token_type = nn.Embed(
            c.type_vocab_size, c.hidden_size, embedding_init=init, name="token_type_embeddings"
        )
        # Summed and normalised in float32 (the tables may be stored in bfloat16).
        f32 = jnp.float32
        x = (
            word(input_ids).astype(f32)
            + position(position_ids).astype(f32)
            + token_type(token_type_ids).astype(f32)
        )
        return layer_norm(_layer_norm(c), x)


class SelfAttention(nn.Module):
    config: EncoderConfig

    @nn.compact
    def __call__(self, x, mask):
        c = self.config
        heads = x.shape[:-1] + (c.num_heads, c.head_dim)
        q = _dense(c, c.hidden_size, "query")(x).reshape(heads)
        k = _dense(c, c.hidden_size, "key")(x).reshape(heads)
        v = _dense(c, c.hidden_size, "value")(x).reshape(heads)
        # [..., L, heads, d] -> [..., heads, L, d]: leading batch dims make the two batched
        # matmuls below plain dot_generals (faster on CPU than the equivalent einsum).
        q, k, v = (jnp.swapaxes(t, -2, -3) for t in (q, k, v))
        q = q * jnp.asarray(1.0 / math.sqrt(c.head_dim), q.dtype)
        # [..., heads, L_q, L_k]; the softmax is float32 whatever the compute dtype.
        scores = (q @ jnp.swapaxes(k, -1, -2)).astype(jnp.float32)
        # Masked keys get the dtype's most negative value (a `where`, not an addition, so it
        # cannot overflow); a fully padded row then softmaxes to uniform weights, never NaN.
        scores = jnp.where(mask[..., None, None, :], scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.swapaxes(probs @ v, -2, -3)  # [..., L, heads, d]
        return out.reshape(x.shape)


class Output(nn.Module):
    """``LayerNorm(dense(h) + residual)``: BertSelfOutput / BertOutput."""

    config: EncoderConfig

    @nn.compact
    def __call__(self, h, residual):
        c = self.config
        return layer_norm(_layer_norm(c), _dense(c, c.hidden_size, "dense")(h) + residual)


class Attention(nn.Module):
    config: EncoderConfig

    @nn.compact
    def __call__(self, x, mask):
        h = SelfAttention(self.config, name="self")(x, mask)
        return Output(self.config, name="output")(h, x)


class Intermediate(nn.Module):
    config: EncoderConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        return activation(c.hidden_act)(_dense(c, c.intermediate_size, "dense")(x))


class Layer(nn.Module):
    config: EncoderConfig

    @nn.compact
    def __call__(self, x, mask):
        x = Attention(self.config, name="attention")(x, mask)
        h = Intermediate(self.config, name="intermediate")(x)
        return Output(self.config, name="output")(h, x)


class Encoder(nn.Module):
    config: EncoderConfig

    @nn.compact
    def __call__(self, x, mask):
        for i in range(self.config.num_layers):
            x = Layer(self.config, name=f"layer_{i}")(x, mask)
        return x


class Pooler(nn.Module):
    """BERT pooler: ``tanh(dense(h[..., 0, :]))``."""

    config: EncoderConfig

    @nn.compact
    def __call__(self, h):
        return jnp.tanh(_dense(self.config, self.config.hidden_size, "dense")(h[..., 0, :]))


class RobertaClassificationHead(nn.Module):
    """``out_proj(tanh(dense(h[..., 0, :])))``, as HF's ``RobertaClassificationHead``."""

    config: EncoderConfig

    def setup(self):
        c = self.config
        self.dense = _dense(c, c.hidden_size)
        self.out_proj = _dense(c, c.num_labels)

    def pre_logits(self, pooled):
        """``pooled``: ``[..., hidden]`` (the first token's state, or a mean)."""
        return jnp.tanh(self.dense(pooled))

    def __call__(self, pooled):
        return self.out_proj(self.pre_logits(pooled))


class EncoderClassifier(nn.Module):
    """BERT/RoBERTa sequence classifier: ``int32 [B, L]`` inputs -> ``float32 [B, num_labels]``.

    Attributes:
      config: the architecture.
      dtype: compute dtype of the activations and matmuls (weights are cast per matmul, see
        :func:`ffa_jax.models.layers.cast_frozen_weights` to also store them so);
        ``jnp.bfloat16`` for speed on TPU/GPU. LayerNorm, softmax, mean pooling and logits
        are float32.

    Methods (use with ``module.apply({"params": params}, ..., method=...)``):
      ``__call__``: logits ``[B, num_labels]``.
      ``encode``: last hidden states ``[B, L, hidden_size]`` (HF ``last_hidden_state``).
      ``features``: the pre-logit vector ``[B, hidden_size]`` the final projection sees: BERT's
        pooler output (HF ``pooler_output``), RoBERTa's ``tanh(classifier.dense(h[:, 0]))``.

    All take ``(input_ids, attention_mask, token_type_ids=None)``; ``attention_mask`` is 1 for
    real tokens and 0 for padding; ``token_type_ids`` is ignored by RoBERTa and defaults to
    zeros for BERT.
    """

    config: EncoderConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.embeddings = Embeddings(c)
        self.encoder = Encoder(c)
        if c.family == "bert":
            self.pooler = Pooler(c)
            self.classifier = _dense(c, c.num_labels)
        else:
            self.classifier = RobertaClassificationHead(c)

    def encode(self, input_ids, attention_mask, token_type_ids=None) -> jax.Array:
        mask = attention_mask > 0
        x = self.embeddings(input_ids, attention_mask, token_type_ids).astype(self.dtype)
        return self.encoder(x, mask)

    def _pre_logits(self, h, attention_mask):
        if self.config.pooling == "mean":
            m = (attention_mask > 0).astype(jnp.float32)[..., None]
            pooled = jnp.sum(h.astype(jnp.float32) * m, axis=-2) / jnp.maximum(
                jnp.sum(m, axis=-2), 1.0
            )
            pooled = pooled.astype(h.dtype)
            if self.config.family == "bert":
                return pooled
            return self.classifier.pre_logits(pooled)
        if self.config.family == "bert":
            return self.pooler(h)
        return self.classifier.pre_logits(h[..., 0, :])

    def features(self, input_ids, attention_mask, token_type_ids=None) -> jax.Array:
        h = self.encode(input_ids, attention_mask, token_type_ids)
        return self._pre_logits(h, attention_mask)

    def __call__(self, input_ids, attention_mask, token_type_ids=None) -> jax.Array:
        feats = self.features(input_ids, attention_mask, token_type_ids)
        if self.config.family == "bert":
            return self.classifier(feats).astype(jnp.float32)
        return self.classifier.out_proj(feats).astype(jnp.float32)
