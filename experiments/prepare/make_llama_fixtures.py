"""Writes the LLaMA parity fixtures in ``tests/fixtures/`` from the PyTorch reference.

Needs torch (``pip install torch==2.13.0``, a CPU build; not a runtime dependency of ffa_jax)
and transformers. Run from the repository root::

    python experiments/prepare/make_llama_fixtures.py

Writes:
  tests/fixtures/llama_tiny/{config.json,model.safetensors}
      a random ``LlamaForCausalLM``: vocab 96, hidden 48, 2 layers, 4 query heads / 2 key-value
      heads (GQA), head_dim 12, FFN 80, untied embeddings, rope theta 5e5 with ``llama3``
      frequency scaling (factor 4, original context 32).
  tests/fixtures/llama_tiny_tied/{config.json,model.safetensors}
      a random ``LlamaForCausalLM`` like SmolLM2: tied embeddings, 6 query heads / 2 key-value
      heads, rope theta 1e5, no scaling, and q/k/v/o and MLP biases (``attention_bias``,
      ``mlp_bias``) to cover those paths.
  tests/fixtures/llama_parity.npz, per model ``m`` in ``{tiny, tied}``:
      ``m_right_{input_ids,attention_mask,logits}``: a right-padded batch and torch's logits;
      ``m_left_{input_ids,attention_mask,logits}``: the same sequences left-padded;
      ``m_gen_{prompt_ids,prompt_lengths,tokens,margin}``: greedy continuations
      (``max_new_tokens`` = 8, no end-of-sequence stop) of ragged prompts, each generated alone
      (unpadded) with ``model.generate``, and the smallest gap between the best and second
      best logit over all greedy steps (so the test knows ties cannot flip a token).

Torch runs in float32 with eager attention. Position ids are passed explicitly as "number of
real tokens before this one" (what HF ``generate`` uses and ffa_jax's default), so the logits
of left-padded rows are defined the same way on both sides. Every parameter (including norm
scales and biases) is drawn at random so the parity test exercises all of them.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil

import numpy as np
import torch
import transformers

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
SEED = 0
MAX_NEW_TOKENS = 8

CONFIGS = {
    "tiny": dict(
        vocab_size=96,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        intermediate_size=80,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=4.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=32,
        ),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    ),
    "tied": dict(
        vocab_size=80,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=100000.0),
        attention_bias=True,
        mlp_bias=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    ),
}
FOLDERS = {"tiny": "llama_tiny", "tied": "llama_tiny_tied"}


def _randomise(model: torch.nn.Module, gen: torch.Generator, scale: float) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif "embed_tokens" in name or "lm_head" in name:
                p.copy_(0.5 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(scale * noise)


def _save(model: transformers.PreTrainedModel, out: pathlib.Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out, safe_serialization=True)
    for f in out.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            f.unlink()


def _positions(mask: np.ndarray) -> np.ndarray:
    return np.maximum(np.cumsum(mask, axis=-1) - 1, 0)


def _logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(_positions(mask)),
        )
    return out.logits.numpy().astype(np.float32)


def _padded(seqs, width, pad, left):
    ids = np.full((len(seqs), width), pad, np.int64)
    mask = np.zeros((len(seqs), width), np.int64)
    for i, s in enumerate(seqs):
        if left:
            ids[i, width - len(s) :] = s
            mask[i, width - len(s) :] = 1
        else:
            ids[i, : len(s)] = s
            mask[i, : len(s)] = 1
    return ids, mask


def _greedy(model, prompt: list[int]) -> tuple[list[int], float]:
    """Greedy continuation of one unpadded prompt, and the smallest top-1/top-2 logit gap."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=MAX_NEW_TOKENS,
            min_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=model.config.pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, len(prompt) :].tolist()
    margin = min(float(torch.topk(lg[0], 2).values.diff().abs()) for lg in out.logits)
    return tokens, margin


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    arrays: dict[str, np.ndarray] = {}
    for key, size in CONFIGS.items():
        cfg = transformers.LlamaConfig(**size)
        cfg._attn_implementation = "eager"
        model = transformers.LlamaForCausalLM(cfg)
        # Tied models need stronger layers, or the output favours repeating the input token.
        _randomise(model, gen, 0.3 if cfg.tie_word_embeddings else 0.15)
        if cfg.tie_word_embeddings:
            model.tie_weights()
        model.eval()
        _save(model, FIXTURES / FOLDERS[key])
        vocab = size["vocab_size"]

        lengths = [12, 9, 5, 1]
        seqs = [[1, *rng.integers(3, vocab, n - 1).tolist()] for n in lengths]
        for side in ("right", "left"):
            ids, mask = _padded(seqs, 12, size["pad_token_id"], left=side == "left")
            arrays[f"{key}_{side}_input_ids"] = ids
            arrays[f"{key}_{side}_attention_mask"] = mask
            arrays[f"{key}_{side}_logits"] = _logits(model, ids, mask)

        prompts = [[1, *rng.integers(3, vocab, n - 1).tolist()] for n in (7, 3, 10)]
        outs = [_greedy(model, p) for p in prompts]
        margin = min(m for _, m in outs)
        if margin < 1e-3:
            raise SystemExit(f"{key}: greedy margin {margin} too small; change SEED")
        # HF's own left-padded batched generation must agree with the unpadded runs.
        ids, mask = _padded(prompts, 10, size["pad_token_id"], left=True)
        with torch.no_grad():
            batched = model.generate(
                torch.from_numpy(ids),
                attention_mask=torch.from_numpy(mask),
                max_new_tokens=MAX_NEW_TOKENS,
                min_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=size["pad_token_id"],
            )[:, 10:].numpy()
        assert (batched == np.array([t for t, _ in outs])).all(), (batched, outs)
        pids, _ = _padded(prompts, 10, 0, left=False)
        arrays[f"{key}_gen_prompt_ids"] = pids
        arrays[f"{key}_gen_prompt_lengths"] = np.array([len(p) for p in prompts])
        arrays[f"{key}_gen_tokens"] = np.array([t for t, _ in outs])
        arrays[f"{key}_gen_margin"] = np.array(margin, np.float32)
        print(key, "greedy margin", margin, "tokens", arrays[f"{key}_gen_tokens"].tolist())

    for k, v in arrays.items():
        if v.dtype == np.int64:
            arrays[k] = v.astype(np.int32)
    meta = {"torch": torch.__version__, "transformers": transformers.__version__, "seed": SEED}
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez_compressed(FIXTURES / "llama_parity.npz", **arrays)
    print(json.dumps(meta), {k: v.shape for k, v in arrays.items()})


if __name__ == "__main__":
    main()
