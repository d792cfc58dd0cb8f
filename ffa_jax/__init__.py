"""ffa_jax: private federated fine-tuning with LoRA and FFA-LoRA in JAX.

Verbs:

* :func:`finetune` ``(config, **sections) -> Run``: a whole run of a config (what
  ``ffa-jax train`` runs), e.g. ``finetune("configs/quickstart.yaml", federated={"rounds": 1})``.
* :func:`finetune_model` ``(model, params, arrays, loss, **sections) -> ModelRun``: private
  federated FFA-LoRA rounds on your own stock ``flax.linen`` model and numpy arrays.
* :func:`load_config` / :func:`make_config`: a validated :class:`RunConfig`.

Submodules (imported on first use, so ``import ffa_jax`` stays cheap): :mod:`ffa_jax.lora`
(LoRA as a pytree transform; ``attach`` for stock Flax models), :mod:`ffa_jax.privacy`
(clipping, noise, accounting), :mod:`ffa_jax.federated` (client update, round, server),
:mod:`ffa_jax.models` (the project's model families, HF conversion), :mod:`ffa_jax.data`
(partitions, Poisson batches).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ffa_jax.version import __version__

# name -> module that defines it; resolved on first attribute access (PEP 562).
_API = {
    "finetune": "ffa_jax.api",
    "finetune_model": "ffa_jax.api",
    "make_config": "ffa_jax.api",
    "Run": "ffa_jax.api",
    "ModelRun": "ffa_jax.api",
    "load_config": "ffa_jax.config",
    "RunConfig": "ffa_jax.config",
    "LoRAConfig": "ffa_jax.config",
    "ConfigError": "ffa_jax.errors",
    "DataError": "ffa_jax.errors",
    "FfaJaxError": "ffa_jax.errors",
}
_SUBMODULES = ("lora", "privacy", "federated", "models", "data")

__all__ = sorted(_API) + list(_SUBMODULES) + ["__version__"]

if TYPE_CHECKING:  # static tools see the real names
    from ffa_jax import data, federated, lora, models, privacy  # noqa: F401
    from ffa_jax.api import ModelRun, Run, finetune, finetune_model, make_config  # noqa: F401
    from ffa_jax.config import LoRAConfig, RunConfig, load_config  # noqa: F401
    from ffa_jax.errors import ConfigError, DataError, FfaJaxError  # noqa: F401


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"ffa_jax.{name}")
    else:
        raise AttributeError(f"module 'ffa_jax' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
