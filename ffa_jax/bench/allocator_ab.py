"""``ffa-jax bench --allocator-ab``: the FFA DP client update on the system malloc and on
tcmalloc, side by side.

The allocator is fixed when a process starts, so each runs in its own worker process (same
spec, same compiled program, same inputs). The workers compile and warm up first; then the
parent asks them in turn for one timed client update, ``repeats`` times each, so that a change
of machine load hits both alike and only one computes at a time. Each worker also reports the
minor page faults and the kernel CPU time of its step: the cost that tcmalloc removes (see
:mod:`ffa_jax.allocator`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

from ffa_jax import allocator
from ffa_jax.errors import ConfigError

SETTINGS = ("system", "tcmalloc")


def _worker_env(setting: str) -> dict[str, str]:
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in (allocator.ENV_CHOICE, allocator.ENV_DONE, "LD_PRELOAD")
    }
    if setting == "system":
        return {**base, allocator.ENV_CHOICE: "system"}
    env = allocator.preload_environ({**base, allocator.ENV_CHOICE: "tcmalloc"})
    assert env is not None  # tcmalloc was found by allocator_ab before any worker started
    return env


def require_tcmalloc() -> None:
    """Raises ConfigError unless this is Linux with a tcmalloc to preload (checked by the CLI
    before any compute, and again here for library callers)."""
    if allocator.find_tcmalloc() is None or not sys.platform.startswith("linux"):
        raise ConfigError(
            f"bench --allocator-ab needs tcmalloc on Linux; {allocator.INSTALL_HINT}, "
            "or drop --allocator-ab."
        )


def allocator_ab(spec, timeout_s: float = 1800.0) -> dict[str, Any]:
    """Median seconds of the FFA DP client update (``spec``'s batch, local steps and
    ``cpu_library_fusion``) per allocator, alternating between one worker process each.

    Returns ``{setting: {"client_update_s", "relative", "minor_faults_per_update",
    "kernel_cpu_s_per_update", "allocator"}, "repeats": n}`` with ``relative`` the median over
    the system allocator's. ``allocator`` is what the worker found itself running on.

    Raises:
        ConfigError: no tcmalloc on this machine (the A/B would compare the system with itself).
    """
    require_tcmalloc()
    spec_json = json.dumps(dataclasses.asdict(spec))
    workers = {
        s: subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys; from ffa_jax.bench.allocator_ab import worker; worker(sys.argv[1])",
                spec_json,
            ],
            env=_worker_env(s),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for s in SETTINGS
    }
    try:
        # Both compile and warm up at once (not timed), then say which malloc they run on.
        found = {s: json.loads(_line(w, timeout_s))["allocator"] for s, w in workers.items()}
        steps: dict[str, list[dict[str, float]]] = {s: [] for s in SETTINGS}
        for _ in range(spec.repeats):
            for s, w in workers.items():
                w.stdin.write("go\n")
                w.stdin.flush()
                steps[s].append(json.loads(_line(w, timeout_s)))
    finally:
        for w in workers.values():
            if w.stdin:
                w.stdin.close()
            try:
                w.wait(timeout=60)
            except subprocess.TimeoutExpired:
                w.kill()
    base = statistics.median(x["s"] for x in steps["system"])
    out: dict[str, Any] = {"repeats": spec.repeats}
    for s in SETTINGS:
        med = statistics.median(x["s"] for x in steps[s])
        out[s] = {
            "client_update_s": med,
            "relative": med / base,
            "minor_faults_per_update": statistics.median(x["minflt"] for x in steps[s]),
            "kernel_cpu_s_per_update": statistics.median(x["sys_s"] for x in steps[s]),
            "allocator": found[s],
        }
    return out


def _line(proc: subprocess.Popen, timeout_s: float) -> str:
    # A worker that dies (OOM, bad flag) closes its stdout: say so instead of hanging.
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout=timeout_s)
        raise RuntimeError(f"bench --allocator-ab worker exited with code {proc.returncode}")
    return line


def worker(spec_json: str) -> None:
    """Worker process: compile and warm up the FFA DP client update, print a ready line, then
    one JSON line per ``go`` on stdin: ``{"s", "minflt", "sys_s"}`` of one timed update."""
    import jax
    import optax

    from ffa_jax.bench.spec import BenchSpec, client_update_args, random_encoder
    from ffa_jax.federated.client import make_client_update
    from ffa_jax.models.objectives import classification_loss

    spec = BenchSpec(**json.loads(spec_json))
    module, params = random_encoder(spec)
    args = client_update_args(spec, params, "ffa")
    update = jax.jit(
        make_client_update(
            classification_loss(module), optax.sgd(0.1), private=True, clipping="vmap"
        ),
        compiler_options=spec.compiler_options,
    )
    jax.block_until_ready(update(*args))
    jax.block_until_ready(update(*args))
    print(json.dumps({"allocator": allocator.active()}), flush=True)
    for _ in sys.stdin:
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        jax.block_until_ready(update(*args))
        dt = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        print(
            json.dumps(
                {"s": dt, "minflt": r1.ru_minflt - r0.ru_minflt, "sys_s": r1.ru_stime - r0.ru_stime}
            ),
            flush=True,
        )


def to_markdown(ab: dict[str, Any]) -> list[str]:
    """The report section of an :func:`allocator_ab` result."""
    lines = [
        "## Host allocator A/B (FFA DP client update)",
        "",
        f"One worker process per allocator, timed alternately, {ab['repeats']} times each "
        "(medians). Faults and kernel CPU time are per client update.",
        "",
        "| allocator (found in the worker) | client update s | relative | minor page faults "
        "| kernel CPU s |",
        "|---|---|---|---|---|",
    ]
    for s in SETTINGS:
        r = ab[s]
        lines.append(
            f"| {s} ({r['allocator']}) | {r['client_update_s']:.3f} | {r['relative']:.3f} "
            f"| {r['minor_faults_per_update']:.0f} | {r['kernel_cpu_s_per_update']:.3f} |"
        )
    return lines
