"""Hugging Face PEFT LoRA adapters in and out of the ffa_jax parameter tree, for every family.

An ffa_jax LoRA node ``LoRAWeight(w0 [d_in, d_out], a [d_in, r], b [r, d_out], scale)`` is PEFT's
``lora.Linear`` with ``lora_A.weight = a.T`` (``[r, d_in]``), ``lora_B.weight = b.T``
(``[d_out, r]``) and ``scale = lora_alpha / r``, so both compute
``x W0 + scale * (x A^T) B^T``. A PEFT adapter folder holds:

* ``adapter_config.json``: ``peft_type: LORA``, ``task_type`` (``SEQ_CLS`` for BERT/RoBERTa,
  ``CAUSAL_LM`` for LLaMA-family decoders, none for ViT), ``r``, ``lora_alpha``,
  ``target_modules``, ``lora_dropout: 0``, ``bias: none``, ``modules_to_save`` and
  ``base_model_name_or_path``;
* ``adapter_model.safetensors``: ``base_model.model.<module>.lora_A.weight`` /
  ``lora_B.weight`` for every adapted module -- the frozen A included, so the adapter is
  self-contained -- and ``base_model.model.<module>.weight`` / ``.bias`` of every module in
  ``modules_to_save``.

Module names are HF's (:func:`hf_module_name`, tested against each family's key table):

* BERT/RoBERTa: ``bert.encoder.layer.0.attention.self.query`` (``*ForSequenceClassification``);
* LLaMA: ``model.layers.0.self_attn.q_proj`` (``LlamaForCausalLM``);
* ViT: ``vit.encoder.layer.0.attention.attention.query`` (``ViTForImageClassification``).

**The classification head.** PEFT's ``SEQ_CLS`` task saves the head (``modules_to_save:
["classifier", "score"]``) with every adapter, and ffa_jax does the same for its classifiers
(BERT/RoBERTa and ViT): the head is either trained (``model.train_head: true``) or a random init
drawn from the run's seed, and in both cases HF cannot reproduce it from the base checkpoint, so
the exported adapter carries it (``classifier``; plus BERT's ``pooler`` when the base checkpoint
has none). That is what makes ``PeftModel.from_pretrained`` give ffa_jax's logits. Decoders
save no module whole (the LM head is tied to, or is, a frozen pretrained matrix).

**The base model's name.** ``base_model_name_or_path`` must let someone else load the base model,
so it is never a path on this machine unless asked for (``absolute_base_path=True``,
``--absolute-base-path``): hub ids are kept, the offline ``minilm`` / ``smollm2`` packages
become their hub ids (:data:`HUB_IDS`), and a local folder becomes its folder name with a
warning to pass ``base_model`` (``--base-model NAME``). ``smollm2`` is a Q4_1 GGUF dequantised
to float32; the hub's float checkpoint differs from it by the quantisation error, so logits on
the hub model are close to, not equal to, ffa_jax's.

**Pooling.** HF ``BertForSequenceClassification`` / ``RobertaForSequenceClassification`` read
the first token (BERT through its pooler). ffa_jax runs on sentence-transformers checkpoints
(all-MiniLM-L6-v2, the quickstart) use ``pooling: mean`` instead. Their adapters are exact for
the encoder (the LoRA weights are pooling-independent) but the head was trained on mean-pooled
features, so in HF's classes the logits differ; :func:`export_peft` warns and says so in the
adapter's ``README.md``. Runs with ``model.pooling: cls`` give identical logits.

Python API::

    export_peft(params, out_dir, config=...)       # adapter files + merged/ HF checkpoint
    import_peft(adapter_dir, base_params, lora_cfg) # PEFT adapter -> tree with LoRA nodes
    init_from_adapter(params, lora_cfg)             # lora.init_from: a run starts from an adapter
    read_lora_config(adapter_dir, mode="ffa")       # the adapter's LoRAConfig

A run directory is exported by :func:`ffa_jax.run.export_run_peft` (the run layer rebuilds
the run with :func:`ffa_jax.run.load_run` and calls :func:`export_peft`). Command line:
``ffa-jax export-peft RUN_DIR OUT_DIR [--base-model NAME]``; a run starts from an adapter
trained elsewhere with ``lora.init_from: ADAPTER_DIR``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shutil
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ffa_jax import lora
from ffa_jax.config import LoRAConfig
from ffa_jax.errors import ConfigError, WeightsError
from ffa_jax.fileio import atomic_write_bytes
from ffa_jax.models import convert, sources
from ffa_jax.models import weights as weights_lib
from ffa_jax.models.encoder import EncoderConfig
from ffa_jax.types import PyTree

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MERGED_DIR = "merged"
PEFT_PREFIX = "base_model.model."
DEFAULT_MODULES_TO_SAVE = ("classifier",)
# Files of the base model folder copied next to the merged checkpoint (tokenizer, and the
# sentence-transformers pooling config so that ffa_jax's ``pooling: auto`` still sees "mean").
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "sentencepiece.bpe.model",
    "spiece.model",
    "added_tokens.json",
)
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "1_Pooling")
# PEFT LoRA options ffa_jax cannot represent; importing an adapter that uses them fails.
_UNSUPPORTED = {
    "use_dora": (False, None),
    "use_rslora": (False, None),
    "fan_in_fan_out": (False, None),
    "lora_bias": (False, None),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
}
_LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight")


# --------------------------------------------------------------------------- names


# The HF model's prefix of every non-head module (``bert.encoder...``, ``model.layers...``).
FAMILY_PREFIX = {"bert": "bert.", "roberta": "roberta.", "llama": "model.", "vit": "vit."}
# Top-level modules that the HF task models hold outside the base model: no prefix.
UNPREFIXED = ("classifier", "lm_head")
# PEFT task_type per family: the PeftModel subclass ``from_pretrained`` builds.
TASK_TYPE = {"bert": "SEQ_CLS", "roberta": "SEQ_CLS", "llama": "CAUSAL_LM", "vit": None}
# transformers Auto* class that loads the base model of each family.
AUTO_CLASS = {
    "bert": "AutoModelForSequenceClassification",
    "roberta": "AutoModelForSequenceClassification",
    "llama": "AutoModelForCausalLM",
    "vit": "AutoModelForImageClassification",
}
# The hub checkpoints of the offline model packages (``model.name`` shorthands).
HUB_IDS = {
    sources.MINILM: "sentence-transformers/all-MiniLM-L6-v2",
    "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct",
}


def family_of(params: PyTree) -> str:
    """The HF family of a parameter tree: ``"llama"`` (``embed_tokens``), ``"vit"``
    (``embeddings/patch_embeddings``), ``"roberta"`` (RoBERTa's ``classifier/out_proj`` head)
    or ``"bert"``."""
    if not isinstance(params, Mapping):
        return "bert"
    if "embed_tokens" in params:
        return "llama"
    emb = params.get("embeddings", {})
    if isinstance(emb, Mapping) and "patch_embeddings" in emb:
        return "vit"
    head = params.get("classifier", {})
    return "roberta" if isinstance(head, Mapping) and "out_proj" in head else "bert"


def family_of_config(config: Any) -> str:
    """The family of a model config: an :class:`EncoderConfig`'s ``family``, ``"llama"`` for a
    :class:`~ffa_jax.models.llama.LlamaConfig`, ``"vit"`` for a
    :class:`~ffa_jax.models.vit.ViTConfig`."""
    from ffa_jax.models.llama import LlamaConfig
    from ffa_jax.models.vit import ViTConfig

    if isinstance(config, EncoderConfig):
        return config.family
    if isinstance(config, LlamaConfig):
        return "llama"
    if isinstance(config, ViTConfig):
        return "vit"
    raise ConfigError(
        f"config={type(config).__name__} is not a model config; pass the EncoderConfig, "
        "LlamaConfig or ViTConfig of the parameter tree."
    )


# transformers 5 renamed ViT's modules (its checkpoint conversion maps the stored names):
# ``vit.encoder.layer.0.attention.attention.query`` -> ``vit.layers.0.attention.q_proj``. PEFT
# targets the live module names, so a ViT adapter must use the layout of the transformers that
# loads it (PEFT 0.21 does not rename a v4 ViT adapter's keys or target_modules).
VIT_LAYOUTS = ("auto", "v4", "v5")
_VIT_V4_TO_V5 = (
    (r"^vit\.encoder\.layer\.(\d+)\.", r"vit.layers.\1."),
    (r"\.attention\.attention\.query$", ".attention.q_proj"),
    (r"\.attention\.attention\.key$", ".attention.k_proj"),
    (r"\.attention\.attention\.value$", ".attention.v_proj"),
    (r"\.attention\.output\.dense$", ".attention.o_proj"),
    (r"\.intermediate\.dense$", ".mlp.fc1"),
    (r"\.output\.dense$", ".mlp.fc2"),
)
_VIT_V5_TO_V4 = (
    (r"^vit\.layers\.(\d+)\.", r"vit.encoder.layer.\1."),
    (r"\.attention\.q_proj$", ".attention.attention.query"),
    (r"\.attention\.k_proj$", ".attention.attention.key"),
    (r"\.attention\.v_proj$", ".attention.attention.value"),
    (r"\.attention\.o_proj$", ".attention.output.dense"),
    (r"\.mlp\.fc1$", ".intermediate.dense"),
    (r"\.mlp\.fc2$", ".output.dense"),
)


def _renamed(module: str, table) -> str:
    for pattern, repl in table:
        module = re.sub(pattern, repl, module)
    return module


def vit_v4_module(module: str) -> str:
    """A ViT module name in transformers 4's layout (``vit.encoder.layer.0.attention.attention
    .query``) whichever layout it is in; other names unchanged."""
    if not module.startswith("vit.layers."):
        return module
    return _renamed(module, _VIT_V5_TO_V4)


def installed_vit_layout() -> str:
    """``"v5"`` when the installed transformers names ViT's attention ``q_proj`` (its
    ``modeling_vit.py`` is read, not imported: no torch needed), else ``"v4"``."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("transformers.models.vit.modeling_vit")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        return "v4"
    try:
        text = pathlib.Path(spec.origin).read_text()
    except OSError:
        return "v4"
    return "v5" if "q_proj" in text else "v4"


def resolve_layout(layout: str, family: str) -> str:
    """The module-name layout of an export: ``"v4"`` for every family but ViT; for ViT
    ``layout``, with ``"auto"`` meaning :func:`installed_vit_layout`.

    Raises:
      ConfigError: ``layout`` is not one of :data:`VIT_LAYOUTS`.
    """
    if layout not in VIT_LAYOUTS:
        raise ConfigError(
            f"vit_layout={layout!r} is unknown; use one of {VIT_LAYOUTS} (v4: transformers 4's "
            "vit.encoder.layer.N.attention.attention.query, v5: vit.layers.N.attention.q_proj)."
        )
    if family != "vit":
        return "v4"
    return installed_vit_layout() if layout == "auto" else layout


def hf_module_name(path: Sequence[str], family: str, layout: str = "v4") -> str:
    """The HF module name of a parameter-tree module path.

    ``("encoder", "layer_0", "attention", "self", "query")`` ->
    ``"bert.encoder.layer.0.attention.self.query"``; ``("layers_1", "self_attn", "q_proj")`` ->
    ``"model.layers.1.self_attn.q_proj"`` (LLaMA); heads have no family prefix
    (``"classifier"``, ``"classifier.out_proj"``, ``"lm_head"``). Agrees with the key tables
    :func:`ffa_jax.models.weights.key_table`, :func:`~ffa_jax.models.llama_weights.llama_key_table`
    and :func:`~ffa_jax.models.vit_weights.vit_key_table` (tested). ``layout="v5"`` gives
    transformers 5's ViT names (``vit.layers.0.attention.q_proj``, see :data:`VIT_LAYOUTS`).
    """
    parts: list[str] = []
    for p in path:
        m = re.fullmatch(r"(layers?)_(\d+)", p)
        parts += [m.group(1), m.group(2)] if m else [p]
    name = ".".join(parts)
    name = name if path[0] in UNPREFIXED else FAMILY_PREFIX[family] + name
    if family == "vit" and layout == "v5":
        name = _renamed(name, _VIT_V4_TO_V5)
    return name


# Parameter leaf name -> HF tensor suffix, and whether the HF tensor is the transpose.
_LEAF_TO_HF = {"kernel": ("weight", True), "bias": ("bias", False), "scale": ("weight", False)}


def _flat(params: PyTree) -> dict[tuple[str, ...], Any]:
    """``{path tuple: leaf}`` with :class:`ffa_jax.lora.LoRAWeight` nodes kept whole."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params, is_leaf=lora.is_lora):
        out[tuple(lora.path_str(path).split("/"))] = leaf
    return out


def _hf_entry(
    path: tuple[str, ...], shape: tuple[int, ...], family: str, layout: str = "v4"
) -> convert.KeyEntry:
    """The key-table row of a Dense/LayerNorm leaf of a ``family`` tree (derived from its path,
    without a model config): ``kernel`` <-> ``.weight`` transposed, ``bias``/``scale`` plain."""
    leaf = path[-1]
    if leaf not in _LEAF_TO_HF:
        raise WeightsError(
            f"parameter {'/'.join(path)} has no HF name (leaf {leaf!r}); modules_to_save can "
            "only hold Dense and LayerNorm modules."
        )
    if "patch_embeddings" in path:
        raise WeightsError(
            f"parameter {'/'.join(path)} is ViT's patch convolution, stored [C*P*P, H] here and "
            "[H, C, P, P] in HF; it cannot be a modules_to_save entry."
        )
    suffix, transpose = _LEAF_TO_HF[leaf]
    name = f"{hf_module_name(path[:-1], family, layout)}.{suffix}"
    if transpose:
        return convert.KeyEntry(name, path, shape, shape[::-1], "linear")
    return convert.plain(name, path, shape)


def _uniform(nodes: Mapping[str, lora.LoRAWeight], what: str) -> tuple[int, float]:
    ranks = {p: n.rank for p, n in nodes.items()}
    scales = {p: float(n.scale) for p, n in nodes.items()}
    if len(set(ranks.values())) != 1 or len(set(scales.values())) != 1:
        raise WeightsError(
            f"{what}: PEFT's adapter_config has one r and one lora_alpha, but the LoRA nodes "
            f"have ranks {sorted(set(ranks.values()))} and scales {sorted(set(scales.values()))}; "
            "export a tree whose nodes share rank and alpha."
        )
    return next(iter(ranks.values())), next(iter(scales.values()))


def _saved_by(module: str, name: str) -> bool:
    """PEFT saves a module whole when it or one of its ancestors matches a ``modules_to_save``
    name (equal, or a ``.``-suffix): ``classifier`` covers ``classifier.out_proj``."""
    parts = module.split(".")
    ancestors = (".".join(parts[: i + 1]) for i in range(len(parts)))
    return any(a == name or a.endswith("." + name) for a in ancestors)


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _target_modules(adapted: Sequence[str], linear: Sequence[str]) -> list[str]:
    """PEFT ``target_modules``: short names (``["query", "value"]``) when they select exactly
    the adapted modules (PEFT matches a name or a ``.``-suffix), else the full module names."""
    short = sorted({m.rsplit(".", 1)[-1] for m in adapted})
    selected = {m for m in linear if m.rsplit(".", 1)[-1] in short}
    return short if selected == set(adapted) else sorted(adapted)


# --------------------------------------------------------------------------- export


def peft_state_dict(
    params: PyTree,
    family: str,
    *,
    modules_to_save: Sequence[str] = DEFAULT_MODULES_TO_SAVE,
    layout: str = "v4",
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The PEFT tensors and ``adapter_config`` fields of a tree with LoRA nodes.

    Args:
      params: a parameter tree with :class:`ffa_jax.lora.LoRAWeight` nodes (all of one rank and
        scale).
      family: ``"bert"``, ``"roberta"``, ``"llama"`` or ``"vit"`` (:func:`family_of`).
      modules_to_save: HF module names (or ``.``-suffixes, as PEFT matches them) whose full
        weights are saved, e.g. ``("classifier",)`` or ``("classifier", "pooler")``.
      layout: ViT module names, ``"v4"`` or ``"v5"`` (:data:`VIT_LAYOUTS`).

    Returns:
      ``(tensors, fields)``: ``{PEFT key: float32 [out, in] array}`` and ``{"r", "lora_alpha",
      "target_modules", "modules_to_save"}``.

    Raises:
      WeightsError: no LoRA nodes, mixed ranks/scales, a LoRA node inside a module to save, or
        a ``modules_to_save`` name that matches nothing.
    """
    flat = _flat(params)
    nodes = {p: leaf for p, leaf in flat.items() if lora.is_lora(leaf)}
    if not nodes:
        raise WeightsError(
            "the parameter tree has no LoRA nodes; apply ffa_jax.lora.init (or load a run) "
            "before exporting a PEFT adapter."
        )
    rank, scale = _uniform({"/".join(p): n for p, n in nodes.items()}, "export")
    linear = [hf_module_name(p[:-1], family, layout) for p in flat if p[-1] == "kernel"]
    tensors: dict[str, np.ndarray] = {}
    adapted = []
    for path, node in nodes.items():
        if path[-1] != "kernel":
            raise WeightsError(f"LoRA node at {'/'.join(path)} is not a Dense kernel.")
        module = hf_module_name(path[:-1], family, layout)
        adapted.append(module)
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = np.asarray(node.a, np.float32).T
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = np.asarray(node.b, np.float32).T
    for name in modules_to_save:
        hits = 0
        for path, leaf in flat.items():
            module = hf_module_name(path[:-1], family, layout)
            if not _saved_by(module, name):
                continue
            if lora.is_lora(leaf):
                raise WeightsError(
                    f"modules_to_save entry {name!r} contains the LoRA-adapted module {module!r}; "
                    "a module is either adapted or saved whole, not both."
                )
            e = _hf_entry(path, tuple(np.shape(leaf)), family, layout)
            value = np.asarray(leaf, np.float32)
            tensors[PEFT_PREFIX + e.hf] = np.ascontiguousarray(e.to_hf(value))
            hits += 1
        if not hits:
            raise WeightsError(
                f"modules_to_save entry {name!r} matches no module of this {family} model; use "
                "e.g. 'classifier' (the head) or 'pooler' (BERT's pooler)."
            )
    fields = {
        "r": rank,
        "lora_alpha": _number(scale * rank),
        "target_modules": _target_modules(adapted, linear),
        "modules_to_save": list(modules_to_save) or None,
    }
    tensors = {k: np.ascontiguousarray(v) for k, v in sorted(tensors.items())}
    return tensors, fields


def adapter_config(
    fields: Mapping[str, Any],
    base_model_name_or_path: str | None,
    task_type: str | None = "SEQ_CLS",
) -> dict[str, Any]:
    """A complete PEFT ``adapter_config.json`` dict (the fields PEFT itself writes).

    ``task_type`` selects the ``PeftModel`` subclass: ``"SEQ_CLS"`` (encoders),
    ``"CAUSAL_LM"`` (decoders) or ``None`` (ViT: the plain ``PeftModel``), see
    :data:`TASK_TYPE`."""
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": fields["r"],
        "lora_alpha": fields["lora_alpha"],
        "lora_dropout": 0.0,
        "target_modules": fields["target_modules"],
        "modules_to_save": fields["modules_to_save"],
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
    }


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What :func:`export_peft` wrote.

    Attributes:
      out_dir: the adapter folder (``adapter_config.json``, ``adapter_model.safetensors``,
        ``README.md``); ``PeftModel.from_pretrained(base, out_dir)`` loads it.
      merged_dir: the merged full HF checkpoint (``config.json``, ``model.safetensors`` and the
        base model's tokenizer or image-processor files), or ``None``.
      base_model: ``base_model_name_or_path`` written into the adapter config.
      num_labels: classifier outputs (load the base model with this ``num_labels``); ``None``
        for decoders.
      warnings: human-readable caveats (e.g. mean pooling, a local base model), also in
        ``README.md``.
      family: ``"bert"``, ``"roberta"``, ``"llama"`` or ``"vit"``.
    """

    out_dir: pathlib.Path
    merged_dir: pathlib.Path | None
    base_model: str | None
    num_labels: int | None
    warnings: tuple[str, ...]
    family: str = "bert"


def _pooling_warning(config: Any) -> str | None:
    if not isinstance(config, EncoderConfig) or config.pooling != "mean":
        return None
    return (
        "this model was trained with mean pooling (a sentence-transformers checkpoint), but "
        f"HF {config.family.capitalize()}ForSequenceClassification feeds the head the first "
        "token's state (through BERT's pooler). The LoRA weights are exact for the encoder, but "
        "the head's logits in transformers/PEFT differ from ffa_jax's; for identical logits "
        "train with model.pooling=cls, or apply mean pooling yourself on the adapted encoder's "
        "last_hidden_state (as sentence-transformers does)."
    )


def portable_base_model(
    name: str, *, absolute: bool = False, model_dir: str | os.PathLike | None = None
) -> tuple[str, str | None]:
    """``(base_model_name_or_path, caveat or None)`` for a run's ``model.name``.

    Hub ids are kept and the offline packages become their hub ids (:data:`HUB_IDS`). A local
    folder or file becomes its name only -- a path on this machine means nothing elsewhere --
    with a caveat saying to pass the hub id (``--base-model``), unless ``absolute`` asks for
    the resolved path (``model_dir`` when given, else ``name``).
    """
    if name in HUB_IDS:
        return HUB_IDS[name], None
    local = pathlib.Path(name).expanduser()
    if not local.exists():
        return name, None  # a hub id
    if absolute:
        return str(pathlib.Path(model_dir or local).resolve()), None
    short = local.resolve().name
    return short, (
        f"the base model is a local {'folder' if local.is_dir() else 'file'}: the adapter "
        f"records only its name {short!r} (a path on this machine means nothing "
        "elsewhere). Pass its hub id (ffa-jax export-peft --base-model NAME, or "
        "base_model=NAME), or ask for the absolute path with --absolute-base-path."
    )


def _loader_lines(family: str, base: str | None, num_labels: int | None) -> list[str]:
    auto = AUTO_CLASS[family]
    labels = "" if num_labels is None else f", num_labels={num_labels}"
    return [
        "```python",
        "from peft import PeftModel",
        f"from transformers import {auto}",
        "",
        f"base = {auto}.from_pretrained({base!r}{labels})",
        'model = PeftModel.from_pretrained(base, "<this folder>").eval()',
        "```",
    ]


def _readme(base: str | None, config: Any, fields, notes, label_names) -> str:
    family = family_of_config(config)
    arch = {
        "bert": "BertForSequenceClassification",
        "roberta": "RobertaForSequenceClassification",
        "llama": "LlamaForCausalLM",
        "vit": "ViTForImageClassification",
    }[family]
    num_labels = getattr(config, "num_labels", None)
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {base}",
        "---",
        "",
        "# FFA-LoRA adapter exported by ffa_jax",
        "",
        f"- base model: `{base}` ({family}, {arch})",
        f"- LoRA: r={fields['r']}, lora_alpha={fields['lora_alpha']}, "
        f"target_modules={fields['target_modules']}; the frozen A is included",
    ]
    if num_labels is not None:
        lines.append(
            f"- head: modules_to_save={fields['modules_to_save']}, num_labels={num_labels}"
            + (f", labels {list(label_names)}" if label_names else "")
        )
    if isinstance(config, EncoderConfig):
        lines.append(f"- pooling used in training: {config.pooling}")
    lines += ["", *_loader_lines(family, base, num_labels), ""]
    lines.append(
        "The merged full checkpoint (no PEFT needed) is in `merged/` when it was exported."
    )
    if notes:
        lines += ["", "## Caveats", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _write_text(path: pathlib.Path, data: str | bytes) -> None:
    atomic_write_bytes(path, data.encode() if isinstance(data, str) else data)


def _write_json(path: pathlib.Path, obj: Any) -> None:
    _write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _metadata(config: Any) -> dict[str, str]:
    family = family_of_config(config)
    info: dict[str, Any] = {"family": family}
    if isinstance(config, EncoderConfig):
        info = {"family": family, "pooling": config.pooling, "num_labels": config.num_labels}
    elif family == "vit":
        info["num_labels"] = config.num_labels
    return {"format": "pt", "ffa_jax": json.dumps(info)}


def default_modules_to_save(config: Any, model_dir: str | os.PathLike | None = None) -> list[str]:
    """What the adapter saves whole: the classifier of encoders and ViTs (plus BERT's pooler
    when the base checkpoint in ``model_dir`` has none), nothing for decoders."""
    family = family_of_config(config)
    if family == "llama":
        return []
    out = list(DEFAULT_MODULES_TO_SAVE)
    if family == "bert" and model_dir is not None and not _has_pooler(pathlib.Path(model_dir)):
        out.append("pooler")
    return out


def safetensors_bytes(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> bytes:
    """A float32 safetensors file, deterministically: the header lists the metadata and the
    tensors in sorted key order (the ``safetensors`` writer keeps metadata in a hash map, whose
    order changes between processes), so equal adapters give equal bytes.

    Layout (the safetensors format): 8-byte little-endian header length, the JSON header
    padded with spaces to a multiple of 8, then every tensor's little-endian bytes in header
    order."""
    header: dict[str, Any] = {"__metadata__": {k: str(metadata[k]) for k in sorted(metadata)}}
    chunks, offset = [], 0
    for name in sorted(tensors):
        data = np.ascontiguousarray(tensors[name], dtype="<f4")
        header[name] = {
            "dtype": "F32",
            "shape": list(data.shape),
            "data_offsets": [offset, offset + data.nbytes],
        }
        chunks.append(data.tobytes())
        offset += data.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + b"".join(chunks)


def save_peft(
    params: PyTree,
    config: Any,
    out_dir: str | os.PathLike,
    *,
    base_model: str | None,
    modules_to_save: Sequence[str] | None = None,
    label_names: Sequence[str] | None = None,
    notes: Sequence[str] = (),
    vit_layout: str = "auto",
) -> pathlib.Path:
    """Writes the PEFT adapter of ``params`` (``adapter_config.json``,
    ``adapter_model.safetensors``, ``README.md``) to ``out_dir``, each file atomically; the
    bytes depend only on the adapter's values and these arguments. See :func:`export_peft`.

    Args:
      config: the tree's EncoderConfig, LlamaConfig or ViTConfig.
      modules_to_save: default :func:`default_modules_to_save` (without a model folder).
      vit_layout: ViT module names: ``"auto"`` (the installed transformers'), ``"v4"`` or
        ``"v5"`` (:data:`VIT_LAYOUTS`); ignored for other families.
    """
    family = family_of_config(config)
    layout = resolve_layout(vit_layout, family)
    if modules_to_save is None:
        modules_to_save = default_modules_to_save(config)
    tensors, fields = peft_state_dict(
        params, family, modules_to_save=modules_to_save, layout=layout
    )
    if family == "vit":
        notes = [
            *notes,
            f"module names in transformers {layout}'s ViT layout ("
            + (
                "vit.layers.N.attention.q_proj; for transformers 4 export with --vit-layout v4)"
                if layout == "v5"
                else "vit.encoder.layer.N.attention.attention.query; for transformers 5 export "
                "with --vit-layout v5)"
            ),
        ]
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_text(out / ADAPTER_WEIGHTS, safetensors_bytes(tensors, _metadata(config)))
    _write_json(out / ADAPTER_CONFIG, adapter_config(fields, base_model, TASK_TYPE[family]))
    _write_text(out / "README.md", _readme(base_model, config, fields, notes, label_names))
    return out


def _copy_model_files(src: pathlib.Path, dst: pathlib.Path) -> None:
    for name in TOKENIZER_FILES + SENTENCE_TRANSFORMERS_FILES:
        s = src / name
        if s.is_dir():
            shutil.copytree(s, dst / name, dirs_exist_ok=True)
        elif s.is_file():
            shutil.copy2(s, dst / name)


def save_merged(
    params: PyTree,
    config: Any,
    out_dir: str | os.PathLike,
    *,
    model_dir: str | os.PathLike | None = None,
    label_names: Sequence[str] | None = None,
    tokenizer: Any = None,
) -> pathlib.Path:
    """Writes the merged full HF checkpoint of ``params`` (``W0 + scale * A B`` folded in) to
    ``out_dir``: ``config.json`` + ``model.safetensors`` in the family's HF layout, plus the
    tokenizer / image-processor files of ``model_dir`` (a local folder) or ``tokenizer``
    (``save_pretrained``). It loads with the family's ``AutoModelFor*`` and as an ffa_jax
    ``model.name``."""
    from ffa_jax.models import llama_weights, vit_weights

    family = family_of_config(config)
    out = pathlib.Path(out_dir)
    src = pathlib.Path(model_dir) if model_dir is not None else None
    src = src if src is not None and src.is_dir() else None
    hf_base = sources.read_hf_config(src) if src is not None else {}
    if family == "llama":
        llama_weights.save_llama(params, config, out)
    elif family == "vit":
        mean = std = None
        if src is not None:
            mean, std = vit_weights.read_image_processor(src, config.num_channels)
        vit_weights.save_vit(
            params,
            config,
            out,
            image_mean=mean,
            image_std=std,
            label_names=(
                label_names if label_names and len(label_names) == config.num_labels else None
            ),
            base_hf_config=hf_base,
        )
    else:
        if label_names is not None and len(label_names) == config.num_labels:
            hf_base["id2label"] = {str(i): str(n) for i, n in enumerate(label_names)}
        weights_lib.save_encoder(params, config, out, base_hf_config=hf_base)
    if src is not None:
        _copy_model_files(src, out)
    elif tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def check_export_folder(out_dir: str | os.PathLike, overwrite: bool) -> pathlib.Path:
    """``out_dir`` as a path; raises ConfigError if it exists, is not empty and not
    ``overwrite`` (checked before any export work)."""
    out = pathlib.Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(
            f"output folder {str(out)!r} already exists and is not empty; pass --overwrite "
            "(overwrite=True) or choose another folder."
        )
    return out


def export_peft(
    params: PyTree,
    out_dir: str | os.PathLike,
    *,
    config: Any = None,
    base_model: str | os.PathLike | None = None,
    absolute_base_path: bool = False,
    modules_to_save: Sequence[str] | None = None,
    merged: bool = True,
    label_names: Sequence[str] | None = None,
    overwrite: bool = False,
    vit_layout: str = "auto",
    model_dir: str | os.PathLike | None = None,
    tokenizer: Any = None,
    notes: Sequence[str] = (),
) -> ExportResult:
    """Exports a parameter tree as a PEFT LoRA adapter plus a merged HF checkpoint.

    A run directory is exported by :func:`ffa_jax.run.export_run_peft`, which rebuilds the run
    and calls this function (the model layer does not know about runs).

    Writes to ``out_dir``: ``adapter_config.json``, ``adapter_model.safetensors`` (PEFT key
    names, PyTorch ``[out, in]`` layout, A included), ``README.md``, and with ``merged``
    ``merged/`` (see :func:`save_merged`). Works for BERT/RoBERTa, LLaMA-family and ViT models.

    Args:
      params: a parameter tree with LoRA nodes.
      out_dir: the adapter folder; must be empty or absent unless ``overwrite``.
      config: the tree's EncoderConfig / LlamaConfig / ViTConfig (required).
      base_model: ``base_model_name_or_path`` to record. Without ``model_dir`` it may be a
        local folder: its tokenizer files and ``config.json`` fields go into ``merged/`` and
        its name (not its path) is recorded. With ``model_dir`` it is recorded as given.
      absolute_base_path: record the base model's absolute local path instead (the adapter
        then loads only on this machine).
      modules_to_save: modules saved whole with the adapter (default
        :func:`default_modules_to_save`).
      merged: also write ``merged/``.
      label_names: names for ``id2label`` (a run directory supplies its own).
      overwrite: replace an existing non-empty ``out_dir``.
      vit_layout: ViT module names (``"auto"``: those of the installed transformers; ``"v4"``:
        ``vit.encoder.layer.N.attention.attention.query``; ``"v5"``:
        ``vit.layers.N.attention.q_proj``). PEFT needs the layout of the transformers that
        loads the adapter.
      model_dir: the base model's local folder (tokenizer files and ``config.json`` fields
        for ``merged/``), when the caller already resolved it (a run); ``base_model`` is then
        recorded as given.
      tokenizer: a tokenizer to save into ``merged/`` (a LLaMA run without a local folder).
      notes: caveats the caller found (e.g. a base model recorded by its local name only);
        they go into the README and ``warnings``.

    Returns:
      An :class:`ExportResult`; its ``warnings`` (also issued with :func:`warnings.warn`)
      explain when HF logits will differ from ffa_jax's (mean pooling) and when the base model
      is recorded by its local name only.

    Raises:
      ConfigError: ``out_dir`` exists and is not empty, or ``config`` is missing.
      WeightsError: the run or tree cannot be exported (see :func:`peft_state_dict`).
    """
    out = check_export_folder(out_dir, overwrite)
    if config is None:
        raise ConfigError(
            "export_peft(params, ...) needs config=<the EncoderConfig, LlamaConfig or "
            "ViTConfig of params>; to export a run directory use ffa_jax.run.export_run_peft."
        )
    notes = list(notes)
    base = None if base_model is None else os.fspath(base_model)
    if model_dir is not None:
        model_dir = pathlib.Path(model_dir)
    elif base is not None and pathlib.Path(base).expanduser().is_dir():
        model_dir = pathlib.Path(base).expanduser().resolve()
        base, note = portable_base_model(base, absolute=absolute_base_path)
        notes += [note] if note else []
    if modules_to_save is None:
        modules_to_save = default_modules_to_save(config, model_dir)
    notes = [w for w in (_pooling_warning(config),) if w] + notes
    if overwrite and out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    save_peft(
        params,
        config,
        out,
        base_model=base,
        modules_to_save=modules_to_save,
        label_names=label_names,
        notes=notes,
        vit_layout=vit_layout,
    )
    merged_dir = None
    if merged:
        merged_dir = save_merged(
            params,
            config,
            out / MERGED_DIR,
            model_dir=model_dir,
            label_names=label_names,
            tokenizer=tokenizer,
        )
    for n in notes:
        warnings.warn(n, stacklevel=2)
    return ExportResult(
        out_dir=out,
        merged_dir=merged_dir,
        base_model=base,
        num_labels=getattr(config, "num_labels", None),
        warnings=tuple(notes),
        family=family_of_config(config),
    )


def _has_pooler(model_dir: pathlib.Path) -> bool:
    names = convert.safetensors_index(model_dir)
    return any(k.removeprefix("bert.").startswith("pooler.") for k in names)


def init_from_adapter(params: PyTree, lora_cfg: LoRAConfig) -> PyTree:
    """``lora.init_from``: the run's LoRA tree (from :func:`ffa_jax.lora.init`) with every
    LoRA node's ``a``/``b`` and every saved module (the head) taken from the PEFT adapter
    folder ``lora_cfg.init_from`` (:func:`import_peft`). The adapter is treated as public,
    like the pretrained weights: its values are not covered by the run's privacy guarantee,
    only the updates that training adds to them.

    Raises:
      ConfigError: ``lora.init_from`` is not a PEFT adapter folder.
      WeightsError: the adapter does not fit the model or ``lora.rank`` / ``lora.alpha`` /
        ``lora.targets`` (the message names the key and the setting to change).
    """
    path = pathlib.Path(os.path.expanduser(lora_cfg.init_from))
    if not (path / ADAPTER_CONFIG).is_file():
        raise ConfigError(
            f"lora.init_from={lora_cfg.init_from!r}: {str(path / ADAPTER_CONFIG)!r} does not "
            "exist; give a PEFT adapter folder (what ffa-jax export-peft or "
            "PeftModel.save_pretrained writes)."
        )
    return import_peft(path, params, lora_cfg)


# --------------------------------------------------------------------------- import


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of a PEFT LoRA adapter folder.

    Raises:
      WeightsError: missing or invalid file, not a LoRA adapter, or a LoRA option ffa_jax does
        not implement (DoRA, rsLoRA, per-module rank/alpha patterns, fan_in_fan_out, biases).
    """
    path = pathlib.Path(adapter_dir) / ADAPTER_CONFIG
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise WeightsError(
            f"{str(path)!r} does not exist; pass a PEFT adapter folder (adapter_config.json + "
            f"{ADAPTER_WEIGHTS})."
        ) from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{str(path)!r} is not valid JSON: {e}") from e
    if cfg.get("peft_type") != "LORA":
        raise WeightsError(
            f"{str(path)!r}: peft_type={cfg.get('peft_type')!r}; only LoRA adapters "
            "(peft_type 'LORA') can be imported."
        )
    for k, ok in _UNSUPPORTED.items():
        if cfg.get(k) not in ok:
            raise WeightsError(
                f"{str(path)!r}: {k}={cfg.get(k)!r} is not supported by ffa_jax (it implements "
                "plain LoRA, W0 + (lora_alpha / r) B A); re-train or convert the adapter without it."
            )
    if cfg.get("bias", "none") != "none":
        raise WeightsError(
            f"{str(path)!r}: bias={cfg.get('bias')!r} is not supported; only bias='none' "
            "adapters (the base model's biases unchanged) can be imported."
        )
    for k in ("r", "lora_alpha"):
        v = cfg.get(k)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
            raise WeightsError(f"{str(path)!r}: {k}={v!r} must be a positive number.")
    return cfg


def read_lora_config(adapter_dir: str | os.PathLike, mode: str = "ffa") -> LoRAConfig:
    """The :class:`LoRAConfig` of a PEFT adapter: ``rank = r``, ``alpha = lora_alpha`` and
    ``targets`` a regular expression matching exactly the adapted modules' kernels."""
    cfg = read_adapter_config(adapter_dir)
    modules = sorted({m for m, _ in _lora_keys(_read_tensors(adapter_dir))})
    paths = [_module_path_regex(m) for m in modules]
    return LoRAConfig(
        mode=mode,
        rank=int(cfg["r"]),
        alpha=float(cfg["lora_alpha"]),
        targets="(" + "|".join(paths) + ")/kernel",
    )


def _module_path_regex(module: str) -> str:
    """``bert.encoder.layer.0.attention.self.query`` -> ``encoder/layer_0/attention/self/query``
    (escaped); ``model.layers.0.self_attn.q_proj`` -> ``layers_0/self_attn/q_proj``."""
    parts = vit_v4_module(module).split(".")
    if parts[0] + "." in FAMILY_PREFIX.values():
        parts = parts[1:]
    out: list[str] = []
    i = 0
    while i < len(parts):
        if parts[i] in ("layer", "layers") and i + 1 < len(parts) and parts[i + 1].isdigit():
            out.append(f"{parts[i]}_{parts[i + 1]}")
            i += 2
        else:
            out.append(parts[i])
            i += 1
    return re.escape("/".join(out))


def _read_tensors(adapter_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    path = pathlib.Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.is_file():
        bin_path = path.with_name("adapter_model.bin")
        hint = (
            " (found adapter_model.bin: re-save it with save_pretrained(safe_serialization=True))"
            if bin_path.is_file()
            else ""
        )
        raise WeightsError(f"{str(path)!r} does not exist{hint}.")
    try:
        return load_file(str(path))
    except Exception as e:
        raise WeightsError(f"cannot read {str(path)!r} as safetensors: {e}") from e


def _lora_keys(tensors: Mapping[str, np.ndarray]) -> list[tuple[str, str]]:
    out = []
    for k in tensors:
        m = _LORA_KEY.fullmatch(k.removeprefix(PEFT_PREFIX))
        if m:
            out.append((m.group("module"), m.group("which")))
    return out


def import_peft(
    adapter_dir: str | os.PathLike,
    base_params: PyTree,
    lora_cfg: LoRAConfig | None = None,
) -> PyTree:
    """Loads a PEFT LoRA adapter into an ffa_jax parameter tree.

    Every adapted module becomes a :class:`ffa_jax.lora.LoRAWeight` with ``a = lora_A.T``,
    ``b = lora_B.T`` and ``scale = lora_alpha / r``; every saved module (``modules_to_save``,
    e.g. the classifier) replaces the base weights. Train the result in either mode with
    ``lora.trainable_mask(params, lora_cfg.mode)`` (FFA: the imported A stays frozen).

    Args:
      adapter_dir: a folder with ``adapter_config.json`` and ``adapter_model.safetensors``
        (what ``PeftModel.save_pretrained`` or :func:`export_peft` writes).
      base_params: the base model's tree from :func:`ffa_jax.models.load_encoder` (plain, or
        with LoRA nodes, whose ``w0`` is used).
      lora_cfg: the expected LoRA config. ``rank`` and ``alpha`` must equal the adapter's
        ``r`` and ``lora_alpha``, and ``targets`` must match exactly the adapted modules. With
        ``None`` it is read from the adapter (:func:`read_lora_config`).

    Returns:
      The tree with LoRA nodes at the adapted modules.

    Raises:
      WeightsError: the adapter does not match the model or ``lora_cfg``. The message names
        every mismatching key: rank (``r`` vs ``lora.rank``), alpha, targets the model does not
        have or ``lora.targets`` does not select, missing A/B, shape mismatches, and unknown
        keys.
    """
    acfg = read_adapter_config(adapter_dir)
    tensors = _read_tensors(adapter_dir)
    family = family_of(base_params)
    source = str(pathlib.Path(adapter_dir) / ADAPTER_WEIGHTS)
    if lora_cfg is None:
        lora_cfg = read_lora_config(adapter_dir)
    r, alpha = acfg["r"], float(acfg["lora_alpha"])
    errors: list[str] = []
    if int(r) != lora_cfg.rank:
        errors.append(
            f"rank mismatch: {ADAPTER_CONFIG} has r={r} but lora.rank={lora_cfg.rank}; set "
            f"lora.rank={r} (and lora.alpha={_number(alpha)}) to load this adapter"
        )
    elif not np.isclose(alpha / r, lora_cfg.scale, rtol=1e-6):
        errors.append(
            f"alpha mismatch: {ADAPTER_CONFIG} has lora_alpha={_number(alpha)} (scale "
            f"{alpha / r:g}) but lora.alpha={_number(lora_cfg.alpha)} (scale {lora_cfg.scale:g}); "
            f"set lora.alpha={_number(alpha)}"
        )

    flat = _flat(base_params)
    base_w = {p: (leaf.w0 if lora.is_lora(leaf) else leaf) for p, leaf in flat.items()}
    kernels = {hf_module_name(p[:-1], family): p for p in base_w if p[-1] == "kernel"}
    entry_of: dict[str, convert.KeyEntry] = {}
    for p, w in base_w.items():
        if p[-1] in _LEAF_TO_HF and "patch_embeddings" not in p:
            e = _hf_entry(p, tuple(np.shape(w)), family)
            entry_of[e.hf] = e
    wanted = {
        hf_module_name(p[:-1], family)
        for p in (tuple(s.split("/")) for s in lora.target_paths(_plain(base_w), lora_cfg.targets))
    }

    factors: dict[str, dict[str, np.ndarray]] = {}
    replaced: dict[tuple[str, ...], np.ndarray] = {}
    for key, value in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            errors.append(f"unexpected key {key!r}: PEFT keys start with {PEFT_PREFIX!r}")
            continue
        name = key.removeprefix(PEFT_PREFIX)
        m = _LORA_KEY.fullmatch(name)
        if family == "vit":  # either transformers layout of ViT's names
            module, _, suffix = name.rpartition(".")
            name = f"{vit_v4_module(module)}.{suffix}"
            if m:
                m = _LORA_KEY.fullmatch(
                    f"{vit_v4_module(m.group('module'))}.lora_{m.group('which')}.weight"
                )
        if m:
            module, which = m.group("module"), m.group("which")
            if module not in kernels:
                other = next(
                    (
                        f
                        for f, pre in FAMILY_PREFIX.items()
                        if f != family and module.startswith(pre)
                    ),
                    None,
                )
                why = (
                    f"it is a {other} module name but the base model is {family}"
                    if other is not None
                    else f"the {family} base model has no such Dense layer"
                )
                errors.append(
                    f"adapter key {key!r} targets module {module!r}: {why} "
                    f"(e.g. {sorted(kernels)[:2]})"
                )
                continue
            factors.setdefault(module, {})[which] = value
            continue
        e = entry_of.get(name)
        if e is None:
            errors.append(
                f"adapter key {key!r} matches no parameter of the {family} base model "
                "(a LoRA factor must end in .lora_A.weight/.lora_B.weight; a saved module must "
                "be a Dense/LayerNorm of the model)"
            )
            continue
        if tuple(value.shape) != e.hf_shape:
            errors.append(
                f"shape mismatch: {key!r} expected {e.hf_shape}, got {tuple(value.shape)}"
            )
            continue
        replaced[e.path] = e.to_tree(value)

    nodes: dict[tuple[str, ...], lora.LoRAWeight] = {}
    for module, ab in sorted(factors.items()):
        path = kernels[module]
        d_in, d_out = np.shape(base_w[path])
        for which, shape in (("A", (int(r), d_in)), ("B", (d_out, int(r)))):
            k = f"{PEFT_PREFIX}{module}.lora_{which}.weight"
            if which not in ab:
                errors.append(f"missing key {k!r} (shape {shape}): A and B come in pairs")
            elif tuple(ab[which].shape) != shape:
                errors.append(
                    f"shape mismatch: {k!r} expected {shape} ([r, d_in] for A, [d_out, r] for "
                    f"B with r={r}), got {tuple(ab[which].shape)}"
                )
        if module not in wanted:
            errors.append(
                f"target mismatch: adapter key {PEFT_PREFIX}{module}.lora_A.weight adapts "
                f"{'/'.join(path)}, which lora.targets={lora_cfg.targets!r} does not select"
            )
    for module in sorted(wanted - set(factors)):
        errors.append(
            f"target mismatch: lora.targets={lora_cfg.targets!r} selects "
            f"{'/'.join(kernels[module])} but the adapter has no "
            f"{PEFT_PREFIX}{module}.lora_A.weight / lora_B.weight"
        )
    if errors:
        raise WeightsError(
            f"cannot load the PEFT adapter {source!r} into this {family} model "
            f"({len(errors)} problem(s)):\n  " + "\n  ".join(errors)
        )
    scale = lora_cfg.scale
    for module, ab in factors.items():
        path = kernels[module]
        nodes[path] = lora.LoRAWeight(
            w0=base_w[path],
            a=jnp.asarray(ab["A"].T, jnp.float32),
            b=jnp.asarray(ab["B"].T, jnp.float32),
            scale=scale,
        )

    def pick(path, leaf):
        p = tuple(lora.path_str(path).split("/"))
        if p in nodes:
            return nodes[p]
        if p in replaced:
            return jnp.asarray(replaced[p], jnp.float32)
        return base_w[p]

    return jax.tree_util.tree_map_with_path(pick, base_params, is_leaf=lora.is_lora)


def _plain(base_w: Mapping[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, leaf in base_w.items():
        convert.set_path(tree, path, leaf)
    return tree


__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "ExportResult",
    "adapter_config",
    "default_modules_to_save",
    "export_peft",
    "family_of",
    "family_of_config",
    "hf_module_name",
    "import_peft",
    "init_from_adapter",
    "installed_vit_layout",
    "peft_state_dict",
    "portable_base_model",
    "read_adapter_config",
    "read_lora_config",
    "resolve_layout",
    "safetensors_bytes",
    "save_merged",
    "save_peft",
    "vit_v4_module",
]
