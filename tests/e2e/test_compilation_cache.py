"""``perf.compilation_cache``: ``ffa-jax train`` keeps its executables in JAX's persistent cache,
so a second identical run compiles nothing new (no timing: the cache gains no entry)."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from ffa_jax import xla_options
from ffa_jax.config import PerfConfig, load_config
from ffa_jax.errors import ConfigError
from tests._tiny import CACHE_FLAGS, tiny_model_dir, tiny_overrides


@pytest.fixture
def restore_jax_cache_flags():
    from jax._src import compilation_cache as cc

    old = {k: getattr(jax.config, k) for k in CACHE_FLAGS}
    yield
    for k, v in old.items():
        jax.config.update(k, v)
    cc.reset_cache()


def test_default_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert xla_options.default_cache_dir() == tmp_path / "ffa_jax" / "jax_cache"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert xla_options.default_cache_dir() == tmp_path / "home" / ".cache" / "ffa_jax" / "jax_cache"


@pytest.mark.parametrize("off", ["0", "off", "false", "no"])
def test_env_switch_turns_it_off(monkeypatch, off, restore_jax_cache_flags):
    monkeypatch.setenv(xla_options.CACHE_ENV, off)
    assert xla_options.enable_compilation_cache(True) is None


def test_config_switch_and_env_dir(monkeypatch, tmp_path, restore_jax_cache_flags):
    monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)
    monkeypatch.setenv(xla_options.CACHE_ENV, "1")
    assert xla_options.enable_compilation_cache(False) is None
    monkeypatch.setenv(xla_options.CACHE_ENV, str(tmp_path / "c"))
    jax.config.update("jax_compilation_cache_dir", None)
    assert xla_options.enable_compilation_cache(True) == tmp_path / "c"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "c")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == (
        xla_options.CACHE_MIN_COMPILE_SECS
    )
    assert (tmp_path / "c").is_dir()


def test_config_field():
    assert PerfConfig().compilation_cache is True
    assert load_config(None, ["perf.compilation_cache=false"]).perf.compilation_cache is False
    with pytest.raises(ConfigError, match="perf.compilation_cache"):
        load_config(None, ["perf.compilation_cache=sometimes"])


def _train(model: Path, out: Path, name: str, cache: Path) -> None:
    env = dict(os.environ)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env[xla_options.CACHE_ENV] = str(cache)
    # Every compilation is cached: a program whose compile time straddles the 0.1 s threshold
    # would otherwise be written by one run and not the other (load-dependent).
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    sets = tiny_overrides(model, out, name, "federated.rounds=2", "eval.every=1")
    args = [sys.executable, "-m", "ffa_jax.cli", "train", "--no-progress"]
    for s in sets:
        args += ["--set", s]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]


def test_second_identical_cli_run_compiles_nothing_new(tmp_path):
    model = tiny_model_dir(tmp_path / "tiny")
    cache = tmp_path / "cache"
    _train(model, tmp_path / "runs", "first", cache)
    first = sorted(p.name for p in cache.iterdir())
    # The round and evaluation executables were written ...
    assert any(n.startswith("jit_round_fn") for n in first), first
    assert any(n.startswith("jit_eval_fn") for n in first), first
    _train(model, tmp_path / "runs", "second", cache)
    # ... and the second run found every executable it needed: nothing new was compiled
    # above the cache's threshold (a miss would have added an entry).
    assert sorted(p.name for p in cache.iterdir()) == first
