"""Hugging Face PEFT LoRA adapters in and out of the ffa_jax parameter tree.

An ffa_jax LoRA node ``LoRAWeight(w0 [d_in, d_out], a [d_in, r], b [r, d_out], scale)`` is PEFT's
``lora.Linear`` with ``lora_A.weight = a.T`` (``[r, d_in]``), ``lora_B.weight = b.T``
(``[d_out, r]``) and ``scale = lora_alpha / r``, so both compute
``x W0 + scale * (x A^T) B^T``. A PEFT adapter folder holds:

* ``adapter_config.json``: ``peft_type: LORA``, ``task_type: SEQ_CLS``, ``r``, ``lora_alpha``,
  ``target_modules``, ``lora_dropout: 0``, ``bias: none``, ``modules_to_save`` and
  ``base_model_name_or_path``;
* ``adapter_model.safetensors``: ``base_model.model.<module>.lora_A.weight`` /
  ``lora_B.weight`` for every adapted module (e.g.
  ``base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight``) -- the frozen A
  included, so the adapter is self-contained -- and ``base_model.model.<module>.weight`` /
  ``.bias`` of every module in ``modules_to_save``.

**The classification head.** PEFT's ``SEQ_CLS`` task saves the head (``modules_to_save:
["classifier", "score"]``) with every adapter, and ffa_jax does the same: its head is either
trained (``model.train_head: true``) or a random init drawn from the run's seed, and in both
cases HF cannot reproduce it from the base checkpoint, so the exported adapter carries it
(``classifier``; plus BERT's ``pooler`` when the base checkpoint has none). That is what makes
``PeftModel.from_pretrained`` give ffa_jax's logits.

**Pooling.** HF ``BertForSequenceClassification`` / ``RobertaForSequenceClassification`` read
the first token (BERT through its pooler). ffa_jax runs on sentence-transformers checkpoints
(all-MiniLM-L6-v2, the quickstart) use ``pooling: mean`` instead. Their adapters are exact for
the encoder (the LoRA weights are pooling-independent) but the head was trained on mean-pooled
features, so in HF's classes the logits differ; :func:`export_peft` warns and says so in the
adapter's ``README.md``. Runs with ``model.pooling: cls`` give identical logits.

Python API::

    export_peft(run_dir_or_params, out_dir, ...)   # adapter files + merged/ HF checkpoint
    import_peft(adapter_dir, base_params, lora_cfg) # PEFT adapter -> tree with LoRA nodes
    read_lora_config(adapter_dir, mode="ffa")       # the adapter's LoRAConfig
    load_run(run_dir)                               # a finished run's params and configs

Command line: ``ffa-jax export-peft RUN_DIR OUT_DIR``.
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
from ffa_jax.models import weights as weights_lib
from ffa_jax.models.encoder import EncoderConfig

PyTree = Any

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


def family_of(params: PyTree) -> str:
    """``"roberta"`` if the tree has RoBERTa's ``classifier/out_proj`` head, else ``"bert"``."""
    head = params.get("classifier", {}) if isinstance(params, Mapping) else {}
    return "roberta" if isinstance(head, Mapping) and "out_proj" in head else "bert"


def hf_module_name(path: Sequence[str], family: str) -> str:
    """The HF module name of a parameter-tree module path.

    ``("encoder", "layer_0", "attention", "self", "query")`` ->
    ``"bert.encoder.layer.0.attention.self.query"``; the classifier has no family prefix in
    ``*ForSequenceClassification`` (``"classifier"``, ``"classifier.out_proj"``). Agrees with
    :func:`ffa_jax.models.weights.key_table` (tested).
    """
    parts: list[str] = []
    for p in path:
        m = re.fullmatch(r"layer_(\d+)", p)
        parts += ["layer", m.group(1)] if m else [p]
    name = ".".join(parts)
    return name if path[0] == "classifier" else weights_lib.PREFIX[family] + name


# Parameter leaf name -> HF tensor suffix, and whether the HF tensor is the transpose.
_LEAF_TO_HF = {"kernel": ("weight", True), "bias": ("bias", False), "scale": ("weight", False)}


def _flat(params: PyTree) -> dict[tuple[str, ...], Any]:
    """``{path tuple: leaf}`` with :class:`ffa_jax.lora.LoRAWeight` nodes kept whole."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params, is_leaf=lora.is_lora):
        out[tuple(lora.path_str(path).split("/"))] = leaf
    return out


def _hf_tensor_name(path: tuple[str, ...], family: str) -> tuple[str, bool]:
    leaf = path[-1]
    if leaf not in _LEAF_TO_HF:
        raise WeightsError(
            f"parameter {'/'.join(path)} has no HF name (leaf {leaf!r}); modules_to_save can "
            "only hold Dense and LayerNorm modules."
        )
    suffix, transpose = _LEAF_TO_HF[leaf]
    return f"{hf_module_name(path[:-1], family)}.{suffix}", transpose


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
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The PEFT tensors and ``adapter_config`` fields of a tree with LoRA nodes.

    Args:
      params: a parameter tree with :class:`ffa_jax.lora.LoRAWeight` nodes (all of one rank and
        scale).
      family: ``"bert"`` or ``"roberta"``.
      modules_to_save: HF module names (or ``.``-suffixes, as PEFT matches them) whose full
        weights are saved, e.g. ``("classifier",)`` or ``("classifier", "pooler")``.

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
    linear = [hf_module_name(p[:-1], family) for p in flat if p[-1] == "kernel"]
    tensors: dict[str, np.ndarray] = {}
    adapted = []
    for path, node in nodes.items():
        if path[-1] != "kernel":
            raise WeightsError(f"LoRA node at {'/'.join(path)} is not a Dense kernel.")
        module = hf_module_name(path[:-1], family)
        adapted.append(module)
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = np.asarray(node.a, np.float32).T
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = np.asarray(node.b, np.float32).T
    for name in modules_to_save:
        hits = 0
        for path, leaf in flat.items():
            module = hf_module_name(path[:-1], family)
            if not _saved_by(module, name):
                continue
            if lora.is_lora(leaf):
                raise WeightsError(
                    f"modules_to_save entry {name!r} contains the LoRA-adapted module {module!r}; "
                    "a module is either adapted or saved whole, not both."
                )
            hf, transpose = _hf_tensor_name(path, family)
            value = np.asarray(leaf, np.float32)
            tensors[PEFT_PREFIX + hf] = np.ascontiguousarray(value.T if transpose else value)
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
    fields: Mapping[str, Any], base_model_name_or_path: str | None
) -> dict[str, Any]:
    """A complete PEFT ``adapter_config.json`` dict (the fields PEFT itself writes)."""
    return {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS",
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
        base model's tokenizer files), or ``None``.
      base_model: ``base_model_name_or_path`` written into the adapter config.
      num_labels: classifier outputs (load the base model with this ``num_labels``).
      warnings: human-readable caveats (e.g. mean pooling), also in ``README.md``.
    """

    out_dir: pathlib.Path
    merged_dir: pathlib.Path | None
    base_model: str | None
    num_labels: int
    warnings: tuple[str, ...]


def _pooling_warning(config: EncoderConfig) -> str | None:
    if config.pooling != "mean":
        return None
    return (
        "this model was trained with mean pooling (a sentence-transformers checkpoint), but "
        f"HF {config.family.capitalize()}ForSequenceClassification feeds the head the first "
        "token's state (through BERT's pooler). The LoRA weights are exact for the encoder, but "
        "the head's logits in transformers/PEFT differ from ffa_jax's; for identical logits "
        "train with model.pooling=cls, or apply mean pooling yourself on the adapted encoder's "
        "last_hidden_state (as sentence-transformers does)."
    )


def _readme(result_base: str | None, config: EncoderConfig, fields, notes, label_names) -> str:
    arch = f"{'Bert' if config.family == 'bert' else 'Roberta'}ForSequenceClassification"
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {result_base}",
        "---",
        "",
        "# FFA-LoRA adapter exported by ffa_jax",
        "",
        f"- base model: `{result_base}` ({config.family}, {arch})",
        f"- LoRA: r={fields['r']}, lora_alpha={fields['lora_alpha']}, "
        f"target_modules={fields['target_modules']}; the frozen A is included",
        f"- head: modules_to_save={fields['modules_to_save']}, num_labels={config.num_labels}"
        + (f", labels {list(label_names)}" if label_names else ""),
        f"- pooling used in training: {config.pooling}",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForSequenceClassification",
        "",
        f"base = AutoModelForSequenceClassification.from_pretrained({result_base!r}, "
        f"num_labels={config.num_labels})",
        'model = PeftModel.from_pretrained(base, "<this folder>").eval()',
        "```",
        "",
        "The merged full checkpoint (no PEFT needed) is in `merged/` when it was exported.",
    ]
    if notes:
        lines += ["", "## Caveats", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _write_json(path: pathlib.Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def save_peft(
    params: PyTree,
    config: EncoderConfig,
    out_dir: str | os.PathLike,
    *,
    base_model: str | None,
    modules_to_save: Sequence[str] = DEFAULT_MODULES_TO_SAVE,
    label_names: Sequence[str] | None = None,
    notes: Sequence[str] = (),
) -> pathlib.Path:
    """Writes the PEFT adapter of ``params`` (``adapter_config.json``,
    ``adapter_model.safetensors``, ``README.md``) to ``out_dir``. See :func:`export_peft`."""
    from safetensors.numpy import save_file

    tensors, fields = peft_state_dict(params, config.family, modules_to_save=modules_to_save)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": "pt",
        "ffa_jax": json.dumps(
            {"family": config.family, "pooling": config.pooling, "num_labels": config.num_labels}
        ),
    }
    tmp = out / f".{ADAPTER_WEIGHTS}.tmp"
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, out / ADAPTER_WEIGHTS)
    _write_json(out / ADAPTER_CONFIG, adapter_config(fields, base_model))
    (out / "README.md").write_text(_readme(base_model, config, fields, notes, label_names))
    return out


def _copy_model_files(src: pathlib.Path, dst: pathlib.Path) -> None:
    for name in TOKENIZER_FILES + SENTENCE_TRANSFORMERS_FILES:
        s = src / name
        if s.is_dir():
            shutil.copytree(s, dst / name, dirs_exist_ok=True)
        elif s.is_file():
            shutil.copy2(s, dst / name)


def export_peft(
    source: str | os.PathLike | PyTree,
    out_dir: str | os.PathLike,
    *,
    config: EncoderConfig | None = None,
    base_model: str | os.PathLike | None = None,
    modules_to_save: Sequence[str] | None = None,
    merged: bool = True,
    num_labels: int | None = None,
    label_names: Sequence[str] | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Exports a run (or a parameter tree) as a PEFT LoRA adapter plus a merged HF checkpoint.

    Writes to ``out_dir``: ``adapter_config.json``, ``adapter_model.safetensors`` (PEFT key
    names, PyTorch ``[out, in]`` layout, A included), ``README.md``, and with ``merged``
    ``merged/`` (``config.json`` + ``model.safetensors`` with ``W0 + scale * A B`` folded in,
    plus the base model's tokenizer files): it loads with
    ``AutoModelForSequenceClassification.from_pretrained`` and as an ffa_jax ``model.name``.

    Args:
      source: a run directory (``config.yaml`` + ``adapter.safetensors``, see :func:`load_run`)
        or a parameter tree with LoRA nodes (then ``config`` is required).
      out_dir: the adapter folder; must be empty or absent unless ``overwrite``.
      config: the tree's :class:`EncoderConfig` (ignored for a run directory).
      base_model: ``base_model_name_or_path`` to record. For a run directory it defaults to
        the run's ``model.name`` (a hub id is kept; ``minilm`` and local folders become
        absolute folder paths); for a tree it is also the folder whose tokenizer files and
        ``config.json`` fields are copied into ``merged/`` when it is a local folder.
      modules_to_save: modules saved whole with the adapter. Default: ``("classifier",)``, and
        BERT's ``"pooler"`` too when the base checkpoint has none (ffa_jax initialised it).
      merged: also write ``merged/``.
      num_labels: for a run directory, the label count if it cannot be read from the run.
      label_names: names for ``id2label`` (a run directory supplies its own).
      overwrite: replace an existing non-empty ``out_dir``.

    Returns:
      An :class:`ExportResult`; its ``warnings`` (also issued with :func:`warnings.warn`)
      explain when HF logits will differ from ffa_jax's (mean pooling).

    Raises:
      ConfigError: ``out_dir`` exists and is not empty, or ``config`` is missing for a tree.
      WeightsError: the run or tree cannot be exported (see :func:`peft_state_dict`).
    """
    out = pathlib.Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(
            f"output folder {str(out)!r} already exists and is not empty; pass --overwrite "
            "(overwrite=True) or choose another folder."
        )
    model_dir: pathlib.Path | None = None
    if isinstance(source, (str, os.PathLike)):
        run = load_run(source, num_labels=num_labels)
        params, config = run.params, run.encoder_config
        model_dir = run.model_dir
        label_names = label_names or run.label_names
        base = str(base_model) if base_model is not None else run.base_model
    else:
        if config is None:
            raise ConfigError(
                "export_peft(params, ...) needs config=<the EncoderConfig of params>; or pass a "
                "run directory."
            )
        params = source
        base = None if base_model is None else os.fspath(base_model)
        if base is not None and pathlib.Path(base).expanduser().is_dir():
            model_dir = pathlib.Path(base).expanduser().resolve()
            base = str(model_dir)
    if modules_to_save is None:
        modules_to_save = list(DEFAULT_MODULES_TO_SAVE)
        if config.family == "bert" and model_dir is not None and not _has_pooler(model_dir):
            modules_to_save.append("pooler")
    notes = [w for w in (_pooling_warning(config),) if w]
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
    )
    merged_dir = None
    if merged:
        hf_base = weights_lib.read_hf_config(model_dir) if model_dir is not None else {}
        if label_names is not None and len(label_names) == config.num_labels:
            hf_base["id2label"] = {str(i): str(n) for i, n in enumerate(label_names)}
        merged_dir = weights_lib.save_encoder(
            params, config, out / MERGED_DIR, base_hf_config=hf_base
        )
        if model_dir is not None:
            _copy_model_files(model_dir, merged_dir)
    for n in notes:
        warnings.warn(n, stacklevel=2)
    return ExportResult(
        out_dir=out,
        merged_dir=merged_dir,
        base_model=base,
        num_labels=config.num_labels,
        warnings=tuple(notes),
    )


def _has_pooler(model_dir: pathlib.Path) -> bool:
    raw, _ = weights_lib.read_safetensors(model_dir)
    return any(k.removeprefix("bert.").startswith("pooler.") for k in raw)


# --------------------------------------------------------------------------- runs


@dataclasses.dataclass(frozen=True)
class Run:
    """A finished run rebuilt from its directory (see :func:`load_run`)."""

    run_config: Any  # ffa_jax.config.RunConfig
    encoder_config: EncoderConfig
    params: PyTree
    model_dir: pathlib.Path
    base_model: str
    label_names: tuple[str, ...] | None


def _base_model_name(name: str, model_dir: pathlib.Path) -> str:
    """Hub ids stay hub ids; ``minilm`` and local folders become absolute folder paths."""
    if name == weights_lib.MINILM or pathlib.Path(name).expanduser().exists():
        return str(pathlib.Path(model_dir).resolve())
    return name


def load_run(run_dir: str | os.PathLike, *, num_labels: int | None = None) -> Run:
    """Rebuilds a finished run's parameter tree from ``config.yaml`` + ``adapter.safetensors``.

    The base weights come from the run's ``model.name``; the head is the checkpoint's or, as in
    training, a random init from the run's seed (``train.KEY_HEAD``); every LoRA node's ``a``
    and ``b`` come from ``adapter.safetensors``, as do trained head leaves when the file holds
    them (keys that are parameter paths, e.g. ``classifier/kernel``).

    The label count is read from the file's metadata (``num_labels`` / ``label_names``), or
    the head's shape, or ``num_labels``, or else by loading the run's task (as training did).

    Raises:
      ConfigError: the directory or its config is missing or invalid.
      WeightsError: the adapter file is missing, does not match the model (the message names
        the key), or the run trained its head but the file does not hold it.
    """
    from safetensors import safe_open

    from ffa_jax.config import load_config
    from ffa_jax.train import KEY_HEAD, KEY_LORA_A

    run = pathlib.Path(run_dir)
    cfg_path, adapter_path = run / "config.yaml", run / "adapter.safetensors"
    if not cfg_path.is_file():
        raise ConfigError(
            f"{str(run)!r} is not a run directory: {cfg_path.name} is missing. Pass the folder "
            "`ffa-jax train` wrote (runs/<name>)."
        )
    cfg = load_config(cfg_path)
    from ffa_jax.workloads import resolve_family

    if resolve_family(cfg) != "encoder":
        raise ConfigError(
            f"{str(run)!r} is a {resolve_family(cfg)} (decoder) run: PEFT export supports encoder "
            "runs only so far. Its LoRA factors are in adapter.safetensors ('<path>/a' [d_in, r], "
            "'<path>/b' [r, d_out] per adapted kernel, e.g. layers_0/self_attn/q_proj/kernel/b)."
        )
    if not adapter_path.is_file():
        raise WeightsError(
            f"{str(adapter_path)!r} is missing: the run did not finish (train writes it after "
            "the last round)."
        )
    with safe_open(str(adapter_path), framework="numpy") as f:
        meta = f.metadata() or {}
        stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open API
    label_names = None
    if "label_names" in meta:
        label_names = tuple(json.loads(meta["label_names"]))
    n = num_labels or (len(label_names) if label_names else None)
    if n is None and "num_labels" in meta:
        n = int(meta["num_labels"])
    if n is None:
        for k in ("classifier/kernel", "classifier/out_proj/kernel"):
            if k in stored:
                n = int(stored[k].shape[-1])
    if n is None:
        from ffa_jax.data import tasks

        data = tasks.load_text_classification(
            cfg.data.task,
            test_fraction=cfg.data.test_fraction,
            seed=cfg.seed,
            text_field=cfg.data.text_field,
            label_field=cfg.data.label_field,
        )
        label_names, n = data.label_names, data.num_labels

    key = jax.random.key(cfg.seed)
    model_dir = weights_lib.resolve_model_dir(cfg.model.name)
    enc_cfg, base = weights_lib.load_encoder(
        str(model_dir), n, head_key=jax.random.fold_in(key, KEY_HEAD), pooling=cfg.model.pooling
    )
    params = lora.init(base, cfg.lora, jax.random.fold_in(key, KEY_LORA_A))
    flat = _flat(params)
    by_path = {"/".join(p): leaf for p, leaf in flat.items()}
    errors, used = [], set()
    new_leaves = {}
    for p, leaf in by_path.items():
        if lora.is_lora(leaf):
            parts = {}
            for which, shape in (("a", leaf.a.shape), ("b", leaf.b.shape)):
                k = f"{p}/{which}"
                if k not in stored:
                    errors.append(f"missing key {k!r} (shape {tuple(shape)})")
                elif tuple(stored[k].shape) != tuple(shape):
                    errors.append(
                        f"shape mismatch: {k!r} expected {tuple(shape)}, got {stored[k].shape}"
                    )
                else:
                    parts[which] = jnp.asarray(stored[k], jnp.float32)
                    used.add(k)
            if len(parts) == 2:
                new_leaves[p] = leaf.replace(**parts)
        elif p in stored:
            if tuple(stored[p].shape) != tuple(leaf.shape):
                errors.append(
                    f"shape mismatch: {p!r} expected {tuple(leaf.shape)}, got {stored[p].shape}"
                )
            else:
                new_leaves[p] = jnp.asarray(stored[p], jnp.float32)
                used.add(p)
    errors += [f"unmapped key {k!r}" for k in sorted(set(stored) - used)]
    if cfg.model.train_head and not any(k.startswith("classifier/") for k in used):
        errors.append(
            "the run trained its head (model.train_head=true) but adapter.safetensors holds no "
            "classifier/* weights, so the trained head cannot be exported"
        )
    if errors:
        raise WeightsError(
            f"cannot rebuild the run {str(run)!r} from {adapter_path.name} ({len(errors)} "
            "problem(s)):\n  " + "\n  ".join(errors)
        )

    def pick(path, leaf):
        return new_leaves.get(lora.path_str(path), leaf)

    params = jax.tree_util.tree_map_with_path(pick, params, is_leaf=lora.is_lora)
    return Run(
        run_config=cfg,
        encoder_config=enc_cfg,
        params=params,
        model_dir=pathlib.Path(model_dir),
        base_model=_base_model_name(cfg.model.name, pathlib.Path(model_dir)),
        label_names=label_names,
    )


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
    (escaped)."""
    parts = module.split(".")
    if parts[0] in ("bert", "roberta"):
        parts = parts[1:]
    out: list[str] = []
    i = 0
    while i < len(parts):
        if parts[i] == "layer" and i + 1 < len(parts) and parts[i + 1].isdigit():
            out.append(f"layer_{parts[i + 1]}")
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
    tensor_of = {}
    for p in base_w:
        if p[-1] in _LEAF_TO_HF:
            tensor_of[_hf_tensor_name(p, family)[0]] = p
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
        if m:
            module, which = m.group("module"), m.group("which")
            if module not in kernels:
                other = "roberta" if family == "bert" else "bert"
                why = (
                    f"it is a {other} module name but the base model is {family}"
                    if module.startswith(other + ".")
                    else f"the {family} base model has no such Dense layer"
                )
                errors.append(
                    f"adapter key {key!r} targets module {module!r}: {why} "
                    f"(e.g. {sorted(kernels)[:2]})"
                )
                continue
            factors.setdefault(module, {})[which] = value
            continue
        path = tensor_of.get(name)
        if path is None:
            errors.append(
                f"adapter key {key!r} matches no parameter of the {family} base model "
                "(a LoRA factor must end in .lora_A.weight/.lora_B.weight; a saved module must "
                "be a Dense/LayerNorm of the model)"
            )
            continue
        expect = tuple(np.shape(base_w[path]))
        transpose = _LEAF_TO_HF[path[-1]][1]
        got = tuple(value.shape[::-1]) if transpose else tuple(value.shape)
        if got != expect:
            errors.append(
                f"shape mismatch: {key!r} expected {expect[::-1] if transpose else expect}, "
                f"got {tuple(value.shape)}"
            )
            continue
        replaced[path] = value.T if transpose else value

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
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = leaf
    return tree


__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "ExportResult",
    "Run",
    "adapter_config",
    "export_peft",
    "family_of",
    "hf_module_name",
    "import_peft",
    "load_run",
    "peft_state_dict",
    "read_adapter_config",
    "read_lora_config",
    "save_peft",
]
