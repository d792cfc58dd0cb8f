"""The ``ffa-jax`` command's host allocator: when it re-executes onto tcmalloc, and that it
really runs on it afterwards (end to end, where the machine has tcmalloc)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ffa_jax import allocator
from ffa_jax.errors import ConfigError

LIB = "/opt/lib/libtcmalloc_minimal.so.4"


def test_auto_preloads_tcmalloc_and_marks_the_new_process():
    env = allocator.preload_environ({"PATH": "/bin"}, platform="linux", library=LIB)
    assert env["LD_PRELOAD"] == LIB
    assert env[allocator.ENV_DONE] == LIB
    assert env["PATH"] == "/bin"
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40
    # The re-executed process must not re-execute again, even if the preload failed.
    assert allocator.preload_environ(env, platform="linux", library=LIB) is None


def test_existing_preload_is_kept_behind_tcmalloc():
    env = allocator.preload_environ(
        {"LD_PRELOAD": "/x/libfoo.so", "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": "5"},
        platform="linux",
        library=LIB,
    )
    assert env["LD_PRELOAD"] == f"{LIB}:/x/libfoo.so"
    assert env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] == "5"  # the user's setting wins


@pytest.mark.parametrize(
    "environ, platform",
    [
        ({allocator.ENV_CHOICE: "system"}, "linux"),
        ({allocator.ENV_CHOICE: "SYSTEM "}, "linux"),
        ({}, "darwin"),
        ({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, "linux"),
        ({"LD_PRELOAD": LIB}, "linux"),
    ],
)
def test_no_reexec_when_the_user_chose_or_the_platform_cannot(environ, platform):
    assert allocator.preload_environ(environ, platform=platform, library=LIB) is None


def test_missing_tcmalloc(monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
    assert allocator.preload_environ({}, platform="linux") is None  # auto: run as is
    with pytest.raises(ConfigError, match="libtcmalloc-minimal4.*FFA_JAX_ALLOCATOR=system"):
        allocator.preload_environ({allocator.ENV_CHOICE: "tcmalloc"}, platform="linux")


def test_a_failed_exec_runs_on_as_is(monkeypatch):
    calls = []

    def refuse(path, args, env):
        calls.append((path, args, env["LD_PRELOAD"]))
        raise PermissionError("exec not allowed here")

    monkeypatch.setattr(allocator, "preload_environ", lambda environ: {"LD_PRELOAD": LIB})
    monkeypatch.setattr(allocator.os, "execve", refuse)
    allocator.reexec_with_tcmalloc(["python", "-m", "ffa_jax.cli", "train"])
    assert calls == [(sys.executable, [sys.executable, "-m", "ffa_jax.cli", "train"], LIB)]


def test_bad_choice_names_the_variable_and_the_values():
    with pytest.raises(ConfigError, match=r"FFA_JAX_ALLOCATOR='jemalloc'.*auto, tcmalloc, system"):
        allocator.preload_environ({allocator.ENV_CHOICE: "jemalloc"}, platform="linux")


def test_find_tcmalloc_searches_the_library_dirs(tmp_path, monkeypatch):
    (tmp_path / "libtcmalloc.so.4").write_bytes(b"")
    assert allocator.find_tcmalloc([str(tmp_path)]) == str(tmp_path / "libtcmalloc.so.4")
    (tmp_path / "libtcmalloc_minimal.so.4").write_bytes(b"")  # the minimal build first
    assert allocator.find_tcmalloc([str(tmp_path)]) == str(tmp_path / "libtcmalloc_minimal.so.4")
    monkeypatch.setattr(allocator.ctypes.util, "find_library", lambda name: None)
    assert allocator.find_tcmalloc([str(tmp_path / "none")]) is None


def test_describe_gives_the_fix_only_where_it_helps(monkeypatch):
    monkeypatch.setattr(allocator, "active", lambda: "system")
    monkeypatch.setattr(allocator.sys, "platform", "linux")
    assert "apt-get install libtcmalloc-minimal4" in allocator.describe("cpu", {})
    assert allocator.describe("cpu", {allocator.ENV_CHOICE: "system"}) == "host allocator: system"
    assert allocator.describe("gpu", {}) == "host allocator: system"
    monkeypatch.setattr(allocator, "active", lambda: "tcmalloc")
    assert (
        allocator.describe("cpu", {allocator.ENV_DONE: LIB}) == f"host allocator: tcmalloc ({LIB})"
    )


_PROBE = (
    "import os; from ffa_jax import allocator; allocator.reexec_with_tcmalloc(); "
    "print(allocator.active(), os.getpid())"
)


def _probe(choice: str) -> tuple[str, int, int]:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.ENV_DONE)}
    env[allocator.ENV_CHOICE] = choice
    proc = subprocess.Popen(
        [sys.executable, "-c", _PROBE], env=env, stdout=subprocess.PIPE, text=True
    )
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    name, pid = out.split()
    return name, int(pid), proc.pid


@pytest.mark.skipif(
    allocator.find_tcmalloc() is None or not sys.platform.startswith("linux"),
    reason="no tcmalloc on this machine (apt-get install libtcmalloc-minimal4)",
)
def test_reexec_really_runs_on_tcmalloc_in_the_same_process():
    name, pid, spawned = _probe("auto")
    assert name == "tcmalloc"
    assert pid == spawned  # execve: same PID, so launchers and signals still reach it
    assert _probe("system")[0] == "system"


def test_cli_rejects_a_bad_choice_before_doing_anything():
    env = {**os.environ, allocator.ENV_CHOICE: "fast"}
    env.pop(allocator.ENV_DONE, None)
    done = subprocess.run(
        [sys.executable, "-m", "ffa_jax.cli", "config"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "ffa-jax: error: FFA_JAX_ALLOCATOR='fast'" in done.stderr
    assert done.stdout == ""
