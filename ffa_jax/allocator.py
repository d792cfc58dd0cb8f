"""The host memory allocator of the ``ffa-jax`` process: tcmalloc when the machine has it.

Why: XLA:CPU allocates each executable's temporary buffer anew on every call (659 MB for the
MiniLM FFA DP step at 32 x 128 tokens). glibc's malloc serves a block that size with a fresh
``mmap`` and returns it with ``munmap`` on free, so every step page-faults all of it in again
(168k minor faults and ~0.5 s of kernel time per 2-s step on 2 cores). tcmalloc keeps freed
memory and hands it back on the next call: the step takes 0.85x the time, with 3 faults
instead of 168k (``ffa-jax bench --allocator-ab``, one worker process per allocator timed
alternately; the committed run is ``experiments/results/bench/idle/``). The allocator cannot
be changed inside a running process, so the console entry point ``ffa-jax`` re-executes
itself once with ``LD_PRELOAD`` set, before JAX is imported.

Choice (environment variable, read only by the ``ffa-jax`` command, never by the library):

    FFA_JAX_ALLOCATOR=auto      tcmalloc if found, else the system allocator (default)
    FFA_JAX_ALLOCATOR=tcmalloc  tcmalloc or a clear error naming the package to install
    FFA_JAX_ALLOCATOR=system    never preload anything

tcmalloc comes from the OS: ``apt-get install libtcmalloc-minimal4`` (Debian, Ubuntu, Cloud
TPU VMs), ``dnf install gperftools-libs`` (RHEL, Fedora). Library users (notebooks, their own
scripts) get the same effect by starting Python with
``LD_PRELOAD=$(python -c "import ffa_jax.allocator as a; print(a.find_tcmalloc())")``.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from ffa_jax.errors import ConfigError

ENV_CHOICE = "FFA_JAX_ALLOCATOR"
CHOICES = ("auto", "tcmalloc", "system")
# Set by the re-executed process so that it never re-executes again, even if the preload
# failed (ld.so then only warns and starts the process with the system allocator).
ENV_DONE = "FFA_JAX_ALLOCATOR_PRELOADED"
INSTALL_HINT = (
    "install tcmalloc (Debian/Ubuntu: apt-get install libtcmalloc-minimal4; "
    "RHEL/Fedora: dnf install gperftools-libs)"
)

_SEARCH_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
)
_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
_KNOWN = {"tcmalloc": "tcmalloc", "jemalloc": "jemalloc", "mimalloc": "mimalloc"}


def find_tcmalloc(search_dirs: Sequence[str] = _SEARCH_DIRS) -> str | None:
    """Absolute path of a tcmalloc shared library on this machine, or None.

    Looks in the usual library directories first, then asks the dynamic linker's cache
    (``ctypes.util.find_library``); the minimal build (no heap profiler) is preferred.
    """
    for d in search_dirs:
        for name in _NAMES:
            p = Path(d) / name
            if p.is_file():
                return str(p)
    for stem in ("tcmalloc_minimal", "tcmalloc"):
        found = ctypes.util.find_library(stem)
        if found:
            for d in search_dirs:  # find_library returns a soname; LD_PRELOAD wants a path
                if (Path(d) / found).is_file():
                    return str(Path(d) / found)
            return found
    return None


def active() -> str:
    """The malloc this process runs on: ``tcmalloc``, ``jemalloc``, ``mimalloc`` or
    ``system``, read from the libraries mapped into it (``/proc/self/maps``, Linux)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    for key, name in _KNOWN.items():
        if f"lib{key}" in maps:
            return name
    return "system"


def choice(environ: Mapping[str, str]) -> str:
    """The validated ``FFA_JAX_ALLOCATOR`` value (default ``auto``)."""
    value = environ.get(ENV_CHOICE, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ConfigError(
            f"{ENV_CHOICE}={environ[ENV_CHOICE]!r} is not one of {', '.join(CHOICES)}; "
            "unset it to use tcmalloc when the machine has it."
        )
    return value


def preload_environ(
    environ: Mapping[str, str], *, platform: str = sys.platform, library: str | None = None
) -> dict[str, str] | None:
    """The environment to re-execute ``ffa-jax`` with, or None to run as is.

    Pure apart from the library search (``library`` overrides it, for tests). None when the
    choice is ``system``, on a platform without ``LD_PRELOAD`` (not Linux), when this process
    is already the re-executed one, or when tcmalloc is already preloaded.

    Raises:
        ConfigError: ``FFA_JAX_ALLOCATOR`` is invalid, or is ``tcmalloc`` and none is found.
    """
    want = choice(environ)
    if want == "system" or environ.get(ENV_DONE) or not platform.startswith("linux"):
        return None
    if any(f"lib{key}" in environ.get("LD_PRELOAD", "") for key in _KNOWN):
        return None  # the user chose an allocator already
    lib = library if library is not None else find_tcmalloc()
    if lib is None:
        if want == "tcmalloc":
            raise ConfigError(
                f"{ENV_CHOICE}=tcmalloc but no tcmalloc library was found; {INSTALL_HINT}, "
                f"or set {ENV_CHOICE}=system."
            )
        return None
    env = dict(environ)
    env["LD_PRELOAD"] = ":".join(x for x in (lib, environ.get("LD_PRELOAD", "")) if x)
    env[ENV_DONE] = lib
    # tcmalloc reports every allocation over 1 GB on stderr by default; XLA's temporary
    # buffer of a large round is routinely bigger, and the report is noise there.
    env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))
    return env


def reexec_with_tcmalloc(argv: Sequence[str] | None = None) -> None:
    """Replace this process by itself with tcmalloc preloaded, when :func:`preload_environ`
    says so; otherwise return. Call it first thing in a console entry point, never from
    library code (``os.execve`` keeps the PID but discards everything in the process).

    ``argv`` is the interpreter command line to replay (default ``sys.orig_argv``, which
    covers both the ``ffa-jax`` script and ``python -m ffa_jax.cli``).
    """
    env = preload_environ(os.environ)
    if env is None or not sys.executable:
        return
    args = list(sys.orig_argv if argv is None else argv)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *args[1:]], env)
    except OSError:
        return  # cannot re-execute (e.g. a sandbox forbids exec): run on the system malloc


def describe(backend: str, environ: Mapping[str, str] = os.environ) -> str:
    """One log line: the allocator in use and, on XLA:CPU with the system malloc, how to get
    tcmalloc (nothing to add if the user chose ``system``)."""
    name = active()
    line = f"host allocator: {name}"
    if name == "tcmalloc" and environ.get(ENV_DONE):
        line += f" ({environ[ENV_DONE]})"
    if name == "system" and backend == "cpu" and sys.platform.startswith("linux"):
        if environ.get(ENV_CHOICE, "auto").strip().lower() != "system":
            line += (
                f"; XLA:CPU steps run faster on tcmalloc ({INSTALL_HINT}; the ffa-jax command "
                f"then uses it; {ENV_CHOICE}=system silences this)"
            )
    return line
