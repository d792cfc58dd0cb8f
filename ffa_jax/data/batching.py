"""Host-side batching with fixed shapes, so the jitted federated round never recompiles.

- :func:`tokenize` pads/truncates every text to exactly ``max_length`` tokens.
- :func:`poisson_batch_indices` draws Poisson-subsampled batches (each example in independently
  with probability q, as the DP-SGD accountant assumes) for every client and local step, padded
  to a fixed ``max_batch_size`` with a mask; :func:`physical_batch_size` picks that size so that
  overflow is negligible.
- :func:`gather_client_batches` turns the indices into ``[K, S, B, ...]`` arrays.
- :func:`eval_batches` walks a set in fixed-size, masked batches.

Why this module keeps its own truncated Poisson sampler instead of jax-privacy's
``jax_privacy.batch_selection.CyclicPoissonSampling`` (decision of issue 17): that sampler
draws the Binomial batch size and truncates it to ``truncated_batch_size`` *before* it draws
the indices, so the number of sampled-then-dropped examples is never materialised. ffa_jax
needs that count: the ledger reports it (``dropped_examples``) and the RDP accountant adds the
truncation's probability to delta from it (:func:`ffa_jax.privacy.accounting.rdp_delta_curve`),
while the PLD accountant accounts the truncated mechanism exactly (the same
``TruncatedSubsampledGaussianDpEvent`` jax-privacy's accountant uses). There is one
implementation of truncated Poisson selection in ffa_jax, this one; no second copy. Client-level
cyclic Poisson sampling (``privacy.mechanism=banded_mf``) is drawn in
:mod:`ffa_jax.federated.participation` on the same pattern. Sample-level cyclic Poisson
sampling (BandMF inside each client) is this same sampler restricted to one group of
:func:`cyclic_partition` per step (``groups`` of :func:`poisson_batch_indices`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ffa_jax.errors import DataError

TOKENIZE_CHUNK = 1024  # texts per tokenizer call: amortises call overhead, bounds peak memory
_PAD_TOKEN_CANDIDATES = ("[PAD]", "<pad>", "<|pad|>", "<|endoftext|>", "</s>")


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise DataError(f"{name}={value!r} must be a positive int.")


def _raw_tokenizer_copy(tokenizer: Any, max_length: int) -> Any:
    """A copy of a ``tokenizers.Tokenizer`` that pads and truncates to ``max_length``."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer.to_str())  # copy: never mutate the caller's tokenizer
    pad_id, pad_token = 0, None
    if tokenizer.padding is not None:
        pad_id, pad_token = tokenizer.padding["pad_id"], tokenizer.padding["pad_token"]
    else:
        for candidate in _PAD_TOKEN_CANDIDATES:
            token_id = tokenizer.token_to_id(candidate)
            if token_id is not None:
                pad_id, pad_token = token_id, candidate
                break
    if pad_token is None:
        # No pad token: id 0 is as good as any, since the attention mask hides padding.
        pad_token = tokenizer.id_to_token(0) or "[PAD]"
    tok.enable_padding(pad_id=pad_id, pad_token=pad_token, length=max_length)
    tok.enable_truncation(max_length=max_length)
    return tok


# Characters of a text kept before tokenizing (then cut at the next whitespace), per output
# token. A prefix that yields too few tokens is re-tokenized whole, so this only trades speed
# against re-tokenizing: on SpamAssassin at 64 tokens, 6 x 64 characters re-tokenized 3 of
# 6,046 e-mails whole (5 x 64: 73; 4 x 64: 1,228), and tokenizing took 0.75 s instead of 1.5 s.
PREFIX_CHARS_PER_TOKEN = 6
# Where a prefix may end: characters every whitelisted pre-tokenizer splits on and no
# normalizer removes (Python's \s also matches e.g. \x1c, which BERT's normalizer deletes,
# joining its neighbours into one word).
_CUT_CHARS = " \t\n\r"
# Normalizers that act on each character (or on runs that never cross whitespace) and
# pre-tokenizers that split at whitespace, so a token never spans one of _CUT_CHARS.
_LOCAL_NORMALIZERS = {"BertNormalizer", "Lowercase", "NFC", "NFD", "NFKC", "NFKD", "StripAccents"}
_WHITESPACE_PRE_TOKENIZERS = {"BertPreTokenizer", "Whitespace", "WhitespaceSplit"}


def _components(spec: dict | None, kind: str) -> list[str] | None:
    """The component type names of a tokenizer.json ``normalizer`` / ``pre_tokenizer``
    (a ``Sequence`` flattened); [] for none; None if unreadable."""
    if spec is None:
        return []
    if not isinstance(spec, dict) or "type" not in spec:
        return None
    if spec["type"] == "Sequence":
        out: list[str] = []
        for part in spec.get(kind, []):
            names = _components(part, kind)
            if names is None:
                return None
            out += names
        return out
    return [spec["type"]]


def _prefix_exact(tokenizer: Any, is_raw: bool) -> bool:
    """Whether tokenizing a prefix cut at one of ``_CUT_CHARS`` gives the first tokens of the
    whole text: a whitelisted normalizer and whitespace pre-tokenizer, right-side truncation
    and no added token containing a cut character (added tokens are matched in the raw
    text). Then the prefix's words are the whole text's first words, each tokenized alike,
    and a prefix whose encoding fills max_length holds all the tokens truncation keeps."""
    import json

    backend = tokenizer if is_raw else getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        return False
    if not is_raw and getattr(tokenizer, "truncation_side", "right") != "right":
        return False
    try:
        spec = json.loads(backend.to_str())
    except (TypeError, ValueError):
        return False
    truncation = spec.get("truncation") or {}
    if is_raw and truncation.get("direction", "Right") != "Right":
        return False
    normalizers = _components(spec.get("normalizer"), "normalizers")
    pre = _components(spec.get("pre_tokenizer"), "pretokenizers")
    if normalizers is None or pre is None or not pre:
        return False
    if not set(normalizers) <= _LOCAL_NORMALIZERS or not set(pre) <= _WHITESPACE_PRE_TOKENIZERS:
        return False
    added = [t.get("content", "") for t in spec.get("added_tokens", [])]
    return not any(c in token for token in added for c in _CUT_CHARS)


def _cut_prefix(text: str, min_chars: int) -> str:
    """``text`` up to (not including) the first of ``_CUT_CHARS`` at or after ``min_chars``;
    the whole text if there is none."""
    if len(text) <= min_chars:
        return text
    ends = [i for i in (text.find(c, min_chars) for c in _CUT_CHARS) if i >= 0]
    return text[: min(ends)] if ends else text


def _split_pairs(
    texts: list[Any], pairs: Sequence[str] | None
) -> tuple[list[Any], list[str] | None]:
    """``(texts, pairs)``: ``(text, text_pair)`` tuples in ``texts`` are split into two lists."""
    if pairs is None and texts and all(isinstance(t, (tuple, list)) for t in texts):
        if not all(len(t) == 2 for t in texts):
            bad = next(t for t in texts if len(t) != 2)
            raise DataError(f"sentence pair {bad!r} must be a (text, text_pair) 2-tuple.")
        return [t[0] for t in texts], [t[1] for t in texts]
    if pairs is None:
        return texts, None
    pairs = list(pairs)
    if len(pairs) != len(texts):
        raise DataError(
            f"pairs has {len(pairs)} entries but texts has {len(texts)}; give one pair per text."
        )
    for i, t in enumerate(pairs):
        if not isinstance(t, str):
            raise DataError(
                f"pairs[{i}]={t!r} is a {type(t).__name__}, not str; tokenize only strings."
            )
    return texts, pairs


def tokenize(
    texts: Sequence[Any], tokenizer: Any, max_length: int, pairs: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """Tokenize texts (or sentence pairs) to fixed-length int32 arrays.

    Args:
      texts: N strings, or N ``(text, text_pair)`` tuples (sentence pairs).
      tokenizer: a ``transformers`` PreTrainedTokenizer(Fast) or a ``tokenizers.Tokenizer``
        (a padding/truncating copy is used; the argument is not modified).
      max_length: L, the exact output length (longer texts are truncated, shorter padded;
        pairs are truncated longest-first).
      pairs: optional N second texts (the same as passing tuples).

    Returns:
      ``{"input_ids": int32 [N, L], "attention_mask": int32 [N, L]}``, plus
      ``"token_type_ids"`` (int32 ``[N, L]``, 1 on the second text where the tokenizer marks
      it) for sentence pairs.
    """
    _check_positive_int("max_length", max_length)
    texts, pairs = _split_pairs(list(texts), pairs)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise DataError(
                f"texts[{i}]={t!r} is a {type(t).__name__}, not str; tokenize only strings."
            )
    is_raw = hasattr(tokenizer, "encode_batch") and hasattr(tokenizer, "enable_padding")
    if is_raw:
        tok = _raw_tokenizer_copy(tokenizer, max_length)
    elif callable(tokenizer):
        if getattr(tokenizer, "pad_token", "") is None:
            raise DataError(
                f"tokenizer {type(tokenizer).__name__} has no pad token, so it cannot pad to "
                "max_length; set one first, e.g. tokenizer.pad_token = tokenizer.eos_token."
            )
    else:
        raise DataError(
            f"tokenizer of type {type(tokenizer).__name__} is neither a transformers tokenizer "
            "nor a tokenizers.Tokenizer; pass one of those."
        )

    def encode(chunk: list[str], chunk_pairs: list[str] | None):
        if is_raw:
            inputs = chunk if chunk_pairs is None else list(zip(chunk, chunk_pairs, strict=True))
            encodings = tok.encode_batch(inputs)
            return (
                np.array([e.ids for e in encodings], dtype=np.int32),
                np.array([e.attention_mask for e in encodings], dtype=np.int32),
                np.array([e.type_ids for e in encodings], dtype=np.int32),
            )
        out = tokenizer(
            chunk,
            chunk_pairs,
            padding="max_length",
            truncation=True,
            max_length=max_length,
            return_tensors="np",
            # Some tokenizers leave token types out by default; pairs need them (BERT).
            return_token_type_ids=chunk_pairs is not None or None,
        )
        chunk_ids = out["input_ids"]
        return chunk_ids, out["attention_mask"], out.get("token_type_ids", np.zeros_like(chunk_ids))

    # Single texts through a whitespace-splitting tokenizer are cut to a prefix first (exact;
    # see _cut_prefix): normalizing and splitting a whole e-mail to keep 64 tokens was most of
    # the quickstart's tokenizing time.
    cut = pairs is None and _prefix_exact(tok if is_raw else tokenizer, is_raw)
    ids = np.zeros((len(texts), max_length), dtype=np.int32)
    mask = np.zeros((len(texts), max_length), dtype=np.int32)
    types = np.zeros((len(texts), max_length), dtype=np.int32)
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        chunk = texts[start : start + TOKENIZE_CHUNK]
        chunk_pairs = None if pairs is None else pairs[start : start + TOKENIZE_CHUNK]
        if cut:
            short = [_cut_prefix(t, PREFIX_CHARS_PER_TOKEN * max_length) for t in chunk]
            chunk_ids, chunk_mask, chunk_types = encode(short, None)
            # A prefix that did not fill max_length proves nothing about the whole text: those
            # texts are tokenized whole.
            redo = [
                i
                for i, (a, b) in enumerate(zip(short, chunk, strict=True))
                if len(a) < len(b) and chunk_mask[i].sum() < max_length
            ]
            if redo:
                r_ids, r_mask, r_types = encode([chunk[i] for i in redo], None)
                chunk_ids[redo], chunk_mask[redo], chunk_types[redo] = r_ids, r_mask, r_types
        else:
            chunk_ids, chunk_mask, chunk_types = encode(chunk, chunk_pairs)
        ids[start : start + len(chunk)] = chunk_ids
        mask[start : start + len(chunk)] = chunk_mask
        types[start : start + len(chunk)] = chunk_types
    if pairs is None:
        return {"input_ids": ids, "attention_mask": mask}
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def physical_batch_size(expected_batch_size: float, overflow_probability: float = 1e-6) -> int:
    """Fixed batch capacity for Poisson-subsampled batches of mean ``expected_batch_size``.

    Returns the smallest ``b >= 1`` with ``P(X > b) <= overflow_probability`` for
    ``X ~ Poisson(expected_batch_size)``. The sampled batch size is Binomial(n, q) (or
    Poisson-binomial) with the same mean and a smaller variance, so the Poisson tail is a
    conservative stand-in.
    """
    lam = expected_batch_size
    if not isinstance(lam, (int, float)) or not 0 <= lam < math.inf:
        raise DataError(
            f"expected_batch_size={lam!r} must be a finite number >= 0 (client.batch_size)."
        )
    if not isinstance(overflow_probability, (int, float)) or not 0 < overflow_probability < 1:
        raise DataError(
            f"overflow_probability={overflow_probability!r} must be in (0, 1), e.g. 1e-6."
        )
    if lam == 0:
        return 1
    # log pmf(k) = -lam + k log lam - lgamma(k + 1), built incrementally over k = 0..k_max.
    log_p = math.log(overflow_probability)
    k_max = int(math.ceil(lam + 2 * math.sqrt(lam * (12 - log_p)) + 2 * (12 - log_p) + 10))
    ks = np.arange(1, k_max + 1, dtype=np.float64)
    log_pmf = np.concatenate([[-lam], -lam + np.cumsum(math.log(lam) - np.log(ks))])
    pmf = np.exp(log_pmf)
    # tail[b] = P(X > b) = sum_{k > b} pmf(k); summing from the right keeps tiny tails exact.
    tail = np.concatenate([np.cumsum(pmf[::-1])[::-1][1:], [0.0]])
    b = int(np.argmax(tail <= overflow_probability))
    return max(b, 1)


def cyclic_partition(rng: np.random.Generator, size: int, bands: int) -> np.ndarray:
    """One client's examples split into ``bands`` groups of equal size for cyclic Poisson
    sampling (jax-privacy's ``PartitionType.EQUAL_SPLIT``): a uniformly random permutation of
    ``range(size)`` cut into ``bands`` rows of ``size // bands``; the ``size mod bands``
    examples left over are in no group (never sampled).

    Returns:
      int64 ``[bands, size // bands]``: row g holds the client-local indices of group g.
    """
    _check_positive_int("bands", bands)
    _check_positive_int("size", size)
    m = int(size) // int(bands)
    if m < 1:
        raise DataError(f"size={size} examples cannot fill bands={bands} groups of >= 1.")
    return rng.permutation(int(size))[: m * int(bands)].reshape(int(bands), m)


def poisson_batch_indices(
    rng: np.random.Generator,
    client_sizes: Sequence[int],
    sampling_rates: Sequence[float],
    local_steps: int,
    max_batch_size: int,
    *,
    groups: Sequence[np.ndarray] | None = None,
    first_step: int = 0,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Poisson-subsampled batches for every client and local step, padded to a fixed size.

    For client k and step s each of the client's ``n_k`` examples is included independently
    with probability ``q_k``. This is drawn as a Binomial(n_k, q_k) count followed by that many
    distinct indices chosen uniformly without replacement, which is distributionally identical
    to per-example Bernoulli draws and costs O(batch) instead of O(n_k).

    Args:
      rng: the generator (advanced in place).
      client_sizes: ``n_k`` for K clients (each >= 1).
      sampling_rates: ``q_k`` in [0, 1] for each client.
      local_steps: S.
      max_batch_size: B_max; see :func:`physical_batch_size`.
      groups: cyclic Poisson sampling (sample-level BandMF): client k's
        :func:`cyclic_partition` ``[b, m_k]``; its step s (the client's step number
        ``first_step + s`` of the run) samples only from group ``(first_step + s) mod b``,
        each of its m_k examples with probability ``q_k`` (then the per-group rate). None:
        every example of the client is eligible at every step.
      first_step: the run-wide index of local step 0 (``round x local_steps``), with groups.

    Returns:
      (local_idx int32 ``[K, S, B_max]``, mask bool ``[K, S, B_max]``, dropped): indices are
      client-local; padding slots hold index 0 with mask False; ``dropped`` counts sampled
      examples that did not fit in B_max (a uniformly random subset of the sample is kept).
    """
    sizes = np.asarray(client_sizes, dtype=np.int64)
    rates = np.asarray(sampling_rates, dtype=np.float64)
    if sizes.ndim != 1 or sizes.size == 0 or np.any(sizes < 1):
        raise DataError(
            f"client_sizes={list(np.atleast_1d(sizes))} must list one size >= 1 per client; "
            "every client needs at least one example."
        )
    if rates.shape != sizes.shape or not np.all((rates >= 0) & (rates <= 1)):
        raise DataError(
            f"sampling_rates={list(np.atleast_1d(rates))} must give one probability in [0, 1] "
            f"per client ({sizes.size} clients); q_k = client.batch_size / n_k."
        )
    _check_positive_int("local_steps", local_steps)
    _check_positive_int("max_batch_size", max_batch_size)

    num_clients = sizes.size
    population = sizes
    if groups is not None:
        if len(groups) != num_clients:
            raise DataError(f"groups has {len(groups)} entries for {num_clients} clients.")
        groups = [np.asarray(g) for g in groups]
        population = np.array([g.shape[1] for g in groups], dtype=np.int64)
    counts = rng.binomial(population[:, None], rates[:, None], size=(num_clients, local_steps))
    local_idx = np.zeros((num_clients, local_steps, max_batch_size), dtype=np.int32)
    mask = np.zeros((num_clients, local_steps, max_batch_size), dtype=bool)
    dropped = 0
    for k in range(num_clients):
        for s in range(local_steps):
            count = int(counts[k, s])
            # choice(..., shuffle=True) returns the sample in random order, so truncating an
            # overflowing sample keeps a uniformly random subset.
            chosen = rng.choice(int(population[k]), size=count, replace=False)
            if groups is not None:
                g = groups[k]
                chosen = g[(int(first_step) + s) % g.shape[0]][chosen]
            kept = min(count, max_batch_size)
            dropped += count - kept
            local_idx[k, s, :kept] = chosen[:kept]
            mask[k, s, :kept] = True
    return local_idx, mask, dropped


def _leading_size(arrays: dict[str, np.ndarray]) -> int:
    if not arrays:
        raise DataError("arrays is empty; pass e.g. {'input_ids': ..., 'labels': ...}.")
    sizes = {name: len(a) for name, a in arrays.items()}
    if len(set(sizes.values())) != 1:
        raise DataError(
            f"arrays have different leading sizes {sizes}; all must be [N, ...] over one set."
        )
    return next(iter(sizes.values()))


def gather_client_batches(
    arrays: dict[str, np.ndarray],
    client_indices: list[np.ndarray],
    local_idx: np.ndarray,
) -> dict[str, np.ndarray]:
    """Gather per-client batches from train-set arrays.

    Args:
      arrays: name -> ``[N, ...]`` over the whole train set.
      client_indices: K arrays mapping client-local positions to train-set indices.
      local_idx: int ``[K, S, B]`` client-local indices (from :func:`poisson_batch_indices`).

    Returns:
      name -> ``[K, S, B, ...]``.
    """
    n = _leading_size(arrays)
    local_idx = np.asarray(local_idx)
    if local_idx.ndim != 3 or local_idx.shape[0] != len(client_indices):
        raise DataError(
            f"local_idx has shape {local_idx.shape}; expected [K={len(client_indices)}, S, B]."
        )
    global_idx = np.empty(local_idx.shape, dtype=np.int64)
    for k, members in enumerate(client_indices):
        members = np.asarray(members)
        if local_idx[k].size and local_idx[k].max() >= len(members):
            raise DataError(
                f"local_idx[{k}] reaches {int(local_idx[k].max())} but client {k} has "
                f"{len(members)} examples; draw indices with that client's size."
            )
        global_idx[k] = members[local_idx[k]]
    if global_idx.size and global_idx.max() >= n:
        raise DataError(
            f"client_indices reach {int(global_idx.max())} but the arrays have N={n} rows; "
            "partition the same train set the arrays come from."
        )
    return {name: a[global_idx] for name, a in arrays.items()}


def eval_batches(
    arrays: dict[str, np.ndarray], batch_size: int
) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
    """Fixed-size batches over a whole set, in order.

    Yields:
      (name -> ``[batch_size, ...]``, mask bool ``[batch_size]``). The last batch is padded by
      repeating row 0, with mask False on the padding.
    """
    _check_positive_int("batch_size", batch_size)
    n = _leading_size(arrays)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        idx = np.zeros(batch_size, dtype=np.int64)
        idx[: stop - start] = np.arange(start, stop)
        mask = np.arange(batch_size) < stop - start
        yield {name: a[idx] for name, a in arrays.items()}, mask
