"""From a run config to the task data split across clients (shared by training and planning)."""

from __future__ import annotations

import numpy as np

from ffa_jax.config import RunConfig
from ffa_jax.data import partition, tasks
from ffa_jax.errors import ConfigError


def partition_clients(cfg: RunConfig, labels: np.ndarray, num_labels: int) -> list[np.ndarray]:
    """Splits training examples with ``labels`` ``[N]`` into ``cfg.federated.clients`` clients.

    Returns:
      ``parts``: ``parts[k]`` holds the training indices of client k.

    Raises:
      ConfigError / DataError: more clients than examples, a client smaller than the expected
        batch (its sampling rate would exceed 1), or a bad partition spec.
    """
    if cfg.federated.clients > len(labels):
        raise ConfigError(
            f"federated.clients={cfg.federated.clients} exceeds the {len(labels)} training "
            "examples of data.task; use fewer clients."
        )
    parts = partition.partition(
        labels,
        cfg.federated.clients,
        cfg.data.partition,
        seed=cfg.seed,
        num_labels=num_labels,
        label_mix=cfg.data.label_mix if cfg.data.partition == "label_mix" else None,
        dirichlet_alpha=cfg.data.dirichlet_alpha,
    )
    smallest = min(len(p) for p in parts)
    if cfg.client.batch_size > smallest:
        raise ConfigError(
            f"client.batch_size={cfg.client.batch_size} exceeds the smallest client's {smallest} "
            "examples (the sampling rate batch_size/n_k must be <= 1); use a smaller batch size or fewer clients."
        )
    return parts


def load_clients(cfg: RunConfig) -> tuple[tasks.TextClassificationData, list[np.ndarray]]:
    """Loads the text-classification ``cfg.data.task`` and partitions its training split into
    ``cfg.federated.clients`` (see :func:`partition_clients`).

    Returns:
      ``(data, parts)``: ``parts[k]`` holds the training indices of client k.

    Raises:
      ConfigError / DataError: as :func:`partition_clients`, or the task cannot be loaded.
    """
    data = tasks.load_text_classification(
        cfg.data.task,
        test_fraction=cfg.data.test_fraction,
        seed=cfg.seed,
        text_field=cfg.data.text_field,
        label_field=cfg.data.label_field,
        max_examples=cfg.data.max_train_examples,
    )
    return data, partition_clients(cfg, data.train_labels, data.num_labels)
