"""Grid workers: equal CPU shares, exclusive cell claims that a dead process does not hold
forever, and clear errors for a worker count the machine cannot give."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ffa_jax.errors import ConfigError
from ffa_jax.experiments import workers


def test_cpu_shares_are_equal_and_disjoint():
    cpus = workers.usable_cpus()
    assert workers.split_cpus(1) == [cpus]
    for n in range(1, len(cpus) + 1):
        sets = workers.split_cpus(n)
        assert len(sets) == n and len({len(s) for s in sets}) == 1
        flat = [c for s in sets for c in s]
        assert len(flat) == len(set(flat)) and set(flat) <= set(cpus)
    with pytest.raises(ConfigError, match=rf"--workers={len(cpus) + 1} needs .*--workers"):
        workers.split_cpus(len(cpus) + 1)
    with pytest.raises(ConfigError, match="positive"):
        workers.split_cpus(0)
    assert workers.taskset_prefix([0, 1]) == "taskset -c 0,1 "


def test_a_claim_is_exclusive_while_its_process_lives(tmp_path):
    path = tmp_path / "claims" / "cell.claim"
    assert workers.claim(path)
    assert not workers.claim(path)  # this (live) process holds it
    owner = json.loads(path.read_text())
    assert owner["pid"] == os.getpid()
    workers.release(path)
    assert not path.exists() and workers.claim(path)
    workers.release(path)
    workers.release(path)  # releasing twice is harmless


def test_a_dead_or_rebooted_owner_leaves_a_stale_claim(tmp_path):
    path = tmp_path / "cell.claim"
    # A process that has exited.
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    dead = int(proc.stdout)
    assert workers.claim(path)
    me = json.loads(path.read_text())  # this process's owner record
    path.write_text(json.dumps({**me, "pid": dead, "start_time": None}))
    assert workers.claim(path) and json.loads(path.read_text())["pid"] == os.getpid()
    # An owner of another boot, and a pid reused by a process started later.
    for stale in ({**me, "boot_id": "another-boot"}, {**me, "start_time": "1"}):
        path.write_text(json.dumps(stale))
        assert workers.claim(path), stale
    # A claim file left empty: live for a minute (being written), stale after.
    path.write_text("")
    assert not workers.claim(path)
    old = path.stat().st_mtime - 120
    os.utime(path, (old, old))
    assert workers.claim(path)
