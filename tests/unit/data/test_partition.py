"""Client partitions: disjointness, coverage, the paper's label mixes, Dirichlet, and errors."""

import numpy as np
import pytest

from ffa_jax.data.partition import (
    label_mix_counts,
    largest_remainder,
    partition,
    partition_table,
)
from ffa_jax.errors import DataError

PAPER_MIX_2 = [[0.1, 0.9], [0.9, 0.1], [0.5, 0.5]]
PAPER_MIX_3 = [[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.05, 0.05, 0.9]]


def _labels(counts, seed=0):
    """Shuffled int labels with ``counts[c]`` examples of class c."""
    labels = np.repeat(np.arange(len(counts)), counts)
    return np.random.default_rng(seed).permutation(labels)


def _assert_disjoint(parts, n):
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined)
    assert joined.min() >= 0 and joined.max() < n
    for p in parts:
        assert p.dtype == np.int64 and len(p) > 0 and np.all(np.diff(p) > 0)


def test_largest_remainder():
    assert largest_remainder(np.array([0.5, 0.5, 2.0]), 3).tolist() == [1, 0, 2]
    assert largest_remainder(np.array([1.3, 1.3, 1.4]), 4).tolist() == [1, 1, 2]
    quotas = np.random.default_rng(0).random(7)
    out = largest_remainder(quotas * 40 / quotas.sum(), 40)
    assert out.sum() == 40 and np.all(np.abs(out - quotas * 40 / quotas.sum()) < 1)


@pytest.mark.parametrize("num_clients", [1, 3, 7])
def test_iid_covers_everything_with_equal_sizes(num_clients):
    labels = _labels([700, 301])
    parts = partition(labels, num_clients, "iid", seed=0, num_labels=2)
    assert len(parts) == num_clients
    _assert_disjoint(parts, len(labels))
    assert sum(len(p) for p in parts) == len(labels)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize(
    ("mix", "counts", "num_clients"),
    [
        (PAPER_MIX_2, [3320, 1517], 3),
        (PAPER_MIX_2, [3320, 1517], 6),
        (PAPER_MIX_3, [900, 1200, 700], 3),
    ],
)
def test_label_mix_matches_rows(mix, counts, num_clients):
    labels = _labels(counts)
    parts = partition(
        labels, num_clients, "label_mix", seed=0, num_labels=len(counts), label_mix=mix
    )
    _assert_disjoint(parts, len(labels))
    sizes = {len(p) for p in parts}
    assert len(sizes) == 1  # equal per-client sizes
    n = sizes.pop()
    rows = np.array([mix[k % len(mix)] for k in range(num_clients)])
    # n is the largest size every class can supply: one more would overdraw some class.
    assert n == int(np.floor(min(np.array(counts) / rows.sum(axis=0))))
    for k, p in enumerate(parts):
        proportions = np.bincount(labels[p], minlength=len(counts)) / len(p)
        np.testing.assert_allclose(proportions, rows[k], atol=0.02)


def test_label_mix_counts_never_overdraw():
    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = rng.integers(1, 60, size=3)
        rows = rng.dirichlet(np.ones(3), size=4)
        rows /= rows.sum(axis=1, keepdims=True)
        counts = label_mix_counts(sizes, rows)
        assert np.all(counts.sum(axis=0) <= sizes)
        totals = counts.sum(axis=1)
        assert np.all(totals == totals[0])


def test_label_mix_zero_proportion_class_is_unused():
    labels = _labels([50, 50, 50])
    parts = partition(
        labels, 2, "label_mix", seed=0, num_labels=3, label_mix=[[0.5, 0.5, 0], [0.5, 0.5, 0]]
    )
    used = np.concatenate(parts)
    assert np.all(labels[used] != 2)
    assert [len(p) for p in parts] == [50, 50]


def test_dirichlet_deterministic_nonempty_covering():
    labels = _labels([600, 400, 200])
    a = partition(labels, 5, "dirichlet", seed=3, num_labels=3, dirichlet_alpha=0.3)
    b = partition(labels, 5, "dirichlet", seed=3, num_labels=3, dirichlet_alpha=0.3)
    c = partition(labels, 5, "dirichlet", seed=4, num_labels=3, dirichlet_alpha=0.3)
    _assert_disjoint(a, len(labels))
    assert sum(len(p) for p in a) == len(labels)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_dirichlet_small_alpha_is_skewed_large_alpha_is_balanced():
    labels = _labels([2000, 2000])

    def spread(alpha):
        parts = partition(labels, 4, "dirichlet", seed=0, num_labels=2, dirichlet_alpha=alpha)
        shares = np.array([np.bincount(labels[p], minlength=2) / len(p) for p in parts])
        return np.abs(shares[:, 0] - 0.5).mean()

    assert spread(0.05) > 0.25 > 0.05 > spread(1000.0)


def test_same_seed_same_partition_for_all_methods():
    labels = _labels([300, 200])
    for method in ("iid", "label_mix", "dirichlet"):
        kw = dict(seed=7, num_labels=2, label_mix=PAPER_MIX_2)
        a, b = partition(labels, 3, method, **kw), partition(labels, 3, method, **kw)
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_partition_table():
    labels = _labels([30, 10])
    parts = partition(
        labels, 2, "label_mix", seed=0, num_labels=2, label_mix=[[0.5, 0.5], [0.5, 0.5]]
    )
    table = partition_table(labels, parts, ("ham", "spam"))
    lines = table.splitlines()
    assert lines[0].split() == ["client", "n", "ham", "spam", "ham", "%", "spam", "%"]
    assert lines[2].split() == ["0", "10", "5", "5", "50.0", "50.0"]
    assert lines[-1].split() == ["total", "20", "10", "10", "50.0", "50.0"]


# ---- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "shards"}, r"data\.partition='shards'.*iid.*label_mix.*dirichlet"),
        ({"num_clients": 11}, r"federated\.clients=11.*10 training examples"),
        ({"num_clients": 0}, r"federated\.clients=0"),
        ({"method": "label_mix", "label_mix": None}, r"data\.label_mix=None"),
        ({"method": "label_mix", "label_mix": [[0.5, 0.5]] * 2}, r"federated\.clients=3.*2 rows"),
        (
            {"method": "label_mix", "label_mix": [[0.5, 0.3, 0.2]] * 3},
            r"data\.label_mix\[0\].*3 entries.*2 labels",
        ),
        (
            {"method": "label_mix", "label_mix": [[0.5, 0.6]] * 3},
            r"data\.label_mix\[0\].*sums to 1\.1",
        ),
        (
            {"method": "label_mix", "label_mix": [[1.5, -0.5]] * 3},
            r"data\.label_mix\[0\].*negative",
        ),
        ({"method": "dirichlet", "dirichlet_alpha": 0.0}, r"data\.dirichlet_alpha=0\.0"),
        ({"method": "dirichlet", "dirichlet_alpha": -1}, r"data\.dirichlet_alpha=-1"),
    ],
)
def test_errors_name_the_field(kwargs, match):
    labels = _labels([5, 5])
    args = {"num_clients": 3, "method": "iid", "seed": 0, "num_labels": 2} | kwargs
    with pytest.raises(DataError, match=match):
        partition(labels, args.pop("num_clients"), args.pop("method"), **args)


def test_label_mix_starved_class():
    labels = _labels([100, 0])
    with pytest.raises(DataError, match=r"data\.label_mix.*too few"):
        partition(labels, 3, "label_mix", seed=0, num_labels=2, label_mix=PAPER_MIX_2)


def test_dirichlet_empty_client_after_retries():
    # 4 examples over 4 clients with a tiny alpha: some client is empty in practically every draw.
    with pytest.raises(DataError, match=r"data\.dirichlet_alpha=0\.001.*federated\.clients=4"):
        partition(_labels([2, 2]), 4, "dirichlet", seed=0, num_labels=2, dirichlet_alpha=0.001)


def test_bad_labels():
    with pytest.raises(DataError, match="outside"):
        partition(np.array([0, 1, 2]), 2, "iid", seed=0, num_labels=2)
    with pytest.raises(DataError, match="1-D int"):
        partition(np.array([0.0, 1.0]), 2, "iid", seed=0, num_labels=2)


def test_dirichlet_redraws_until_every_client_has_the_minimum():
    """A draw that leaves a client below ``min_client_size`` is drawn again from the same
    stream; a first draw that qualifies is the partition as before."""
    labels = _labels([300, 200])
    first = partition(labels, 3, "dirichlet", seed=0, num_labels=2, dirichlet_alpha=0.1)
    smallest = min(len(p) for p in first)
    kept = partition(
        labels, 3, "dirichlet", seed=0, num_labels=2, dirichlet_alpha=0.1, min_client_size=smallest
    )
    assert all(np.array_equal(x, y) for x, y in zip(first, kept, strict=True))
    redrawn = partition(
        labels,
        3,
        "dirichlet",
        seed=0,
        num_labels=2,
        dirichlet_alpha=0.1,
        min_client_size=smallest + 1,
    )
    assert min(len(p) for p in redrawn) >= smallest + 1
    _assert_disjoint(redrawn, len(labels))
    assert sum(len(p) for p in redrawn) == len(labels)
    with pytest.raises(DataError, match=r"dirichlet_alpha=0.1.*fewer than 400 examples.*batch"):
        partition(
            labels,
            3,
            "dirichlet",
            seed=0,
            num_labels=2,
            dirichlet_alpha=0.1,
            min_client_size=400,
        )


def test_min_client_size_leaves_a_batch_after_the_validation_hold_out():
    from ffa_jax.data.clients import hold_out, min_client_size

    assert min_client_size(64, 0.0) == 64
    assert min_client_size(64, 0.1) == 71  # 71 - round(7.1) = 64
    assert min_client_size(8, 0.1) == 9  # at least one example is held out
    for batch, frac in ((64, 0.1), (16, 0.25), (5.5, 0.2)):
        n = min_client_size(batch, frac)
        assert len(hold_out([np.arange(n)], frac, 0).train[0]) >= batch
        assert len(hold_out([np.arange(n - 1)], frac, 0).train[0]) < batch
