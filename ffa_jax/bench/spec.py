"""The bench's workload: model shapes, :class:`BenchSpec`, the random-weight encoder, the
random batches and the jitted client update / round arguments every timed variant gets.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ffa_jax import lora, xla_options
from ffa_jax.config import LoRAConfig, ServerConfig
from ffa_jax.federated.client import DpParams, make_client_update
from ffa_jax.federated.round import RoundInputs, make_round
from ffa_jax.federated.server import make_server_optimizer, server_init
from ffa_jax.models.encoder import EncoderClassifier, EncoderConfig
from ffa_jax.models.layers import cast_frozen_weights

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
    # perf.cpu_library_fusion of the timed jits (ffa_jax.xla_options; "auto" = the encoder's).
    cpu_library_fusion: str = "auto"

    @property
    def compiler_options(self) -> dict[str, str] | None:
        return xla_options.compiler_options(self.cpu_library_fusion, "encoder")

    @property
    def round_batch(self) -> tuple[int, int]:
        return (self.round_batch_size or self.batch_size, self.round_seq_len or self.seq_len)


# Dense peak FLOP/s (vendor datasheets, no sparsity), in TFLOP/s, by jax device_kind and the
# dtype of the frozen trunk's matmuls. float32 on NVIDIA counts TF32 tensor cores: XLA's
# default precision for float32 dots on Ampere and later. Others: pass --peak-tflops.
PEAK_TFLOPS = {
    "NVIDIA H100 80GB HBM3": {"float32": 494.7, "bfloat16": 989.4},
    "NVIDIA H200": {"float32": 494.7, "bfloat16": 989.4},
    "NVIDIA A100-SXM4-80GB": {"float32": 156.0, "bfloat16": 312.0},
    "NVIDIA A100-SXM4-40GB": {"float32": 156.0, "bfloat16": 312.0},
    "TPU v4": {"float32": 275.0, "bfloat16": 275.0},
    "TPU v5 lite": {"float32": 197.0, "bfloat16": 197.0},
}


def model_flops_per_example(spec: BenchSpec, mode: str, seq_len: int | None = None) -> float:
    """Model FLOPs of one example's DP-SGD (or SGD) step of the bench encoder: the forward
    pass, the backward pass's data gradients (the frozen trunk gets no weight gradient, so
    the backward costs one matmul per forward matmul), and the LoRA factors' gradients
    (FFA-LoRA: B; LoRA: A and B) on the query and value projections of every layer.

    Per token and layer: 2 (4 h^2 + 2 h i) for the projections and the feed-forward, 4 T h
    for the attention scores and values, 8 h r for the two low-rank branches; the pooler and
    head add 2 (h^2 + 2 h) per example. Per-example clipping and noise are not model FLOPs.
    Used for the model-FLOPs utilisation that ``ffa-jax bench`` reports (the standard MFU
    convention: useful FLOPs of the model, not what the compiled program executes).
    """
    m = MODELS[spec.model]
    h, i, layers = m["hidden_size"], m["intermediate_size"], m["num_layers"]
    t, r = seq_len or spec.seq_len, spec.rank
    per_token_layer = 2 * (4 * h * h + 2 * h * i) + 4 * t * h + 8 * h * r
    forward = layers * t * per_token_layer + 2 * (h * h + 2 * h)
    lora_grads = layers * t * 2 * (2 * r * h) * (2 if mode == "lora" else 1)
    return float(2 * forward + lora_grads)


def peak_tflops(device_kind: str, dtype: str) -> float | None:
    """The dense peak of :data:`PEAK_TFLOPS` for this device and dtype, or None (unknown,
    e.g. a CPU: pass ``--peak-tflops``)."""
    return PEAK_TFLOPS.get(device_kind, {}).get(dtype)


def random_encoder(spec: BenchSpec):
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


def random_batches(
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


def client_update_args(spec: BenchSpec, params, mode: str) -> tuple:
    """``(trainable, frozen, batch, dp, key)`` of one client update of ``mode`` (``ffa`` or
    ``lora``) on the bench's first client's batch: what every timed client update gets."""
    lp = lora.init(params, LoRAConfig(mode=mode, rank=spec.rank), jax.random.key(1))
    trainable, frozen = lora.split(lp, lora.trainable_mask(lp, mode))
    one = jax.tree_util.tree_map(
        lambda x: x[0], random_batches(spec, 1, MODELS[spec.model]["vocab_size"])
    )
    dp = DpParams(jnp.float32(1.0), jnp.float32(1.0), jnp.float32(spec.batch_size))
    return trainable, frozen, one, dp, jax.random.key(0)


def round_setup(spec: BenchSpec, module, params, loss_fn, k: int, chunk: int):
    """A jitted FFA DP round over ``k`` clients at the round batch; returns
    ``(call, round_fn, args)``: ``call()`` runs ``round_fn(*args)``."""
    lp = lora.init(params, LoRAConfig(mode="ffa", rank=spec.rank), jax.random.key(1))
    trainable, frozen = lora.split(lp, lora.trainable_mask(lp, "ffa"))
    # The project's encoder calls lora.dense: the vmapped path, as ffa-jax train runs it.
    cu = make_client_update(loss_fn, optax.sgd(0.1), private=True, clipping="vmap")
    opt = make_server_optimizer(ServerConfig())
    round_fn = make_round(cu, opt, clients_per_chunk=chunk, compiler_options=spec.compiler_options)
    batches = random_batches(spec, k, MODELS[spec.model]["vocab_size"], spec.round_batch)
    dpk = DpParams(jnp.ones(k), jnp.ones(k), jnp.full((k,), float(spec.round_batch[0])))
    state = server_init(trainable, opt)
    inputs = RoundInputs(batches, jnp.ones(k), jnp.arange(k), dpk)
    args = (state, frozen, inputs, jax.random.key(0))
    return (lambda: round_fn(*args)[0].trainable), round_fn, args
