"""GSM task: the shipped gsm_symbolic set, local/hub sources, answer extraction, prompts with a
chat template, answer-only loss masks and the greedy exact-match evaluator (tiny model)."""

from __future__ import annotations

import functools
import gzip
import json

import jax
import numpy as np
import pytest

from ffa_jax.data import gsm
from ffa_jax.data.gsm import (
    ALPACA_PROMPT,
    DEFAULT_INSTRUCTION,
    GSMExample,
    encode_gsm,
    exact_match,
    extract_answer,
    format_prompt,
    load_gsm,
    normalize_number,
)
from ffa_jax.errors import DataError
from ffa_jax.models.llama import LlamaConfig, init_params
from ffa_jax.workloads.gsm import make_gsm_evaluator

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
EXAMPLES = (
    GSMExample("Tom has 3 apples and buys 4 more. How many?", "3 + 4 = 7\n#### 7", "a"),
    GSMExample("A pen costs $2. What do 5 pens cost?", "5 * 2 = 10\n#### 10", "b"),
    GSMExample("What is 1,000 - 1?", "1000 - 1 = 999\n#### 999", "c"),
)


@functools.cache
def _tokenizer(chat: bool = True, bos: bool = False):
    """A byte-level tokenizer (one token per byte, no merges) with ChatML special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + pre_tokenizers.ByteLevel.alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML if chat else None,
    )


# --------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def symbolic():
    return load_gsm("gsm_symbolic")


def test_shipped_gsm_symbolic(symbolic):
    assert symbolic.name == "gsm_symbolic"
    assert (len(symbolic.train), len(symbolic.test)) == (1745, 250)
    with gzip.open(gsm.GSM_SYMBOLIC_FILE, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    ids = [r["id"] for r in records]
    assert ids == sorted(ids) and len(set(ids)) == len(ids) == 1995
    assert {r["split"] for r in records} == {"train", "test"}
    train_q = {e.question for e in symbolic.train}
    assert not train_q & {e.question for e in symbolic.test}
    for e in symbolic.train + symbolic.test:
        assert e.answer.rsplit("\n", 1)[-1].startswith("#### ")
        assert float(e.final_answer) >= 0  # integers, but for 4 amounts with cents
        assert "Give the result as your final answer" not in e.question


def test_max_examples_are_seeded_subsets(symbolic):
    a = load_gsm("gsm_symbolic", max_train_examples=30, max_test_examples=5, seed=3)
    b = load_gsm("gsm_symbolic", max_train_examples=30, max_test_examples=5, seed=3)
    assert a == b and (len(a.train), len(a.test)) == (30, 5)
    assert set(a.train) <= set(symbolic.train) and set(a.test) <= set(symbolic.test)
    assert load_gsm("gsm_symbolic", max_train_examples=30, seed=4).train != a.train


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_local_files_and_folders(tmp_path):
    recs = [{"question": e.question, "answer": e.answer} for e in EXAMPLES] * 4
    # no split field: a seeded test split is drawn
    data = load_gsm(str(_write_jsonl(tmp_path / "all.jsonl", recs)), test_fraction=0.25, seed=1)
    assert (len(data.train), len(data.test)) == (9, 3)
    assert data == load_gsm(str(tmp_path / "all.jsonl"), test_fraction=0.25, seed=1)
    # a split field is honoured
    split = [dict(r, split="test" if i < 2 else "train") for i, r in enumerate(recs)]
    data = load_gsm(str(_write_jsonl(tmp_path / "split.jsonl", split)))
    assert (len(data.train), len(data.test)) == (10, 2)
    # the openai/grade-school-math folder layout
    folder = tmp_path / "grade_school_math"
    folder.mkdir()
    _write_jsonl(folder / "train.jsonl", recs[:5])
    _write_jsonl(folder / "test.jsonl", recs[5:7])
    data = load_gsm(str(folder))
    assert (len(data.train), len(data.test)) == (5, 2) and data.train[0].question == EXAMPLES[
        0
    ].question
    # a JSON list
    (tmp_path / "list.json").write_text(json.dumps(recs))
    assert len(load_gsm(str(tmp_path / "list.json")).train) == 10


def test_hub_name_uses_datasets(monkeypatch):
    import datasets

    recs = [{"question": e.question, "answer": e.answer} for e in EXAMPLES]
    calls = []

    def fake_load_dataset(name, config=None, **kw):
        calls.append((name, config))
        return datasets.DatasetDict(
            train=datasets.Dataset.from_list(recs[:2]), test=datasets.Dataset.from_list(recs[2:])
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load_gsm("openai/gsm8k")
    assert calls == [("openai/gsm8k", "main")]
    assert (len(data.train), len(data.test)) == (2, 1) and data.test[0].final_answer == "999"
    load_gsm("gsm8k:socratic")
    assert calls[-1] == ("openai/gsm8k", "socratic")


def test_hub_offline_error():
    with pytest.raises(DataError, match="needs internet; offline, use 'gsm_symbolic'"):
        load_gsm("openai/gsm8k")  # HF_DATASETS_OFFLINE=1 in conftest


def test_bad_sources(tmp_path):
    with pytest.raises(DataError, match="is not a GSM task"):
        load_gsm("spamassassin")
    with pytest.raises(DataError, match="does not exist"):
        load_gsm(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="holds no records"):
        load_gsm(str(_write_jsonl(tmp_path / "empty.jsonl", [])))
    with pytest.raises(DataError, match=r"record 1 needs string fields 'question' and 'answer'"):
        load_gsm(
            str(
                _write_jsonl(
                    tmp_path / "f.jsonl", [{"question": "q", "answer": "#### 1"}, {"text": "x"}]
                )
            )
        )
    with pytest.raises(DataError, match=r"record 0's answer does not end with '#### <number>'"):
        load_gsm(str(_write_jsonl(tmp_path / "n.jsonl", [{"question": "q", "answer": "it is 4"}])))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match="not valid JSON lines"):
        load_gsm(str(tmp_path / "bad.jsonl"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="without train.jsonl and test.jsonl"):
        load_gsm(str(tmp_path / "folder"))


# --------------------------------------------------------------------------- answers


@pytest.mark.parametrize(
    "text, want",
    [
        ("#### 42", "42"),
        ("so 3 + 4 = 7\n#### 7", "7"),
        ("#### 1,200", "1200"),
        ("#### $1,200.00", "1200"),
        ("#### -3.50", "-3.5"),
        ("#### 007", "7"),
        ("#### 0.25 dollars", "0.25"),
        ("#### 12\n#### 13", "13"),
        ("#### none", None),
        ("the answer is 12", None),
    ],
)
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_lenient_extraction_and_exact_match():
    assert extract_answer("He pays $1,500 in total.", lenient=True) == "1500"
    assert extract_answer("no numbers", lenient=True) is None
    assert normalize_number("-0") == "0" and normalize_number(".5") == "0.5"
    gens = ["3 + 4 = 7\n#### 7", "The answer is 10.", "#### 998"]
    refs = [e.answer for e in EXAMPLES]
    assert exact_match(gens, refs).tolist() == [True, False, False]
    assert exact_match(gens, refs, lenient=True).tolist() == [True, True, False]
    with pytest.raises(DataError):
        exact_match(gens[:1], refs)


# --------------------------------------------------------------------------- encoding


def test_prompt_uses_chat_template_or_alpaca():
    q = EXAMPLES[0].question
    chat = format_prompt(_tokenizer(), q)
    assert (
        chat == f"<|im_start|>user\n{q}\n{DEFAULT_INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n"
    )
    plain = format_prompt(_tokenizer(chat=False), q, instruction=None)
    assert plain == ALPACA_PROMPT.format(instruction=q)
    assert format_prompt(_tokenizer(), q, chat=False) == ALPACA_PROMPT.format(
        instruction=f"{q}\n{DEFAULT_INSTRUCTION}"
    )
    with pytest.raises(DataError, match="no chat template"):
        format_prompt(_tokenizer(chat=False), q, chat=True)


def test_encode_gsm_masks_exactly_the_answer():
    tok = _tokenizer()
    out = encode_gsm(tok, EXAMPLES, max_length=160)
    ids, attn, loss = out["input_ids"], out["attention_mask"], out["loss_mask"]
    assert ids.shape == attn.shape == loss.shape == (3, 160) and ids.dtype == np.int32
    assert out["index"].tolist() == [0, 1, 2]
    for i, e in enumerate(EXAMPLES):
        n, p = int(out["length"][i]), int(out["prompt_length"][i])
        assert attn[i].tolist() == [1] * n + [0] * (160 - n)
        assert loss[i].tolist() == [0] * p + [1] * (n - p) + [0] * (160 - n)
        assert tok.decode(ids[i, :p]) == format_prompt(tok, e.question)
        assert tok.decode(ids[i, p:n]) == e.answer + "<|im_end|>"  # answer + EOS are targets
        assert ids[i, n - 1] == tok.eos_token_id and (ids[i, n:] == tok.pad_token_id).all()


def test_encode_gsm_without_template_adds_bos():
    tok = _tokenizer(chat=False, bos=True)
    out = encode_gsm(tok, EXAMPLES[:1], max_length=400)
    p = int(out["prompt_length"][0])
    assert out["input_ids"][0, 0] == 0  # the BOS of the tokenizer's post-processor
    assert tok.decode(out["input_ids"][0, 1:p]) == ALPACA_PROMPT.format(
        instruction=f"{EXAMPLES[0].question}\n{DEFAULT_INSTRUCTION}"
    )


def test_encode_gsm_overflow():
    tok = _tokenizer()
    lengths = encode_gsm(tok, EXAMPLES, max_length=200)["length"]
    limit = int(sorted(lengths)[1])  # the longest example does not fit
    with pytest.raises(DataError, match=rf"1 of 3 GSM examples are longer than max_length={limit}"):
        encode_gsm(tok, EXAMPLES, max_length=limit)
    out = encode_gsm(tok, EXAMPLES, max_length=limit, overflow="drop")
    longest = int(np.argmax(lengths))
    assert out["index"].tolist() == [i for i in range(3) if i != longest]
    assert out["input_ids"].shape == (2, limit) and set(out) == {
        "input_ids", "attention_mask", "loss_mask", "prompt_length", "length", "index"
    }  # fmt: skip
    with pytest.raises(DataError, match="no GSM example fits"):
        encode_gsm(tok, EXAMPLES, max_length=10, overflow="drop")


# --------------------------------------------------------------------------- evaluation


def _tiny_model(tok):
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
        max_position_embeddings=256, initializer_range=0.5,
    )  # fmt: skip
    return config, init_params(config, jax.random.key(0))


def test_evaluator_runs_and_compiles_once():
    tok = _tokenizer()
    config, params = _tiny_model(tok)
    ev = make_gsm_evaluator(
        config, tok, max_prompt_length=160, max_new_tokens=6, batch_size=2, num_samples=2
    )
    res = ev(params, EXAMPLES)
    assert res.count == 3 and len(res.predictions) == 3 and len(res.samples) == 2
    assert 0 <= res.exact_match <= res.exact_match_lenient <= 1
    assert set(res.metrics()) == {
        "eval_exact_match", "eval_exact_match_lenient", "eval_format_rate", "eval_finished_rate",
        "eval_examples",
    }  # fmt: skip
    assert res.samples[0]["reference"] == "7" and isinstance(res.samples[0]["generation"], str)
    ev(params, EXAMPLES[:1])  # fewer examples: padded to the same batch, no new compilation
    assert ev.generator.jitted._cache_size() == 1
    with pytest.raises(DataError, match="longer than the 20 prompt tokens"):
        make_gsm_evaluator(config, tok, max_prompt_length=20, max_new_tokens=4)(params, EXAMPLES)


def test_evaluator_scores_generations(monkeypatch):
    tok = _tokenizer()
    config, params = _tiny_model(tok)
    ev = make_gsm_evaluator(config, tok, max_prompt_length=160, max_new_tokens=4)
    texts = ["3 + 4 = 7\n#### 7", "It costs 10 dollars.", "#### 1000"]
    monkeypatch.setattr(ev, "generate_text", lambda p, q: (texts, np.array([True, True, False])))
    res = ev(params, EXAMPLES)
    assert res.exact_match == pytest.approx(1 / 3)
    assert res.exact_match_lenient == pytest.approx(2 / 3)
    assert res.format_rate == pytest.approx(2 / 3) and res.finished_rate == pytest.approx(2 / 3)
    assert res.predictions == ("7", None, "1000")
