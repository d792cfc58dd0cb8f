"""Ground types shared by every layer of ffa_jax (no ffa_jax imports)."""

from __future__ import annotations

from typing import Any

# A JAX pytree: nested dicts/lists/tuples of arrays (and LoRAWeight nodes). ``Any`` because
# jax has no structural pytree type; the alias documents intent at every signature.
PyTree = Any

__all__ = ["PyTree"]
