"""From a run config to the task data split across clients (shared by training and planning)."""

from __future__ import annotations

import numpy as np

from ffa_jax.config import RunConfig
from ffa_jax.data import partition, tasks
from ffa_jax.errors import ConfigError


def load_clients(cfg: RunConfig) -> tuple[tasks.TextClassificationData, list[np.ndarray]]:
    """Loads ``cfg.data.task`` and partitions its training split into ``cfg.federated.clients``.

    Returns:
      ``(data, parts)``: ``parts[k]`` holds the training indices of client k.

    Raises:
      ConfigError / DataError: more clients than examples, a client smaller than the expected
        batch (its sampling rate would exceed 1), or a bad partition spec.
    """
    data = tasks.load_text_classification(
        cfg.data.task,
        test_fraction=cfg.data.test_fraction,
        seed=cfg.seed,
        text_field=cfg.data.text_field,
        label_field=cfg.data.label_field,
        max_examples=cfg.data.max_train_examples,
    )
    if cfg.federated.clients > len(data.train_labels):
        raise ConfigError(
            f"federated.clients={cfg.federated.clients} exceeds the {len(data.train_labels)} training "
            "examples of data.task; use fewer clients."
        )
    parts = partition.partition(
        data.train_labels,
        cfg.federated.clients,
        cfg.data.partition,
        seed=cfg.seed,
        num_labels=data.num_labels,
        label_mix=cfg.data.label_mix if cfg.data.partition == "label_mix" else None,
        dirichlet_alpha=cfg.data.dirichlet_alpha,
    )
    smallest = min(len(p) for p in parts)
    if cfg.client.batch_size > smallest:
        raise ConfigError(
            f"client.batch_size={cfg.client.batch_size} exceeds the smallest client's {smallest} "
            "examples (the sampling rate batch_size/n_k must be <= 1); use a smaller batch size or fewer clients."
        )
    return data, parts
