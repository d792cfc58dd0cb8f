"""Federated training of any trainable tree: one client's local steps, the round, the server.

* :mod:`~ffa_jax.federated.client`: ``make_client_update`` (``lax.scan`` of local DP-SGD or
  SGD steps of one client, returning the delta of its trainable tree), ``DpParams``.
* :mod:`~ffa_jax.federated.round`: ``make_round`` (all clients ``vmap``ped in one ``jax.jit``,
  weighted FedAvg, server optimiser): ``round_fn(state, frozen, inputs: RoundInputs, key)``;
  ``client_mesh``.
* :mod:`~ffa_jax.federated.server`: ``ServerState``, ``server_init``, ``make_server_optimizer``
  (sgd lr 1 = FedAvg, momentum = FedAvgM, adam, yogi), ``server_step`` (the one server step
  of the simulation and Flower: weighted mean or DP-FedAvg, then the optimiser step).
* :mod:`~ffa_jax.federated.participation`: which clients take part in which round.

Names are imported on first use (no import cost, no import cycle with :mod:`ffa_jax.privacy`).
"""

from __future__ import annotations

import importlib

_NAMES = {
    "ClientMetrics": "client",
    "DpParams": "client",
    "make_client_optimizer": "client",
    "make_client_update": "client",
    "RoundInputs": "round",
    "RoundMetrics": "round",
    "client_mesh": "round",
    "make_round": "round",
    "ServerState": "server",
    "ServerStep": "server",
    "make_server_optimizer": "server",
    "server_init": "server",
    "server_step": "server",
    "weighted_mean": "server",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name not in _NAMES:
        raise AttributeError(f"module 'ffa_jax.federated' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"ffa_jax.federated.{_NAMES[name]}"), name)
    globals()[name] = value
    return value
