"""The run's secret: the one source of the randomness that epsilon relies on.

DP-SGD's guarantee holds only while the noise, the Poisson batches and the client sampling
are unknown to the adversary. They are therefore drawn from a **secret** that is never
written next to the run's public outputs (``config.yaml``, ``metrics.jsonl``, ``summary.md``,
the adapter): by default 256 bits from the operating system's entropy (:func:`draw`) when a
run starts, kept only in the run's checkpoints (owner-only files) so that a resumed run
continues bit-identically. The public ``seed`` decides only public things (the frozen A, the
head init, the data split and the partition).

``privacy.noise_seed: <int>`` replaces the drawn secret by that integer for reproducible
research runs: everyone who knows the seed can regenerate every noise draw and subtract it,
so such a run is **not** a private release unless the seed itself stays secret.

Derivations (each purpose gets its own stream; round, client and step are folded in by the
callers, so no two of them share randomness):

* :func:`jax_key`: a JAX PRNG key whose key data (all of it: 64 bits for threefry2x32) are
  the first bytes of ``SHA-256(secret || purpose)``. ``jax.random.key(int)`` would keep only
  the low 32 bits of a seed without x64, a key space small enough to search.
* :func:`numpy_rng`: ``numpy.random.default_rng([secret, purpose, *ints])`` (SeedSequence
  takes the whole 256-bit integer).
"""

from __future__ import annotations

import hashlib
import secrets

import jax
import numpy as np

SECRET_BITS = 256

#: The line that every output of a run with ``privacy.noise_seed`` set carries.
REPRODUCIBLE_WARNING = (
    "privacy.noise_seed is set: the noise, the Poisson batches and the client sampling can be "
    "regenerated from it, so this run is NOT a private release unless privacy.noise_seed stays "
    "secret (leave it null for a private run)."
)
#: What ``metrics.jsonl`` says about the noise of a default run.
SECRET_NOTE = "secret (drawn from the OS, kept only in the checkpoints)"


def draw() -> int:
    """A fresh ``SECRET_BITS``-bit secret from the operating system's CSPRNG."""
    return secrets.randbits(SECRET_BITS)


def resolve(noise_seed: int | None) -> int:
    """The secret of a new run: ``noise_seed`` when set (reproducible, not private), else a
    fresh :func:`draw`."""
    return draw() if noise_seed is None else int(noise_seed)


def derive(secret: int, purpose: int | str) -> int:
    """An independent ``SECRET_BITS``-bit secret for ``purpose`` (e.g. the privacy audit's),
    ``SHA-256(secret || purpose)``: knowing it reveals nothing about ``secret``'s other uses."""
    return int.from_bytes(_digest(secret, f"derive:{purpose}"), "big")


def jax_key(secret: int, purpose: int) -> jax.Array:
    """A typed JAX PRNG key (default implementation) for ``purpose``, filled entirely from
    ``SHA-256(secret || purpose)``."""
    shape = jax.random.key_data(jax.random.key(0)).shape
    words = int(np.prod(shape))
    digest = b""
    counter = 0
    while len(digest) < 4 * words:
        digest += _digest(secret, f"jax:{purpose}:{counter}")
        counter += 1
    data = np.frombuffer(digest[: 4 * words], dtype=">u4").astype(np.uint32).reshape(shape)
    return jax.random.wrap_key_data(data)


def numpy_rng(secret: int, purpose: int, *ints: int) -> np.random.Generator:
    """A NumPy generator for ``purpose`` (and e.g. the round), seeded with the whole secret."""
    return np.random.default_rng([int(secret), int(purpose), *(int(i) for i in ints)])


def to_hex(secret: int) -> str:
    """The checkpoint's spelling of a secret (64 hex digits)."""
    return f"{int(secret):064x}"


def from_hex(text: str) -> int:
    return int(text, 16)


def _digest(secret: int, label: str) -> bytes:
    n = int(secret)
    if n < 0:
        raise ValueError("a secret is a non-negative integer")
    raw = n.to_bytes(max(32, (n.bit_length() + 7) // 8), "big")
    return hashlib.sha256(raw + b"|" + label.encode()).digest()


__all__ = [
    "REPRODUCIBLE_WARNING",
    "SECRET_BITS",
    "SECRET_NOTE",
    "derive",
    "draw",
    "from_hex",
    "jax_key",
    "numpy_rng",
    "resolve",
    "to_hex",
]
