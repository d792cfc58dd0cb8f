"""GGUF files (llama.cpp): reader, LLaMA config, tensors and the tokenizer.

Files are read with the pure-Python ``gguf`` package: tensors are dequantised to float32
(``gguf.quants.dequantize``; Q4_1, Q8_0, K-quants, F16...) and the query/key projections are
un-permuted (llama.cpp stores them in its interleaved rotary layout:
``w.reshape(n_head, 2, D // 2, ...).swapaxes(1, 2)`` of the HF weight). A quantised file gives
the *dequantised* weights, not the original full-precision ones. The tokenizer is rebuilt from
the GGUF metadata (byte-level BPE, see :func:`tokenizer_from_gguf`). The tensor names are the
``gguf`` column of :func:`ffa_jax.models.llama_weights.llama_key_table`.
"""

from __future__ import annotations

import functools
import os
import pathlib
from typing import Any

import numpy as np

from ffa_jax.errors import WeightsError
from ffa_jax.models.convert import TensorSource
from ffa_jax.models.llama import LlamaConfig, RopeScaling


def unpermute_gguf(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's rotary permutation of a query/key weight ``[out, in]`` (or bias
    ``[out]``), giving HF's layout."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_gguf(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's permutation (``convert_hf_to_gguf.py``), the inverse of :func:`unpermute_gguf`."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_reader(path: pathlib.Path):
    """A (cached) ``gguf.GGUFReader``: weights and tokenizer of one file parse it once."""
    path = pathlib.Path(path)
    try:
        st = path.stat()
    except OSError as e:
        raise WeightsError(f"cannot read {str(path)!r}: {e}") from e
    return _cached_gguf_reader(str(path.resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=2)
def _cached_gguf_reader(path: str, mtime_ns: int, size: int):
    try:
        import gguf
    except ImportError as e:
        raise WeightsError(
            f"reading {str(path)!r} needs the `gguf` package: run `pip install gguf`."
        ) from e
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:
        raise WeightsError(
            f"cannot read {str(path)!r} as a GGUF file: {type(e).__name__}: {e}"
        ) from e


def field(reader, key: str, default: Any = None) -> Any:
    """The value of metadata ``key`` of a GGUF reader, or ``default`` when absent."""
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _f32(x) -> float:
    """A GGUF float32 as the shortest decimal that round-trips (9.99999975e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def llama_config_from_gguf(reader, path: str | os.PathLike = "<gguf>") -> LlamaConfig:
    """The :class:`LlamaConfig` described by a GGUF file's metadata (``llama.*`` keys).

    Raises:
      WeightsError: the architecture is not ``llama`` or a required key is missing.
    """
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise WeightsError(
            f"{str(path)!r}: GGUF general.architecture={arch!r} is not supported by the LLaMA "
            "decoder; only 'llama' files (LLaMA-2/3, SmolLM2, ...) are."
        )
    required = {
        "hidden_size": "llama.embedding_length",
        "num_layers": "llama.block_count",
        "num_heads": "llama.attention.head_count",
        "intermediate_size": "llama.feed_forward_length",
    }
    missing = [k for k in required.values() if k not in reader.fields]
    if missing:
        raise WeightsError(f"{str(path)!r}: GGUF metadata lacks the required keys {missing}.")
    kw = {ours: int(field(reader, key)) for ours, key in required.items()}
    tokens = field(reader, "tokenizer.ggml.tokens")
    vocab = field(reader, "llama.vocab_size", len(tokens) if tokens is not None else None)
    if vocab is None:
        raise WeightsError(
            f"{str(path)!r}: GGUF metadata has neither llama.vocab_size nor tokenizer.ggml.tokens."
        )
    head_dim = field(reader, "llama.attention.key_length")
    if head_dim is None:
        rope_dim = field(reader, "llama.rope.dimension_count")
        if rope_dim is not None and rope_dim != kw["hidden_size"] // kw["num_heads"]:
            head_dim = rope_dim
    scaling = None
    stype = field(reader, "llama.rope.scaling.type", "none")
    if stype == "linear":
        scaling = RopeScaling(
            rope_type="linear", factor=float(field(reader, "llama.rope.scaling.factor"))
        )
    elif stype not in (None, "none"):
        raise WeightsError(
            f"{str(path)!r}: GGUF llama.rope.scaling.type={stype!r} is not supported (use 'linear' "
            "or none; for LLaMA-3.1 use the HF safetensors checkpoint)."
        )
    eos = field(reader, "tokenizer.ggml.eos_token_id")
    names = {t.name for t in reader.tensors}
    return LlamaConfig(
        vocab_size=int(vocab),
        num_kv_heads=int(field(reader, "llama.attention.head_count_kv", kw["num_heads"])),
        head_dim=None if head_dim is None else int(head_dim),
        max_position_embeddings=int(field(reader, "llama.context_length", 2048)),
        rms_norm_eps=_f32(field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=_f32(field(reader, "llama.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        mlp_bias="blk.0.ffn_up.bias" in names,
        bos_token_id=field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
        pad_token_id=field(reader, "tokenizer.ggml.padding_token_id"),
        **kw,
    )


def dequantize(t) -> np.ndarray:
    """A GGUF tensor as float32 numpy in HF's dimension order (GGUF lists innermost first)."""
    import gguf

    data = gguf.quants.dequantize(t.data, t.tensor_type)
    return np.asarray(data, np.float32).reshape(tuple(int(n) for n in reversed(t.shape)))


# --------------------------------------------------------------------------- tokenizer

# llama.cpp's ``tokenizer.ggml.pre`` -> HF pre-tokenizer (llama-vocab.cpp regexes).
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_GPT2 = ("gpt2", "default", "mpt", "olmo", "jais")
_LLAMA3 = ("llama-bpe", "llama3")
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GGUF_PRE_TOKENIZERS = _DIGITS_THEN_GPT2 + _GPT2 + _LLAMA3
_CONTROL, _USER_DEFINED = 3, 4


def _pre_tokenizer(pre: str, where: str):
    from tokenizers import Regex, pre_tokenizers

    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in _GPT2:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _LLAMA3:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    raise WeightsError(
        f"{where}: GGUF tokenizer.ggml.pre={pre!r} is not supported; supported pre-tokenizers are "
        f"{list(GGUF_PRE_TOKENIZERS)}. Use the model's HF folder (tokenizer.json) instead."
    )


def tokenizer_from_gguf(reader, path: str | os.PathLike = "<gguf>"):
    """A ``transformers`` fast tokenizer rebuilt from a GGUF file's ``tokenizer.*`` metadata.

    Byte-level BPE (``tokenizer.ggml.model == "gpt2"``) from ``tokenizer.ggml.tokens`` and
    ``tokenizer.ggml.merges``; the pre-tokenizer follows ``tokenizer.ggml.pre`` as llama.cpp
    does (``smollm``: digits split individually, then the GPT-2 regex); control tokens
    (token type 3, e.g. ``<|im_start|>``) are special tokens; BOS is prepended when
    ``tokenizer.ggml.add_bos_token`` is true; ``tokenizer.chat_template`` becomes the chat
    template. Needs no torch and no network.

    Raises:
      WeightsError: the tokenizer is not byte-level BPE or its pre-tokenizer is unknown.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    where = repr(str(path))
    kind = field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise WeightsError(
            f"{where}: GGUF tokenizer.ggml.model={kind!r} is not supported; only byte-level BPE "
            "('gpt2') tokenizers are rebuilt. Use the model's HF folder (tokenizer.json) instead."
        )
    tokens = list(field(reader, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges", [])]
    types = list(field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = _pre_tokenizer(field(reader, "tokenizer.ggml.pre", "default"), where)
    tok.decoder = decoders.ByteLevel()
    specials = [
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, types, strict=True)
        if ty in (_CONTROL, _USER_DEFINED)
    ]
    tok.add_special_tokens(specials)

    def name(key):
        i = field(reader, key)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos = name("tokenizer.ggml.bos_token_id")
    if field(reader, "tokenizer.ggml.add_bos_token", False) and bos is not None:
        bos_id = int(field(reader, "tokenizer.ggml.bos_token_id"))
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    kwargs = {}
    for role, key in (
        ("bos_token", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("unk_token", "tokenizer.ggml.unknown_token_id"),
        ("pad_token", "tokenizer.ggml.padding_token_id"),
    ):
        if name(key) is not None:
            kwargs[role] = name(key)
    template = field(reader, "tokenizer.chat_template")
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template, **kwargs)


def gguf_source(reader, path: str | os.PathLike) -> TensorSource:
    """A GGUF file's tensors as a :class:`~ffa_jax.models.convert.TensorSource`: HF-layout
    shapes (GGUF lists dimensions innermost first) and float32 dequantised values."""
    tensors = {t.name: t for t in reader.tensors}
    shapes = {n: tuple(int(d) for d in reversed(t.shape)) for n, t in tensors.items()}

    def read(names):
        for n in names:
            yield n, dequantize(tensors[n])

    return TensorSource(shapes, read, repr(str(path)))
