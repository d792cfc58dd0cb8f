"""A disk memo of calibrated noise multipliers: a rerun, or the next cell of an experiment
grid, with the same privacy parameters skips the bracket search of
:func:`ffa_jax.privacy.accounting.calibrate_noise_multiplier` (~2.5 s of the quickstart's
start-up on 2 cores; one accountant evaluation, ~0.1 s, instead).

What it stores: only public parameters (epsilon, delta, sampling rate, steps, accountant,
truncation, the accountant libraries' versions, a hash of the calibration's source) and the
sigma found for them; never data, keys or anything a run's secret derives. Keyed by the code
too, a run's sigma stays a function of its code and parameters (another search may return
another sigma within the same 1% promise).

Why a stale or tampered file cannot weaken a guarantee: the memo is a hint. The caller
re-evaluates a remembered sigma with its own accountant and uses it only when
``(1 - CALIBRATION_RTOL) x target <= epsilon(sigma) <= target`` (the same promise a fresh
calibration makes); anything else is recomputed (and remembered anew). The file is
``$XDG_CACHE_HOME/ffa_jax/sigma_cache.json`` (:func:`ffa_jax.fileio.user_cache_dir`);
``FFA_JAX_SIGMA_CACHE=0`` (or ``off``/``false``/``no``) turns the memo off, any other value
except ``1``/``on``/``true``/``yes`` names the folder to keep the file in. An unreadable or
unwritable file is ignored (the calibration runs as if there were none).
"""

from __future__ import annotations

import functools
import hashlib
import json
import pathlib
from importlib import metadata
from typing import Any

from ffa_jax.fileio import atomic_write_text, cache_switch, user_cache_dir

ENV = "FFA_JAX_SIGMA_CACHE"
FILE_NAME = "sigma_cache.json"
# Bump when the meaning of a key changes (a new field of the calibration, another search).
FORMAT = 1
# Oldest entries are dropped beyond this many (a grid has tens of distinct calibrations).
MAX_ENTRIES = 2048


def cache_file() -> pathlib.Path | None:
    """The memo's path, or None when ``FFA_JAX_SIGMA_CACHE`` turns it off."""
    on, folder = cache_switch(ENV)
    if not on:
        return None
    return (folder or user_cache_dir()) / FILE_NAME


@functools.cache
def _library_versions() -> tuple[tuple[str, str], ...]:
    out = []
    for dist in ("dp-accounting", "jax-privacy"):
        try:
            out.append((dist, metadata.version(dist)))
        except metadata.PackageNotFoundError:
            out.append((dist, "unknown"))
    return tuple(out)


def key_of(params: dict[str, Any]) -> str:
    """The entry name of a calibration: a hash of its parameters (JSON, sorted keys), the
    format and the accountant libraries' versions."""
    blob = json.dumps(
        {"format": FORMAT, "libraries": _library_versions(), **params},
        sort_keys=True,
        default=repr,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _read(path: pathlib.Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def lookup(params: dict[str, Any]) -> float | None:
    """The remembered sigma for ``params`` (a positive finite float), or None. A hint only:
    the caller must re-check it with its accountant before use."""
    path = cache_file()
    if path is None:
        return None
    entry = _read(path).get(key_of(params))
    sigma = entry.get("sigma") if isinstance(entry, dict) else None
    if isinstance(sigma, (int, float)) and not isinstance(sigma, bool) and 0 < sigma < 1e9:
        return float(sigma)
    return None


def remember(params: dict[str, Any], sigma: float) -> None:
    """Adds ``sigma`` for ``params`` to the memo (atomically; a concurrent writer may win,
    which only costs the other process its entry). Failures are ignored."""
    path = cache_file()
    if path is None:
        return
    data = _read(path)
    data.pop(key := key_of(params), None)
    data[key] = {"sigma": float(sigma), "params": params}
    while len(data) > MAX_ENTRIES:
        data.pop(next(iter(data)))
    try:
        atomic_write_text(path, json.dumps(data, indent=0, default=repr))
    except OSError:
        pass
