"""``data.split_seed``: one train/test split shared by runs whose ``seed`` differs, so that a
tuning seed's training and validation examples are never a reported seed's test examples,
while the seed still varies the partition and the validation hold-out."""

from __future__ import annotations

import numpy as np
import pytest

from ffa_jax.config import RunConfig, load_config
from ffa_jax.data.clients import client_splits, load_clients
from ffa_jax.errors import ConfigError

QUICKSTART = "configs/quickstart.yaml"


def _cfg(seed: int, split_seed: int | None) -> RunConfig:
    sets = [f"seed={seed}", "data.validation_fraction=0.1"]
    if split_seed is not None:
        sets.append(f"data.split_seed={split_seed}")
    return load_config(QUICKSTART, sets)


def _load(cfg: RunConfig):
    data, _ = load_clients(cfg)
    splits = client_splits(cfg, data.train_labels, data.num_labels)
    return data, splits


def test_a_shared_split_seed_keeps_every_seeds_test_examples_out_of_training(monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[3])
    tuning, reported = _load(_cfg(1000, 0)), _load(_cfg(3, 0))
    (t_data, t_splits), (r_data, r_splits) = tuning, reported
    # One test split: the same e-mails, in the same order.
    assert t_data.test_texts == r_data.test_texts
    assert t_data.train_texts == r_data.train_texts
    # So the tuning seed trains and validates only on indices of the shared training side,
    # never on the reported seed's test examples (compared by position: the corpus itself
    # holds some identical e-mails on both sides).
    used = np.concatenate([*t_splits.train, t_splits.validation])
    assert len(np.unique(used)) == len(used) and used.max() < len(r_data.train_texts)
    without = _load(_cfg(1000, None))[0]
    assert without.test_texts != r_data.test_texts  # the seed's own split would differ
    # The seed still varies the validation hold-out (and the partition).
    assert not np.array_equal(t_splits.validation, r_splits.validation)


def test_without_split_seed_the_seed_draws_the_split_as_before(monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[3])
    a, b = _cfg(1000, None), _cfg(3, None)
    assert (a.split_seed, b.split_seed) == (1000, 3)
    assert _cfg(3, 1000).split_seed == 1000
    (a_data, _), (b_data, _) = _load(a), _load(b)
    assert a_data.test_texts != b_data.test_texts
    # Seed 3 with split_seed 3 is seed 3 as it always was.
    assert _load(_cfg(3, 3))[0].test_texts == b_data.test_texts


@pytest.mark.parametrize("bad", ["-1", "true", "1.5"])
def test_a_bad_split_seed_is_refused_by_name(bad):
    with pytest.raises(ConfigError, match="data.split_seed"):
        load_config(QUICKSTART, [f"data.split_seed={bad}"])
