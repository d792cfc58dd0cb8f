"""DP vs non-DP client step of FFA-LoRA on stock Flax models (``lora.attach``).

    PYTHONPATH=. python experiments/bench_stock_flax.py [--model mlp|attention] [--mode ffa|lora]
        [WIDTH ...]

Models (stock ``flax.linen`` layers, LoRA r=8, FFA-LoRA unless ``--mode lora``):

* ``mlp``: ``nn.Dense`` ``WIDTH -> WIDTH -> WIDTH -> 10``, LoRA on the two hidden kernels, one
  feature vector per example;
* ``attention``: a ``nn.Dense`` embedding, one ``nn.MultiHeadDotProductAttention`` block
  (4 heads, ``WIDTH`` features) over 32 positions, mean pooling and a ``nn.Dense`` head,
  LoRA on the attention's query and value kernels (``nn.DenseGeneral``).

One client update of 4 local steps at batch 64 (``make_client_update``), jitted; the
non-private step, the DP step with the default clipping (``auto``: book-keeping on stock
layers) and the DP step with vmapped per-example gradients (``clipping="vmap"``) are timed
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

BATCH, STEPS, REPEATS, POSITIONS = 64, 4, 30, 32
VARIANTS = {"nondp": (False, "auto"), "dp": (True, "auto"), "dp_vmap": (True, "vmap")}


def build(kind: str, width: int):
    """``(module, sample input, x [STEPS, BATCH, ...], lora targets)``."""
    rng = np.random.default_rng(0)
    if kind == "mlp":

        class MLP(nn.Module):
            @nn.compact
            def __call__(self, x):
                h = nn.relu(nn.Dense(width, name="query")(x))
                h = nn.relu(nn.Dense(width, name="value")(h))
                return nn.Dense(10, name="head")(h)

        x = rng.normal(size=(STEPS, BATCH, width)).astype(np.float32)
        return MLP(), "(query|value)/kernel", x
    if kind == "attention":

        class Block(nn.Module):
            @nn.compact
            def __call__(self, x):
                h = nn.Dense(width, name="embed")(x)
                h = h + nn.MultiHeadDotProductAttention(num_heads=4, name="attn")(h)
                return nn.Dense(10, name="head")(jnp.mean(h, axis=-2))

        x = rng.normal(size=(STEPS, BATCH, POSITIONS, 16)).astype(np.float32)
        return Block(), "attn/(query|value)/kernel", x
    raise SystemExit(f"--model {kind!r}: use mlp or attention")


def measure(kind: str, width: int, mode: str = "ffa") -> dict[str, float]:
    model, targets, x = build(kind, width)
    y = np.random.default_rng(1).integers(0, 10, (STEPS, BATCH)).astype(np.int32)
    params = model.init(jax.random.key(0), x[0, :1])["params"]
    spec = LoRAConfig(rank=8, targets=targets)
    p = lora.attach(model, params, spec, jax.random.key(1), x[0, :1])
    trainable, frozen = lora.split(p, lora.trainable_mask(p, mode))
    apply = lora.linen_apply(model, mode)

    def loss_fn(t, f, ex):
        logits = apply(lora.combine(t, f), ex["x"][None])[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, ex["y"])

    batches = {"x": x, "y": y, "mask": np.ones((STEPS, BATCH), bool)}
    dp = DpParams(jnp.float32(1.0), jnp.float32(1.0), jnp.float32(BATCH))
    fns = {
        name: jax.jit(
            make_client_update(loss_fn, optax.sgd(0.1), private=private, clipping=clipping)
        )
        for name, (private, clipping) in VARIANTS.items()
    }
    compile_s = {}
    for name, f in fns.items():
        t0 = time.perf_counter()
        jax.block_until_ready(f(trainable, frozen, batches, dp, jax.random.key(2)))
        compile_s[name] = time.perf_counter() - t0
    times = {name: [] for name in fns}
    for i in range(REPEATS):
        for name, f in fns.items():  # alternate, so load changes hit all alike
            t0 = time.perf_counter()
            jax.block_until_ready(f(trainable, frozen, batches, dp, jax.random.key(i)))
            times[name].append(time.perf_counter() - t0)
    step_ms = {name: 1e3 * float(np.median(v)) / STEPS for name, v in times.items()}
    return {"width": width, "step_ms": step_ms, "compile_s": compile_s}


if __name__ == "__main__":
    args = sys.argv[1:]
    kind, mode = "mlp", "ffa"
    while args[:1] in (["--model"], ["--mode"]):
        if args[0] == "--model":
            kind = args[1]
        else:
            mode = args[1]
        args = args[2:]
    widths = [int(w) for w in args] or [256, 1024]
    device = f"{jax.devices()[0].device_kind} ({jax.devices()[0].platform})"
    print(f"device: {device}; model {kind}; mode {mode}")
    for w in widths:
        r = measure(kind, w, mode)
        ms = r["step_ms"]
        print(
            f"width {w}: non-DP {ms['nondp']:.3f} ms/step, DP {ms['dp']:.3f} ms/step "
            f"(DP/non-DP {ms['dp'] / ms['nondp']:.2f}x), DP with clipping=vmap "
            f"{ms['dp_vmap']:.3f} ms/step ({ms['dp_vmap'] / ms['nondp']:.2f}x); first call incl. "
            f"compile: {r['compile_s']['nondp']:.1f} / {r['compile_s']['dp']:.1f} / "
            f"{r['compile_s']['dp_vmap']:.1f} s"
        )
