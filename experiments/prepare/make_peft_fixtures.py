"""Writes the PEFT parity fixtures in ``tests/fixtures/`` from the PyTorch reference.

Needs the optional torch extra (``pip install torch==2.13.0 peft``; never a runtime dependency
of ffa_jax) and the encoder fixtures of ``make_encoder_fixtures.py``. Run from the repository
root::

    python experiments/prepare/make_peft_fixtures.py

For each of the tiny BERT and RoBERTa classifiers (``tests/fixtures/encoder_tiny_{bert,roberta}``)
it wraps the model with PEFT LoRA (``r=4``, ``lora_alpha=8`` so that ``scale = 2`` catches scale
bugs, ``target_modules=["query", "value"]``, ``task_type=SEQ_CLS``: the classifier is a module
to save), *trains* it for a few Adam steps on a random batch (A, B and the head all move away
from their init, so every tensor is exercised), and writes:

  tests/fixtures/peft_tiny_{bert,roberta}/{adapter_config.json,adapter_model.safetensors}
      the adapter exactly as ``PeftModel.save_pretrained`` writes it (the model card removed;
      ``base_model_name_or_path`` made repository-relative).
  tests/fixtures/peft_parity.npz
      ``{bert,roberta}_{input_ids,attention_mask,token_type_ids,logits}``: the padded batches
      of ``encoder_parity.npz`` and the PEFT model's logits (``eval()``, eager attention).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil

import numpy as np
import peft
import torch
import transformers

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
SEED = 0
RANK, ALPHA = 4, 8
TRAIN_STEPS = 5


def _model(family: str):
    path = FIXTURES / f"encoder_tiny_{family}"
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        path,
        attn_implementation="eager",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return model, path


def _train(model, gen: torch.Generator, family: str) -> None:
    """A few Adam steps on a random batch: every adapter tensor and the head change."""
    lo, pad = (1, 0) if family == "bert" else (3, 1)
    ids = torch.randint(lo, 100, (8, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[4:, 7:] = 0
    ids[mask == 0] = pad
    labels = torch.randint(0, 3, (8,), generator=gen)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=0.05)
    model.train()
    for _ in range(TRAIN_STEPS):
        opt.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
    model.eval()


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    inputs = np.load(FIXTURES / "encoder_parity.npz")
    arrays: dict[str, np.ndarray] = {}
    for family in ("bert", "roberta"):
        base, path = _model(family)
        cfg = peft.LoraConfig(
            r=RANK,
            lora_alpha=ALPHA,
            target_modules=["query", "value"],
            lora_dropout=0.0,
            bias="none",
            task_type="SEQ_CLS",
        )
        model = peft.get_peft_model(base, cfg)
        _train(model, gen, family)
        out = FIXTURES / f"peft_tiny_{family}"
        if out.exists():
            shutil.rmtree(out)
        model.save_pretrained(out)
        (out / "README.md").unlink(missing_ok=True)
        config_path = out / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = str(path.relative_to(ROOT))
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

        ids, mask, types = (
            inputs[f"{family}_{k}"] for k in ("input_ids", "attention_mask", "token_type_ids")
        )
        with torch.no_grad():
            logits = model(
                input_ids=torch.from_numpy(ids.astype(np.int64)),
                attention_mask=torch.from_numpy(mask.astype(np.int64)),
                token_type_ids=torch.from_numpy(types.astype(np.int64)),
            ).logits
        arrays.update(
            {
                f"{family}_input_ids": ids,
                f"{family}_attention_mask": mask,
                f"{family}_token_type_ids": types,
                f"{family}_logits": logits.numpy().astype(np.float32),
            }
        )
    meta = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "seed": SEED,
        "r": RANK,
        "lora_alpha": ALPHA,
    }
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez_compressed(FIXTURES / "peft_parity.npz", **arrays)
    print(json.dumps(meta), {k: v.shape for k, v in arrays.items()})


if __name__ == "__main__":
    main()
