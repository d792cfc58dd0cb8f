"""DP vs non-DP client step of FFA-LoRA on a stock ``nn.Dense`` MLP (``lora.attach``).

    PYTHONPATH=. python experiments/bench_stock_flax.py [WIDTH ...]

For each width: an MLP ``WIDTH -> WIDTH -> WIDTH -> 10`` (stock ``nn.Dense``), LoRA r=8 on
the two hidden kernels (``lora.attach``, FFA), one client update of 4 local steps at batch 64
(``make_client_update``), jitted, DP (per-example clipping + noise) and non-DP timed
alternately in this process (30 repeats each after one warm-up), median per local step.
"""

import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ffa_jax import lora
from ffa_jax.config import LoRAConfig
from ffa_jax.federated.client import DpParams, make_client_update

BATCH, STEPS, REPEATS = 64, 4, 30


def measure(width: int) -> dict[str, float]:
    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.relu(nn.Dense(width, name="query")(x))
            h = nn.relu(nn.Dense(width, name="value")(h))
            return nn.Dense(10, name="head")(h)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(STEPS, BATCH, width)).astype(np.float32)
    y = rng.integers(0, 10, (STEPS, BATCH)).astype(np.int32)
    model = MLP()
    params = model.init(jax.random.key(0), x[0, :1])["params"]
    spec = LoRAConfig(rank=8, targets="(query|value)/kernel")
    p = lora.attach(model, params, spec, jax.random.key(1), x[0, :1])
    trainable, frozen = lora.split(p, lora.trainable_mask(p, "ffa"))
    apply = lora.linen_apply(model, "ffa")

    def loss_fn(t, f, ex):
        logits = apply(lora.combine(t, f), ex["x"][None])[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, ex["y"])

    batches = {"x": x, "y": y, "mask": np.ones((STEPS, BATCH), bool)}
    dp = DpParams(jnp.float32(1.0), jnp.float32(1.0), jnp.float32(BATCH))
    fns = {
        private: jax.jit(make_client_update(loss_fn, optax.sgd(0.1), private=private))
        for private in (False, True)
    }
    compile_s = {}
    for private, f in fns.items():
        t0 = time.perf_counter()
        jax.block_until_ready(f(trainable, frozen, batches, dp, jax.random.key(2)))
        compile_s[private] = time.perf_counter() - t0
    times = {False: [], True: []}
    for i in range(REPEATS):
        for private, f in fns.items():  # alternate, so load changes hit both alike
            t0 = time.perf_counter()
            jax.block_until_ready(f(trainable, frozen, batches, dp, jax.random.key(i)))
            times[private].append(time.perf_counter() - t0)
    step = {k: float(np.median(v)) / STEPS for k, v in times.items()}
    return {
        "width": width,
        "nondp_ms": 1e3 * step[False],
        "dp_ms": 1e3 * step[True],
        "ratio": step[True] / step[False],
        "compile_s_nondp": compile_s[False],
        "compile_s_dp": compile_s[True],
    }


if __name__ == "__main__":
    widths = [int(w) for w in sys.argv[1:]] or [256, 1024]
    print(f"device: {jax.devices()[0].device_kind} ({jax.devices()[0].platform})")
    for w in widths:
        r = measure(w)
        print(
            f"width {w}: non-DP {r['nondp_ms']:.3f} ms/step, DP {r['dp_ms']:.3f} ms/step, "
            f"DP/non-DP {r['ratio']:.2f}x (first call incl. compile: "
            f"{r['compile_s_nondp']:.1f} s / {r['compile_s_dp']:.1f} s)"
        )
