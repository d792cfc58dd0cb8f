"""Writes ``tests/fixtures/opacus_step.npz``: one noise-free DP-SGD step by Opacus.

Needs the optional torch extra (``pip install torch==2.13.0 peft opacus``; never a runtime
dependency of ffa_jax) and the encoder fixtures. Run from the repository root::

    python experiments/prepare/make_opacus_fixture.py

The model is the tiny BERT classifier of ``tests/fixtures/encoder_tiny_bert`` (dropout off) with
PEFT LoRA on query and value (``r=4``, ``lora_alpha=8``). As in FFA-LoRA only every ``lora_B`` is
trainable (A, the base weights and the head are frozen); B starts from a random non-zero value
so the step is not a special case. Opacus's ``PrivacyEngine.make_private`` (per-sample
gradients with ``GradSampleModule``, ``noise_multiplier=0``, ``max_grad_norm=C``, no Poisson
sampling so the batch is exactly the fixture's) wraps plain SGD, and one step is taken on a
batch of 6 padded sentence pairs. ``C`` is the median per-sample gradient norm, so some examples
are clipped and some are not.

Stored arrays: ``input_ids``, ``attention_mask``, ``token_type_ids`` ``[6, 12]``, ``labels``
``[6]``, ``clip_norm``, ``learning_rate``, ``per_sample_norms`` ``[6]`` (before clipping), and
for every adapted module (``layer{i}_{query,value}``) ``..._A`` ``[r, d_in]`` (PEFT layout),
``..._B_before`` and ``..._B_after`` ``[d_out, r]``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import warnings

import numpy as np
import opacus
import peft
import torch
import transformers
from opacus import PrivacyEngine

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
SEED = 0
RANK, ALPHA = 4, 8
LEARNING_RATE = 0.5
BATCH = 6


def _batch(rng: np.random.Generator):
    L = 12
    lengths = [12, 10, 9, 7, 5, 3]
    ids = np.zeros((BATCH, L), np.int64)
    mask = np.zeros((BATCH, L), np.int64)
    types = np.zeros((BATCH, L), np.int64)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(1, 100, n)
        mask[i, :n] = 1
        types[i, n // 2 : n] = 1
    labels = rng.integers(0, 3, BATCH)
    return ids, mask, types, labels


def _lora_modules(model) -> dict[str, torch.nn.Module]:
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, peft.tuners.lora.Linear):
            layer = name.split("encoder.layer.")[1].split(".")[0]
            out[f"layer{layer}_{name.rsplit('.', 1)[-1]}"] = module
    return out


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    base = transformers.AutoModelForSequenceClassification.from_pretrained(
        FIXTURES / "encoder_tiny_bert",
        attn_implementation="eager",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    cfg = peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=["query", "value"], lora_dropout=0.0
    )
    model = peft.get_peft_model(base, cfg)
    modules = _lora_modules(model)
    with torch.no_grad():
        for m in modules.values():
            b = m.lora_B["default"].weight
            b.copy_(0.3 * torch.randn(b.shape, generator=gen))
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_B." in name)
    arrays: dict[str, np.ndarray] = {}
    for k, m in modules.items():
        arrays[f"{k}_A"] = m.lora_A["default"].weight.detach().numpy().copy()
        arrays[f"{k}_B_before"] = m.lora_B["default"].weight.detach().numpy().copy()

    ids, mask, types, labels = _batch(rng)
    tensors = [torch.from_numpy(x) for x in (ids, mask, types, labels)]

    def loss_of(ids, mask, types, labels):
        logits = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        return torch.nn.functional.cross_entropy(logits, labels)

    # Per-sample gradient norms (before clipping), to pick a C that clips some examples.
    trainable = [p for p in model.parameters() if p.requires_grad]
    norms = []
    for i in range(BATCH):
        grads = torch.autograd.grad(loss_of(*(t[i : i + 1] for t in tensors)), trainable)
        norms.append(float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads))))
    clip = float(np.median(norms))

    model.train()
    optimizer = torch.optim.SGD(trainable, lr=LEARNING_RATE)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(*tensors), batch_size=BATCH, shuffle=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about secure RNG and sigma = 0
        private_model, optimizer, loader = PrivacyEngine().make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=0.0,
            max_grad_norm=clip,
            poisson_sampling=False,
        )
    (batch,) = list(loader)
    optimizer.zero_grad()
    logits = private_model(input_ids=batch[0], attention_mask=batch[1], token_type_ids=batch[2])
    torch.nn.functional.cross_entropy(logits.logits, batch[3]).backward()
    optimizer.step()
    for k, m in modules.items():
        arrays[f"{k}_B_after"] = m.lora_B["default"].weight.detach().numpy().copy()

    arrays.update(
        input_ids=ids.astype(np.int32),
        attention_mask=mask.astype(np.int32),
        token_type_ids=types.astype(np.int32),
        labels=labels.astype(np.int32),
        clip_norm=np.float32(clip),
        learning_rate=np.float32(LEARNING_RATE),
        per_sample_norms=np.array(norms, np.float32),
    )
    meta = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "opacus": opacus.__version__,
        "seed": SEED,
        "r": RANK,
        "lora_alpha": ALPHA,
    }
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez_compressed(FIXTURES / "opacus_step.npz", **arrays)
    print(json.dumps(meta), "C =", clip, "norms =", np.round(norms, 4).tolist())


if __name__ == "__main__":
    main()
