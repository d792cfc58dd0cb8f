"""Compile-only XLA temp memory of one FFA DP round (the bench's ``memory_probe`` without
running it), optionally under an XLA:CPU library-fusion setting. Used for the K=k overshoot
analysis in ``experiments/results/bench/round_memory_overshoot.md``.

    python experiments/round_memory_probe.py K k [jax|off|dots] [--rb 8 --rl 64]
"""

from __future__ import annotations

import argparse
import json

from ffa_jax.bench import BenchSpec, random_encoder, round_setup
from ffa_jax.models.objectives import classification_loss

OPTS = {
    "jax": None,
    "off": {"xla_cpu_experimental_ynn_fusion_type": ""},
    "dots": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("clients", type=int)
    p.add_argument("chunk", type=int)
    p.add_argument("fusion", nargs="?", default="jax", choices=sorted(OPTS))
    p.add_argument("--model", default="minilm")
    p.add_argument("--rb", type=int, default=8)
    p.add_argument("--rl", type=int, default=64)
    a = p.parse_args()
    spec = BenchSpec(model=a.model, local_steps=1, round_batch_size=a.rb, round_seq_len=a.rl)
    module, params = random_encoder(spec)
    _, round_fn, args = round_setup(
        spec, module, params, classification_loss(module), a.clients, a.chunk
    )
    m = round_fn.lower(*args).compile(compiler_options=OPTS[a.fusion]).memory_analysis()
    print(
        json.dumps(
            {
                "K": a.clients,
                "k": a.chunk,
                "fusion": a.fusion,
                "rows": a.chunk * a.rb * a.rl,
                "temp_mb": round(m.temp_size_in_bytes / 2**20, 2),
                "args_out_mb": round(
                    (m.argument_size_in_bytes + m.output_size_in_bytes) / 2**20, 2
                ),
            }
        )
    )


if __name__ == "__main__":
    main()
