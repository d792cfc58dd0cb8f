"""Named numpy arrays in and out of Flower ``ArrayRecord`` s (``.npy`` bytes, never pickle)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ffa_jax.errors import FederationError

try:
    from flwr.app import Array, ArrayRecord
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        'ffa_jax.flower needs Flower: pip install "ffa_jax[flower]" (or pip install flwr).'
    ) from e


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """An ``ArrayRecord`` of ``{name: array}`` (each serialised with ``allow_pickle=False``)."""
    return ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in arrays.items()})


def from_record(record: ArrayRecord, *, sender: str) -> dict[str, np.ndarray]:
    """``{name: numpy array}`` of an ``ArrayRecord`` (loaded with ``allow_pickle=False``).

    Raises:
      FederationError: ``record`` is not an ArrayRecord or an entry is not a numpy array.
    """
    if not isinstance(record, ArrayRecord):
        raise FederationError(
            f"{sender} sent {type(record).__name__} where an ArrayRecord was expected."
        )
    out = {}
    for name, arr in record.items():
        try:
            out[name] = arr.numpy()
        except (TypeError, ValueError) as e:
            raise FederationError(
                f"{sender} sent array {name!r} that is not a numpy array: {e}"
            ) from e
    return out


def serialized_bytes(record: ArrayRecord) -> int:
    """Bytes of the serialised arrays (``.npy`` headers included, names excluded)."""
    return int(sum(len(arr.data) for arr in record.values()))
