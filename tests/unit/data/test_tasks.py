"""Task loading: the shipped SpamAssassin asset, local files, and every bad-input error."""

import gzip
import json
from collections import Counter

import numpy as np
import pytest

from ffa_jax.data import tasks
from ffa_jax.data.tasks import RawSplits, load_text_classification
from ffa_jax.errors import DataError


@pytest.fixture(scope="module")
def spam():
    return load_text_classification("spamassassin")


@pytest.fixture(scope="module")
def asset_records():
    with gzip.open(tasks.ASSETS_DIR / "spamassassin.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_asset_records(asset_records):
    assert len(asset_records) == 6046
    ids = [r["id"] for r in asset_records]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    for r in asset_records:
        assert r["text"].startswith("Subject: ")
        assert len(r["text"]) <= 1500
        assert r["label"] == int(r["id"].startswith("spam"))
    assert sum(r["label"] for r in asset_records) == 1896


def test_spamassassin_loads(spam):
    assert spam.name == "spamassassin"
    assert spam.label_names == ("ham", "spam") and spam.num_labels == 2
    n_train, n_test = len(spam.train_texts), len(spam.test_texts)
    assert n_train + n_test == 6046
    assert abs(n_test - 0.2 * 6046) <= 2
    assert spam.train_labels.dtype == np.int32 and spam.train_labels.shape == (n_train,)
    assert spam.test_labels.dtype == np.int32 and spam.test_labels.shape == (n_test,)
    assert set(np.unique(spam.train_labels)) == {0, 1} == set(np.unique(spam.test_labels))
    # Stratified: both splits keep the corpus's ~31.4 % spam.
    assert abs(spam.train_labels.mean() - 1896 / 6046) < 0.005
    assert abs(spam.test_labels.mean() - 1896 / 6046) < 0.005
    assert all(isinstance(t, str) and t for t in spam.train_texts[:100])


def test_split_is_deterministic_and_disjoint(spam, asset_records):
    again = load_text_classification("spamassassin")
    assert again.train_texts == spam.train_texts and again.test_texts == spam.test_texts
    np.testing.assert_array_equal(again.train_labels, spam.train_labels)
    other = load_text_classification("spamassassin", seed=1)
    assert other.test_texts != spam.test_texts

    # Train and test partition the corpus as a multiset of texts (some mails repeat verbatim),
    # which is what disjoint index sets give.
    whole = Counter(r["text"] for r in asset_records)
    assert Counter(spam.train_texts) + Counter(spam.test_texts) == whole


def test_max_examples_caps_stratified_and_deterministic():
    capped = load_text_classification("spamassassin", max_examples=600, seed=4)
    full = load_text_classification("spamassassin", seed=4)
    assert len(capped.train_labels) == 600
    assert abs(capped.train_labels.mean() - full.train_labels.mean()) < 0.005
    assert set(capped.train_texts) <= set(full.train_texts)
    assert capped.test_texts == full.test_texts  # the cap never touches the test split
    again = load_text_classification("spamassassin", max_examples=600, seed=4)
    assert again.train_texts == capped.train_texts


@pytest.fixture(scope="module")
def small_rows(asset_records):
    rng = np.random.default_rng(0)
    picked = rng.choice(len(asset_records), size=200, replace=False)
    return [asset_records[i] for i in sorted(picked)]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _write_csv(path, rows):
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_local_jsonl_and_csv_match(tmp_path, small_rows):
    rows = [{"text": r["text"], "label": r["label"]} for r in small_rows]
    _write_jsonl(tmp_path / "d.jsonl", rows)
    _write_csv(tmp_path / "d.csv", rows)
    a = load_text_classification(str(tmp_path / "d.jsonl"), seed=2)
    b = load_text_classification(str(tmp_path / "d.csv"), seed=2)
    assert a.label_names == b.label_names == ("0", "1")
    assert len(a.train_texts) + len(a.test_texts) == 200
    assert a.train_texts == b.train_texts and a.test_texts == b.test_texts
    np.testing.assert_array_equal(a.train_labels, b.train_labels)
    np.testing.assert_array_equal(a.test_labels, b.test_labels)
    assert len(a.test_texts) == 40


def test_local_string_labels_and_custom_fields(tmp_path, small_rows):
    names = ("ham", "spam")
    rows = [{"body": r["text"], "kind": names[r["label"]]} for r in small_rows]
    _write_jsonl(tmp_path / "s.jsonl", rows)
    d = load_text_classification(str(tmp_path / "s.jsonl"), text_field="body", label_field="kind")
    assert d.label_names == names
    truth = {r["text"]: r["label"] for r in small_rows}
    assert all(truth[t] == y for t, y in zip(d.train_texts, d.train_labels, strict=True))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"data\.task=.*nope\.jsonl.*not found"):
        load_text_classification(str(tmp_path / "nope.jsonl"))


def test_empty_file(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DataError, match=r"data\.task=.*empty"):
        load_text_classification(str(tmp_path / "e.jsonl"))


def test_missing_columns_name_field_and_list_columns(tmp_path):
    _write_jsonl(
        tmp_path / "c.jsonl", [{"sentence": "a", "label": 0}, {"sentence": "b", "label": 1}]
    )
    with pytest.raises(DataError, match=r"data\.text_field='text'.*\['sentence', 'label'\]"):
        load_text_classification(str(tmp_path / "c.jsonl"))
    with pytest.raises(DataError, match=r"data\.label_field='y'.*\['sentence', 'label'\]"):
        load_text_classification(str(tmp_path / "c.jsonl"), text_field="sentence", label_field="y")


def _with_loader(monkeypatch, raw):
    monkeypatch.setitem(tasks.TASKS, "fake", lambda: raw)


def test_empty_data(monkeypatch):
    _with_loader(monkeypatch, RawSplits("fake-src", [], []))
    with pytest.raises(DataError, match="no train examples"):
        load_text_classification("fake")


def test_non_string_text(monkeypatch):
    _with_loader(monkeypatch, RawSplits("fake-src", ["a", 3, "c"], [0, 1, 0]))
    with pytest.raises(DataError, match=r"data\.text_field.*example 1.*int"):
        load_text_classification("fake")


def test_single_class(monkeypatch):
    _with_loader(monkeypatch, RawSplits("fake-src", ["a", "b", "c"], [1, 1, 1]))
    with pytest.raises(DataError, match=r"data\.label_field.*single class"):
        load_text_classification("fake")


def test_negative_label(monkeypatch):
    _with_loader(monkeypatch, RawSplits("fake-src", ["a", "b", "c"], [0, -1, 1]))
    with pytest.raises(DataError, match=r"data\.label_field.*label -1"):
        load_text_classification("fake")


def test_mixed_and_non_integer_labels(monkeypatch):
    _with_loader(monkeypatch, RawSplits("fake-src", ["a", "b"], [0, "x"]))
    with pytest.raises(DataError, match="mix strings and numbers"):
        load_text_classification("fake")
    _with_loader(monkeypatch, RawSplits("fake-src", ["a", "b"], [0, 0.5]))
    with pytest.raises(DataError, match=r"data\.label_field.*0\.5"):
        load_text_classification("fake")


def test_given_test_split_is_used(monkeypatch):
    raw = RawSplits("fake-src", ["a", "b", "c"], [0, 1, 0], ["d", "e"], [1, 0], ("neg", "pos"))
    _with_loader(monkeypatch, raw)
    d = load_text_classification("fake")
    assert d.train_texts == ("a", "b", "c") and d.test_texts == ("d", "e")
    assert d.test_labels.tolist() == [1, 0] and d.label_names == ("neg", "pos")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"test_fraction": 0.0}, "data.test_fraction"),
        ({"test_fraction": 1.5}, "data.test_fraction"),
        ({"max_examples": 0}, "data.max_train_examples"),
    ],
)
def test_bad_arguments(kwargs, field):
    with pytest.raises(DataError, match=field.replace(".", r"\.")):
        load_text_classification("spamassassin", **kwargs)


def test_unknown_hub_name_offline():
    # Offline (conftest sets HF_HUB_OFFLINE): the hub path must fail with a clear DataError.
    with pytest.raises(DataError, match=r"data\.task='no-such-org/no-such-dataset'.*hub"):
        load_text_classification("no-such-org/no-such-dataset")


def test_register_task_rejects_duplicates():
    with pytest.raises(DataError, match="already registered"):
        tasks.register_task("spamassassin", lambda: None)


def _fake_hub(monkeypatch, splits):
    import datasets

    calls = []

    def load_dataset(name, config=None, **kwargs):
        calls.append((name, config))
        return datasets.DatasetDict(splits)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hub_path_uses_labelled_validation_when_test_is_hidden(monkeypatch):
    import datasets

    features = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )

    def split(texts, labels):
        return datasets.Dataset.from_dict({"sentence": texts, "label": labels}, features=features)

    calls = _fake_hub(
        monkeypatch,
        {
            "train": split(["a", "b", "c", "d"], [0, 1, 0, 1]),
            "validation": split(["e", "f"], [1, 0]),
            # GLUE-style hidden test labels (-1) must be skipped, not rejected.
            "test": split(["g", "h"], [-1, -1]),
        },
    )
    d = load_text_classification("some/glue:sst2", text_field="sentence")
    assert calls == [("some/glue", "sst2")]
    assert d.label_names == ("neg", "pos")
    assert d.train_texts == ("a", "b", "c", "d") and d.test_texts == ("e", "f")
    assert d.test_labels.tolist() == [1, 0]


def test_hub_path_without_test_split_is_split_off(monkeypatch):
    import datasets

    texts = [f"t{i}" for i in range(50)]
    labels = ["x" if i % 5 else "y" for i in range(50)]
    _fake_hub(monkeypatch, {"train": datasets.Dataset.from_dict({"text": texts, "label": labels})})
    d = load_text_classification("some/ds", test_fraction=0.2, seed=1)
    assert d.label_names == ("x", "y")
    assert len(d.test_texts) == 10 and d.test_labels.sum() == 2  # 20 % of each class
    assert sorted(d.train_texts + d.test_texts) == sorted(texts)


def test_split_order_is_shuffled_so_prefixes_are_fair(spam):
    # The asset is sorted by group (all ham, then spam); a prefix of the test split must not be.
    head = spam.test_labels[:200]
    assert 0.2 < head.mean() < 0.45
    assert 0.2 < spam.train_labels[:500].mean() < 0.45
