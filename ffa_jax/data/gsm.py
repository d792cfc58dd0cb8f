"""Grade-school math (GSM8K format): data, prompts, answer-only loss masks, exact-match eval.

Data (:func:`load_gsm`), every source in the GSM8K format: records with a ``question`` and an
``answer`` whose chain of thought ends with a line ``#### <number>``:

1. ``"gsm_symbolic"``: the shipped offline set (1,995 problems from reasoning-gym's
   ``gsm_symbolic`` generator, Apache-2.0; 1,745 train / 250 test; see
   ``ffa_jax/data/assets/GSM_SYMBOLIC.md``);
2. ``"openai/gsm8k"`` (alias ``"gsm8k"``; optionally ``"openai/gsm8k:socratic"``): GSM8K from
   the HF hub with HF ``datasets`` (needs internet): 7,473 train / 1,319 test;
3. a local ``.jsonl`` / ``.json`` file of such records (a ``split`` field of
   ``"train"``/``"test"`` is honoured; otherwise a seeded test split is drawn), or a folder
   holding ``train.jsonl`` and ``test.jsonl`` (the layout of the original
   ``openai/grade-school-math`` repository).

Training examples (:func:`encode_gsm`): the prompt is the question under the model's chat
template (when the tokenizer has one; otherwise the Alpaca-style prompt FederatedScope-LLM uses
for GSM8K), the target is the answer followed by the end-of-sequence token. Arrays are
``[N, L]`` int32 ``input_ids``, ``attention_mask`` and ``loss_mask``, where ``loss_mask`` is 1
exactly on the answer tokens (and the final EOS): the causal-LM loss
(:func:`ffa_jax.models.llama.causal_lm_loss`) is taken on the answer only.

Evaluation (:func:`ffa_jax.workloads.gsm.make_gsm_evaluator`, which owns the generator):
greedy generation from the prompt, then exact match of the number after the last ``####``
(:func:`extract_answer`) against the reference's.
A lenient variant (last number in the text when there is no ``####``) is reported alongside,
since an untuned model rarely follows the ``####`` convention.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import pathlib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ffa_jax.errors import DataError

log = logging.getLogger(__name__)

ASSETS_DIR = pathlib.Path(__file__).resolve().parent / "assets"
GSM_SYMBOLIC = "gsm_symbolic"
GSM_SYMBOLIC_FILE = ASSETS_DIR / "gsm_symbolic.jsonl.gz"
GSM8K_HUB = "openai/gsm8k"
GSM8K_ALIASES = ("gsm8k", "openai/gsm8k", "gsm8k:main", "openai/gsm8k:main")
LOCAL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz")

# Appended to every question: the same for every source and before/after fine-tuning.
DEFAULT_INSTRUCTION = "Solve step by step, then give the final answer as '#### <number>'."
# FederatedScope-LLM's GSM8K prompt for models without a chat template (Alpaca's no-input form).
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
OVERFLOW = ("error", "drop")


@dataclasses.dataclass(frozen=True)
class GSMExample:
    """One problem. ``answer`` is the GSM8K-style solution ending ``#### <number>``."""

    question: str
    answer: str
    id: str = ""

    @property
    def final_answer(self) -> str | None:
        return extract_answer(self.answer)


@dataclasses.dataclass(frozen=True)
class GSMData:
    """A GSM task with a train and a test split (tuples of :class:`GSMExample`)."""

    name: str
    train: tuple[GSMExample, ...]
    test: tuple[GSMExample, ...]


# --------------------------------------------------------------------------- answers

_NUMBER = re.compile(r"-?[$€£]?\s?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def normalize_number(text: str | None) -> str | None:
    """A canonical string for a number: ``"$1,200.00"`` -> ``"1200"``, ``"-3.50"`` -> ``"-3.5"``.

    Returns ``None`` when ``text`` holds no number.
    """
    if text is None:
        return None
    m = _NUMBER.search(text)
    if m is None:
        return None
    s = re.sub(r"[$€£,\s]", "", m.group(0))
    neg = s.startswith("-")
    s = s.lstrip("-")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    s = s.lstrip("0") or "0"
    if s.startswith("."):
        s = "0" + s
    return ("-" + s) if neg and s != "0" else s


def extract_answer(text: str, *, lenient: bool = False) -> str | None:
    """The final answer of a GSM8K-style solution: the number after the last ``####``.

    Args:
      text: a reference answer or a model's generation.
      lenient: when there is no ``####``, fall back to the last number in the text.

    Returns:
      The normalised number (:func:`normalize_number`), or ``None``.

    Example:
      >>> extract_answer("5 + 7 = 12 apples.\\n#### 12")
      '12'
      >>> extract_answer("The answer is 1,000.", lenient=True)
      '1000'
    """
    if "####" in text:
        return normalize_number(text.rsplit("####", 1)[1])
    if not lenient:
        return None
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def exact_match(
    generations: Sequence[str], references: Sequence[str], *, lenient: bool = False
) -> np.ndarray:
    """Bool ``[N]``: the generation's final answer equals the reference's (both extracted with
    :func:`extract_answer`; the reference always strictly)."""
    if len(generations) != len(references):
        raise DataError(f"{len(generations)} generations for {len(references)} references.")
    out = []
    for g, r in zip(generations, references, strict=True):
        ref = extract_answer(r)
        out.append(ref is not None and extract_answer(g, lenient=lenient) == ref)
    return np.asarray(out, bool)


# --------------------------------------------------------------------------- loading


def _records_to_examples(records: Iterable[Mapping[str, Any]], source: str) -> list[GSMExample]:
    out = []
    for i, r in enumerate(records):
        q, a = r.get("question"), r.get("answer")
        if not isinstance(q, str) or not isinstance(a, str):
            raise DataError(
                f"{source}: record {i} needs string fields 'question' and 'answer' (the GSM8K "
                f"format); it has {sorted(r)}."
            )
        if extract_answer(a) is None:
            raise DataError(
                f"{source}: record {i}'s answer does not end with '#### <number>' (the GSM8K "
                f"convention): {a[-80:]!r}."
            )
        out.append(GSMExample(question=q, answer=a, id=str(r.get("id", f"{source}#{i}"))))
    if not out:
        raise DataError(f"{source} holds no records; give at least one question/answer pair.")
    return out


def _read_jsonl(path: pathlib.Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"GSM data file {str(path)!r} does not exist.")
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            if path.name.endswith(".json"):
                data = json.load(f)
                if isinstance(data, Mapping):
                    data = data.get("data", data.get("train"))
                if not isinstance(data, list):
                    raise DataError(
                        f"{str(path)!r}: a .json file must hold a list of records (or "
                        "{'data': [...]}); use JSON lines otherwise."
                    )
                return data
            return [json.loads(line) for line in f if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise DataError(f"{str(path)!r} is not valid JSON lines: {e}") from e


def _split_off(examples: list[GSMExample], test_fraction: float, seed: int):
    if not 0 < test_fraction < 1:
        raise DataError(f"test_fraction={test_fraction!r} must be in (0, 1).")
    order = np.random.default_rng((seed, 0)).permutation(len(examples))
    n_test = max(1, int(round(test_fraction * len(examples))))
    if n_test >= len(examples):
        raise DataError(
            f"{len(examples)} examples are too few to split off a test fraction of {test_fraction}."
        )
    shuffled = [examples[i] for i in order]
    return shuffled[n_test:], shuffled[:n_test]


def _from_records(records: list[dict], source: str, test_fraction: float, seed: int):
    if records and all("split" in r for r in records):
        splits = {s: [r for r in records if r["split"] == s] for s in ("train", "test")}
        if splits["train"] and splits["test"]:
            return (
                _records_to_examples(splits["train"], source),
                _records_to_examples(splits["test"], source),
            )
    return _split_off(_records_to_examples(records, source), test_fraction, seed)


def _load_hub(task: str) -> tuple[list[GSMExample], list[GSMExample]]:
    import datasets  # deferred: importing datasets takes ~1 s

    name, _, config = task.partition(":")
    name = GSM8K_HUB if name == "gsm8k" else name
    try:
        dd = datasets.load_dataset(name, config or "main")
    except Exception as e:  # noqa: BLE001 - offline/hub failures surface as many types
        raise DataError(
            f"data.task={task!r}: loading {name!r} (config {config or 'main'!r}) from the HF hub "
            f"failed ({type(e).__name__}: {e}). It needs internet; offline, use "
            f"{GSM_SYMBOLIC!r} or a local .jsonl file in the GSM8K format."
        ) from e
    missing = [s for s in ("train", "test") if s not in dd]
    if missing:
        raise DataError(f"data.task={task!r}: the dataset has no {missing} split(s) ({list(dd)}).")
    return (
        _records_to_examples(dd["train"], f"{task} (train)"),
        _records_to_examples(dd["test"], f"{task} (test)"),
    )


def load_gsm(
    task: str = GSM_SYMBOLIC,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    max_train_examples: int | None = None,
    max_test_examples: int | None = None,
) -> GSMData:
    """Loads a GSM task (see the module docstring for ``task``).

    A test split is drawn (``numpy.random.default_rng((seed, 0))``, ``test_fraction``) only
    when the source has none. ``max_*_examples`` keep a seeded random subset
    (``default_rng((seed, 1))`` / ``(seed, 2)``) of each split, in the source order.

    Raises:
      DataError: unknown task, missing/unreadable file, records not in the GSM8K format (the
        message names the record), or the hub is unreachable.
    """
    path = pathlib.Path(task).expanduser()
    if task == GSM_SYMBOLIC:
        if not GSM_SYMBOLIC_FILE.is_file():
            raise DataError(
                f"data.task={task!r}: the shipped asset {GSM_SYMBOLIC_FILE} is missing; reinstall "
                "ffa_jax or regenerate it with `python experiments/prepare/gsm_symbolic.py`."
            )
        train, test = _from_records(_read_jsonl(GSM_SYMBOLIC_FILE), task, test_fraction, seed)
    elif task in GSM8K_ALIASES or task.startswith((GSM8K_HUB + ":", "gsm8k:")):
        train, test = _load_hub(task)
    elif path.is_dir():
        files = [path / "train.jsonl", path / "test.jsonl"]
        if not all(f.is_file() for f in files):
            raise DataError(
                f"data.task={task!r} is a folder without train.jsonl and test.jsonl (found "
                f"{sorted(p.name for p in path.iterdir())[:10]})."
            )
        train = _records_to_examples(_read_jsonl(files[0]), str(files[0]))
        test = _records_to_examples(_read_jsonl(files[1]), str(files[1]))
    elif task.endswith(LOCAL_SUFFIXES):
        train, test = _from_records(_read_jsonl(path), task, test_fraction, seed)
    else:
        raise DataError(
            f"data.task={task!r} is not a GSM task: use {GSM_SYMBOLIC!r} (shipped, offline), "
            f"{GSM8K_HUB!r} (HF hub), a local {'/'.join(LOCAL_SUFFIXES)} file in the GSM8K "
            "format, or a folder with train.jsonl and test.jsonl."
        )

    def cap(xs, n, stream):
        if n is None or n >= len(xs):
            return tuple(xs)
        if n <= 0:
            raise DataError(f"max examples must be positive, got {n}.")
        keep = np.sort(np.random.default_rng((seed, stream)).choice(len(xs), n, replace=False))
        return tuple(xs[i] for i in keep)

    return GSMData(
        name=task,
        train=cap(train, max_train_examples, 1),
        test=cap(test, max_test_examples, 2),
    )


# --------------------------------------------------------------------------- prompts


def format_prompt(
    tokenizer: Any,
    question: str,
    *,
    instruction: str | None = DEFAULT_INSTRUCTION,
    chat: bool | None = None,
) -> str:
    """The prompt text for ``question``: the chat template with one user message when the
    tokenizer has one (``chat=None`` or ``True``), else the Alpaca-style prompt
    :data:`ALPACA_PROMPT`. ``instruction`` is appended to the question (``None``: nothing)."""
    from ffa_jax.data.chat_template import render_chat

    content = question if not instruction else f"{question}\n{instruction}"
    if chat is not False:
        text = render_chat(tokenizer, [{"role": "user", "content": content}])
        if text is not None:
            return text
        if chat:
            raise DataError(
                "chat=True but the tokenizer has no chat template; pass chat=None or False."
            )
    return ALPACA_PROMPT.format(instruction=content)


def uses_chat_template(tokenizer: Any, chat: bool | None = None) -> bool:
    return chat is not False and bool(getattr(tokenizer, "chat_template", None))


def eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError(
            "the tokenizer has no eos_token; GSM targets end with it so that generation stops."
        )
    return int(eos)


def tokenize_prompts(
    tokenizer: Any,
    questions: Sequence[str],
    *,
    instruction: str | None = DEFAULT_INSTRUCTION,
    chat: bool | None = None,
) -> list[list[int]]:
    """Token ids of each question's prompt (chat-rendered prompts carry their own special
    tokens, so none are added; plain prompts get the tokenizer's, e.g. LLaMA's BOS)."""
    texts = [format_prompt(tokenizer, q, instruction=instruction, chat=chat) for q in questions]
    special = not uses_chat_template(tokenizer, chat)
    if not texts:
        return []
    return [list(x) for x in tokenizer(texts, add_special_tokens=special)["input_ids"]]


def encode_gsm(
    tokenizer: Any,
    examples: Sequence[GSMExample],
    *,
    max_length: int,
    instruction: str | None = DEFAULT_INSTRUCTION,
    chat: bool | None = None,
    overflow: str = "error",
    pad_token_id: int | None = None,
) -> dict[str, np.ndarray]:
    """Fixed-shape causal-LM training arrays with answer-only loss masks.

    Each row is ``prompt tokens + answer tokens + EOS``, right-padded to ``max_length``.

    Args:
      tokenizer: a HF fast tokenizer (e.g. from :func:`ffa_jax.models.llama_weights.load_llama_tokenizer`).
      examples: the problems.
      max_length: L.
      instruction, chat: see :func:`format_prompt`.
      overflow: ``"error"`` (raise when any example is longer than ``max_length``) or
        ``"drop"`` (skip those; ``"index"`` tells which were kept). Answers are never truncated:
        a truncated answer would teach the model to stop before ``####``.
      pad_token_id: id written in padding (default: the tokenizer's pad, else its EOS).

    Returns:
      ``{"input_ids", "attention_mask", "loss_mask"}`` int32 ``[N, L]`` (``loss_mask[i, t] = 1``
      iff token ``t`` of row ``i`` is an answer token or the final EOS), ``"prompt_length"`` and
      ``"length"`` and ``"index"`` (the row's position in ``examples``) int32 ``[N]``: every
      value has the leading example axis, so the dict can be sliced and partitioned as one
      tree. ``len(examples) - N`` examples were dropped.

    Raises:
      DataError: an example is longer than ``max_length`` (with ``overflow="error"``; the
        message gives the count and the longest length), no example fits, or the tokenizer has
        no EOS token.
    """
    if overflow not in OVERFLOW:
        raise DataError(f"overflow={overflow!r} is not one of {OVERFLOW}.")
    if not isinstance(max_length, int) or max_length < 2:
        raise DataError(f"max_length={max_length!r} must be an integer >= 2.")
    eos = eos_id(tokenizer)
    pad = pad_token_id if pad_token_id is not None else getattr(tokenizer, "pad_token_id", None)
    pad = eos if pad is None else int(pad)
    prompts = tokenize_prompts(
        tokenizer, [e.question for e in examples], instruction=instruction, chat=chat
    )
    answers = (
        tokenizer([e.answer for e in examples], add_special_tokens=False)["input_ids"]
        if examples
        else []
    )
    rows, too_long = [], []
    for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        n = len(p) + len(a) + 1
        if n > max_length:
            too_long.append((i, n))
            continue
        rows.append((i, list(p), list(a) + [eos]))
    if too_long and overflow == "error":
        longest = max(n for _, n in too_long)
        raise DataError(
            f"{len(too_long)} of {len(examples)} GSM examples are longer than max_length="
            f"{max_length} tokens (longest {longest}, e.g. example {too_long[0][0]}); raise "
            f"model.max_length to at least {longest}, or drop them with overflow='drop'."
        )
    if not rows:
        raise DataError(f"no GSM example fits in max_length={max_length} tokens; raise it.")
    if too_long:
        log.info(
            "dropped %d of %d GSM examples longer than %d tokens",
            len(too_long),
            len(examples),
            max_length,
        )
    N = len(rows)
    ids = np.full((N, max_length), pad, np.int32)
    attn = np.zeros((N, max_length), np.int32)
    loss = np.zeros((N, max_length), np.int32)
    plen = np.zeros((N,), np.int32)
    for i, (_, p, a) in enumerate(rows):
        n = len(p) + len(a)
        ids[i, :n] = p + a
        attn[i, :n] = 1
        loss[i, len(p) : n] = 1
        plen[i] = len(p)
    return {
        "input_ids": ids,
        "attention_mask": attn,
        "loss_mask": loss,
        "prompt_length": plen,
        "length": attn.sum(axis=1).astype(np.int32),
        "index": np.asarray([r[0] for r in rows], np.int32),
    }


# --------------------------------------------------------------------------- evaluation


@dataclasses.dataclass(frozen=True)
class GSMEvalResult:
    """Greedy exact-match evaluation.

    Attributes:
      exact_match: fraction whose ``####`` answer equals the reference.
      exact_match_lenient: same, falling back to the last number when there is no ``####``.
      format_rate: fraction of generations that contain ``####``.
      count: problems evaluated.
      finished_rate: fraction of generations that ended with EOS within ``max_new_tokens``.
      samples: the first few ``{"id", "question", "reference", "generation", "predicted",
        "correct"}`` records, for the run summary.
      predictions: every extracted answer (strict), in order.
    """

    exact_match: float
    exact_match_lenient: float
    format_rate: float
    count: int
    finished_rate: float
    samples: tuple[dict, ...]
    predictions: tuple[str | None, ...]

    def metrics(self) -> dict[str, float]:
        """JSON-safe scalars for ``metrics.jsonl``."""
        return {
            "eval_exact_match": self.exact_match,
            "eval_exact_match_lenient": self.exact_match_lenient,
            "eval_format_rate": self.format_rate,
            "eval_finished_rate": self.finished_rate,
            "eval_examples": self.count,
        }
