"""The ``llama`` workload: a LLaMA-family causal LM fine-tuned on a GSM task.

Model: ``model.name`` is ``smollm2`` (offline SmolLM2-135M-Instruct), a ``.gguf`` file, a
local HF folder or a hub id (:func:`ffa_jax.models.llama_weights.load_llama_pretrained`;
the tokenizer must fit the embedding). Data: :func:`ffa_jax.data.gsm.load_gsm`
(``gsm_symbolic`` shipped, ``openai/gsm8k``, local JSONL).

Training examples are ``prompt (chat template + question + instruction) + answer + EOS``
(:func:`ffa_jax.data.gsm.encode_gsm`); examples longer than ``model.max_length`` are dropped
(counted in the summary), answers are never truncated. The per-example loss is the mean NLL
of the answer tokens (:func:`ffa_jax.models.llama.causal_lm_loss`). Evaluation: greedy
decoding of at most ``eval.max_new_tokens`` tokens from every test prompt and exact match of
the number after ``####`` (:func:`make_gsm_evaluator`); every test prompt
must fit in ``model.max_length`` tokens (checked before training).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from ffa_jax import perf as perf_lib
from ffa_jax.config import RunConfig
from ffa_jax.data import gsm as gsm_lib
from ffa_jax.errors import ConfigError, DataError
from ffa_jax.models import llama as llama_lib
from ffa_jax.models import llama_weights
from ffa_jax.workloads import Workload, compute_dtype, host_weights

log = logging.getLogger(__name__)

LABEL_NAMES = ("problems",)  # GSM has no classes: one column in the partition table
TRAIN_KEYS = ("input_ids", "attention_mask", "loss_mask")


class GSMEvaluator:
    """Greedy-decoding exact-match evaluator; build with :func:`make_gsm_evaluator`.

    ``evaluator(params, examples) -> GSMEvalResult`` (:mod:`ffa_jax.data.gsm`). ``params`` may
    hold LoRA nodes (they
    are merged once per call, each merged kernel sharded as its ``w0``:
    :func:`ffa_jax.lora.merge_sharded`). Batches are padded to ``batch_size`` with dummy rows, so the
    generator compiles once for the whole evaluation (and across calls).
    """

    def __init__(self, generator, tokenizer, *, batch_size, instruction, chat, num_samples):
        self.generator = generator
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.instruction = instruction
        self.chat = chat
        self.num_samples = num_samples

    def generate_text(self, params: Any, questions: Sequence[str]) -> tuple[list[str], np.ndarray]:
        """Greedy generations (decoded, special tokens skipped) and ``finished`` flags."""
        from ffa_jax import lora

        # Sharded frozen kernels (perf.model_devices > 1) stay sharded once merged.
        params = lora.merge_sharded(params)
        prompts = gsm_lib.tokenize_prompts(
            self.tokenizer, questions, instruction=self.instruction, chat=self.chat
        )
        P = self.generator.max_prompt_length
        too_long = [(i, len(p)) for i, p in enumerate(prompts) if len(p) > P]
        if too_long:
            raise DataError(
                f"{len(too_long)} GSM prompts are longer than the {P} prompt tokens of the "
                f"evaluator (e.g. question {too_long[0][0]}: {too_long[0][1]} tokens); raise "
                "max_prompt_length."
            )
        texts, finished = [], []
        B = self.batch_size
        for start in range(0, len(prompts), B):
            chunk = prompts[start : start + B]
            real = len(chunk)
            chunk = chunk + [chunk[0]] * (B - real)  # dummy rows keep the batch shape fixed
            out = self.generator(params, chunk)
            toks, lens, fin = (np.asarray(x) for x in (out.tokens, out.lengths, out.finished))
            for r in range(real):
                texts.append(self.tokenizer.decode(toks[r, : lens[r]], skip_special_tokens=True))
                finished.append(bool(fin[r]))
        return texts, np.asarray(finished, bool)

    def __call__(
        self, params: Any, examples: Sequence[gsm_lib.GSMExample]
    ) -> gsm_lib.GSMEvalResult:
        if not examples:
            raise DataError("no GSM examples to evaluate.")
        texts, finished = self.generate_text(params, [e.question for e in examples])
        refs = [e.answer for e in examples]
        strict = gsm_lib.exact_match(texts, refs)
        lenient = gsm_lib.exact_match(texts, refs, lenient=True)
        preds = tuple(gsm_lib.extract_answer(t) for t in texts)
        samples = tuple(
            {
                "id": e.id,
                "question": e.question,
                "reference": e.final_answer,
                "generation": t,
                "predicted": p,
                "correct": bool(c),
            }
            for e, t, p, c in list(zip(examples, texts, preds, strict, strict=True))[
                : self.num_samples
            ]
        )
        return gsm_lib.GSMEvalResult(
            exact_match=float(strict.mean()),
            exact_match_lenient=float(lenient.mean()),
            format_rate=float(np.mean(["####" in t for t in texts])),
            count=len(examples),
            finished_rate=float(finished.mean()),
            samples=samples,
            predictions=preds,
        )


def make_gsm_evaluator(
    config: Any,
    tokenizer: Any,
    *,
    max_prompt_length: int = 256,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    instruction: str | None = gsm_lib.DEFAULT_INSTRUCTION,
    chat: bool | None = None,
    num_samples: int = 3,
    dtype: Any = None,
) -> GSMEvaluator:
    """Builds a :class:`GSMEvaluator` for a :class:`ffa_jax.models.llama.LlamaConfig` model.

    Generation stops at the tokenizer's EOS (and the config's ``eos_token_ids``); the KV
    cache has ``max_prompt_length + max_new_tokens`` slots; one compilation per evaluator.

    Raises:
      ConfigError: the lengths are invalid or exceed the model's context.
      DataError: the tokenizer has no EOS token.
    """
    import jax.numpy as jnp

    from ffa_jax.models.generate import make_generate

    eos = tuple(dict.fromkeys([gsm_lib.eos_id(tokenizer), *config.eos_token_ids]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    gen = make_generate(
        config,
        max_length=max_prompt_length + max_new_tokens,
        max_new_tokens=max_new_tokens,
        eos_token_ids=eos,
        pad_token_id=int(pad),
        dtype=dtype or jnp.float32,
    )
    return GSMEvaluator(
        gen,
        tokenizer,
        batch_size=batch_size,
        instruction=instruction,
        chat=chat,
        num_samples=num_samples,
    )


def check(cfg: RunConfig) -> None:
    """Pure config checks (no I/O).

    Raises:
      ConfigError: a non-IID partition (GSM problems have no class labels), a trained head
        (the LM head is not a classification head), or an unknown GSM task name.
    """
    if cfg.data.partition != "iid":
        raise ConfigError(
            f"data.partition={cfg.data.partition!r} needs class labels, which GSM problems do "
            "not have; use data.partition=iid (the paper's GSM-8K federation)."
        )
    if cfg.model.train_head:
        raise ConfigError(
            "model.train_head=true: decoders have no classification head to train (the LM head "
            "is the output embedding); use model.train_head=false (only LoRA is trained)."
        )
    if cfg.model.max_length < 2:
        raise ConfigError(f"model.max_length={cfg.model.max_length} must be >= 2 for a decoder.")
    if cfg.data.validation_fraction:
        raise ConfigError(
            f"data.validation_fraction={cfg.data.validation_fraction}: GSM runs have no "
            "validation evaluator (exact match needs generation); use data.validation_fraction=0."
        )


def _prompt_arrays(prompts: Sequence[Sequence[int]], length: int, pad: int) -> dict:
    ids = np.full((len(prompts), length), pad, np.int32)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
    return {"prompt_ids": ids, "prompt_length": np.asarray([len(p) for p in prompts], np.int32)}


def _load_task(cfg: RunConfig) -> gsm_lib.GSMData:
    return gsm_lib.load_gsm(
        cfg.data.task,
        test_fraction=cfg.data.test_fraction,
        seed=cfg.split_seed,
        max_train_examples=cfg.data.max_train_examples,
        max_test_examples=cfg.eval.max_examples,
    )


def train_labels(cfg: RunConfig) -> tuple[np.ndarray, tuple[str, ...]]:
    """All-zero labels, one per training problem that fits ``model.max_length`` with the
    model's tokenizer (the weights are not loaded)."""
    data = _load_task(cfg)
    tokenizer = llama_weights.load_llama_tokenizer(cfg.model.name)
    encoded = gsm_lib.encode_gsm(
        tokenizer, data.train, max_length=cfg.model.max_length, overflow="drop"
    )
    return np.zeros(len(encoded["index"]), np.int32), LABEL_NAMES


def load(cfg: RunConfig, *, head_key: jax.Array) -> Workload:
    """Loads the decoder, its tokenizer and the GSM task; encodes the training examples and
    checks that every test prompt fits.

    Raises:
      DataError: the task cannot be loaded, no training example fits ``model.max_length``, or
        a test prompt is longer than ``model.max_length``.
      WeightsError: the model cannot be loaded (unsupported architecture, missing files) or
        its tokenizer has more tokens than the embedding (vocab mismatch).
      ConfigError: ``model.max_length + eval.max_new_tokens`` exceeds the model's context.
    """
    del head_key  # no randomly initialised head
    if not cfg.eval.test:
        raise ConfigError(
            "eval.test=false: a decoder run has no validation split to report instead; use "
            "eval.test=true."
        )
    if cfg.eval.dtype != "model":
        raise ConfigError(
            f"eval.dtype={cfg.eval.dtype!r}: a decoder is evaluated by greedy generation in "
            "its training dtype; use eval.dtype=model (model.dtype=bfloat16 makes the whole run "
            "bfloat16)."
        )
    L = cfg.model.max_length
    data = _load_task(cfg)
    dtype = compute_dtype(cfg)
    pre = llama_weights.load_llama_pretrained(cfg.model.name, dtype=dtype, host=host_weights(cfg))
    config, tokenizer = pre.config, pre.tokenizer
    context = L + cfg.eval.max_new_tokens
    if context > config.max_position_embeddings:
        raise ConfigError(
            f"model.max_length={L} + eval.max_new_tokens={cfg.eval.max_new_tokens} = {context} "
            f"exceeds the {config.max_position_embeddings} positions of {cfg.model.name!r}; "
            "lower one of them."
        )

    encoded = gsm_lib.encode_gsm(tokenizer, data.train, max_length=L, overflow="drop")
    train_arrays = {k: encoded[k] for k in TRAIN_KEYS}
    n_kept, n_all = len(encoded["index"]), len(data.train)
    notes = []
    if n_kept < n_all:
        notes.append(
            f"{n_all - n_kept} of {n_all} training problems are longer than model.max_length="
            f"{L} tokens (prompt + answer + EOS) and were dropped; {n_kept} remain."
        )
        log.info(notes[-1])

    prompts = gsm_lib.tokenize_prompts(tokenizer, [e.question for e in data.test])
    too_long = [(i, len(p)) for i, p in enumerate(prompts) if len(p) > L]
    if too_long:
        longest = max(n for _, n in too_long)
        raise DataError(
            f"{len(too_long)} of {len(prompts)} test prompts of data.task={cfg.data.task!r} are "
            f"longer than model.max_length={L} tokens (longest {longest}, e.g. test problem "
            f"{too_long[0][0]}); raise model.max_length to at least {longest}, or evaluate "
            "fewer problems with eval.max_examples."
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    test_arrays = _prompt_arrays(prompts, L, int(pad))

    module = llama_lib.LlamaForCausalLM(config, dtype=dtype, remat=cfg.perf.remat)
    evaluator = make_gsm_evaluator(
        config,
        tokenizer,
        max_prompt_length=L,
        max_new_tokens=cfg.eval.max_new_tokens,
        batch_size=min(perf_lib.eval_batch_size(cfg), len(data.test)),
        dtype=dtype,
    )

    def evaluate(params) -> dict[str, Any]:
        """Greedy exact match on the test problems, plus a few sample generations."""
        res = evaluator(params, data.test)
        return {**res.metrics(), "eval_samples": [dict(s) for s in res.samples]}

    def summary_fields(history: Sequence[dict[str, Any]]) -> dict[str, Any]:
        base = next((h for h in history if h["round"] == 0), None)
        last = history[-1]
        return {
            "test_exact_match": last["eval_exact_match"],
            "test_exact_match_lenient": last["eval_exact_match_lenient"],
            "baseline_exact_match": None if base is None else base["eval_exact_match"],
            "baseline_exact_match_lenient": (
                None if base is None else base["eval_exact_match_lenient"]
            ),
            "test_examples": last["eval_examples"],
            "train_examples": n_kept,
            "dropped_train_examples": n_all - n_kept,
        }

    def result_rows(summary: dict[str, Any], history) -> list[tuple[str, str]]:
        last = history[-1]

        def before_after(key: str) -> str:
            b = summary.get(f"baseline_{key}")
            after = f"{summary[f'test_{key}']:.4f}"
            return after if b is None else f"{b:.4f} -> {after}"

        return [
            (
                f"exact match (`####` answer; pretrained -> fine-tuned), "
                f"{summary['test_examples']} test problems",
                before_after("exact_match"),
            ),
            (
                "exact match, lenient (last number if no `####`)",
                before_after("exact_match_lenient"),
            ),
            ("generations with `####`", f"{last['eval_format_rate']:.4f}"),
            ("generations ending with EOS", f"{last['eval_finished_rate']:.4f}"),
            (
                "training problems used (dropped: longer than max_length)",
                f"{summary['train_examples']} ({summary['dropped_train_examples']} dropped)",
            ),
        ]

    return Workload(
        family="llama",
        module=module,
        base_params=pre.params,
        head_pattern=None,
        loss_fn=llama_lib.causal_lm_loss(module),
        evaluate=evaluate,
        train_arrays=train_arrays,
        train_labels=np.zeros(n_kept, np.int32),
        label_names=LABEL_NAMES,
        test_arrays=test_arrays,
        data=data,
        metric="eval_exact_match",
        metric_title="exact match",
        metric_short="em",
        summary_fields=summary_fields,
        result_rows=result_rows,
        notes=tuple(notes),
    )
