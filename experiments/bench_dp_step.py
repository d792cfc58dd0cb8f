"""DP client update vs non-DP client update (FFA-LoRA), timed interleaved in one process.

Run it against two checkouts to compare implementations of the DP core on the same machine:

    PYTHONPATH=/path/to/checkout python experiments/bench_dp_step.py --model minilm

Prints JSON: the median seconds of each variant and the DP / non-DP ratio per micro-batch
size. The batch is a padded Poisson batch (real examples first, ``--fill`` of B_max real),
as ``data.batching`` lays it out, so micro-batching skips the all-padding tail.
"""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ffa_jax import bench, lora
from ffa_jax.config import LoRAConfig
from ffa_jax.federated.client import DpParams, make_client_update
from ffa_jax.models.objectives import classification_loss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm", choices=sorted(bench.MODELS))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--fill", type=float, default=0.5)
    ap.add_argument("--microbatch", type=int, nargs="+", default=[0, 8])
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    spec = bench.BenchSpec(model=a.model, batch_size=a.batch, seq_len=a.seq, local_steps=a.steps)
    module, params = bench.random_encoder(spec)
    loss_fn = classification_loss(module)
    lp = lora.init(params, LoRAConfig(mode="ffa", rank=spec.rank), jax.random.key(1))
    trainable, frozen = lora.split(lp, lora.trainable_mask(lp, "ffa"))
    batch = jax.tree_util.tree_map(
        lambda x: x[0], bench.random_batches(spec, 1, bench.MODELS[a.model]["vocab_size"])
    )
    real = int(round(a.fill * a.batch))
    batch["mask"] = np.broadcast_to(np.arange(a.batch) < real, batch["mask"].shape).copy()
    dp = DpParams(jnp.float32(1.0), jnp.float32(1.0), jnp.float32(real))
    args = (trainable, frozen, batch, dp, jax.random.key(0))
    fns = {}
    for mb in a.microbatch:
        for private in (False, True):
            cu = jax.jit(
                make_client_update(
                    loss_fn, optax.sgd(0.1), private=private, microbatch_size=mb or None
                ),
                compiler_options=spec.compiler_options,
            )
            name = f"mb{mb}_{'dp' if private else 'nodp'}"
            fns[name] = lambda cu=cu: cu(*args)
            jax.block_until_ready(fns[name]())  # compile
    med = bench.round_robin(fns, a.repeats)
    out = {"args": vars(a), "median_s": med}
    out["dp_over_nodp"] = {mb: med[f"mb{mb}_dp"] / med[f"mb{mb}_nodp"] for mb in a.microbatch}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
