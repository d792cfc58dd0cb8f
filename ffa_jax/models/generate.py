"""Greedy generation with a key/value cache: one ``jax.jit``, fixed shapes, no per-token compiles.

:func:`make_generate` builds ``generate(params, prompt_ids, prompt_mask) -> Generation`` for a
fixed total length ``max_length`` (prompt slots + new tokens). Prompts are placed in
``max_length - max_new_tokens`` cache slots (narrower prompt arrays are padded on the host), a
single prefill writes their keys and values, and a ``lax.while_loop`` then decodes one token
per iteration into the next slot, stopping early once every row has produced an end-of-sequence
token. Hence exactly one compilation per ``(batch, max_length)`` for a given generator.

Left and right padding are both handled: padding slots are masked out of attention, and the
rotary position of every token is the number of real tokens before it, so a padded row
generates exactly what it would generate alone.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from ffa_jax.models.llama import LlamaConfig, init_params
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2,
    ...                   intermediate_size=32)
    >>> gen = make_generate(cfg, max_length=12, max_new_tokens=4)
    >>> out = gen(init_params(cfg, jax.random.key(0)), [[5, 6, 7], [8, 9, 0]], [[1, 1, 1], [1, 1, 0]])
    >>> out.tokens.shape
    (2, 4)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ffa_jax.errors import ConfigError
from ffa_jax.models.llama import LlamaConfig, LlamaForCausalLM, init_cache
from ffa_jax.types import PyTree


class Generation(NamedTuple):
    """Greedy continuations.

    Attributes:
      tokens: ``int32 [B, max_new_tokens]``; after a row's first end-of-sequence token (which
        is included) the row holds ``pad_token_id``.
      lengths: ``int32 [B]`` generated tokens per row, including the end-of-sequence token.
      finished: ``bool [B]``: the row produced an end-of-sequence token.
    """

    tokens: jax.Array
    lengths: jax.Array
    finished: jax.Array


def _generate_core(
    module: LlamaForCausalLM,
    max_new_tokens: int,
    eos_ids: tuple[int, ...],
    pad_id: int,
    cache_dtype: Any,
    params: PyTree,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
) -> Generation:
    config = module.config
    B, P = prompt_ids.shape
    T = P + max_new_tokens
    prompt_mask = (prompt_mask > 0).astype(jnp.int32)
    n_real = jnp.sum(prompt_mask, axis=-1)  # [B]
    # Slots [0, P) hold the prompt (with holes for padding), [P, T) the generated tokens.
    kv_mask = jnp.concatenate([prompt_mask, jnp.ones((B, max_new_tokens), jnp.int32)], axis=1)
    cache = init_cache(config, B, T, cache_dtype)
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=-1) - 1, 0)
    h, cache = module.apply(
        {"params": params}, prompt_ids, positions, kv_mask, cache, 0, method="decode"
    )
    # The last real prompt token of each row (index P - 1 for left padding).
    last = P - 1 - jnp.argmax(prompt_mask[:, ::-1], axis=-1)
    h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]  # [B, H]
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

    def pick(logits, done):
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        tok = jnp.where(done, pad_id, tok)
        return tok, done | jnp.isin(tok, eos)

    logits0 = module.apply({"params": params}, h_last, method="logits")
    tok0, done0 = pick(logits0, jnp.zeros((B,), bool))
    tokens = jnp.full((B, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok0)
    lengths = jnp.ones((B,), jnp.int32)

    def cond(state):
        step, _, _, _, done, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, tokens, cache, prev, done, lengths = state
        # Feed the previous token into slot P + step - 1 at position n_real + step - 1.
        pos = (n_real + step - 1)[:, None]
        h, cache = module.apply(
            {"params": params}, prev[:, None], pos, kv_mask, cache, P + step - 1, method="decode"
        )
        logits = module.apply({"params": params}, h[:, 0], method="logits")
        tok, new_done = pick(logits, done)
        tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], (0, step))
        lengths = lengths + (~done).astype(jnp.int32)
        return step + 1, tokens, cache, tok, new_done, lengths

    state = (jnp.int32(1), tokens, cache, tok0, done0, lengths)
    _, tokens, _, _, done, lengths = jax.lax.while_loop(cond, body, state)
    return Generation(tokens=tokens, lengths=lengths, finished=done)


@dataclasses.dataclass(frozen=True)
class GreedyGenerator:
    """Callable built by :func:`make_generate`; see there.

    Attributes:
      jitted: the compiled core ``(params, prompt_ids [B, P], prompt_mask [B, P]) ->
        Generation``; ``jitted._cache_size()`` counts its compilations.
    """

    config: LlamaConfig
    max_length: int
    max_new_tokens: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    jitted: Any

    @property
    def max_prompt_length(self) -> int:
        return self.max_length - self.max_new_tokens

    def prepare(
        self, prompt_ids: Sequence[Sequence[int]] | np.ndarray, prompt_mask=None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Validates prompts and pads them to ``[B, max_prompt_length]`` (host-side numpy).

        Columns that are padding in every row are dropped first (from either end), then the
        prompts are right-padded with mask 0. Ragged lists of token ids are accepted (the mask
        is then implied).

        Raises:
          ConfigError: a prompt is empty, longer than ``max_prompt_length``, or holds token ids
            outside the vocabulary; shapes of ids and mask differ.
        """
        if prompt_mask is None and not isinstance(prompt_ids, np.ndarray | jax.Array):
            rows = [list(map(int, r)) for r in prompt_ids]
            width = max((len(r) for r in rows), default=0)
            ids = np.zeros((len(rows), width), np.int32)
            mask = np.zeros((len(rows), width), np.int32)
            for i, r in enumerate(rows):
                ids[i, : len(r)] = r
                mask[i, : len(r)] = 1
        else:
            ids = np.asarray(prompt_ids, np.int32)
            mask = np.ones_like(ids) if prompt_mask is None else np.asarray(prompt_mask, np.int32)
        if ids.ndim != 2 or ids.shape != mask.shape or ids.shape[0] == 0:
            raise ConfigError(
                f"prompt_ids {ids.shape} and prompt_mask {mask.shape} must have the same [B, P] "
                "shape with B >= 1."
            )
        mask = (mask > 0).astype(np.int32)
        lengths = mask.sum(axis=1)
        if np.any(lengths == 0):
            raise ConfigError(
                f"prompt rows {np.flatnonzero(lengths == 0).tolist()} have no real token; every "
                "prompt needs at least one token (e.g. the BOS token)."
            )
        used = np.flatnonzero(mask.any(axis=0))
        ids, mask = ids[:, used[0] : used[-1] + 1], mask[:, used[0] : used[-1] + 1]
        P = self.max_prompt_length
        if ids.shape[1] > P:
            longest = int(lengths.max())
            raise ConfigError(
                f"prompt of {longest} tokens (padded width {ids.shape[1]}) is longer than the "
                f"{P} prompt slots of this generator (max_length={self.max_length} minus "
                f"max_new_tokens={self.max_new_tokens}); raise max_length, lower "
                "max_new_tokens, or shorten the prompt."
            )
        bad = (ids < 0) | (ids >= self.config.vocab_size)
        if np.any(bad & (mask > 0)):
            raise ConfigError(
                f"prompt token ids {sorted(set(ids[bad & (mask > 0)].tolist()))[:5]} are outside "
                f"the model's vocabulary [0, {self.config.vocab_size}); is the tokenizer the "
                "model's?"
            )
        ids = np.where(mask > 0, ids, 0)
        pad = P - ids.shape[1]
        return np.pad(ids, ((0, 0), (0, pad))), np.pad(mask, ((0, 0), (0, pad)))

    def __call__(self, params: PyTree, prompt_ids, prompt_mask=None) -> Generation:
        """Greedy continuations of a batch of prompts (see :class:`Generation`).

        Args:
          params: the model's parameter tree (LoRA nodes allowed; merge them first with
            :func:`ffa_jax.lora.merge` for speed).
          prompt_ids: ``[B, P]`` ids (any padding side) or a list of ragged id lists.
          prompt_mask: ``[B, P]``, 1 for real tokens; ``None`` = all real (or implied by the
            ragged lists).
        """
        ids, mask = self.prepare(prompt_ids, prompt_mask)
        return self.jitted(params, jnp.asarray(ids), jnp.asarray(mask))


def make_generate(
    config: LlamaConfig,
    *,
    max_length: int,
    max_new_tokens: int,
    eos_token_ids: Sequence[int] | None = None,
    pad_token_id: int | None = None,
    dtype: Any = jnp.float32,
    module: LlamaForCausalLM | None = None,
) -> GreedyGenerator:
    """Builds a jitted greedy generator for prompts of up to ``max_length - max_new_tokens``
    tokens.

    Args:
      config: the model.
      max_length: cache slots = prompt slots + ``max_new_tokens``; at most
        ``config.max_position_embeddings``.
      max_new_tokens: tokens generated per prompt (fewer when every row has stopped).
      eos_token_ids: stop tokens (default ``config.eos_token_ids``; ``()`` never stops early).
      pad_token_id: written after a row stops (default ``config.pad_token_id``, else the first
        eos id, else 0).
      dtype: computation and cache dtype.
      module: an explicit :class:`LlamaForCausalLM` (default ``LlamaForCausalLM(config, dtype)``).

    Returns:
      A :class:`GreedyGenerator` ``gen(params, prompt_ids, prompt_mask) -> Generation``; it
      compiles once per batch size.

    Raises:
      ConfigError: non-positive lengths, no room for a prompt, or ``max_length`` beyond the
        model's context.
    """
    for name, v in (("max_length", max_length), ("max_new_tokens", max_new_tokens)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"{name}={v!r} is invalid: must be a positive integer.")
    if max_new_tokens >= max_length:
        raise ConfigError(
            f"max_new_tokens={max_new_tokens} leaves no prompt slot in max_length={max_length}; "
            "max_length must exceed max_new_tokens."
        )
    if max_length > config.max_position_embeddings:
        raise ConfigError(
            f"max_length={max_length} exceeds the model's context of "
            f"{config.max_position_embeddings} tokens (max_position_embeddings); lower it."
        )
    eos = tuple(config.eos_token_ids if eos_token_ids is None else eos_token_ids)
    if pad_token_id is None:
        pad_token_id = (
            config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
        )
    module = module if module is not None else LlamaForCausalLM(config, dtype=dtype)

    def core(params, prompt_ids, prompt_mask):
        return _generate_core(
            module, max_new_tokens, eos, int(pad_token_id), dtype, params, prompt_ids, prompt_mask
        )

    return GreedyGenerator(
        config=config,
        max_length=max_length,
        max_new_tokens=max_new_tokens,
        eos_token_ids=eos,
        pad_token_id=int(pad_token_id),
        jitted=jax.jit(core),
    )
