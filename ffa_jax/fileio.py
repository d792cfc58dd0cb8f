"""File I/O every layer shares: THE atomic write, and JSON-safe records.

Ground layer: no ffa_jax imports. Every file ffa_jax writes for a reader to find later
(metrics, configs, summaries, adapters, caches, exported checkpoints) goes through
:func:`atomic_write`, so that a reader (or a resumed run) never sees a partial file.
"""

from __future__ import annotations

import math
import os
import pathlib
import secrets
from collections.abc import Callable
from typing import Any


def user_cache_dir() -> pathlib.Path:
    """ffa_jax's per-user cache folder: ``$XDG_CACHE_HOME/ffa_jax`` (``~/.cache/ffa_jax``
    without it). Not created here; what lives in it is rebuilt when missing."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "ffa_jax"


def cache_switch(var: str) -> tuple[bool, pathlib.Path | None]:
    """How the environment switch ``var`` of one of ffa_jax's caches reads: ``(False, None)``
    for ``0`` / ``off`` / ``false`` / ``no`` (the cache is off); ``(True, None)`` when unset or
    ``1`` / ``on`` / ``true`` / ``yes`` (on, in its default folder); ``(True, folder)`` for any
    other value, the folder to use."""
    value = os.environ.get(var, "").strip()
    if value.lower() in ("0", "off", "false", "no"):
        return False, None
    if value.lower() in ("", "1", "on", "true", "yes"):
        return True, None
    return True, pathlib.Path(value)


def atomic_write(
    path: str | os.PathLike,
    write: Callable[[str], None],
    *,
    suffix: str = ".tmp",
    mode: int | None = None,
) -> None:
    """Runs ``write(tmp)``, which creates a temporary file next to ``path``, then renames it to
    ``path``: readers never see a partial file, and a failed write leaves no temporary. The
    file gets permission bits ``mode`` (e.g. ``0o640``) before it appears, whatever the umask;
    ``None`` keeps the process umask's (as a plain ``open`` would). ``suffix`` ends the
    temporary's name (e.g. ``".npz"`` for writers that append their own extension otherwise).
    The parent folder is created if needed."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}{suffix}")
    try:
        write(str(tmp))
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str, *, mode: int | None = None) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically and durably (fsync before the rename),
    with permission bits ``mode`` if given (see :func:`atomic_write`)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write, mode=mode)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, mode: int | None = None) -> None:
    """Writes ``data`` to ``path`` atomically and durably (fsync before the rename), with
    permission bits ``mode`` if given (see :func:`atomic_write`)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write, mode=mode)


def json_safe(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` with every non-finite float (at any depth of nested dicts) replaced by ``None``:
    strict JSON has no infinity, so a non-private run's epsilon is written as ``null``."""

    def safe(v):
        if isinstance(v, dict):
            return {k: safe(x) for k, x in v.items()}
        return None if isinstance(v, float) and not math.isfinite(v) else v

    return {k: safe(v) for k, v in d.items()}


__all__ = ["atomic_write", "atomic_write_text", "atomic_write_bytes", "json_safe"]
