"""The PyTorch Opacus+PEFT reference of ``ffa-jax bench``: what peers run, timed in-process.

Needs the optional ``torch`` extra (``pip install -e ".[torch]"``: torch, peft, opacus); this
module is imported only when the reference is requested, never by training code.

The reference is built to match the ffa_jax side of the bench: a ``transformers``
``BertForSequenceClassification`` with the same shape (random weights: timings do not depend on
values; dropout off, as ffa_jax's encoder is deterministic), PEFT LoRA on ``query``/``value``
with the same rank and alpha, FFA-LoRA by freezing every ``lora_A`` (only ``lora_B`` is
trainable), and DP-SGD through Opacus: ``GradSampleModule`` per-sample gradients, and
``DPOptimizer`` per-sample clipping to C plus Gaussian noise ``sigma * C`` divided by the
expected batch size, i.e. what ``PrivacyEngine.make_private`` assembles. A round runs its K
clients one after another, as peers simulate them: reset B to the global value, take
``local_steps`` DP-SGD steps, keep the delta, then average. On a machine where torch sees a
CUDA GPU the reference runs there (as ffa_jax's side runs on the GPU), and each timed call
waits for the device before it returns.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any


def torch_available() -> bool:
    """True when torch, peft and opacus all import."""
    try:
        import opacus  # noqa: F401
        import peft  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _device():
    """CUDA when torch sees a GPU, else the CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync() -> None:
    """Waits for queued CUDA work (timings must include it); nothing on a CPU."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _model(shape: dict[str, int], rank: int, alpha: float, seq_len: int):
    import peft
    import torch
    import transformers

    cfg = transformers.BertConfig(
        vocab_size=shape["vocab_size"],
        hidden_size=shape["hidden_size"],
        num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_heads"],
        intermediate_size=shape["intermediate_size"],
        max_position_embeddings=max(512, seq_len + 2),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(cfg)
    lcfg = peft.LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=["query", "value"], lora_dropout=0.0
    )
    model = peft.get_peft_model(base, lcfg)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_B." in name)  # FFA-LoRA: A, trunk and head frozen
    model.train()
    return model.to(_device())


def _batches(n: int, batch_size: int, seq_len: int, vocab: int):
    import torch

    g = torch.Generator().manual_seed(0)
    device = _device()
    return [
        (
            torch.randint(2, vocab, (batch_size, seq_len), generator=g).to(device),
            torch.ones(batch_size, seq_len, dtype=torch.long, device=device),
            torch.randint(0, 2, (batch_size,), generator=g).to(device),
        )
        for _ in range(n)
    ]


class _DpClient:
    """One Opacus-wrapped FFA model reused by every client (peers reuse one model too)."""

    def __init__(self, shape, rank, alpha, seq_len, batch_size, clip_norm, noise_multiplier):
        import torch
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # transformers deprecation warnings on wrapping
            self.model = GradSampleModule(_model(shape, rank, alpha, seq_len))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus warns about its non-secure RNG
            self.opt = DPOptimizer(
                torch.optim.SGD(self.params, lr=0.1),
                noise_multiplier=noise_multiplier,
                max_grad_norm=clip_norm,
                expected_batch_size=batch_size,
            )

    def update(self, batches, start):
        """``len(batches)`` DP-SGD steps from B = ``start``; returns the delta of B."""
        import torch

        with torch.no_grad():
            for p, s in zip(self.params, start, strict=True):
                p.copy_(s)
        with warnings.catch_warnings():
            # Opacus's full backward hooks warn when no module input requires grad (FFA).
            warnings.simplefilter("ignore")
            for ids, mask, labels in batches:
                self.opt.zero_grad()
                logits = self.model(input_ids=ids, attention_mask=mask).logits
                torch.nn.functional.cross_entropy(logits, labels).backward()
                self.opt.step()
        with torch.no_grad():
            return [p.detach() - s for p, s in zip(self.params, start, strict=True)]


def make_reference(
    *,
    shape: dict[str, int],
    rank: int,
    alpha: float,
    batch_size: int,
    seq_len: int,
    round_batch_size: int,
    round_seq_len: int,
    local_steps: int,
    clients: int,
    threads: int,
    clip_norm: float = 1.0,
    noise_multiplier: float = 1.0,
) -> tuple[dict[str, Any], Callable[[], Any], Callable[[], Any]]:
    """The reference, built and warmed up: ``(info, client_update, round_)``.

    ``client_update()`` runs one DP client update (``local_steps`` steps at ``batch_size x
    seq_len``); ``round_()`` runs a sequential round of ``clients`` clients at
    ``round_batch_size x round_seq_len``. The caller times them, interleaved with ffa_jax's
    (:func:`ffa_jax.bench.run_bench`), so that both see the same machine load.
    """
    import opacus
    import peft
    import torch
    import transformers

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    vocab = shape["vocab_size"]
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "peft": peft.__version__,
        "opacus": opacus.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(_device())
        + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""),
        "attention": "transformers default (sdpa)",
    }
    client = _DpClient(shape, rank, alpha, seq_len, batch_size, clip_norm, noise_multiplier)
    start = [p.detach().clone() for p in client.params]
    one = _batches(local_steps, batch_size, seq_len, vocab)

    def client_update():
        delta = client.update(one, start)
        _sync()
        return delta

    rclient = _DpClient(
        shape, rank, alpha, round_seq_len, round_batch_size, clip_norm, noise_multiplier
    )
    rstart = [p.detach().clone() for p in rclient.params]
    data = [_batches(local_steps, round_batch_size, round_seq_len, vocab) for _ in range(clients)]

    def round_():
        deltas = [rclient.update(data[k], rstart) for k in range(clients)]
        with torch.no_grad():
            for p, s, *ds in zip(rclient.params, rstart, *deltas, strict=True):
                p.copy_(s + torch.stack(ds).mean(0))
        _sync()

    for fn in (client_update, round_):  # warm-up (allocator, Opacus hooks)
        fn()
    return info, client_update, round_


def default_threads() -> int:
    """The cores this process may use (XLA:CPU's thread pool uses the same count)."""
    return len(os.sched_getaffinity(0))
