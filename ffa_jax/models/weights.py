"""HF BERT/RoBERTa checkpoints (``config.json`` + safetensors) <-> encoder parameter trees.

The conversion is driven by one explicit table, :func:`key_table`, used in both directions by
the engine :mod:`ffa_jax.models.convert`: every HF tensor name maps to one parameter path, with
a per-key transpose (PyTorch ``Linear`` weights are ``[out, in]``, Flax kernels ``[in, out]``)
and the shape implied by the config. Loading fails with a :class:`ffa_jax.errors.WeightsError`
that lists *every* unmapped key, missing key and shape mismatch (and the files read), rather
than stopping at the first. Where a named model's folder is found (``"minilm"``, a local
folder, a hub id) is :func:`ffa_jax.models.sources.resolve_model_dir`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ffa_jax.errors import WeightsError
from ffa_jax.models import convert
from ffa_jax.models.convert import KeyEntry
from ffa_jax.models.encoder import MODEL_TYPES, EncoderConfig
from ffa_jax.models.sources import load_hf_tokenizer, read_hf_config, resolve_model_dir
from ffa_jax.types import PyTree

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


def key_table(config: EncoderConfig) -> tuple[KeyEntry, ...]:
    """The HF <-> parameter-tree table of ``config``'s model, in a fixed order.

    ``hf`` names are without the family prefix (``bert.``/``roberta.``), which every row but
    the classifier's carries in ``*ForSequenceClassification`` checkpoints (``prefix``). The
    classifier and BERT's pooler are ``optional`` (initialised when absent); the final
    projection has a ``label_dim``.
    """
    c = config
    H, Iz, N, pre = c.hidden_size, c.intermediate_size, c.num_labels, PREFIX[c.family]
    rows: list[KeyEntry] = []
    for name, n in (
        ("word_embeddings", c.vocab_size),
        ("position_embeddings", c.max_position_embeddings),
        ("token_type_embeddings", c.type_vocab_size),
    ):
        path = ("embeddings", name, "embedding")
        rows.append(convert.plain(f"embeddings.{name}.weight", path, (n, H), prefix=pre))
    rows += convert.layer_norm("embeddings.LayerNorm", ("embeddings", "LayerNorm"), H, prefix=pre)
    for i in range(c.num_layers):
        hf, p = f"encoder.layer.{i}", ("encoder", f"layer_{i}")
        for proj in ("query", "key", "value"):
            path = (*p, "attention", "self", proj)
            rows += convert.linear(f"{hf}.attention.self.{proj}", path, H, H, prefix=pre)
        path = (*p, "attention", "output")
        rows += convert.linear(f"{hf}.attention.output.dense", (*path, "dense"), H, H, prefix=pre)
        rows += convert.layer_norm(
            f"{hf}.attention.output.LayerNorm", (*path, "LayerNorm"), H, prefix=pre
        )
        rows += convert.linear(
            f"{hf}.intermediate.dense", (*p, "intermediate", "dense"), H, Iz, prefix=pre
        )
        rows += convert.linear(f"{hf}.output.dense", (*p, "output", "dense"), Iz, H, prefix=pre)
        rows += convert.layer_norm(
            f"{hf}.output.LayerNorm", (*p, "output", "LayerNorm"), H, prefix=pre
        )
    if c.family == "bert":
        rows += convert.linear("pooler.dense", ("pooler", "dense"), H, H, prefix=pre, optional=True)
        rows += convert.linear("classifier", ("classifier",), H, N, optional=True, label_dim=True)
    else:
        rows += convert.linear("classifier.dense", ("classifier", "dense"), H, H, optional=True)
        rows += convert.linear(
            "classifier.out_proj", ("classifier", "out_proj"), H, N, optional=True, label_dim=True
        )
    return tuple(rows)


# --------------------------------------------------------------------------- load


def _normalise(family: str):
    """Stored name -> table name: strips the family prefix, renames TF-era LayerNorm names."""

    def rename(key: str) -> str:
        k = key.removeprefix(PREFIX[family])
        for old, new in _LEGACY:
            if k.endswith(old):
                k = k[: -len(old)] + new
        return k

    return rename


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
    source, problems = convert.safetensors_source(model_dir, _normalise(config.family))
    table = key_table(config)
    init = convert.modules_to_init(
        table, source.shapes, num_labels=num_labels, where=str(model_dir)
    )
    params = convert.import_tree(
        table,
        source,
        what=config.family,
        leaf=convert.leaf_converter(jnp.float32, host),
        ignored=IGNORED[config.family],
        init=dict.fromkeys(
            init, lambda e: convert.init_leaf(e, head_key, config.initializer_range)
        ),
        problems=problems,
    )
    return config, params


def load_tokenizer(name_or_path: str | os.PathLike):
    """The fast HF tokenizer of a model folder (``transformers.AutoTokenizer``), offline."""
    return load_hf_tokenizer(resolve_model_dir(name_or_path))


# --------------------------------------------------------------------------- save


def to_hf_state_dict(params: PyTree, config: EncoderConfig) -> dict[str, np.ndarray]:
    """``{HF name: float32 numpy}`` in ``*ForSequenceClassification`` layout.

    LoRA nodes are merged first (``w0 + scale * a @ b``).

    Raises:
      WeightsError: ``params`` does not have exactly the table's paths and shapes.
    """
    return convert.export_state_dict(params, key_table(config))


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
    state = to_hf_state_dict(params, config)
    hf_config = to_hf_config(config, base_hf_config)
    return convert.write_hf_folder(out_dir, state, {"config.json": hf_config})
