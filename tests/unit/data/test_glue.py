"""GLUE / SNLI on local files in the hub format, tiny local model folders, and the paper configs.

No network: the files are written in ``tmp_path`` with the columns of the HF ``datasets``
versions (``nyu-mll/glue``, ``stanfordnlp/snli``), the models are the tiny fixtures plus a
word-level tokenizer built here with the ``tokenizers`` library.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ffa_jax import lora
from ffa_jax.config import load_config
from ffa_jax.data import tasks
from ffa_jax.errors import DataError
from ffa_jax.models import load_encoder, load_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[3]
FIXTURES = ROOT / "tests" / "fixtures"
WORDS = "the a cat dog sat on mat what is who where why yes no good bad movie it was".split()

# Columns of each task as in the hub data sets; "idx" is there in GLUE, not in SNLI.
ROWS = {
    "sst2": lambda i: {"sentence": f"the movie was {'good' if i % 2 else 'bad'}", "label": i % 2},
    "qnli": lambda i: {
        "question": "what sat on the mat",
        "sentence": "the cat sat",
        "label": i % 2,
    },
    "qqp": lambda i: {"question1": "who is it", "question2": "who was it", "label": i % 2},
    "mnli": lambda i: {"premise": "the cat sat", "hypothesis": "a cat sat", "label": i % 3},
    "snli": lambda i: {"premise": "a dog sat", "hypothesis": "the dog", "label": i % 4 - 1},
}


def _write(folder: pathlib.Path, task: str, n_train=24, n_eval=9, fmt="jsonl") -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    eval_split = tasks.GLUE_TASKS[task].eval_split
    for split, n in (("train", n_train), (eval_split, n_eval)):
        rows = [
            ROWS[task.removesuffix("-mm")](i) | ({"idx": i} if task != "snli" else {})
            for i in range(n)
        ]
        if fmt == "jsonl":
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        else:
            import csv

            with open(folder / f"{split}.csv", "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
    return folder


@pytest.mark.parametrize("task", ["sst2", "qnli", "qqp", "mnli", "mnli-mm", "snli"])
def test_glue_tasks_load_local_files(task, tmp_path):
    spec = tasks.GLUE_TASKS[task]
    base = task.removesuffix("-mm")
    folder = tmp_path / task
    _write(folder, task)
    d = tasks.load_text_classification(f"{task}:{folder}")
    assert d.label_names == spec.label_names
    if spec.pair_field is None:
        assert all(isinstance(t, str) for t in d.train_texts)
    else:
        assert all(isinstance(t, tuple) and len(t) == 2 for t in d.train_texts + d.test_texts)
        first = ROWS[base](0)
        assert d.train_texts[0] == (first[spec.text_field], first[spec.pair_field])
    if task == "snli":  # label -1 (no gold label) is dropped
        assert len(d.train_texts) == 18 and len(d.test_texts) == 6
    else:  # the eval split comes from its own file, never from the train split
        assert len(d.train_texts) == 24 and len(d.test_texts) == 9
    assert set(d.train_labels.tolist()) == set(range(len(spec.label_names)))


def test_glue_string_labels_and_csv(tmp_path):
    folder = _write(tmp_path / "qnli", "qnli", fmt="csv")
    d = tasks.load_text_classification(f"qnli:{folder}")
    assert d.train_texts[0] == ("what sat on the mat", "the cat sat")
    names = tasks.GLUE_TASKS["mnli"].label_names
    folder = tmp_path / "mnli"
    folder.mkdir()
    for split in ("train", "validation_matched"):
        rows = [{"premise": "p", "hypothesis": "h", "label": names[i % 3]} for i in range(6)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    d = tasks.load_text_classification(f"mnli:{folder}")
    assert d.train_labels.tolist() == [0, 1, 2, 0, 1, 2]


def test_glue_local_folder_errors(tmp_path):
    folder = _write(tmp_path / "mnli", "mnli")
    (folder / "validation_matched.jsonl").unlink()
    with pytest.raises(DataError, match="validation_matched"):
        tasks.load_text_classification(f"mnli:{folder}")
    folder = tmp_path / "qqp"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps({"question1": "a", "label": 0}) + "\n")
    (folder / "validation.jsonl").write_text(json.dumps({"question1": "a", "label": 0}) + "\n")
    with pytest.raises(DataError, match="'question2' is not a column"):
        tasks.load_text_classification(f"qqp:{folder}")


def test_text_pair_field_for_other_files(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"a": f"x{i}", "b": f"y{i}", "label": i % 2} for i in range(10)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    d = tasks.load_text_classification(str(path), text_field="a", text_pair_field="b")
    assert all(t[0][1:] == t[1][1:] for t in d.train_texts)


# --------------------------------------------------------------------------- tiny models


def _tiny_model(family: str, dst: pathlib.Path) -> pathlib.Path:
    """The tiny fixture model plus a word-level tokenizer (vocab < 100) with pair templates."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    shutil.copytree(FIXTURES / f"encoder_tiny_{family}", dst)
    if family == "roberta":
        special = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
        post = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
        names = {
            "bos_token": "<s>",
            "eos_token": "</s>",
            "pad_token": "<pad>",
            "unk_token": "<unk>",
        }
    else:
        special = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
        post = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
        names = {
            "cls_token": "[CLS]",
            "sep_token": "[SEP]",
            "pad_token": "[PAD]",
            "unk_token": "[UNK]",
        }
    vocab = special | {w: i + len(special) for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=names["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = post
    tok.save(str(dst / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 64} | names
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("family", ["roberta", "bert"])
def test_glue_pairs_through_prepare_and_the_model(family, tmp_path):
    """configs/glue/qnli.yaml on local QNLI files and a tiny local model: data, pairs, model."""
    from ffa_jax.run import prepare

    model_dir = _tiny_model(family, tmp_path / "model")
    folder = _write(tmp_path / "qnli", "qnli", n_train=60, n_eval=10)
    cfg = load_config(
        ROOT / "configs" / "glue" / "qnli.yaml",
        [
            f"model.name={model_dir}",
            "model.max_length=16",
            f"data.task=qnli:{folder}",
            "client.batch_size=4",
            "federated.rounds=1",
            "federated.local_steps=1",
            "privacy.epsilon=inf",
        ],
    )
    prep = prepare(cfg, log=lambda *a: None)
    assert prep.data.num_labels == 2 and len(prep.client_indices) == 3
    arrays = prep.train_arrays
    assert set(arrays) == {"input_ids", "attention_mask", "token_type_ids", "label"}
    tok = load_tokenizer(str(model_dir))
    first = tok.convert_ids_to_tokens(arrays["input_ids"][0][arrays["attention_mask"][0] > 0])
    if family == "roberta":
        assert first[0] == "<s>" and first.count("</s>") == 3  # <s> a </s></s> b </s>
    else:
        assert first[0] == "[CLS]" and first.count("[SEP]") == 2
        sep = first.index("[SEP]")
        assert arrays["token_type_ids"][0][sep + 1] == 1 and arrays["token_type_ids"][0][0] == 0
    assert len(prep.target_paths) == 4  # query and value of both layers
    # The model consumes the pairs; for BERT the token types change the logits.
    batch = {k: jnp.asarray(v[:4]) for k, v in prep.test_arrays.items()}
    module = prep.module
    merged = lora.merge(prep.params)
    logits = module.apply(
        {"params": merged}, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    )
    assert logits.shape == (4, 2) and bool(jnp.all(jnp.isfinite(logits)))
    no_types = module.apply({"params": merged}, batch["input_ids"], batch["attention_mask"])
    assert (family == "bert") == (not np.allclose(logits, no_types))


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize("task", ["sst2", "qnli", "qqp", "mnli", "snli"])
def test_paper_glue_configs(task):
    cfg = load_config(ROOT / "configs" / "glue" / f"{task}.yaml")
    assert cfg.model.name == "roberta-large" and cfg.model.pooling == "cls"
    assert (cfg.lora.mode, cfg.lora.rank, cfg.lora.alpha) == ("ffa", 8, 8.0)
    assert cfg.federated.clients == 3 and cfg.data.partition == "label_mix"
    assert (cfg.privacy.epsilon, cfg.privacy.delta) == (6.0, 1e-5)
    assert cfg.data.task == task and task in tasks.TASKS
    n = len(tasks.GLUE_TASKS[task].label_names)
    assert len(cfg.data.label_mix) == 3 and all(len(row) == n for row in cfg.data.label_mix)
    # The targets hit exactly the query and value projections of a RoBERTa encoder.
    _, params = load_encoder(
        str(FIXTURES / "encoder_tiny_roberta"), n, head_key=jax.random.key(0), pooling="cls"
    )
    paths = lora.target_paths(params, cfg.lora.targets)
    assert len(paths) == 4 and all(p.split("/")[-2] in ("query", "value") for p in paths)
