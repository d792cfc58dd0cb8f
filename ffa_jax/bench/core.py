"""``ffa-jax bench``: side-by-side timings of one process, reported as ratios.

Measures, on one model and one batch shape, the jitted client update (``local_steps`` steps
of local training of one client, the unit a round is made of) in four variants — FFA-LoRA and
LoRA, each with DP-SGD (per-example clipping + noise) and without — plus a K-client round.
Each variant is compiled first (compile time reported separately), then all are timed in
turn, ``repeats`` rounds; the median is reported. Absolute times are noisy on shared machines;
the ratios (DP / non-DP, LoRA / FFA, ffa_jax / torch) are measured interleaved in one process
and are the numbers to compare. Memory is reported two ways: XLA's buffer sizes of each compiled executable
(``memory_analysis()``: temporary buffers = activations, arguments, outputs), which do not
depend on the load or on what else the process holds, and the process's resident set.
MB means 2^20 bytes throughout.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import optax

from ffa_jax import allocator, lora, xla_options
from ffa_jax.bench.spec import (
    MODELS,
    BenchSpec,
    client_update_args,
    model_flops_per_example,
    peak_tflops,
    random_encoder,
    round_setup,
)
from ffa_jax.config import LoRAConfig
from ffa_jax.federated.client import make_client_update
from ffa_jax.models.objectives import classification_loss


def _time(fn, repeats: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return compile_s, statistics.median(times)


def round_robin(fns: dict[str, Any], repeats: int) -> dict[str, float]:
    """Median seconds of each (warm) callable, timed in turn ``repeats`` rounds over all, so
    that a change of machine load hits all alike. Non-JAX results (torch tensors, None) are
    fine: ``jax.block_until_ready`` leaves them as they are."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def compiled_memory(jitted, *args) -> dict[str, float] | None:
    """XLA's buffer sizes of ``jitted`` compiled for ``args``, in MB (2^20 bytes).

    ``temp_mb``: temporary buffers (activations, per-example gradients); ``argument_mb`` and
    ``output_mb``: the inputs and results; ``total_mb``: all three minus donated (aliased)
    bytes, the executable's peak. ``None`` where the backend does not report them. After a
    call with the same shapes the executable comes from jit's cache: nothing recompiles.
    """
    stats = jitted.lower(*args).compile().memory_analysis()
    if stats is None:
        return None
    temp, arg = stats.temp_size_in_bytes, stats.argument_size_in_bytes
    out, alias = stats.output_size_in_bytes, stats.alias_size_in_bytes
    return {
        "temp_mb": temp / 2**20,
        "argument_mb": arg / 2**20,
        "output_mb": out / 2**20,
        "total_mb": (temp + arg + out - alias) / 2**20,
    }


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _hwm_rss_mb() -> float:
    """This process's own peak RSS (VmHWM). Unlike ``ru_maxrss``, which Linux carries over
    from the parent across fork + exec, it starts afresh in a new program."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return _peak_rss_mb()


class _RssSampler:
    """Polls this process's resident set in a thread: the peak over a window of time."""

    def __init__(self, period_s: float = 0.002):
        self.period_s, self.peak_mb = period_s, _current_rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, _current_rss_mb())
            time.sleep(self.period_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, _current_rss_mb())


# Default largest XLA total (MB) a memory probe runs; larger settings are only compiled. With
# the ~0.5 GB of weights and runtime and the allocator's slack, 6 GiB of buffers keeps a probe
# under ~7.5 GB resident.
MEMORY_BUDGET_MB = 6144.0


def memory_probe(
    spec: BenchSpec, clients: int, chunk: int, budget_mb: float = MEMORY_BUDGET_MB
) -> dict[str, Any]:
    """Memory of one K-client round in *this* process (run it in a fresh one). MB = 2^20 bytes.

    ``xla``: :func:`compiled_memory` of the round (``temp_mb`` = its activations, independent
    of what else the process holds); ``weights_mb``: the shared frozen tree plus the server
    state, the part of the arguments every client shares; ``per_client_mb``: one client's
    batch plus its delta (the upload), which the round holds for every client. When ``xla["total_mb"]`` exceeds
    ``budget_mb`` (0 = no limit) the round is compiled only (``ran`` False) and the resident-
    set fields are ``None``. Otherwise: ``setup_rss_mb``, the resident set once the weights
    and batches exist, before compiling; ``run_peak_rss_mb``, the highest resident set sampled
    (every 2 ms) while two compiled rounds run, so compiler memory is excluded;
    ``run_extra_mb``, that minus the resident set just before the rounds; ``max_rss_mb``, the
    process's max RSS including compilation; ``round_s``, one round's wall time.
    """
    module, params = random_encoder(spec)
    call, round_fn, args = round_setup(
        spec, module, params, classification_loss(module), clients, chunk
    )
    state, frozen, inputs = args[:3]
    batches = inputs.batches
    out: dict[str, Any] = {
        "clients": clients,
        "clients_per_chunk": chunk or clients,
        "weights_mb": (lora.tree_bytes(frozen) + lora.tree_bytes(state)) / 2**20,
        # What the round holds per client whatever k: its batch and its delta (the upload).
        "per_client_mb": (lora.tree_bytes(batches) / clients + lora.tree_bytes(state.trainable))
        / 2**20,
    }
    setup_rss = _current_rss_mb()
    xla = compiled_memory(round_fn, *args)
    ran = budget_mb <= 0 or xla is None or xla["total_mb"] <= budget_mb
    out.update(xla=xla, ran=ran, setup_rss_mb=setup_rss)
    if not ran:
        none = dict.fromkeys(("run_peak_rss_mb", "run_extra_mb", "max_rss_mb", "round_s"))
        return {**out, **none}
    jax.block_until_ready(call())  # the executable compiled above, from jit's cache
    before = _current_rss_mb()
    with _RssSampler() as sampler:
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        round_s = time.perf_counter() - t0
        jax.block_until_ready(call())
    return {
        **out,
        "run_peak_rss_mb": sampler.peak_mb,
        "run_extra_mb": sampler.peak_mb - before,
        "max_rss_mb": _hwm_rss_mb(),
        "round_s": round_s,
    }


def _probe_subprocess(spec: BenchSpec, clients: int, chunk: int, budget_mb: float) -> dict:
    """:func:`memory_probe` in a fresh interpreter (a clean max RSS); a failure (say, killed
    for memory) is returned as ``{"error": ...}`` so the other settings still get measured."""
    code = (
        "import json, sys; from ffa_jax.bench.core import BenchSpec, memory_probe; "
        "s = BenchSpec(**json.loads(sys.argv[1])); "
        "print(json.dumps(memory_probe(s, int(sys.argv[2]), int(sys.argv[3]), "
        "float(sys.argv[4]))))"
    )
    argv = [json.dumps(dataclasses.asdict(spec)), str(clients), str(chunk), str(budget_mb)]
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-5:]
        return {
            "clients": clients,
            "clients_per_chunk": chunk or clients,
            "error": f"exit code {proc.returncode}: " + " / ".join(tail),
        }
    return json.loads(proc.stdout.strip().splitlines()[-1])


# Slack of the chunk bound for the O(K) scalars a round keeps (keys, metrics, DP parameters).
CHUNK_BOUND_SLACK_MB = 1.0


def chunk_bound(probe: dict[str, Any], single_temp_mb: float) -> dict[str, float] | None:
    """The chunking target of one probe, in MB.

    ``bound_mb = k x single_temp_mb + arguments + outputs`` (``single_temp_mb``: a single-
    client round's temporary buffers; arguments and outputs: shared weights, server state,
    the K batches, the new state and metrics); ``ratio = total / bound``, ``excess_mb =
    total - bound``. A round also keeps, whatever k, every client's delta (the uploads it
    averages) and a chunked copy of its batch, for K rounded up to whole chunks:
    ``per_client_allowance_mb`` is that plus :data:`CHUNK_BOUND_SLACK_MB`; an excess within
    it is not activation memory growing with K.
    """
    xla = probe.get("xla")
    if not xla:
        return None
    k = probe["clients_per_chunk"]
    shared = xla["argument_mb"] + xla["output_mb"]
    bound = k * single_temp_mb + shared
    padded = -(-probe["clients"] // k) * k
    return {
        "bound_mb": bound,
        "ratio": xla["total_mb"] / bound,
        "excess_mb": xla["total_mb"] - bound,
        "per_client_allowance_mb": padded * probe["per_client_mb"] + CHUNK_BOUND_SLACK_MB,
    }


def run_memory_probes(
    spec: BenchSpec, settings: list[tuple[int, int]], budget_mb: float = MEMORY_BUDGET_MB
) -> list[dict[str, Any]]:
    """Runs :func:`memory_probe` for each ``(K, k)``, each in its own subprocess.

    The single-client round ``(1, 1)`` is always probed first: every row's
    :func:`chunk_bound` (stored under ``"chunk_bound"``) refers to its XLA temp size.
    Settings whose compiled round exceeds ``budget_mb`` are compiled, not run.
    """
    ordered = [(1, 1)] + sorted(set(settings) - {(1, 1)})
    out = [_probe_subprocess(spec, clients, chunk, budget_mb) for clients, chunk in ordered]
    single = out[0].get("xla")
    for probe in out:
        probe["chunk_bound"] = chunk_bound(probe, single["temp_mb"]) if single else None
    return out


def run_bench(
    spec: BenchSpec,
    *,
    reference: bool = False,
    threads: int | None = None,
    memory: list[tuple[int, int]] | None = None,
    memory_budget_mb: float = MEMORY_BUDGET_MB,
    fusion_ab: list[str] | None = None,
    allocator_ab: bool = False,
    peak: float | None = None,
) -> dict[str, Any]:
    """Runs every variant and returns a JSON-able report with times, memory and ratios.

    Every timed variant also reports its model FLOP rate (:func:`model_flops_per_example`)
    and, where the device's dense peak is known (``peak`` TFLOP/s, else
    :data:`ffa_jax.bench.spec.PEAK_TFLOPS` by device kind and dtype), its model-FLOPs
    utilisation ``mfu``.

    ``reference``: also time the PyTorch Opacus+PEFT reference (:mod:`ffa_jax.bench.torch_ref`)
    on the same shapes with ``threads`` torch threads. ``memory``: ``(K, k)`` settings whose
    round memory is measured, each in a fresh subprocess (see :func:`run_memory_probes`;
    those above ``memory_budget_mb`` MB of XLA buffers are compiled, not run).
    ``fusion_ab``: ``perf.cpu_library_fusion`` settings whose FFA DP client updates are timed
    against each other (:func:`library_fusion_ab`). ``allocator_ab``: time the FFA DP client
    update on the system malloc against tcmalloc, in two worker processes
    (:func:`ffa_jax.bench.allocator_ab.allocator_ab`).
    """
    # The probes go first, while this process holds no model, so that its resident set and
    # a probe's never add up beyond the probe's own.
    probes = run_memory_probes(spec, memory, memory_budget_mb) if memory else None
    module, params = random_encoder(spec)
    loss_fn = classification_loss(module)
    results: dict[str, Any] = {}
    timed: dict[str, Any] = {}
    for mode in ("ffa", "lora"):
        args = client_update_args(spec, params, mode)
        trainable = args[0]
        # clipping="vmap": the project's encoder calls lora.dense, so this is the path ffa-jax
        # train runs (and "auto" would only add a probe trace to the compile time measured).
        for private in (False, True):
            cu = jax.jit(
                make_client_update(loss_fn, optax.sgd(0.1), private=private, clipping="vmap"),
                compiler_options=spec.compiler_options,
            )
            name = f"{mode}_{'dp' if private else 'nodp'}"
            timed[name] = lambda cu=cu, args=args: cu(*args)
            t0 = time.perf_counter()
            jax.block_until_ready(timed[name]())
            results[name] = {
                "compile_s": time.perf_counter() - t0,
                "uplink_bytes": lora.tree_bytes(trainable),
                "xla": compiled_memory(cu, *args),
            }
    device = jax.devices()[0]
    peak_source = "--peak-tflops" if peak is not None else "PEAK_TFLOPS"
    peak = peak if peak is not None else peak_tflops(device.device_kind, spec.dtype)

    def flop_rate(flops: float, seconds: float) -> dict[str, float | None]:
        rate = flops / seconds
        return {
            "model_gflop_per_s": rate / 1e9,
            "mfu": None if peak is None else rate / (peak * 1e12),
        }

    # Timed round-robin, so that DP / non-DP and LoRA / FFA compare under the same load.
    for name, median in round_robin(timed, spec.repeats).items():
        examples = spec.batch_size * spec.local_steps
        results[name].update(
            client_update_s=median,
            step_s=median / spec.local_steps,
            examples_per_s=examples / median,
            **flop_rate(model_flops_per_example(spec, name.split("_")[0]) * examples, median),
        )
    # One round with K clients (FFA, DP) in one jit, clients vmapped in chunks.
    k = spec.clients
    round_call, round_fn, round_args = round_setup(
        spec, module, params, loss_fn, k, spec.clients_per_chunk
    )
    compile_s, median = _time(round_call, spec.repeats)
    results["round_ffa_dp"] = {
        "clients": k,
        "clients_per_chunk": spec.clients_per_chunk or k,
        "batch": list(spec.round_batch),
        "compile_s": compile_s,
        "round_s": median,
        "recompiles_after_first": round_fn._cache_size() - 1,
        "xla": compiled_memory(round_fn, *round_args),
        **flop_rate(
            model_flops_per_example(spec, "ffa", spec.round_batch[1])
            * spec.round_batch[0]
            * spec.local_steps
            * k,
            median,
        ),
    }
    r = results
    ratios = {
        "ffa_dp_over_nodp": r["ffa_dp"]["client_update_s"] / r["ffa_nodp"]["client_update_s"],
        "lora_dp_over_nodp": r["lora_dp"]["client_update_s"] / r["lora_nodp"]["client_update_s"],
        "lora_over_ffa_dp": r["lora_dp"]["client_update_s"] / r["ffa_dp"]["client_update_s"],
        "uplink_lora_over_ffa": r["lora_dp"]["uplink_bytes"] / r["ffa_dp"]["uplink_bytes"],
        **_memory_ratios(results),
    }
    if spec.round_batch == (spec.batch_size, spec.seq_len):
        ratios["round_over_k_sequential_clients"] = r["round_ffa_dp"]["round_s"] / (
            k * r["ffa_dp"]["client_update_s"]
        )
    report: dict[str, Any] = {
        "spec": dataclasses.asdict(spec),
        "machine": machine_info(),
        "peak_tflops": {
            "value": peak,
            "source": None if peak is None else peak_source,
            "device_kind": device.device_kind,
            "dtype": spec.dtype,
        },
        "results": results,
        "ratios": ratios,
        "peak_rss_mb": _peak_rss_mb(),
    }
    if reference:
        from ffa_jax.bench.torch_ref import default_threads, make_reference

        info, torch_client, torch_round = make_reference(
            shape=MODELS[spec.model],
            rank=spec.rank,
            alpha=float(LoRAConfig().alpha),
            batch_size=spec.batch_size,
            seq_len=spec.seq_len,
            round_batch_size=spec.round_batch[0],
            round_seq_len=spec.round_batch[1],
            local_steps=spec.local_steps,
            clients=k,
            threads=threads or default_threads(),
        )
        # Interleaved (ffa_jax, torch, ffa_jax, torch, ...) so that both see the same load.
        client = round_robin({"jax": timed["ffa_dp"], "torch": torch_client}, spec.repeats)
        round_ = round_robin({"jax": round_call, "torch": torch_round}, spec.repeats)
        ref_flops = model_flops_per_example(spec, "ffa") * spec.batch_size * spec.local_steps
        report["reference"] = {
            **info,
            "ffa_dp": {
                "client_update_s": client["torch"],
                "ffa_jax_s": client["jax"],
                "model_gflop_per_s": ref_flops / client["torch"] / 1e9,
            },
            "round_ffa_dp": {"clients": k, "round_s": round_["torch"], "ffa_jax_s": round_["jax"]},
            "paired_repeats": spec.repeats,
        }
        # Speed-ups: reference time / ffa_jax time (> 1 means ffa_jax is faster).
        ratios["speedup_vs_torch_client_dp"] = client["torch"] / client["jax"]
        ratios["speedup_vs_torch_round_dp"] = round_["torch"] / round_["jax"]
    if fusion_ab:
        report["cpu_library_fusion_ab"] = library_fusion_ab(spec, fusion_ab, (module, params))
    if allocator_ab:
        from ffa_jax.bench.allocator_ab import allocator_ab as run_allocator_ab

        report["allocator_ab"] = run_allocator_ab(spec)
    if probes is not None:
        report["memory"], report["memory_budget_mb"] = probes, memory_budget_mb
    report["machine"]["loadavg_end"] = list(os.getloadavg())
    return report


def library_fusion_ab(spec: BenchSpec, settings: list[str], model=None) -> dict[str, Any]:
    """The FFA DP client update compiled under each ``perf.cpu_library_fusion`` setting and
    timed round-robin (``spec.repeats`` rounds), with its XLA temp memory (MB).

    Returns ``{setting: {"client_update_s", "relative", "temp_mb", "compiler_options"}}``;
    ``relative`` is the median time over the first setting's. On a non-CPU backend every
    setting compiles alike (the options are CPU-only). ``model``: ``(module, params)`` of
    :func:`encoder`, when the caller has them already."""
    module, params = model or random_encoder(spec)
    args = client_update_args(spec, params, "ffa")
    loss_fn = classification_loss(module)
    update = make_client_update(loss_fn, optax.sgd(0.1), private=True, clipping="vmap")
    compiled, options = {}, {}
    for setting in settings:
        options[setting] = xla_options.compiler_options(setting, "encoder")
        jitted = jax.jit(update, compiler_options=options[setting])
        compiled[setting] = jitted.lower(*args).compile()
        jax.block_until_ready(compiled[setting](*args))
    medians = round_robin(
        {setting: (lambda fn=fn: fn(*args)) for setting, fn in compiled.items()}, spec.repeats
    )
    first = medians[settings[0]]
    out = {}
    for setting in settings:
        stats = compiled[setting].memory_analysis()
        out[setting] = {
            "client_update_s": medians[setting],
            "relative": medians[setting] / first,
            "temp_mb": None if stats is None else stats.temp_size_in_bytes / 2**20,
            "compiler_options": options[setting],
        }
    return out


def _memory_ratios(results: dict[str, Any]) -> dict[str, float]:
    """DP / non-DP XLA temporary-buffer size of the client update, per mode: what DP-SGD's
    per-example gradients cost in activation memory (weights and batch are the same)."""
    out = {}
    for mode in ("ffa", "lora"):
        dp, nodp = results[f"{mode}_dp"]["xla"], results[f"{mode}_nodp"]["xla"]
        if dp and nodp and nodp["temp_mb"] > 0:
            out[f"{mode}_dp_over_nodp_memory"] = dp["temp_mb"] / nodp["temp_mb"]
    return out


def machine_info() -> dict[str, Any]:
    """The machine and software a report was measured on, with the load when it started."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpus": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": len(jax.devices()),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "allocator": allocator.active(),
        "loadavg_start": list(os.getloadavg()),
    }


def _mb(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def _variants_md(report: dict[str, Any]) -> list[str]:
    lines = [
        "| variant | compile s | client update s | examples/s | model GFLOP/s | MFU "
        "| uplink bytes | XLA temp MB | XLA total MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("ffa_nodp", "ffa_dp", "lora_nodp", "lora_dp"):
        r = report["results"][name]
        xla = r.get("xla") or {}
        lines.append(
            f"| {name} | {r['compile_s']:.2f} | {r['client_update_s']:.3f} "
            f"| {r['examples_per_s']:.1f} | {_gflops(r)} | {_mfu(r)} | {r['uplink_bytes']:,} "
            f"| {_mb(xla.get('temp_mb'))} | {_mb(xla.get('total_mb'))} |"
        )
    peak = report.get("peak_tflops") or {}
    return lines + [
        "",
        "Model GFLOP/s: the model FLOPs of the step (forward, the backward's data gradients and "
        "the LoRA factors' gradients; ffa_jax.bench.spec.model_flops_per_example) per second. "
        "MFU: that over the device's dense peak"
        + (
            f" ({peak['value']:g} TFLOP/s, {peak['source']})."
            if peak.get("value")
            else f" (unknown for {peak.get('device_kind', '?')!r}: pass --peak-tflops)."
        ),
        "",
        "XLA temp = the compiled client update's temporary buffers (activations and, with DP, "
        "per-example gradients); total = temp + arguments (weights, batch) + outputs. "
        "MB = 2^20 bytes. These come from the compiled executable and do not depend on load.",
    ]


def _gflops(r: dict[str, Any]) -> str:
    v = r.get("model_gflop_per_s")
    return "-" if v is None else f"{v:.1f}"


def _mfu(r: dict[str, Any]) -> str:
    v = r.get("mfu")
    return "-" if v is None else f"{100 * v:.1f}%"


def _round_md(report: dict[str, Any], rb: int, rl: int) -> list[str]:
    rr = report["results"]["round_ffa_dp"]
    temp = (rr.get("xla") or {}).get("temp_mb")
    return [
        f"Round of {rr['clients']} FFA DP clients ({rb} x {rl} each, chunks of "
        f"{rr['clients_per_chunk']}) in one jit: {rr['round_s']:.3f} s "
        f"(compile {rr['compile_s']:.2f} s, recompiles after the first: "
        f"{rr['recompiles_after_first']}; XLA temp {_mb(temp)} MB); model GFLOP/s "
        f"{_gflops(rr)}, MFU {_mfu(rr)}.",
    ]


def _reference_md(ref: dict[str, Any], m: dict[str, Any]) -> list[str]:
    c, r = ref["ffa_dp"], ref["round_ffa_dp"]
    return [
        f"PyTorch reference (torch {ref['torch']}, peft {ref['peft']}, opacus "
        f"{ref['opacus']}, on {ref.get('device', 'cpu')}, {ref['torch_threads']} torch threads; "
        f"XLA:CPU uses {m['usable_cores']} cores), timed alternately with ffa_jax "
        f"({ref.get('paired_repeats', '?')} pairs, medians): Opacus+PEFT FFA DP client update "
        f"{c['client_update_s']:.3f} s ({_gflops(c)} model GFLOP/s) vs ffa_jax "
        f"{c.get('ffa_jax_s', float('nan')):.3f} s; "
        f"sequential round of {r['clients']} clients {r['round_s']:.3f} s vs ffa_jax's "
        f"one-jit round {r.get('ffa_jax_s', float('nan')):.3f} s.",
    ]


def _fusion_md(ab: dict[str, Any]) -> list[str]:
    lines = [
        "perf.cpu_library_fusion (XLA:CPU matmul kernels), FFA DP client update compiled "
        "under each setting in this process and timed round-robin:",
        "",
        "| setting | compiler options | client update s | relative | XLA temp MB |",
        "|---|---|---|---|---|",
    ]
    for name, r in ab.items():
        lines.append(
            f"| {name} | `{r['compiler_options'] or 'jax defaults'}` | "
            f"{r['client_update_s']:.3f} | {r['relative']:.3f} | {_mb(r['temp_mb'])} |"
        )
    return lines


def _memory_row(r: dict[str, Any]) -> str:
    k, c = r["clients"], r["clients_per_chunk"]
    if "error" in r:
        return f"| {k} | {c} | failed: {r['error'][:200]} |" + " |" * 8
    xla, cb = r.get("xla") or {}, r.get("chunk_bound") or {}
    ratio = "n/a" if not cb else f"{cb['ratio']:.3f}"
    cells = [str(k), str(c), _mb(xla.get("temp_mb")), _mb(xla.get("total_mb"))]
    cells += [_mb(cb.get("bound_mb")), ratio]
    if r["ran"]:
        cells += [
            f"{r['setup_rss_mb']:.0f}",
            f"{r['run_peak_rss_mb']:.0f} (+{r['run_extra_mb']:.0f})",
            f"{r['max_rss_mb']:.0f}",
            f"{r['round_s']:.3f}",
        ]
    else:
        cells += [f"{r['setup_rss_mb']:.0f}", "not run (compiled only)", "", ""]
    return "| " + " | ".join(cells) + " |"


def _setting(r: dict[str, Any]) -> str:
    return f"K={r['clients']} k={r['clients_per_chunk']}"


def _chunk_target_md(mem: list[dict[str, Any]]) -> list[str]:
    bounds = [(r, r["chunk_bound"]) for r in mem if r.get("chunk_bound")]
    if not bounds:
        return []
    strict = [_setting(r) for r, b in bounds if b["ratio"] <= 1]
    within = [_setting(r) for r, b in bounds if 0 < b["excess_mb"] <= b["per_client_allowance_mb"]]
    beyond = [
        f"{_setting(r)} (ratio {b['ratio']:.3f}, {b['excess_mb']:+.1f} MB)"
        for r, b in bounds
        if b["excess_mb"] > b["per_client_allowance_mb"]
    ]
    parts = []
    if strict:
        parts.append("met for " + ", ".join(strict))
    if within:
        parts.append(
            "met up to the per-client uploads and batches the round holds whatever k "
            f"(K x {mem[0].get('per_client_mb', 0):.3f} MB + {CHUNK_BOUND_SLACK_MB:.0f} MB) "
            "for " + ", ".join(within)
        )
    parts.append("NOT met for " + ", ".join(beyond) if beyond else "no row beyond that")
    return [
        "",
        'Target "round memory with k-client chunks <= k x single-client + shared weights" '
        "(XLA total / bound <= 1): " + "; ".join(parts) + ".",
    ]


def _memory_md(mem: list[dict[str, Any]], rb: int, rl: int, budget: float | None) -> list[str]:
    lines = [
        f"Round memory vs K and chunk k ({rb} x {rl} per client; each row a fresh "
        "subprocess; MB = 2^20 bytes). XLA temp = the compiled round's temporary buffers "
        "(activations); XLA total = temp + arguments (weights, state, batches) + outputs; "
        "bound = k x the single-client round's (K=1) XLA temp + this round's arguments and "
        "outputs; setup RSS = weights + batches before compiling; run peak = highest RSS "
        "sampled every 2 ms while two compiled rounds run (+ = above the RSS just before); "
        "max RSS includes the compiler."
        + (
            f" Rounds above {budget:.0f} MB of XLA buffers are compiled, not run." if budget else ""
        ),
        "",
        "| K | k | XLA temp MB | XLA total MB | bound MB | total / bound "
        "| setup RSS MB | run peak RSS MB (+) | max RSS MB | round s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_memory_row(r) for r in mem]
    return lines + _chunk_target_md(mem)


def _noise_note(report: dict[str, Any]) -> list[str]:
    m = report["machine"]
    load = max(m["loadavg_start"][0], m.get("loadavg_end", [0])[0])
    if load <= 0.5 * max(m["usable_cores"], 1):
        return []
    return [
        "",
        "The machine was shared with other jobs during this run (see the load average): "
        "absolute times and the timing ratios are noisy. Each ratio compares two measurements "
        "of the same process taken close together, so it is the number to compare, but "
        "treat differences below ~20 % as noise. The XLA memory numbers do not depend on load.",
    ]


def to_markdown(report: dict[str, Any]) -> str:
    s, m = report["spec"], report["machine"]
    rb, rl = s["round_batch_size"] or s["batch_size"], s["round_seq_len"] or s["seq_len"]
    load = ", ".join(f"{x:.1f}" for x in m["loadavg_start"])
    lines = [
        f"# ffa-jax bench: {s['model']}, batch {s['batch_size']} x {s['seq_len']} tokens, "
        f"{s['local_steps']} local steps, r={s['rank']}, {s.get('dtype', 'float32')}",
        "",
        f"Machine: {m['platform']}, {m['cpus']} CPUs ({m['usable_cores']} usable), "
        f"JAX {m['jax']} ({m['backend']}, {m['devices']} devices), "
        f"host allocator {m.get('allocator', 'system')}. "
        f"Median of {s['repeats']} runs after compile; peak RSS {report['peak_rss_mb']:.0f} MB. "
        f"Load average at start: {load} (1/5/15 min).",
    ]
    if report.get("command"):
        lines += ["", f"Command: `{report['command']}` at commit `{report.get('commit', '?')}`."]
    lines += ["", *_variants_md(report), "", *_round_md(report, rb, rl)]
    if report.get("reference"):
        lines += ["", *_reference_md(report["reference"], m)]
    if report.get("cpu_library_fusion_ab"):
        lines += ["", *_fusion_md(report["cpu_library_fusion_ab"])]
    if report.get("allocator_ab"):
        from ffa_jax.bench.allocator_ab import to_markdown as allocator_md

        lines += ["", *allocator_md(report["allocator_ab"])]
    if report.get("memory"):
        lines += ["", *_memory_md(report["memory"], rb, rl, report.get("memory_budget_mb"))]
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in report["ratios"].items()]
    lines += _noise_note(report)
    return "\n".join(lines) + "\n"


def report_stem(spec: dict[str, Any]) -> str:
    """``bench_MODEL_bB_lL_rRBxRL[_DTYPE]``: the file name of a report, with its batch shapes
    (client update ``B x L``, round ``RB x RL`` per client) and a non-float32 compute dtype, so
    reports of other shapes or dtypes do not clash."""
    rb = spec["round_batch_size"] or spec["batch_size"]
    rl = spec["round_seq_len"] or spec["seq_len"]
    stem = f"bench_{spec['model']}_b{spec['batch_size']}_l{spec['seq_len']}_r{rb}x{rl}"
    if spec.get("dtype", "float32") != "float32":
        stem += f"_{spec['dtype']}"
    return stem


def write_report(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = report_stem(report["spec"])
    j, md = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    for path, text in ((j, json.dumps(report, indent=2)), (md, to_markdown(report))):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return j, md
