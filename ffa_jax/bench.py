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
    module = EncoderClassifier(cfg)
    ids = jnp.ones((1, spec.seq_len), jnp.int32)
    params = module.init(jax.random.key(0), ids, ids)["params"]
    return module, params


def _batches(spec: BenchSpec, k: int, vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shape = (k, spec.local_steps, spec.batch_size)
    return {
        "input_ids": rng.integers(2, vocab, size=shape + (spec.seq_len,)).astype(np.int32),
        "attention_mask": np.ones(shape + (spec.seq_len,), np.int32),
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


def run_bench(spec: BenchSpec) -> dict[str, Any]:
    """Runs every variant and returns a JSON-able report with times and ratios."""
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
    # One round with K clients (FFA, DP): vmapped clients in one jit.
    lp = lora.init(params, LoRAConfig(mode="ffa", rank=spec.rank), jax.random.key(1))
    trainable, frozen = lora.split(lp, lora.trainable_mask(lp, "ffa"))
    cu = make_client_update(loss_fn, optax.sgd(0.1), private=True)
    opt = make_server_optimizer(ServerConfig())
    round_fn = make_round(cu, opt)
    k = spec.clients
    batches = _batches(spec, k, vocab)
    dpk = DpParams(jnp.ones(k), jnp.ones(k), jnp.full((k,), float(spec.batch_size)))
    state = server_init(trainable, opt)
    compile_s, median = _time(
        lambda: (
            round_fn(state, frozen, batches, jnp.ones(k), jnp.arange(k), dpk, jax.random.key(0))[
                0
            ].trainable
        ),
        spec.repeats,
    )
    results["round_ffa_dp"] = {
        "clients": k,
        "compile_s": compile_s,
        "round_s": median,
        "recompiles_after_first": round_fn._cache_size() - 1,
    }
    r = results
    return {
        "spec": dataclasses.asdict(spec),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "devices": len(jax.devices()),
        },
        "results": results,
        "ratios": {
            "ffa_dp_over_nodp": r["ffa_dp"]["client_update_s"] / r["ffa_nodp"]["client_update_s"],
            "lora_dp_over_nodp": r["lora_dp"]["client_update_s"]
            / r["lora_nodp"]["client_update_s"],
            "lora_over_ffa_dp": r["lora_dp"]["client_update_s"] / r["ffa_dp"]["client_update_s"],
            "round_over_k_sequential_clients": r["round_ffa_dp"]["round_s"]
            / (k * r["ffa_dp"]["client_update_s"]),
            "uplink_lora_over_ffa": r["lora_dp"]["uplink_bytes"] / r["ffa_dp"]["uplink_bytes"],
        },
        "peak_rss_mb": _peak_rss_mb(),
    }


def to_markdown(report: dict[str, Any]) -> str:
    s, m = report["spec"], report["machine"]
    lines = [
        f"# ffa-jax bench: {s['model']}, batch {s['batch_size']} x {s['seq_len']} tokens, "
        f"{s['local_steps']} local steps, r={s['rank']}",
        "",
        f"Machine: {m['platform']}, {m['cpus']} CPUs, JAX {m['jax']} ({m['backend']}, {m['devices']} devices). "
        f"Median of {s['repeats']} runs after compile; peak RSS {report['peak_rss_mb']:.0f} MB.",
        "",
        "| variant | compile s | client update s | examples/s | uplink bytes |",
        "|---|---|---|---|---|",
    ]
    for name in ("ffa_nodp", "ffa_dp", "lora_nodp", "lora_dp"):
        r = report["results"][name]
        lines.append(
            f"| {name} | {r['compile_s']:.2f} | {r['client_update_s']:.3f} | {r['examples_per_s']:.1f} | {r['uplink_bytes']:,} |"
        )
    rr = report["results"]["round_ffa_dp"]
    lines += [
        "",
        f"Round of {rr['clients']} FFA DP clients in one jit: {rr['round_s']:.3f} s "
        f"(compile {rr['compile_s']:.2f} s, recompiles after the first: {rr['recompiles_after_first']}).",
        "",
        "| ratio | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.3f} |" for k, v in report["ratios"].items()]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"bench_{report['spec']['model']}_b{report['spec']['batch_size']}_l{report['spec']['seq_len']}"
    j, md = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    for path, text in ((j, json.dumps(report, indent=2)), (md, to_markdown(report))):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return j, md
