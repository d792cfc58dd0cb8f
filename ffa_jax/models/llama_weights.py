"""LLaMA checkpoints <-> parameter trees: the key table, HF safetensors and GGUF loading.

One explicit table, :func:`llama_key_table`, maps every HF tensor name
(``model.layers.3.self_attn.q_proj.weight``) and its GGUF name (``blk.3.attn_q.weight``) to one
parameter path, with a per-key transpose (PyTorch ``Linear`` weights are ``[out, in]``, Flax
kernels ``[in, out]``) and the shape implied by the config. The conversion itself (checks,
import loop, export loop) is :mod:`ffa_jax.models.convert`'s; loading fails with a
:class:`ffa_jax.errors.WeightsError` that lists *every* unmapped key, missing key and shape
mismatch, rather than stopping at the first. GGUF reading (dequantisation, rotary
un-permutation, the tokenizer) is :mod:`ffa_jax.models.gguf`; where a model is found
(``"smollm2"``, a ``.gguf`` file, a HF folder, a hub id) is
:func:`ffa_jax.models.sources.resolve_llama_source`.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from ffa_jax.errors import WeightsError
from ffa_jax.models import convert
from ffa_jax.models import gguf as gguf_lib
from ffa_jax.models.llama import LlamaConfig
from ffa_jax.models.sources import load_hf_tokenizer, read_hf_config, resolve_llama_source
from ffa_jax.types import PyTree

# HF tensors that carry no weights (old checkpoints saved RoPE's inverse frequencies).
IGNORED_HF = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)


@dataclasses.dataclass(frozen=True)
class LlamaKeyEntry(convert.KeyEntry):
    """A :class:`~ffa_jax.models.convert.KeyEntry` with the GGUF side.

    Attributes:
      gguf: GGUF tensor name (llama.cpp).
      gguf_heads: > 0 for the query/key projections (and their biases) that llama.cpp stores
        permuted: the number of heads to un-permute with.
    """

    gguf: str = ""
    gguf_heads: int = 0


def llama_key_table(config: LlamaConfig) -> tuple[LlamaKeyEntry, ...]:
    """The HF/GGUF <-> parameter-tree table of ``config``'s model, in a fixed order."""
    c = config
    H, F, D, V = c.hidden_size, c.intermediate_size, c.head_dim_, c.vocab_size
    Q, KV = c.num_heads * D, c.num_kv_heads * D
    rows: list[LlamaKeyEntry] = []

    def add(entries, gguf_module, heads=0):
        for e in entries:
            suffix = e.hf.rsplit(".", 1)[1]
            rows.append(LlamaKeyEntry(**vars(e), gguf=f"{gguf_module}.{suffix}", gguf_heads=heads))

    add(
        [convert.plain("model.embed_tokens.weight", ("embed_tokens", "embedding"), (V, H))],
        "token_embd",
    )
    for i in range(c.num_layers):
        hf, g, p = f"model.layers.{i}", f"blk.{i}", (f"layers_{i}",)
        norm = convert.plain(f"{hf}.input_layernorm.weight", (*p, "input_layernorm", "scale"), (H,))
        add([norm], f"{g}.attn_norm")
        a, ab = (*p, "self_attn"), c.attention_bias
        add(
            convert.linear(f"{hf}.self_attn.q_proj", (*a, "q_proj"), H, Q, bias=ab),
            f"{g}.attn_q",
            c.num_heads,
        )
        add(
            convert.linear(f"{hf}.self_attn.k_proj", (*a, "k_proj"), H, KV, bias=ab),
            f"{g}.attn_k",
            c.num_kv_heads,
        )
        add(convert.linear(f"{hf}.self_attn.v_proj", (*a, "v_proj"), H, KV, bias=ab), f"{g}.attn_v")
        add(
            convert.linear(f"{hf}.self_attn.o_proj", (*a, "o_proj"), Q, H, bias=ab),
            f"{g}.attn_output",
        )
        norm = convert.plain(
            f"{hf}.post_attention_layernorm.weight", (*p, "post_attention_layernorm", "scale"), (H,)
        )
        add([norm], f"{g}.ffn_norm")
        m, mb = (*p, "mlp"), c.mlp_bias
        add(
            convert.linear(f"{hf}.mlp.gate_proj", (*m, "gate_proj"), H, F, bias=mb), f"{g}.ffn_gate"
        )
        add(convert.linear(f"{hf}.mlp.up_proj", (*m, "up_proj"), H, F, bias=mb), f"{g}.ffn_up")
        add(
            convert.linear(f"{hf}.mlp.down_proj", (*m, "down_proj"), F, H, bias=mb), f"{g}.ffn_down"
        )
    add([convert.plain("model.norm.weight", ("norm", "scale"), (H,))], "output_norm")
    if not c.tie_word_embeddings:
        add(convert.linear("lm_head", ("lm_head",), H, V, bias=False), "output")
    return tuple(rows)


# --------------------------------------------------------------------------- load / save


def _unpermute(e: LlamaKeyEntry, value: np.ndarray) -> np.ndarray:
    return gguf_lib.unpermute_gguf(value, e.gguf_heads) if e.gguf_heads else value


def load_llama(
    name_or_path: str | os.PathLike, *, dtype: Any = jnp.float32, host: bool = False
) -> tuple[LlamaConfig, PyTree]:
    """Loads a LLaMA checkpoint as ``(config, params)`` for :class:`LlamaForCausalLM`.

    Args:
      name_or_path: see :func:`~ffa_jax.models.sources.resolve_llama_source` (``"smollm2"``,
        a ``.gguf`` file, a HF folder or a hub id).
      dtype: dtype of the parameter leaves (``jnp.bfloat16`` halves memory for 7B models);
        tensors are read and converted one at a time.
      host: keep the leaves in host memory as C-contiguous numpy arrays (bfloat16 as
        ``ml_dtypes.bfloat16``) instead of ``jax.Array`` leaves on the default device: no
        device ever holds the whole tree, and :func:`ffa_jax.federated.round.place_frozen`
        later transfers each device only its shard (``perf.model_devices > 1``). Host RAM
        then holds the converted tree once (a safetensors tensor is read, transposed and
        converted one at a time; a GGUF tensor is dequantised one at a time).

    Returns:
      ``(config, params)``: ``params`` is the inner tree (``model.apply({"params": params},
      ...)``) of ``jax.Array`` leaves, or numpy leaves with ``host``.

    Raises:
      WeightsError: the source is unusable, the architecture is unsupported, or the weights do
        not match the table; the message names every unmapped key, missing key and shape
        mismatch (expected vs got).
    """
    src = resolve_llama_source(name_or_path)
    leaf = convert.leaf_converter(dtype, host)
    if src.kind == "gguf":
        reader = gguf_lib.gguf_reader(src.path)
        config = gguf_lib.llama_config_from_gguf(reader, src.path)
        params = convert.import_tree(
            llama_key_table(config),
            gguf_lib.gguf_source(reader, src.path),
            what="LLaMA",
            leaf=leaf,
            name_of=lambda e: e.gguf,
            check_values=False,
            transform=_unpermute,
        )
        return config, params
    config = LlamaConfig.from_hf(read_hf_config(src.path))
    source, problems = convert.safetensors_source(src.path)
    ignored = list(IGNORED_HF)
    if config.tie_word_embeddings:
        ignored.append(r"lm_head\.weight")  # some tied checkpoints store the copy
    params = convert.import_tree(
        llama_key_table(config),
        source,
        what="LLaMA",
        leaf=leaf,
        ignored=ignored,
        check_values=False,
        problems=problems,
    )
    return config, params


def llama_to_hf_state_dict(params: PyTree, config: LlamaConfig) -> dict[str, np.ndarray]:
    """``{HF name: float32 numpy}`` in ``LlamaForCausalLM`` layout (LoRA nodes merged first).

    Raises:
      WeightsError: ``params`` does not have exactly the table's paths and shapes.
    """
    return convert.export_state_dict(params, llama_key_table(config))


def save_llama(params: PyTree, config: LlamaConfig, out_dir: str | os.PathLike) -> pathlib.Path:
    """Writes ``model.safetensors`` and ``config.json`` (HF ``LlamaForCausalLM``) to ``out_dir``
    (each file atomically); the folder loads with :func:`load_llama` and with transformers."""
    state = llama_to_hf_state_dict(params, config)
    return convert.write_hf_folder(out_dir, state, {"config.json": config.to_hf()})


# --------------------------------------------------------------------------- tokenizer


def load_llama_tokenizer(name_or_path: str | os.PathLike):
    """The tokenizer of a LLaMA model: rebuilt from GGUF metadata, or the HF folder's fast
    tokenizer (``transformers.AutoTokenizer``, offline for local folders).

    Raises:
      WeightsError: the tokenizer cannot be built or loaded.
    """
    src = resolve_llama_source(name_or_path)
    if src.kind == "gguf":
        return gguf_lib.tokenizer_from_gguf(gguf_lib.gguf_reader(src.path), src.path)
    return load_hf_tokenizer(src.path)


def check_vocab(config: LlamaConfig, tokenizer) -> None:
    """Checks that every token id of ``tokenizer`` has an embedding row.

    Raises:
      WeightsError: the tokenizer has more tokens (``len(tokenizer)``, added tokens included)
        than the model's ``vocab_size`` (a model may have *more* rows than tokens: padded
        embeddings are fine).
    """
    n = len(tokenizer)
    if n > config.vocab_size:
        raise WeightsError(
            f"vocab mismatch: the tokenizer has {n} tokens but the model's embedding has "
            f"{config.vocab_size} rows (vocab_size); token ids >= {config.vocab_size} would "
            "index past the embedding. Use the tokenizer that belongs to these weights."
        )


class PretrainedLlama(NamedTuple):
    """A loaded model: architecture, parameter tree and its tokenizer."""

    config: LlamaConfig
    params: PyTree
    tokenizer: Any


def load_llama_pretrained(
    name_or_path: str | os.PathLike, *, dtype: Any = jnp.float32, host: bool = False
) -> PretrainedLlama:
    """:func:`load_llama` (``dtype``, ``host`` as there) + :func:`load_llama_tokenizer` +
    :func:`check_vocab`.

    For the config, special token ids the checkpoint does not set (``eos_token_ids``,
    ``pad_token_id``, ``bos_token_id``) are taken from the tokenizer.

    Raises:
      WeightsError: as :func:`load_llama`, or the tokenizer does not fit the weights.
    """
    config, params = load_llama(name_or_path, dtype=dtype, host=host)
    tokenizer = load_llama_tokenizer(name_or_path)
    check_vocab(config, tokenizer)
    updates = {}
    if not config.eos_token_ids and tokenizer.eos_token_id is not None:
        updates["eos_token_ids"] = (int(tokenizer.eos_token_id),)
    if config.pad_token_id is None and tokenizer.pad_token_id is not None:
        updates["pad_token_id"] = int(tokenizer.pad_token_id)
    if config.bos_token_id is None and tokenizer.bos_token_id is not None:
        updates["bos_token_id"] = int(tokenizer.bos_token_id)
    if updates:
        config = dataclasses.replace(config, **updates)
    return PretrainedLlama(config, params, tokenizer)
