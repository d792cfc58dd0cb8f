"""``ffa-jax bench``: side-by-side timings of one process, reported as ratios.

Measures, on one model and one batch shape, the jitted client update (``local_steps`` steps
of local training of one client, the unit a round is made of) in four variants — FFA-LoRA and
LoRA, each with DP-SGD (per-example clipping + noise) and without — plus a K-client round.
Each variant is compiled first (compile time reported separately), then timed ``repeats``
times; the median is reported. Absolute times are noisy on shared machines; the ratios
(DP / non-DP, LoRA / FFA) are measured back to back in one process and are the numbers to
compare. Peak memory is the process's max RSS (CPU) or device memory stats where available.
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
import jax.numpy as jnp
import numpy as np
import optax

from ffa_jax import lora
from ffa_jax.config import LoRAConfig, ServerConfig
from ffa_jax.federated.client import DpParams, make_client_update
from ffa_jax.federated.round import make_round
from ffa_jax.federated.server import make_server_optimizer, server_init
from ffa_jax.models.encoder import EncoderClassifier, EncoderConfig
from ffa_jax.models.layers import cast_frozen_weights
from ffa_jax.models.objectives import classification_loss

TINY = dict(vocab_size=1000, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128)
MINILM = dict(vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536)
ROBERTA_BASE = dict(
    vocab_size=50265, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072
)
MODELS = {"tiny": TINY, "minilm": MINILM, "roberta-base": ROBERTA_BASE}


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchSpec:
    model: str = "minilm"  # random weights of that shape (timings do not depend on values)
    batch_size: int = 32
    seq_len: int = 64
    local_steps: int = 2
    clients: int = 3
    rank: int = 8
    repeats: int = 5
    # The K-client round's per-client batch (0 = batch_size / seq_len): cross-device FL uses
    # small client batches, where vmapping clients pays on CPU.
    round_batch_size: int = 0
    round_seq_len: int = 0
    clients_per_chunk: int = 0  # of the timed round (0 = all K clients vmapped at once)
    # model.dtype: "bfloat16" stores the frozen trunk and computes in bf16 (LoRA stays float32).
    dtype: str = "float32"

    @property
    def round_batch(self) -> tuple[int, int]:
        return (self.round_batch_size or self.batch_size, self.round_seq_len or self.seq_len)


def _encoder(spec: BenchSpec):
    family = "roberta" if spec.model.startswith("roberta") else "bert"
    cfg = EncoderConfig(
        family=family,
        max_position_embeddings=max(512, spec.seq_len + 2),
        type_vocab_size=2 if family == "bert" else 1,
        layer_norm_eps=1e-12,
        pad_token_id=1 if family == "roberta" else 0,
        num_labels=2,
        **MODELS[spec.model],
    )
    dtype = jnp.bfloat16 if spec.dtype == "bfloat16" else jnp.float32
    module = EncoderClassifier(cfg, dtype=dtype)
    ids = jnp.ones((1, spec.seq_len), jnp.int32)
    params = module.init(jax.random.key(0), ids, ids)["params"]
    if dtype != jnp.float32:
        params = cast_frozen_weights(params, dtype)
    return module, params


def _batches(
    spec: BenchSpec, k: int, vocab: int, batch: tuple[int, int] | None = None
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    batch_size, seq_len = batch or (spec.batch_size, spec.seq_len)
    shape = (k, spec.local_steps, batch_size)
    return {
        "input_ids": rng.integers(2, vocab, size=shape + (seq_len,)).astype(np.int32),
        "attention_mask": np.ones(shape + (seq_len,), np.int32),
        "label": rng.integers(0, 2, size=shape).astype(np.int32),
        "mask": np.ones(shape, bool),
    }


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


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _round_setup(spec: BenchSpec, module, params, loss_fn, k: int, chunk: int):
    """A jitted FFA DP round over ``k`` clients at the round batch; returns (call, round_fn)."""
    lp = lora.init(params, LoRAConfig(mode="ffa", rank=spec.rank), jax.random.key(1))
    trainable, frozen = lora.split(lp, lora.trainable_mask(lp, "ffa"))
    cu = make_client_update(loss_fn, optax.sgd(0.1), private=True)
    opt = make_server_optimizer(ServerConfig())
    round_fn = make_round(cu, opt, clients_per_chunk=chunk)
    batches = _batches(spec, k, MODELS[spec.model]["vocab_size"], spec.round_batch)
    dpk = DpParams(jnp.ones(k), jnp.ones(k), jnp.full((k,), float(spec.round_batch[0])))
    state = server_init(trainable, opt)
    args = (state, frozen, batches, jnp.ones(k), jnp.arange(k), dpk, jax.random.key(0))
    return (lambda: round_fn(*args)[0].trainable), round_fn, args


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


def memory_probe(spec: BenchSpec, clients: int, chunk: int) -> dict[str, Any]:
    """Memory of one K-client round in *this* process (run it in a fresh one).

    ``setup_rss_mb``: resident set once the weights and batches exist, before compiling;
    ``run_peak_rss_mb``: the highest resident set sampled (every 2 ms) while two compiled
    rounds run, so compiler memory is excluded; ``run_extra_mb`` is that minus the resident
    set just before the rounds; ``max_rss_mb``: the process's max RSS including compilation;
    ``temp_mb``: XLA's compiled temporary buffer size of the round (its activations),
    independent of what else the process holds.
    """
    module, params = _encoder(spec)
    call, round_fn, args = _round_setup(
        spec, module, params, classification_loss(module), clients, chunk
    )
    setup_rss = _current_rss_mb()
    compiled = round_fn.lower(*args).compile()
    stats = compiled.memory_analysis()
    temp_mb = None if stats is None else stats.temp_size_in_bytes / 2**20
    jax.block_until_ready(call())  # fills the jit cache (same executable)
    before = _current_rss_mb()
    with _RssSampler() as sampler:
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        round_s = time.perf_counter() - t0
        jax.block_until_ready(call())
    return {
        "clients": clients,
        "clients_per_chunk": chunk or clients,
        "setup_rss_mb": setup_rss,
        "run_peak_rss_mb": sampler.peak_mb,
        "run_extra_mb": sampler.peak_mb - before,
        "max_rss_mb": _hwm_rss_mb(),
        "temp_mb": temp_mb,
        "round_s": round_s,
    }


def run_memory_probes(spec: BenchSpec, settings: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """Runs :func:`memory_probe` for each ``(K, k)`` in its own subprocess (clean max RSS)."""
    out = []
    for clients, chunk in settings:
        code = (
            "import json, sys; from ffa_jax.bench import BenchSpec, memory_probe; "
            "s = BenchSpec(**json.loads(sys.argv[1])); "
            "print(json.dumps(memory_probe(s, int(sys.argv[2]), int(sys.argv[3]))))"
        )
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                code,
                json.dumps(dataclasses.asdict(spec)),
                str(clients),
                str(chunk),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"memory probe K={clients} k={chunk} failed:\n{proc.stderr}")
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def run_bench(
    spec: BenchSpec,
    *,
    reference: bool = False,
    threads: int | None = None,
    memory: list[tuple[int, int]] | None = None,
) -> dict[str, Any]:
    """Runs every variant and returns a JSON-able report with times and ratios.

    ``reference``: also time the PyTorch Opacus+PEFT reference (:mod:`ffa_jax.bench_torch`)
    on the same shapes with ``threads`` torch threads. ``memory``: ``(K, k)`` settings whose
    round memory is measured, each in a fresh subprocess.
    """
    module, params = _encoder(spec)
    vocab = MODELS[spec.model]["vocab_size"]
    loss_fn = classification_loss(module)
    one = jax.tree_util.tree_map(lambda x: x[0], _batches(spec, 1, vocab))
    results: dict[str, Any] = {}
    for mode in ("ffa", "lora"):
        lp = lora.init(params, LoRAConfig(mode=mode, rank=spec.rank), jax.random.key(1))
        trainable, frozen = lora.split(lp, lora.trainable_mask(lp, mode))
        for private in (False, True):
            cu = jax.jit(make_client_update(loss_fn, optax.sgd(0.1), private=private))
            dp = DpParams(jnp.float32(1.0), jnp.float32(1.0), jnp.float32(spec.batch_size))
            compile_s, median = _time(
                lambda cu=cu, t=trainable, f=frozen, dp=dp: cu(t, f, one, dp, jax.random.key(0)),
                spec.repeats,
            )
            name = f"{mode}_{'dp' if private else 'nodp'}"
            results[name] = {
                "compile_s": compile_s,
                "client_update_s": median,
                "step_s": median / spec.local_steps,
                "examples_per_s": spec.batch_size * spec.local_steps / median,
                "uplink_bytes": lora.tree_bytes(trainable),
            }
    # One round with K clients (FFA, DP) in one jit, clients vmapped in chunks.
    k = spec.clients
    round_call, round_fn, _ = _round_setup(spec, module, params, loss_fn, k, spec.clients_per_chunk)
    compile_s, median = _time(round_call, spec.repeats)
    results["round_ffa_dp"] = {
        "clients": k,
        "clients_per_chunk": spec.clients_per_chunk or k,
        "batch": list(spec.round_batch),
        "compile_s": compile_s,
        "round_s": median,
        "recompiles_after_first": round_fn._cache_size() - 1,
    }
    r = results
    ratios = {
        "ffa_dp_over_nodp": r["ffa_dp"]["client_update_s"] / r["ffa_nodp"]["client_update_s"],
        "lora_dp_over_nodp": r["lora_dp"]["client_update_s"] / r["lora_nodp"]["client_update_s"],
        "lora_over_ffa_dp": r["lora_dp"]["client_update_s"] / r["ffa_dp"]["client_update_s"],
        "uplink_lora_over_ffa": r["lora_dp"]["uplink_bytes"] / r["ffa_dp"]["uplink_bytes"],
    }
    if spec.round_batch == (spec.batch_size, spec.seq_len):
        ratios["round_over_k_sequential_clients"] = r["round_ffa_dp"]["round_s"] / (
            k * r["ffa_dp"]["client_update_s"]
        )
    report: dict[str, Any] = {
        "spec": dataclasses.asdict(spec),
        "machine": machine_info(),
        "results": results,
        "ratios": ratios,
        "peak_rss_mb": _peak_rss_mb(),
    }
    if reference:
        from ffa_jax.bench_torch import default_threads, run_reference

        ref = run_reference(
            shape=MODELS[spec.model],
            rank=spec.rank,
            alpha=float(LoRAConfig().alpha),
            batch_size=spec.batch_size,
            seq_len=spec.seq_len,
            round_batch_size=spec.round_batch[0],
            round_seq_len=spec.round_batch[1],
            local_steps=spec.local_steps,
            clients=k,
            repeats=spec.repeats,
            threads=threads or default_threads(),
        )
        report["reference"] = ref
        # Speed-ups: reference time / ffa_jax time (> 1 means ffa_jax is faster).
        ratios["speedup_vs_torch_client_dp"] = (
            ref["ffa_dp"]["client_update_s"] / r["ffa_dp"]["client_update_s"]
        )
        ratios["speedup_vs_torch_round_dp"] = (
            ref["round_ffa_dp"]["round_s"] / r["round_ffa_dp"]["round_s"]
        )
    if memory:
        report["memory"] = run_memory_probes(spec, memory)
    report["machine"]["loadavg_end"] = list(os.getloadavg())
    return report


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
        "loadavg_start": list(os.getloadavg()),
    }


def to_markdown(report: dict[str, Any]) -> str:
    s, m = report["spec"], report["machine"]
    rb, rl = s["round_batch_size"] or s["batch_size"], s["round_seq_len"] or s["seq_len"]
    load = ", ".join(f"{x:.1f}" for x in m["loadavg_start"])
    lines = [
        f"# ffa-jax bench: {s['model']}, batch {s['batch_size']} x {s['seq_len']} tokens, "
        f"{s['local_steps']} local steps, r={s['rank']}, {s.get('dtype', 'float32')}",
        "",
        f"Machine: {m['platform']}, {m['cpus']} CPUs ({m['usable_cores']} usable), "
        f"JAX {m['jax']} ({m['backend']}, {m['devices']} devices). "
        f"Median of {s['repeats']} runs after compile; peak RSS {report['peak_rss_mb']:.0f} MB. "
        f"Load average at start: {load} (1/5/15 min).",
    ]
    if report.get("command"):
        lines += ["", f"Command: `{report['command']}` at commit `{report.get('commit', '?')}`."]
    lines += [
        "",
        "| variant | compile s | client update s | examples/s | uplink bytes |",
        "|---|---|---|---|---|",
    ]
    for name in ("ffa_nodp", "ffa_dp", "lora_nodp", "lora_dp"):
        r = report["results"][name]
        lines.append(
            f"| {name} | {r['compile_s']:.2f} | {r['client_update_s']:.3f} "
            f"| {r['examples_per_s']:.1f} | {r['uplink_bytes']:,} |"
        )
    rr = report["results"]["round_ffa_dp"]
    lines += [
        "",
        f"Round of {rr['clients']} FFA DP clients ({rb} x {rl} each, chunks of "
        f"{rr['clients_per_chunk']}) in one jit: {rr['round_s']:.3f} s "
        f"(compile {rr['compile_s']:.2f} s, recompiles after the first: "
        f"{rr['recompiles_after_first']}).",
    ]
    ref = report.get("reference")
    if ref:
        lines += [
            "",
            f"PyTorch reference (torch {ref['torch']}, peft {ref['peft']}, opacus "
            f"{ref['opacus']}, {ref['torch_threads']} torch threads; XLA:CPU uses "
            f"{m['usable_cores']} cores): Opacus+PEFT FFA DP client update "
            f"{ref['ffa_dp']['client_update_s']:.3f} s; sequential round of "
            f"{ref['round_ffa_dp']['clients']} clients {ref['round_ffa_dp']['round_s']:.3f} s.",
        ]
    mem = report.get("memory")
    if mem:
        lines += [
            "",
            f"Round memory vs K and chunk k ({rb} x {rl} per client; each row a fresh "
            "subprocess. XLA temp = the compiled round's temporary buffers (activations); "
            "setup RSS = weights + batches before compiling; run peak = highest RSS sampled "
            "every 2 ms while two compiled rounds run (+ = above the RSS just before); "
            "max RSS includes the compiler):",
            "",
            "| K | k | XLA temp MB | setup RSS MB | run peak RSS MB (+) | max RSS MB | round s |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in mem:
            temp = "n/a" if r["temp_mb"] is None else f"{r['temp_mb']:.0f}"
            lines.append(
                f"| {r['clients']} | {r['clients_per_chunk']} | {temp} "
                f"| {r['setup_rss_mb']:.0f} | {r['run_peak_rss_mb']:.0f} "
                f"(+{r['run_extra_mb']:.0f}) | {r['max_rss_mb']:.0f} | {r['round_s']:.3f} |"
            )
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in report["ratios"].items()]
    if max(m["loadavg_start"][0], report["machine"].get("loadavg_end", [0])[0]) > 0.5 * max(
        m["usable_cores"], 1
    ):
        lines += [
            "",
            "The machine was shared with other jobs during this run (see the load average): "
            "absolute times and the ratios are noisy. Each ratio compares two measurements "
            "of the same process taken close together, so it is the number to compare, but "
            "treat differences below ~20 % as noise.",
        ]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = report["spec"]
    stem = f"bench_{spec['model']}_b{spec['batch_size']}_l{spec['seq_len']}"
    if spec.get("dtype", "float32") != "float32":
        stem += f"_{spec['dtype']}"
    j, md = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    for path, text in ((j, json.dumps(report, indent=2)), (md, to_markdown(report))):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return j, md
