"""Writes the ViT parity fixtures in ``tests/fixtures/`` from the PyTorch reference.

Needs torch (``pip install torch==2.13.0``, a CPU build; the optional ``torch`` extra, not a
runtime dependency of ffa_jax) and transformers. Run from the repository root::

    python experiments/prepare/make_vit_fixtures.py

Writes:
  tests/fixtures/vit_tiny/{config.json,model.safetensors}
      a random ``ViTForImageClassification``: 12x12 RGB images, 4x4 patches (9 + 1 tokens),
      hidden 32, 2 layers, 4 heads, FFN 64, 3 labels, exact GELU, qkv biases.
  tests/fixtures/vit_tiny_gray/{config.json,model.safetensors}
      the same size with 1 channel, no qkv biases, tanh-approximate GELU, 6x6 patches.
  tests/fixtures/vit_tiny_base/{config.json,model.safetensors}
      a bare random ``ViTModel`` with its pooler (keys without ``vit.``, no classifier), the
      layout of ``google/vit-base-patch16-224-in21k``.
  tests/fixtures/vit_parity.npz
      ``{tiny,gray,base}_pixel_values`` (``[B, C, H, W]``, PyTorch layout), ``{tiny,gray}_logits``
      and ``{tiny,gray,base}_last_hidden_state`` from the torch models (``eval()``, eager
      attention, float32).

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
    image_size=12,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
)


def _randomise(model: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "layernorm" in name and name.endswith("weight"):
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


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    arrays: dict[str, np.ndarray] = {}
    variants = {
        "tiny": (
            "vit_tiny",
            transformers.ViTForImageClassification,
            dict(patch_size=4, num_channels=3, num_labels=3, hidden_act="gelu"),
        ),
        "gray": (
            "vit_tiny_gray",
            transformers.ViTForImageClassification,
            dict(patch_size=6, num_channels=1, num_labels=4, hidden_act="gelu_new", qkv_bias=False),
        ),
        "base": (
            "vit_tiny_base",
            transformers.ViTModel,
            dict(patch_size=4, num_channels=3, hidden_act="gelu"),
        ),
    }
    for name, (folder, cls, extra) in variants.items():
        cfg = transformers.ViTConfig(**SIZE, **extra)
        cfg._attn_implementation = "eager"
        model = cls(cfg)
        _randomise(model, gen)
        model.eval()
        _save(model, FIXTURES / folder)
        pixels = rng.standard_normal((4, cfg.num_channels, 12, 12)).astype(np.float32)
        with torch.no_grad():
            if cls is transformers.ViTModel:
                out = model(pixel_values=torch.from_numpy(pixels))
                hidden = out.last_hidden_state
            else:
                out = model(pixel_values=torch.from_numpy(pixels), output_hidden_states=True)
                arrays[f"{name}_logits"] = out.logits.numpy().astype(np.float32)
                hidden = model.vit.layernorm(out.hidden_states[-1])
        arrays[f"{name}_pixel_values"] = pixels
        arrays[f"{name}_last_hidden_state"] = hidden.numpy().astype(np.float32)
    meta = {"torch": torch.__version__, "transformers": transformers.__version__, "seed": SEED}
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez_compressed(FIXTURES / "vit_parity.npz", **arrays)
    print(json.dumps(meta), {k: v.shape for k, v in arrays.items()})


if __name__ == "__main__":
    main()
