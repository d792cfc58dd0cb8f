"""ffa_jax on Flower's deployment runtime: a ``ClientApp`` and a ``ServerApp`` over a real network.

- :mod:`ffa_jax.flower.core`: one client's round and the server's aggregation, built on the
  simulation's functions (no flwr import).
- :mod:`ffa_jax.flower.wire`: the trainable tree as named numpy arrays (no pickle).
- :mod:`ffa_jax.flower.client_app` / :mod:`ffa_jax.flower.server_app`: the Flower apps
  (``ffa_jax.flower.client_app:app``, ``ffa_jax.flower.server_app:app``).
- :mod:`ffa_jax.flower.app`: writes a Flower App folder (``pyproject.toml``) for a run config.
- :mod:`ffa_jax.flower.local`: SuperLink + SuperNodes + ``flwr run`` on 127.0.0.1.
- :mod:`ffa_jax.flower.worker`: the node worker that keeps a client's model loaded between
  rounds (node config ``keep-model=true``).

The Flower parts need the optional extra: ``pip install -e ".[flower]"``.
"""
