"""Task data for federated runs: partitions over clients and fixed-shape Poisson batches.

* :mod:`~ffa_jax.data.partition`: ``partition`` (iid, label_mix, dirichlet), ``partition_table``.
* :mod:`~ffa_jax.data.batching`: ``physical_batch_size``, ``poisson_batch_indices``,
  ``gather_client_batches``, ``eval_batches`` (masked, fixed shapes: nothing recompiles).
* :mod:`~ffa_jax.data.tasks`, :mod:`~ffa_jax.data.images`, :mod:`~ffa_jax.data.gsm`: the
  text, image and GSM tasks of the CLI's model families.

Names are imported on first use.
"""

from __future__ import annotations

import importlib

_NAMES = {
    "partition_table": "partition",
    "physical_batch_size": "batching",
    "poisson_batch_indices": "batching",
    "gather_client_batches": "batching",
    "eval_batches": "batching",
}

# Submodules (``ffa_jax.data.partition.partition`` is the partition function).
_SUBMODULES = ("batching", "partition")

__all__ = sorted(_NAMES) + list(_SUBMODULES)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"ffa_jax.data.{name}")
    if name not in _NAMES:
        raise AttributeError(f"module 'ffa_jax.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"ffa_jax.data.{_NAMES[name]}"), name)
    globals()[name] = value
    return value
