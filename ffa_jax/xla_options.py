"""XLA compile options of the training jits (``perf.cpu_library_fusion``), CPU only.

In jax 0.10 (the version measured), XLA:CPU hands each matmul, together with the elementwise
ops around it, to the YNNPACK library ("library fusion"). For the backward pass of an encoder's or a ViT's DP step
that is slower than XLA's own kernels on a 2-core AVX2 CPU, and above 4096 token rows per
matmul it merges the FFN, GELU and LayerNorm backward into one fusion whose ~30 inputs are all
live at once, so memory stops scaling linearly with the batch
(``experiments/results/bench/round_memory_overshoot.md``). For a LLaMA decoder, YNNPACK
matmuls without their elementwise neighbours are best. FFA DP client update, each setting
compiled in one process and timed round-robin on the same inputs (the MiniLM column: two runs
of ``ffa-jax bench --fusion-ab jax,dots,off``, docs/benchmarks.md; the others: one scratch
A/B run each):

=========================  ==================  =================  ==========================
setting                    MiniLM 32 x 128     ViT-B/16, 4 images SmolLM2-135M shape,
                           time, XLA temp                         12 layers, 4 x 128
=========================  ==================  =================  ==========================
``jax`` (jax's default)    1.00, 1084 MB       1.00, 632 MB       1.00, 466 MB
``dots``                   0.89-0.94, 659 MB   1.02, 438 MB       0.97, 442 MB
``off``                    0.81-0.84, 659 MB   0.94, 438 MB       1.15 - 1.32, 442 MB
=========================  ==================  =================  ==========================

``auto`` therefore picks ``off`` for encoders and ViTs and ``dots`` for decoders. Results are
identical up to float rounding (the same math, other kernels); the setting never changes
privacy. It applies only when the jits compile for CPU; GPU and TPU ignore it. An explicit
``--xla_cpu_experimental_ynn_fusion_type`` in ``XLA_FLAGS`` wins over it, and a jaxlib
without that option (older or newer than the ones measured) compiles with its defaults.

Also here: JAX's persistent compilation cache (:func:`enable_compilation_cache`), which
``ffa-jax train`` turns on by default (``perf.compilation_cache``) so that a second run of the
same shapes loads the round's and the evaluation's executables from disk instead of compiling
them again. It changes no result: a cache entry is keyed by the program, the compile options,
the backend and the jax/jaxlib versions.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import jax

from ffa_jax.config import CPU_LIBRARY_FUSIONS
from ffa_jax.fileio import cache_switch, user_cache_dir

_OPTION = "xla_cpu_experimental_ynn_fusion_type"
_VALUES = {"off": "", "dots": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
# What ``auto`` means per model family (ffa_jax.workloads.Workload.family).
_AUTO = {"encoder": "off", "vit": "off", "llama": "dots"}


@functools.cache
def _option_supported() -> bool:
    # Probed once per process with a trivial compile: jaxlib rejects unknown option names.
    try:
        jax.jit(lambda x: x + 1, compiler_options={_OPTION: ""}).lower(1.0).compile()
    except Exception:  # noqa: BLE001 - any failure means: do not pass the option
        return False
    return True


def resolve(setting: str, family: str) -> str:
    """The concrete setting (``jax``, ``dots`` or ``off``) of ``setting`` for ``family``."""
    if setting not in CPU_LIBRARY_FUSIONS:
        raise ValueError(f"cpu_library_fusion={setting!r}: use one of {CPU_LIBRARY_FUSIONS}.")
    return _AUTO.get(family, "jax") if setting == "auto" else setting


def compiler_options(setting: str = "auto", family: str = "encoder") -> dict[str, str] | None:
    """``compiler_options`` for ``jax.jit`` of a training step or round, or None (defaults).

    Args:
      setting: ``perf.cpu_library_fusion``: ``auto``, ``jax`` (XLA's default), ``dots``
        (YNNPACK for matmuls only) or ``off`` (XLA's own kernels).
      family: the model family (``encoder``, ``vit``, ``llama``) that ``auto`` decides for.
    """
    concrete = resolve(setting, family)
    if concrete == "jax" or jax.default_backend() != "cpu":
        return None
    if f"--{_OPTION}" in os.environ.get("XLA_FLAGS", ""):
        return None
    if not _option_supported():
        return None
    return {_OPTION: _VALUES[concrete]}


# ----------------------------------------------------------------------------- compilation cache

# Environment switch: 0 / false / off / no disables the cache; any other value except 1 / true /
# on / yes is the cache directory.
CACHE_ENV = "FFA_JAX_COMPILATION_CACHE"
# Executables that took at least this long to compile are cached. The round and evaluation
# jits take seconds; 0.1 s leaves out the many tiny eager-dispatch programs, whose disk round
# trip would cost about what compiling them does.
CACHE_MIN_COMPILE_SECS = 0.1


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/ffa_jax/jax_cache`` (``~/.cache/ffa_jax/jax_cache`` without it)."""
    return user_cache_dir() / "jax_cache"


def enable_compilation_cache(enabled: bool = True, path: str | Path | None = None) -> Path | None:
    """Turns on JAX's persistent compilation cache; returns its directory (None: off).

    Call it before the first compilation of the process (``ffa-jax train`` does, with
    ``perf.compilation_cache``); a library user may call it the same way. Off when ``enabled``
    is false or the environment variable ``FFA_JAX_COMPILATION_CACHE`` is ``0`` / ``off``.
    The directory is, in order: ``path``; ``FFA_JAX_COMPILATION_CACHE`` when it names one;
    JAX's own ``JAX_COMPILATION_CACHE_DIR`` / ``jax_compilation_cache_dir`` when already set
    (left as the user configured it, thresholds included); :func:`default_cache_dir`. A
    directory that cannot be created leaves the cache off. Programs that took at least
    :data:`CACHE_MIN_COMPILE_SECS` to compile are cached, unless
    ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` is set (then JAX's reading of it stands).
    """
    on, folder = cache_switch(CACHE_ENV)
    if not enabled or not on:
        return None
    if path is None and folder is not None:
        path = folder
    if path is None and jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    target = Path(path) if path is not None else default_cache_dir()
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(target))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # a user's value wins
        jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_SECS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return target
