"""Flax models (pure functions of parameter trees) and HF weight conversion."""

from ffa_jax.models.encoder import EncoderClassifier, EncoderConfig
from ffa_jax.models.sources import MINILM, resolve_model_dir
from ffa_jax.models.weights import key_table, load_encoder, load_tokenizer, save_encoder

__all__ = [
    "MINILM",
    "EncoderClassifier",
    "EncoderConfig",
    "key_table",
    "load_encoder",
    "load_tokenizer",
    "resolve_model_dir",
    "save_encoder",
]
