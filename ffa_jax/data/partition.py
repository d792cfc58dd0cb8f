"""Split a training set across federated clients: IID, fixed label mixes, or Dirichlet.

Every method returns one sorted int64 index array per client; the arrays are disjoint and index
into the ``labels`` array given. All randomness comes from ``numpy.random.default_rng(seed)``, so
a seed fixes the partition.

- ``iid``: shuffle, then split into sizes that differ by at most one.
- ``label_mix``: the paper's non-IID setting. Row k of ``label_mix`` is client k's label
  distribution (e.g. ``[[0.1, 0.9], [0.9, 0.1], [0.5, 0.5]]``); all clients get the same number
  of examples ``n``, the largest that every class can supply.
- ``dirichlet``: per class, proportions over clients drawn from Dirichlet(alpha) (Hsu et al.,
  2019, "Measuring the effects of non-identical data distribution ...").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ffa_jax.errors import DataError

PARTITION_METHODS = ("iid", "label_mix", "dirichlet")
DIRICHLET_MAX_TRIES = 100


def largest_remainder(quotas: np.ndarray, total: int) -> np.ndarray:
    """Round non-negative ``quotas`` ``[M]`` (summing to ``total``) to ints summing to ``total``.

    Hamilton's method: each entry gets ``floor(quota)``; the ``total - sum(floors)`` leftover
    units go to the largest fractional parts (ties to the lower index, so it is deterministic).
    """
    quotas = np.asarray(quotas, dtype=np.float64)
    floors = np.floor(quotas + 1e-9).astype(np.int64)
    leftover = int(total) - int(floors.sum())
    if abs(leftover) > len(quotas):
        raise ValueError(f"quotas sum to {quotas.sum()}, not to total={total}")
    if leftover > 0:
        order = np.argsort(-(quotas - floors), kind="stable")
        floors[order[:leftover]] += 1
    elif leftover < 0:
        # Quotas summing above `total` (float noise) give the surplus back from the smallest
        # fractional parts among non-zero entries.
        order = [i for i in np.argsort(quotas - floors, kind="stable") if floors[i] > 0]
        floors[order[:-leftover]] -= 1
    return floors


def _check_labels(labels: np.ndarray, num_labels: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(
            f"labels must be a 1-D int array, got dtype {labels.dtype} shape {labels.shape}; "
            "pass TextClassificationData.train_labels."
        )
    if not isinstance(num_labels, (int, np.integer)) or num_labels < 1:
        raise DataError(f"num_labels={num_labels!r} must be a positive int (the label count).")
    if labels.size and (labels.min() < 0 or labels.max() >= num_labels):
        bad = int(labels.min() if labels.min() < 0 else labels.max())
        raise DataError(
            f"labels contain {bad}, outside [0, num_labels={num_labels}); pass the task's "
            "num_labels."
        )
    return labels


def _split_iid(n: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    return list(np.array_split(rng.permutation(n), num_clients))


def _label_mix_rows(
    label_mix: Sequence[Sequence[float]] | None, num_clients: int, num_labels: int
) -> np.ndarray:
    """Validated per-client proportions ``[K, C]`` (rows repeated cyclically)."""
    if label_mix is None or len(label_mix) == 0:
        raise DataError(
            f"data.label_mix={label_mix!r}: data.partition=label_mix needs one row of label "
            "proportions per client, e.g. [[0.1, 0.9], [0.9, 0.1], [0.5, 0.5]]."
        )
    rows = []
    for k, row in enumerate(label_mix):
        try:
            values = np.asarray(row, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise DataError(
                f"data.label_mix[{k}]={row!r} is not a list of numbers; give "
                f"{num_labels} proportions that sum to 1."
            ) from e
        if values.ndim != 1 or len(values) != num_labels:
            raise DataError(
                f"data.label_mix[{k}]={list(np.atleast_1d(values))} has "
                f"{values.size} entries but the task has {num_labels} labels; give one "
                "proportion per label."
            )
        if not np.all(np.isfinite(values)) or np.any(values < 0):
            raise DataError(
                f"data.label_mix[{k}]={values.tolist()} has a negative or non-finite entry; "
                "proportions must be >= 0."
            )
        if abs(values.sum() - 1.0) > 1e-6:
            raise DataError(
                f"data.label_mix[{k}]={values.tolist()} sums to {values.sum():.6g}, not 1; "
                "normalise the row."
            )
        rows.append(values)
    if num_clients % len(rows) != 0:
        raise DataError(
            f"federated.clients={num_clients} with data.label_mix of {len(rows)} rows: the number "
            f"of clients must equal the number of rows or be a multiple of it (rows repeat "
            f"cyclically), e.g. {len(rows)} or {2 * len(rows)}."
        )
    return np.stack([rows[k % len(rows)] for k in range(num_clients)])


def label_mix_counts(class_sizes: np.ndarray, proportions: np.ndarray) -> np.ndarray:
    """Per-client per-class counts ``[K, C]`` for the label-mix partition.

    Every client gets the same size ``n``: the largest with ``n = floor(min_c N_c / sum_k p_kc)``
    whose largest-remainder-rounded counts ``round(n * p_kc)`` fit in every class. Returns all
    zeros if even ``n = 1`` does not fit.
    """
    demand = proportions.sum(axis=0)
    with np.errstate(divide="ignore"):
        ratios = np.where(demand > 0, class_sizes / np.where(demand > 0, demand, 1.0), np.inf)
    n = int(math.floor(ratios.min() + 1e-9))
    while n > 0:
        counts = np.stack([largest_remainder(n * p, n) for p in proportions])
        if np.all(counts.sum(axis=0) <= class_sizes):
            return counts
        n -= 1  # rounding up in several clients overdrew a class; shrink and retry
    return np.zeros_like(proportions, dtype=np.int64)


def _split_label_mix(
    labels: np.ndarray,
    proportions: np.ndarray,
    num_labels: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    class_sizes = np.bincount(labels, minlength=num_labels)
    counts = label_mix_counts(class_sizes, proportions)
    if counts.sum() == 0:
        starved = [c for c in range(num_labels) if proportions[:, c].sum() > 0]
        raise DataError(
            f"data.label_mix: the classes asked for have sizes "
            f"{ {c: int(class_sizes[c]) for c in starved} }, too few to give each of the "
            f"{len(proportions)} clients even one example in these proportions. Use more data, "
            "fewer clients, or proportions that avoid the missing classes."
        )
    parts: list[list[np.ndarray]] = [[] for _ in proportions]
    for c in range(num_labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        bounds = np.concatenate([[0], np.cumsum(counts[:, c])])
        for k in range(len(proportions)):
            parts[k].append(members[bounds[k] : bounds[k + 1]])
    return [np.concatenate(p) for p in parts]


def _split_dirichlet(
    labels: np.ndarray,
    num_clients: int,
    num_labels: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 1,
) -> list[np.ndarray]:
    # Draws again (from the same stream, so a first draw that qualifies is kept as it always
    # was) until every client holds at least ``min_size`` examples: NIID-Bench's rule (Li et
    # al. 2022) with the run's own minimum, since a client smaller than the expected batch
    # cannot be Poisson-sampled at q = batch / n_k <= 1.
    for _ in range(DIRICHLET_MAX_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in range(num_labels):
            members = rng.permutation(np.flatnonzero(labels == c))
            if members.size == 0:
                continue
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * members.size).astype(np.int64)
            for k, chunk in enumerate(np.split(members, cuts)):
                parts[k].append(chunk)
        result = [np.concatenate(p) for p in parts]
        if min(len(p) for p in result) >= max(min_size, 1):
            return result
    need = "no example" if min_size <= 1 else f"fewer than {min_size} examples"
    raise DataError(
        f"data.dirichlet_alpha={alpha}: after {DIRICHLET_MAX_TRIES} draws some of the "
        f"federated.clients={num_clients} clients still got {need} ({len(labels)} examples). "
        "Increase data.dirichlet_alpha, reduce federated.clients or client.batch_size, or use "
        "more data."
    )


def partition(
    labels: np.ndarray,
    num_clients: int,
    method: str,
    *,
    seed: int,
    num_labels: int,
    label_mix: Sequence[Sequence[float]] | None = None,
    dirichlet_alpha: float = 0.5,
    min_client_size: int = 1,
) -> list[np.ndarray]:
    """Partition examples across clients.

    Args:
      labels: int ``[N]`` label of each training example, in ``[0, num_labels)``.
      num_clients: K.
      method: ``"iid"``, ``"label_mix"`` or ``"dirichlet"``.
      seed: seeds ``numpy.random.default_rng``; the same seed gives the same partition.
      num_labels: C.
      label_mix: ``[R][C]`` label proportions per client for ``label_mix`` (K must be a multiple
        of R; rows repeat cyclically). Ignored by the other methods.
      dirichlet_alpha: concentration for ``dirichlet`` (smaller = more skewed).
      min_client_size: ``dirichlet`` draws the label shares again (at most
        ``DIRICHLET_MAX_TRIES`` times, from the same seeded stream) until every client holds
        at least this many examples; the partition is then Dirichlet conditioned on that
        minimum. A first draw that meets it is the partition this function always gave.

    Returns:
      K sorted, disjoint int64 index arrays into ``labels``, each non-empty. ``iid`` and
      ``dirichlet`` cover all N examples; ``label_mix`` uses ``K * n`` of them.

    Raises:
      DataError: unknown method, more clients than examples, malformed ``label_mix``,
        ``dirichlet_alpha <= 0``, or a client that would be empty.
    """
    if method not in PARTITION_METHODS:
        raise DataError(
            f"data.partition={method!r} is not a partition method; use one of {PARTITION_METHODS}."
        )
    if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise DataError(f"federated.clients={num_clients!r} must be a positive int, e.g. 3.")
    labels = _check_labels(labels, num_labels)
    if num_clients > len(labels):
        raise DataError(
            f"federated.clients={num_clients} exceeds the {len(labels)} training examples; use at "
            "most that many clients or more data."
        )
    rng = np.random.default_rng(seed)

    if method == "iid":
        parts = _split_iid(len(labels), num_clients, rng)
    elif method == "label_mix":
        proportions = _label_mix_rows(label_mix, num_clients, num_labels)
        parts = _split_label_mix(labels, proportions, num_labels, rng)
    else:
        if not isinstance(dirichlet_alpha, (int, float)) or not 0 < dirichlet_alpha < math.inf:
            raise DataError(
                f"data.dirichlet_alpha={dirichlet_alpha!r} must be a finite number > 0 "
                "(smaller = more heterogeneous), e.g. 0.5."
            )
        parts = _split_dirichlet(
            labels, num_clients, num_labels, float(dirichlet_alpha), rng, int(min_client_size)
        )

    parts = [np.sort(p).astype(np.int64) for p in parts]
    empty = [k for k, p in enumerate(parts) if p.size == 0]
    if empty:
        raise DataError(
            f"federated.clients={num_clients}: clients {empty} got no examples with "
            f"data.partition={method!r}; use fewer clients or more data."
        )
    return parts


def partition_table(
    labels: np.ndarray, parts: Sequence[np.ndarray], label_names: Sequence[str]
) -> str:
    """A printable table: one row per client (size, count and % per label) and a total row."""
    labels = np.asarray(labels)
    names = [str(n) for n in label_names]
    counts = np.zeros((len(parts), len(names)), dtype=np.int64)
    for k, p in enumerate(parts):
        counts[k] = np.bincount(labels[p], minlength=len(names))[: len(names)]
    counts = np.vstack([counts, counts.sum(axis=0, keepdims=True)])
    row_names = [str(k) for k in range(len(parts))] + ["total"]

    header = ["client", "n"] + names + [f"{n} %" for n in names]
    rows = []
    for name, row in zip(row_names, counts, strict=True):
        n = int(row.sum())
        pct = [f"{100 * c / n:.1f}" if n else "-" for c in row]
        rows.append([name, str(n)] + [str(int(c)) for c in row] + pct)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(cells: list[str]) -> str:
        return "  ".join(cell.rjust(w) for cell, w in zip(cells, widths, strict=True))

    rule = "-" * len(fmt(header))
    return "\n".join([fmt(header), rule, *map(fmt, rows[:-1]), rule, fmt(rows[-1])])
