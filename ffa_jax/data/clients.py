"""From a run config to the task data split across clients (shared by training and planning)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ffa_jax.config import RunConfig
from ffa_jax.data import partition, tasks
from ffa_jax.errors import ConfigError

# Purpose folded into the public seed for the validation hold-out (never the run's secret).
VALIDATION_PURPOSE = 7


@dataclasses.dataclass(frozen=True)
class ClientSplits:
    """Each client's training indices and the validation indices held out of them.

    Attributes:
      train: ``train[k]``: the indices (into the task's training examples) client k trains on,
        in the partition's order.
      validation: sorted indices of every client's held-out validation examples (empty
        without ``data.validation_fraction``), disjoint from every ``train[k]``.
    """

    train: list[np.ndarray]
    validation: np.ndarray


def hold_out(parts: list[np.ndarray], fraction: float, seed: int) -> ClientSplits:
    """Holds out ``round(fraction * n_k)`` random examples of each client ``k`` (at least one
    when ``fraction > 0``), drawn from the public ``seed``: the same split for every method,
    learning rate and epsilon of one seed (paired comparisons).

    Args:
      parts: ``parts[k]``: client k's training indices.
      fraction: share in ``[0, 1)`` held out of each client.
      seed: the run's public seed.
    """
    train, held = [], []
    for k, p in enumerate(parts):
        p = np.asarray(p)
        n_val = 0 if fraction <= 0 else max(1, int(round(fraction * len(p))))
        n_val = min(n_val, max(len(p) - 1, 0))
        rng = np.random.default_rng([seed, VALIDATION_PURPOSE, k])
        chosen = np.zeros(len(p), bool)
        chosen[rng.permutation(len(p))[:n_val]] = True
        train.append(p[~chosen])  # the partition's order: fraction 0 changes nothing
        held.append(p[chosen])
    validation = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    return ClientSplits(train=train, validation=validation.astype(np.int64))


def partition_clients(cfg: RunConfig, labels: np.ndarray, num_labels: int) -> list[np.ndarray]:
    """The training indices of each client: :func:`client_splits` without the validation."""
    return client_splits(cfg, labels, num_labels).train


def min_client_size(batch_size: float, validation_fraction: float) -> int:
    """The fewest examples a client may hold so that, after :func:`hold_out` takes its
    validation share, at least ``batch_size`` remain to train on (Poisson sampling at
    q = batch / n_k <= 1): what a Dirichlet split is conditioned on."""
    n = max(1, math.ceil(batch_size))
    while True:
        held = 0 if validation_fraction <= 0 else max(1, int(round(validation_fraction * n)))
        if n - min(held, n - 1) >= batch_size:
            return n
        n += 1


def client_splits(cfg: RunConfig, labels: np.ndarray, num_labels: int) -> ClientSplits:
    """Splits training examples with ``labels`` ``[N]`` into ``cfg.federated.clients`` clients
    and holds ``data.validation_fraction`` of each client out as the validation split
    (:func:`hold_out`).

    Returns:
      :class:`ClientSplits`: ``train[k]`` holds the training indices of client k.

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
        min_client_size=min_client_size(cfg.client.batch_size, cfg.data.validation_fraction),
    )
    splits = hold_out(parts, cfg.data.validation_fraction, cfg.seed)
    parts = splits.train
    smallest = min(len(p) for p in parts)
    if cfg.client.batch_size > smallest:
        raise ConfigError(
            f"client.batch_size={cfg.client.batch_size} exceeds the smallest client's {smallest} "
            "examples (the sampling rate batch_size/n_k must be <= 1); use a smaller batch size or fewer clients."
        )
    return splits


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
        seed=cfg.split_seed,
        text_field=cfg.data.text_field,
        label_field=cfg.data.label_field,
        max_examples=cfg.data.max_train_examples,
    )
    return data, partition_clients(cfg, data.train_labels, data.num_labels)
