"""A whole federated run in PyTorch, as peers implement it: HF transformers + PEFT LoRA + Opacus
DP-SGD, clients trained one after another. The reference side of ``ffa-jax bench --quickstart``
(:mod:`ffa_jax.bench.e2e`), run as a script in a fresh interpreter::

    python ffa_jax/bench/torch_run.py JOB.json RESULT.json

It imports only the standard library, numpy, torch, transformers, peft and opacus (never
ffa_jax or jax), so the process's memory and wall time are the reference's own. ``JOB.json``
is written by :func:`ffa_jax.bench.e2e.reference_job` from an ffa_jax run config: the model
folder, the raw texts and labels of the training split, each client's example indices (the
config's partition), the test split, and the training settings. What it runs:

* the model: ``AutoModelForSequenceClassification`` (``pooling: cls``) or ``AutoModel`` with
  the attention-mask mean pooling and a linear head (``pooling: mean``, sentence-transformers
  checkpoints), dropout off (ffa_jax's encoder is deterministic); the head is frozen unless
  ``train_head``;
* LoRA: ``peft.inject_adapter_in_model`` on the job's ``target_modules`` (rank, alpha, PEFT's
  Kaiming-uniform A, B = 0); FFA-LoRA trains every ``lora_B`` only, LoRA both factors;
* data: the HF tokenizer (padding to ``max_length``, truncation); Poisson sampling of each
  local batch (every example of client k independently with probability q_k = batch / n_k,
  a variable batch, as Opacus's ``DPDataLoader``);
* DP-SGD: Opacus ``GradSampleModule`` per-sample gradients and ``DPOptimizer`` (clip to C,
  Gaussian noise sigma_k C, divided by the expected batch), sigma_k calibrated by Opacus's
  RDP accountant to the job's (epsilon, delta) over rounds x local steps at q_k, which is
  what ``PrivacyEngine.make_private_with_epsilon(accountant="rdp")`` computes; without DP the
  plain model and optimiser;
* a round: each client starts from the global trainable tensors, takes ``local_steps`` steps
  (optimiser state reset every round), its delta is kept; the server averages the deltas
  (uniform or by n_k) and applies them with SGD (``server_lr``, optional momentum);
* evaluation on the whole test split after the rounds the job lists, in batches of
  ``eval_batch_size``, ``torch.no_grad``.

``RESULT.json``: ``rounds`` (one row per round: ``round`` 1-based, ``seconds``, and
``eval_accuracy`` / ``eval_loss`` after an evaluation), ``setup_seconds`` (imports, model,
tokenisation, calibration), ``noise_multipliers``, ``versions`` and ``threads``. Seconds are
wall-clock; the caller measures the process's whole wall time and memory itself.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings

T_START = time.perf_counter()  # before the heavy imports: the setup time includes them


def _model(job):
    import peft
    import torch
    import transformers

    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    torch.manual_seed(job["seed"])
    if job["pooling"] == "mean":
        base = transformers.AutoModel.from_pretrained(
            job["model_dir"], add_pooling_layer=False, **no_dropout
        )

        class MeanPooled(torch.nn.Module):
            """Mask-weighted mean of the last hidden states, then a linear head."""

            def __init__(self):
                super().__init__()
                self.base = base
                self.classifier = torch.nn.Linear(base.config.hidden_size, job["num_labels"])

            def forward(self, input_ids, attention_mask):
                h = self.base(input_ids=input_ids, attention_mask=attention_mask)
                m = attention_mask.unsqueeze(-1).to(h.last_hidden_state.dtype)
                pooled = (h.last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1.0)
                return self.classifier(pooled)

        model = MeanPooled()
    else:
        inner = transformers.AutoModelForSequenceClassification.from_pretrained(
            job["model_dir"],
            num_labels=job["num_labels"],
            ignore_mismatched_sizes=True,
            **no_dropout,
        )

        class Logits(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = inner

            def forward(self, input_ids, attention_mask):
                return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits

        model = Logits()
    lcfg = peft.LoraConfig(
        r=job["rank"],
        lora_alpha=job["alpha"],
        target_modules=job["target_modules"],
        lora_dropout=0.0,
    )
    model = peft.inject_adapter_in_model(lcfg, model)
    for name, p in model.named_parameters():
        trainable = ".lora_B." in name or (job["mode"] == "lora" and ".lora_A." in name)
        if job["train_head"] and "classifier" in name and "lora_" not in name:
            trainable = True
        p.requires_grad_(trainable)
    model.train()
    return model


def _tokenize(tokenizer, texts, max_length):

    enc = tokenizer(
        list(texts),
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    return enc["input_ids"], enc["attention_mask"]


def _sigma(job, q: float) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=job["epsilon"],
            target_delta=job["delta"],
            sample_rate=q,
            steps=job["rounds"] * job["local_steps"],
            accountant="rdp",
        )
    )


def _optimizer(job, params):
    import torch

    if job["client_optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=job["client_lr"])
    if job["client_optimizer"] == "momentum":
        return torch.optim.SGD(params, lr=job["client_lr"], momentum=job["client_momentum"])
    return torch.optim.Adam(params, lr=job["client_lr"])


def _evaluate(model, ids, mask, labels, batch_size):
    import torch

    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    with torch.no_grad():
        for i in range(0, len(labels), batch_size):
            logits = model(
                input_ids=ids[i : i + batch_size], attention_mask=mask[i : i + batch_size]
            )
            y = labels[i : i + batch_size]
            loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(-1) == y).sum())
    model.train(was_training)
    n = max(len(labels), 1)
    return {"eval_accuracy": correct / n, "eval_loss": loss_sum / n}


def run(job: dict) -> dict:
    """The whole run of ``job`` (see the module docstring); returns the result dict."""
    import numpy as np
    import opacus
    import peft
    import torch
    import transformers

    torch.set_num_threads(job["threads"])
    model = _model(job)
    tokenizer = transformers.AutoTokenizer.from_pretrained(job["model_dir"])
    train_ids, train_mask = _tokenize(tokenizer, job["train_texts"], job["max_length"])
    train_labels = torch.tensor(job["train_labels"], dtype=torch.long)
    test_ids, test_mask = _tokenize(tokenizer, job["test_texts"], job["max_length"])
    test_labels = torch.tensor(job["test_labels"], dtype=torch.long)
    clients = [np.asarray(ix, np.int64) for ix in job["client_indices"]]
    q = [job["batch_size"] / len(ix) for ix in clients]
    private = job["private"]
    sigmas = [_sigma(job, qk) for qk in q] if private else [0.0] * len(clients)

    if private:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # transformers deprecation warnings on wrapping
            model = GradSampleModule(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizers = []
    for sigma in sigmas:
        opt = _optimizer(job, params)
        if private:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Opacus warns about its non-secure RNG
                opt = DPOptimizer(
                    opt,
                    noise_multiplier=sigma,
                    max_grad_norm=job["clip_norm"],
                    expected_batch_size=job["batch_size"],
                )
        optimizers.append(opt)
    global_params = [p.detach().clone() for p in params]
    server_momentum = [torch.zeros_like(p) for p in params]
    weights = (
        np.ones(len(clients))
        if job["weighting"] == "uniform"
        else np.array([len(ix) for ix in clients], np.float64)
    )
    weights = weights / weights.sum()
    rng = np.random.default_rng(job["seed"])
    eval_after = set(job["eval_after_rounds"])
    setup_seconds = time.perf_counter() - T_START

    rows = []
    if job["eval_baseline"]:
        t0 = time.perf_counter()
        m = _evaluate(model, test_ids, test_mask, test_labels, job["eval_batch_size"])
        rows.append({"round": 0, **m, "seconds": time.perf_counter() - t0})
    empty_batches = 0
    for r in range(job["rounds"]):
        t0 = time.perf_counter()
        deltas = []
        for k, ix in enumerate(clients):
            with torch.no_grad():
                for p, g in zip(params, global_params, strict=True):
                    p.copy_(g)
            opt = optimizers[k]
            opt.state.clear()  # optimiser state is reset every round, as in ffa_jax
            with warnings.catch_warnings():
                # Opacus's full backward hooks warn when no module input requires grad (FFA).
                warnings.simplefilter("ignore")
                for _ in range(job["local_steps"]):
                    batch = ix[rng.random(len(ix)) < q[k]]
                    if len(batch) == 0:
                        empty_batches += 1  # Opacus would take a noise-only step; rare
                        continue
                    b = torch.from_numpy(batch)
                    opt.zero_grad(set_to_none=True)
                    logits = model(input_ids=train_ids[b], attention_mask=train_mask[b])
                    torch.nn.functional.cross_entropy(logits, train_labels[b]).backward()
                    opt.step()
            with torch.no_grad():
                deltas.append([p.detach() - g for p, g in zip(params, global_params, strict=True)])
        with torch.no_grad():
            for i, g in enumerate(global_params):
                avg = sum(float(w) * d[i] for w, d in zip(weights, deltas, strict=True))
                # Server SGD on the pseudo-gradient -avg (FedAvg at lr 1, no momentum).
                server_momentum[i].mul_(job["server_momentum"]).add_(avg)
                g.add_(job["server_lr"] * server_momentum[i])
        row = {"round": r + 1}
        if r + 1 in eval_after:
            with torch.no_grad():
                for p, g in zip(params, global_params, strict=True):
                    p.copy_(g)
            row.update(_evaluate(model, test_ids, test_mask, test_labels, job["eval_batch_size"]))
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
    return {
        "rounds": rows,
        "setup_seconds": setup_seconds,
        "noise_multipliers": sigmas,
        "sampling_rates": q,
        "empty_batches": empty_batches,
        "threads": torch.get_num_threads(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "opacus": opacus.__version__,
        },
    }


def main(argv: list[str]) -> int:
    job_path, out_path = argv
    with open(job_path) as f:
        job = json.load(f)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = run(job)
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, out_path)  # atomic: a partial result is never read as a whole one
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
