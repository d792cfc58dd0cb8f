"""ffa_jax: private federated fine-tuning with LoRA and FFA-LoRA in JAX."""

__version__ = "0.1.0"
