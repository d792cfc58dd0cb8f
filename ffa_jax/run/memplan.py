"""``ffa-jax plan``: will a config's training round fit an accelerator's memory?

The estimate is XLA's own buffer assignment of the run's jitted round
(``jax.jit(...).lower(...).compile().memory_analysis()``), compiled at the config's shapes
from *abstract* values only: the model's parameter tree comes from ``jax.eval_shape`` of its
initialiser (no weights are read or downloaded, no device memory is allocated), and the batch
is a ``jax.ShapeDtypeStruct`` of ``[clients, local_steps, B_max, ...]``. What is compiled is
what ``ffa-jax train`` builds (:func:`ffa_jax.run.setup.build_round`): the same client update
(DP-SGD with the resolved ``perf.microbatch_size``), the same server optimiser and
``clients_per_chunk``, on the backend the config targets (``perf: auto`` resolves for it).

Per device: the round's clients are spread over the devices of the clients axis
(:func:`ffa_jax.federated.round.choose_devices`'s rule: the most devices, at most
``--devices``, that divide the chunk), so one device holds ``ceil(K / d)`` clients' batches
and runs ``ceil(chunk / d)`` clients at a time, with the whole frozen model (one replica per
device; ``perf.model_devices > 1`` sharding is not modelled, so the estimate is an upper
bound there). The number reported is XLA's peak of that per-device program: arguments
(frozen weights, server state, batches) + outputs + temporaries (activations, per-example
gradients) - donated buffers. It is compiled by the local backend (XLA:CPU on a laptop):
GPU and TPU compilers fuse and schedule differently, so treat it as an estimate and keep
headroom (:data:`HEADROOM`). A ``bfloat16`` model is compiled in float32 on a CPU (XLA:CPU
would add float32 copies of every weight that accelerators do not make), with its frozen
weights counted at bfloat16 size: its activations are then over-, not under-estimated.
Deep models are compiled at 1 and 2 layers and extrapolated linearly in depth (``exact``
compiles the whole depth). Evaluation and generation are not included.

Model architectures come from the model folder's ``config.json`` (a local folder, or the
offline ``minilm`` / ``smollm2`` packages), or, for the hub models of the paper configs, from
:data:`KNOWN_HF_CONFIGS` (the fields of their published ``config.json``), so the paper
configs can be planned offline.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp

from ffa_jax import lora
from ffa_jax import perf as perf_lib
from ffa_jax.config import AUTO, RunConfig
from ffa_jax.errors import ConfigError

# The architecture fields of the published config.json of the paper configs' hub models.
_ROBERTA_LARGE = {
    "model_type": "roberta",
    "vocab_size": 50265,
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "hidden_act": "gelu",
    "max_position_embeddings": 514,
    "type_vocab_size": 1,
    "layer_norm_eps": 1e-5,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "initializer_range": 0.02,
}
_LLAMA_7B = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 32000,
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "intermediate_size": 11008,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "initializer_range": 0.02,
}
_VIT_B16_IN21K = {
    "model_type": "vit",
    "architectures": ["ViTModel"],
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "image_size": 224,
    "patch_size": 16,
    "num_channels": 3,
    "qkv_bias": True,
    "layer_norm_eps": 1e-12,
    "initializer_range": 0.02,
}
KNOWN_HF_CONFIGS: dict[str, dict[str, Any]] = {
    "roberta-large": _ROBERTA_LARGE,
    "FacebookAI/roberta-large": _ROBERTA_LARGE,
    "huggyllama/llama-7b": _LLAMA_7B,
    "meta-llama/Llama-2-7b-hf": {**_LLAMA_7B, "max_position_embeddings": 4096},
    "google/vit-base-patch16-224-in21k": _VIT_B16_IN21K,
}
# Classes of hub data sets that cannot be read offline (the head's size only).
KNOWN_TASK_LABELS = {"ethz/food101": 101, "food101": 101}

# Keep this fraction of the device free: the estimate is XLA:CPU's buffer assignment, and a
# GPU/TPU runtime reserves memory of its own (allocator fragmentation, collectives, programs).
HEADROOM = 0.10

# Buffer assignment (what memory_analysis reports) happens before code generation, so the
# estimate does not need LLVM's optimisations: without them XLA:CPU compiles several times
# faster.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


def parse_memory(text: str) -> int:
    """Bytes of ``"32GiB"``, ``"16GB"``, ``"80 GiB"``, ``"512MiB"`` or a plain byte count.

    Raises:
      ConfigError: not a positive size with a unit of B, kB, MB, GB, TB, KiB, MiB, GiB, TiB.
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS or float(m.group(1)) <= 0:
        raise ConfigError(
            f"--device-memory={text!r} is invalid: use a size such as 32GiB, 16GB or 80GiB."
        )
    return int(float(m.group(1)) * _UNITS[unit])


def hf_config(cfg: RunConfig) -> dict[str, Any]:
    """The model's ``config.json`` fields: from its folder (a local folder or an offline
    package), else :data:`KNOWN_HF_CONFIGS`. Never downloads.

    Raises:
      ConfigError: neither a local config.json nor a known hub id.
    """
    from pathlib import Path

    from ffa_jax.models.sources import read_hf_config, resolve_model_dir

    name = cfg.model.name
    local = Path(name).expanduser()
    if name in ("minilm", "smollm2") or (local / "config.json").is_file():
        return read_hf_config(resolve_model_dir(name))
    if name in KNOWN_HF_CONFIGS:
        return dict(KNOWN_HF_CONFIGS[name])
    raise ConfigError(
        f"model.name={name!r}: ffa-jax plan needs the model's config.json without downloading; "
        f"use a local model folder, or one of {sorted(KNOWN_HF_CONFIGS)}."
    )


def num_labels(cfg: RunConfig) -> int:
    """Classes of the config's classification task, without loading its data: the built-in
    GLUE tasks' label names, SpamAssassin's 2, ``data.classes``, :data:`KNOWN_TASK_LABELS`;
    else 2 (the head is a small part of the memory either way)."""
    from ffa_jax.data.tasks import GLUE_TASKS

    if cfg.data.classes is not None:
        return len(cfg.data.classes)
    task = cfg.data.task.split(":")[0]
    if task in GLUE_TASKS:
        return len(GLUE_TASKS[task].label_names)
    return KNOWN_TASK_LABELS.get(cfg.data.task, 2)


def _is_pair_task(cfg: RunConfig) -> bool:
    from ffa_jax.data.tasks import GLUE_TASKS

    spec = GLUE_TASKS.get(cfg.data.task.split(":")[0])
    return spec is not None and spec.pair_field is not None


def abstract_model(cfg: RunConfig, layers: int | None = None):
    """``(family, loss_fn, abstract params, example, head pattern)`` of the config's model:
    the parameter tree as ``jax.ShapeDtypeStruct`` leaves (``model.dtype`` storage for the
    frozen matrices, LoRA nodes at ``lora.targets``), and one training example's shapes and
    dtypes. ``layers``: that many transformer layers instead of the model's own."""
    from ffa_jax.models.layers import cast_frozen_weights
    from ffa_jax.workloads import compute_dtype, resolve_family

    family = resolve_family(cfg)
    hf = hf_config(cfg)
    if layers is not None:
        hf["num_hidden_layers"] = layers
    dtype = compute_dtype(cfg)
    L = cfg.model.max_length
    key = jax.random.key(0)
    head = None
    if family == "llama":
        from ffa_jax.models import llama as llama_lib

        config = llama_lib.LlamaConfig.from_hf(hf)
        module = llama_lib.LlamaForCausalLM(config, dtype=dtype, remat=cfg.perf.remat)
        params = jax.eval_shape(lambda k: llama_lib.init_params(config, k), key)
        loss_fn = llama_lib.causal_lm_loss(module)
        example = {
            n: jax.ShapeDtypeStruct((L,), jnp.int32)
            for n in ("input_ids", "attention_mask", "loss_mask")
        }
    elif family == "vit":
        from ffa_jax.models.vit import ViTClassifier, ViTConfig, image_classification_loss

        config = ViTConfig.from_hf(hf, num_labels(cfg))
        module = ViTClassifier(config, dtype=dtype)
        pixels = jnp.zeros((1, *config.input_shape), jnp.float32)
        params = jax.eval_shape(lambda k: module.init(k, pixels)["params"], key)
        half = (0.5,) * config.num_channels
        loss_fn = image_classification_loss(module, half, half)
        example = {
            "pixel_values": jax.ShapeDtypeStruct(config.input_shape, jnp.uint8),
            "label": jax.ShapeDtypeStruct((), jnp.int32),
        }
        head = r"classifier/.*" if cfg.model.train_head else None
    else:
        from ffa_jax.models.encoder import EncoderClassifier, EncoderConfig
        from ffa_jax.models.objectives import classification_loss

        config = EncoderConfig.from_hf(hf, num_labels(cfg))
        pooling = cfg.model.pooling
        if pooling == AUTO:
            from ffa_jax.models.sources import resolve_model_dir
            from ffa_jax.models.weights import detect_pooling

            local = cfg.model.name not in KNOWN_HF_CONFIGS
            pooling = detect_pooling(resolve_model_dir(cfg.model.name)) if local else "cls"
        config = dataclasses.replace(config, pooling=pooling)
        module = EncoderClassifier(config, dtype=dtype)
        ids = jnp.ones((1, L), jnp.int32)
        params = jax.eval_shape(lambda k: module.init(k, ids, ids)["params"], key)
        loss_fn = classification_loss(module)
        names = ["input_ids", "attention_mask"] + (["token_type_ids"] if _is_pair_task(cfg) else [])
        example = {n: jax.ShapeDtypeStruct((L,), jnp.int32) for n in names}
        example["label"] = jax.ShapeDtypeStruct((), jnp.int32)
        head = r"classifier/.*" if cfg.model.train_head else None

    def with_lora(p):
        if dtype != jnp.float32:
            p = cast_frozen_weights(p, dtype, keep=head)
        return lora.init(p, cfg.lora, jax.random.key(1))

    params = jax.eval_shape(with_lora, params)
    return family, loss_fn, params, example, head


def clients_devices(chunk: int, devices: int, requested: int = 0) -> int:
    """Devices on the clients axis for a chunk of ``chunk`` clients on ``devices`` devices:
    ``requested`` (``perf.devices``) when set, else the most that divide the chunk (the
    rule of :func:`ffa_jax.federated.round.choose_devices`)."""
    if requested:
        return requested
    return max(d for d in range(1, min(devices, chunk) + 1) if chunk % d == 0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemoryPlan:
    """The per-device estimate of one round. Bytes throughout.

    ``clients_axis_devices``: devices the round's clients are spread over (of ``devices``);
    ``clients_per_device`` / ``chunk_per_device``: clients whose batches one device holds,
    and that it runs at once; ``xla``: XLA's ``temp`` / ``argument`` / ``output`` / ``alias``
    bytes and ``total`` (= temp + argument + output - alias) of the per-device round;
    ``frozen_bytes``: the model's frozen tree (part of ``argument``); ``method``: compiled at
    full depth or extrapolated; ``fits``: ``total <=
    (1 - HEADROOM) * device_memory``.
    """

    config_name: str
    family: str
    backend: str
    device_memory: int
    devices: int
    clients_axis_devices: int
    clients: int
    clients_per_device: int
    chunk_per_device: int
    microbatch_size: int
    max_batch_size: int
    local_steps: int
    seq_shape: tuple[int, ...]
    frozen_bytes: int
    trainable_bytes: int
    xla: dict[str, int]
    method: str
    compile_seconds: float
    fits: bool

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def round_memory(
    cfg: RunConfig, resolved, k_dev: int, c_dev: int, chunked: bool, *, layers: int | None
) -> tuple[dict[str, int], dict[str, Any]]:
    """XLA's buffer sizes (bytes: ``temp``, ``argument``, ``output``, ``alias``, ``total``)
    of one device's round with ``k_dev`` clients, ``c_dev`` at a time (``chunked``), and
    ``{"family", "seq_shape", "frozen_bytes", "trainable_bytes"}``; ``layers`` as in
    :func:`abstract_model`. Compiled from abstract values only."""
    from ffa_jax.federated.client import DpParams, make_client_optimizer, make_client_update
    from ffa_jax.federated.round import RoundInputs, make_round
    from ffa_jax.federated.server import ServerDpParams, make_server_optimizer, server_init

    stored = split_bytes(cfg, layers)
    if cfg.model.dtype != "float32" and jax.default_backend() == "cpu":
        # XLA:CPU has no bfloat16 matmuls: it converts every bf16 weight to float32 and
        # hoists those converts out of the loops, so a bf16 compile here reports float32
        # copies of the whole model (LLaMA-7B: 1.7 GiB per layer) that no GPU/TPU makes.
        # Compile in float32 instead (its activations bound bf16's from above) and count
        # the frozen weights at their stored size.
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype="float32"))
    family, loss_fn, params, example, head = abstract_model(cfg, layers)
    mask = lora.trainable_mask(params, cfg.lora.mode, extra=head)
    trainable, frozen = lora.split(params, mask)
    private = cfg.privacy.enabled
    sample_dp = private and cfg.privacy.unit == "sample"
    client_update = make_client_update(
        loss_fn,
        make_client_optimizer(cfg.client),
        private=sample_dp,
        microbatch_size=resolved.microbatch_size or None,
        tail_microbatch_size=resolved.tail_microbatch_size or None,
        clipping="vmap",  # as ffa-jax train's workloads run (run.setup.build_client_update)
    )
    server_opt = make_server_optimizer(cfg.server, cfg.federated.rounds)
    round_fn = make_round(
        client_update,
        server_opt,
        clients_per_chunk=c_dev if chunked else 0,
        client_level_dp=private and cfg.privacy.unit == "client",
    )
    S, B = cfg.federated.local_steps, resolved.max_batch_size

    def sds(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype)

    batches = {n: sds((k_dev, S, B, *x.shape), x.dtype) for n, x in example.items()}
    batches["mask"] = sds((k_dev, S, B), jnp.bool_)
    vec = sds((k_dev,), jnp.float32)
    state = jax.eval_shape(lambda t: server_init(t, server_opt), trainable)
    scalar = sds((), jnp.float32)
    inputs = RoundInputs(
        batches,
        vec,
        sds((k_dev,), jnp.int32),
        DpParams(vec, vec, vec),
        ServerDpParams(scalar, scalar, scalar) if private and not sample_dp else None,
    )
    args = (state, frozen, inputs, jax.eval_shape(lambda: jax.random.key(0)))
    stats = round_fn.lower(*args).compile(compiler_options=FAST_COMPILE).memory_analysis()
    if stats is None:
        raise ConfigError(
            f"the {jax.default_backend()} backend reports no compiled memory analysis; run "
            "ffa-jax plan where jax's CPU backend is available (JAX_PLATFORMS=cpu)."
        )
    xla = {
        "temp": int(stats.temp_size_in_bytes),
        "argument": int(stats.argument_size_in_bytes)
        - lora.tree_bytes(frozen)
        + stored["frozen_bytes"],
        "output": int(stats.output_size_in_bytes),
        "alias": int(stats.alias_size_in_bytes),
    }
    xla["total"] = xla["temp"] + xla["argument"] + xla["output"] - xla["alias"]
    info = {
        "family": family,
        "seq_shape": tuple(next(iter(example.values())).shape),
        **stored,
    }
    return xla, info


def split_bytes(cfg: RunConfig, layers: int | None = None) -> dict[str, int]:
    """``frozen_bytes`` / ``trainable_bytes`` of the config's model as stored
    (``model.dtype``), from abstract shapes (nothing is compiled)."""
    _, _, params, _, head = abstract_model(cfg, layers)
    trainable, frozen = lora.split(params, lora.trainable_mask(params, cfg.lora.mode, extra=head))
    return {"frozen_bytes": lora.tree_bytes(frozen), "trainable_bytes": lora.tree_bytes(trainable)}


def plan_memory(
    cfg: RunConfig,
    *,
    device_memory: int,
    devices: int = 1,
    backend: str = "gpu",
    exact: bool = False,
) -> MemoryPlan:
    """Compiles the config's round abstractly for one device (see the module docstring) and
    compares XLA's peak with ``device_memory`` bytes.

    Args:
      cfg: the run config (``perf`` auto values resolve for ``backend``).
      device_memory: bytes of one device (e.g. ``parse_memory("32GiB")``).
      devices: devices of the host the run will use (the clients axis spans up to this many).
      backend: ``gpu`` / ``tpu`` / ``cpu``: the backend ``perf: auto`` resolves for.
      exact: compile the model at its full depth (minutes for a 7B model on a CPU) instead
        of extrapolating two compiles of 1 and 2 layers linearly in depth (seconds).

    Raises:
      ConfigError: bad ``devices`` / ``backend``, an unknown model (see :func:`hf_config`).
    """
    import time

    if not isinstance(devices, int) or devices < 1:
        raise ConfigError(f"--devices={devices!r} is invalid: use an integer >= 1.")
    if backend not in ("cpu", "gpu", "tpu"):
        raise ConfigError(f"--backend={backend!r} is invalid: use cpu, gpu or tpu.")
    resolved = perf_lib.resolve(
        cfg.perf,
        expected_batch_size=cfg.client.batch_size,
        backend=backend,
        eval_batch_size=cfg.eval.batch_size,
        overflow_probability=perf_lib.batch_overflow_probability(cfg),
    )
    # The round's client slots: all K (a Poisson participation pads up to a bound <= K, a
    # fixed one holds exactly M).
    fed = cfg.federated
    fixed = fed.clients_per_round is not None and fed.client_sampling == "fixed"
    K = fed.clients_per_round if fixed else fed.clients
    chunk = resolved.clients_per_chunk or K
    d = clients_devices(chunk, devices, cfg.perf.devices)
    k_dev, c_dev = math.ceil(K / d), math.ceil(chunk / d)
    chunked = bool(resolved.clients_per_chunk)
    full = int(hf_config(cfg)["num_hidden_layers"])
    t0 = time.perf_counter()
    if exact or full <= 2:
        xla, info = round_memory(cfg, resolved, k_dev, c_dev, chunked, layers=None)
        method = f"compiled at all {full} layers"
    else:
        # Every buffer the round holds grows linearly with depth (weights, the activations
        # kept for the backward pass, per-layer LoRA factors and their per-example
        # gradients); one layer's working set is a constant: two small compiles give both.
        one, info1 = round_memory(cfg, resolved, k_dev, c_dev, chunked, layers=1)
        two, info2 = round_memory(cfg, resolved, k_dev, c_dev, chunked, layers=2)

        def grow(a: int, b: int) -> int:
            return a + (full - 1) * (b - a)

        xla = {k: grow(one[k], two[k]) for k in one}
        info = dict(info1)
        for k in ("frozen_bytes", "trainable_bytes"):
            info[k] = grow(info1[k], info2[k])
        method = f"extrapolated linearly in depth from 1- and 2-layer compiles to {full} layers"
    compile_s = time.perf_counter() - t0
    if cfg.model.dtype != "float32" and jax.default_backend() == "cpu":
        method += f"; {cfg.model.dtype} weights, float32 activations (an upper bound)"
    return MemoryPlan(
        config_name=cfg.name,
        family=info["family"],
        backend=backend,
        device_memory=device_memory,
        devices=devices,
        clients_axis_devices=d,
        clients=K,
        clients_per_device=k_dev,
        chunk_per_device=c_dev,
        microbatch_size=resolved.microbatch_size,
        max_batch_size=resolved.max_batch_size,
        local_steps=fed.local_steps,
        seq_shape=info["seq_shape"],
        frozen_bytes=info["frozen_bytes"],
        trainable_bytes=info["trainable_bytes"],
        xla=xla,
        method=method,
        compile_seconds=compile_s,
        fits=xla["total"] <= (1 - HEADROOM) * device_memory,
    )


def _gib(x: int) -> str:
    return f"{x / 2**30:.2f} GiB"


def describe(p: MemoryPlan) -> str:
    """The plan as a few lines of text (GiB = 2^30 bytes)."""
    verdict = "fits" if p.fits else "does NOT fit"
    used = p.xla["total"] / p.device_memory
    lines = [
        f"{p.config_name} ({p.family}, perf resolved for {p.backend}): "
        f"{p.clients} clients over {p.clients_axis_devices} of {p.devices} device(s); per "
        f"device {p.clients_per_device} client batch(es) of {p.local_steps} x B_max "
        f"{p.max_batch_size} x {list(p.seq_shape)}, {p.chunk_per_device} client(s) at a time, "
        f"micro-batch {p.microbatch_size or 'whole batch'}",
        f"XLA per-device peak {_gib(p.xla['total'])} = arguments {_gib(p.xla['argument'])} "
        f"(frozen model {_gib(p.frozen_bytes)}) + temporaries {_gib(p.xla['temp'])} + outputs "
        f"{_gib(p.xla['output'])} - donated {_gib(p.xla['alias'])}",
        f"{verdict} in {_gib(p.device_memory)} per device ({used:.0%} of it; the limit keeps "
        f"{HEADROOM:.0%} headroom)",
        f"XLA:{jax.default_backend().upper()} estimate, {p.method} ({p.compile_seconds:.1f} s, "
        "abstract shapes, no weights); evaluation not included",
    ]
    if not p.fits:
        lines.append(
            "to fit: a smaller perf.microbatch_size (per-example gradients of fewer examples at "
            "once), perf.clients_per_chunk=1, perf.remat=true (decoders), or model.dtype=bfloat16"
        )
    return "\n".join(lines)
