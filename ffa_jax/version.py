"""ffa_jax's version and the state of the git checkout holding it (ground layer).

:func:`git_state` is the one git helper: ``ffa-jax bench`` records the commit of its numbers
and ``ffa-jax experiment`` the commit of each grid's results.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

__version__ = "0.1.0"

# The repository root of a source checkout (ffa_jax/..); not a repository when installed.
REPO_ROOT = Path(__file__).resolve().parents[1]


def git_state(
    root: Path | None = None,
    *,
    paths: Sequence[str] = (),
    short: bool = False,
    untracked: bool = True,
) -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the checkout at ``root`` (default :data:`REPO_ROOT`), or
    ``(None, None)`` when git or the repository is missing.

    ``commit``: ``git rev-parse [--short] HEAD``. ``dirty``: uncommitted changes under
    ``paths`` (all of the work tree when empty), untracked files included unless
    ``untracked=False``.
    """
    root = root or REPO_ROOT
    status = ["git", "status", "--porcelain"]
    if not untracked:
        status.append("--untracked-files=no")
    if paths:
        status += ["--", *paths]

    def run(cmd: list[str]) -> str:
        return subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=True).stdout

    try:
        sha = run(["git", "rev-parse", *(["--short"] if short else []), "HEAD"]).strip()
        dirty = bool(run(status).strip())
    except (OSError, subprocess.CalledProcessError):
        return None, None
    return sha, dirty


__all__ = ["REPO_ROOT", "__version__", "git_state"]
