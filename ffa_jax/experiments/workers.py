"""Parallel workers for one grid: each on its own equal share of the CPUs, cells claimed.

``ffa-jax experiment NAME --workers N`` starts N processes of the same experiment, each pinned
(``sched_setaffinity``, before the interpreter starts) to ``len(cpus) // N`` CPUs of its own.
On a CPU backend XLA sizes its thread pool by the process's CPUs, so every worker computes with
the same number of threads, and a cell's numbers depend on that number: the cells record it
(``cpu_threads``) and their command starts with ``taskset -c <cpus>``, which reproduces them
exactly. Why: on the 2-core machine two one-thread workers finish 1.1-1.2x the cells per hour
of one two-thread process (``docs/experiments.md``), since a single small model's step keeps two
threads busy only ~88% of the time.

A worker takes a cell by creating ``<scratch>/.claims/<cell>.claim`` exclusively (``O_EXCL``)
and removes it when the cell's file is written. A claim whose process is gone (another boot,
a dead pid, or a pid reused by a process started later) is stale and taken over.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ffa_jax.errors import ConfigError


def usable_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity; all CPUs where that is unknown)."""
    get = getattr(os, "sched_getaffinity", None)
    if get is not None:
        return sorted(get(0))
    return list(range(os.cpu_count() or 1))


def cpu_threads() -> int:
    """How many CPUs (so XLA:CPU threads) this process computes with."""
    return len(usable_cpus())


def split_cpus(workers: int) -> list[list[int]]:
    """``workers`` disjoint, equal, contiguous sets of this process's CPUs (a remainder is left
    idle: unequal sets would give the workers' cells different thread counts, so different
    float summation orders).

    Raises:
      ConfigError: ``workers`` < 1, more workers than CPUs, or no ``sched_setaffinity``.
    """
    cpus = usable_cpus()
    if workers < 1:
        raise ConfigError(f"--workers={workers}: pass a positive number of worker processes.")
    if workers > len(cpus):
        raise ConfigError(
            f"--workers={workers} needs at least {workers} CPUs, but this process may use "
            f"{len(cpus)} ({cpus}): pass --workers {len(cpus)} or fewer."
        )
    if workers > 1 and not hasattr(os, "sched_setaffinity"):
        raise ConfigError(
            f"--workers={workers} pins each worker to its CPUs with sched_setaffinity, which "
            "this platform lacks (Linux has it): run with --workers 1."
        )
    each = len(cpus) // workers
    return [cpus[i * each : (i + 1) * each] for i in range(workers)]


def taskset_prefix(cpus: Sequence[int]) -> str:
    """``taskset -c 0,1 `` (util-linux): the prefix that runs a command on ``cpus``."""
    return f"taskset -c {','.join(str(c) for c in cpus)} "


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (``/proc/PID/stat`` field 22)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(owner: dict) -> bool:
    pid = owner.get("pid")
    if not isinstance(pid, int) or owner.get("boot_id") != _boot_id():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    started = owner.get("start_time")
    return started is None or _start_time(pid) == started


def _owner() -> dict:
    pid = os.getpid()
    return {"pid": pid, "boot_id": _boot_id(), "start_time": _start_time(pid)}


def claim(path: Path) -> bool:
    """Takes the cell claim ``path`` for this process: True if taken (created, or stale and
    taken over), False if a live process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = json.loads(path.read_text())
            except FileNotFoundError:
                continue  # released meanwhile
            except (OSError, ValueError):
                # Being written this instant, or left empty by a process killed between
                # creating and writing it: live for a minute, stale after.
                try:
                    young = time.time() - path.stat().st_mtime < 60
                except FileNotFoundError:
                    continue
                if young:
                    return False
                owner = {}
            if owner and _alive(owner):
                return False
            path.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(_owner(), f)
        return True
    return False


def release(path: Path) -> None:
    """Drops this process's claim ``path`` (nothing if it is gone)."""
    path.unlink(missing_ok=True)


def run_workers(argvs: Sequence[Sequence[str]], cpu_sets: Sequence[Sequence[int]]) -> list[int]:
    """Starts ``argvs[i]`` pinned to ``cpu_sets[i]`` (before exec, so before XLA sizes its
    thread pool), all at once; waits for all; returns their exit codes. Their output goes
    where this process's ``sys.stdout`` and ``sys.stderr`` go now (so a ``--json`` caller,
    whose prints go to stderr, keeps its stdout for the result line)."""
    sys.stdout.flush()
    procs = []
    try:
        for argv, cpus in zip(argvs, cpu_sets, strict=True):
            procs.append(
                subprocess.Popen(
                    list(argv),
                    stdout=_fd(sys.stdout),
                    stderr=_fd(sys.stderr),
                    preexec_fn=lambda c=tuple(cpus): os.sched_setaffinity(0, c),
                )
            )
        return [p.wait() for p in procs]
    finally:
        for p in procs:  # interrupted: no worker outlives the parent
            if p.poll() is None:
                p.terminate()
        for p in procs:
            p.wait()


def _fd(stream) -> int | None:
    """The file descriptor behind ``stream``, or None (inherit) for one without (a notebook's
    or a test's captured stream)."""
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def python_argv() -> list[str]:
    """The interpreter that runs ``python -m ffa_jax.cli`` in a worker."""
    return [sys.executable, "-m", "ffa_jax.cli"]
