"""float32 vs bfloat16 FFA DP client update, interleaved in one process (load drift cancels).

    python experiments/bench_dtype.py [--model minilm] [--batch-size 32] [--seq-len 64] [--repeats 7]

Compiles both variants of :func:`ffa_jax.bench.run_bench`'s ``ffa_dp`` client update (random
weights of the bench's model shapes, r=8, 2 local steps), then times them alternately
(f32, bf16, f32, bf16, ...) and prints the medians and their ratio as one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

from ffa_jax import lora
from ffa_jax.bench import MODELS, BenchSpec, machine_info, random_batches, random_encoder
from ffa_jax.config import LoRAConfig
from ffa_jax.federated.client import DpParams, make_client_update
from ffa_jax.models.objectives import classification_loss


def _client_update(spec: BenchSpec):
    module, params = random_encoder(spec)
    lp = lora.init(params, LoRAConfig(mode="ffa", rank=spec.rank), jax.random.key(1))
    trainable, frozen = lora.split(lp, lora.trainable_mask(lp, "ffa"))
    cu = jax.jit(make_client_update(classification_loss(module), optax.sgd(0.1), private=True))
    one = jax.tree_util.tree_map(
        lambda x: x[0], random_batches(spec, 1, MODELS[spec.model]["vocab_size"])
    )
    dp = DpParams(jnp.float32(1.0), jnp.float32(1.0), jnp.float32(spec.batch_size))
    return lambda: cu(trainable, frozen, one, dp, jax.random.key(0))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="minilm")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args()
    base = BenchSpec(model=a.model, batch_size=a.batch_size, seq_len=a.seq_len, repeats=a.repeats)
    fns, compile_s, times = {}, {}, {}
    for dtype in ("float32", "bfloat16"):
        fns[dtype] = _client_update(dataclasses.replace(base, dtype=dtype))
        t0 = time.perf_counter()
        jax.block_until_ready(fns[dtype]())
        compile_s[dtype], times[dtype] = time.perf_counter() - t0, []
    for _ in range(a.repeats):
        for dtype, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[dtype].append(time.perf_counter() - t0)
    med = {d: statistics.median(t) for d, t in times.items()}
    print(
        json.dumps(
            {
                "spec": {k: v for k, v in dataclasses.asdict(base).items() if k != "dtype"},
                "command": "python experiments/bench_dtype.py " + " ".join(sys.argv[1:]),
                "compile_s": compile_s,
                "ffa_dp_client_update_s": med,
                "bf16_over_f32": med["bfloat16"] / med["float32"],
                "machine": machine_info(),
            }
        )
    )


if __name__ == "__main__":
    main()
