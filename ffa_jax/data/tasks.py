"""Text-classification tasks: the shipped SpamAssassin asset, local files and HF hub datasets.

``load_text_classification(task)`` returns a :class:`TextClassificationData` with a train and a
test split, integer labels ``0..num_labels-1`` and the label names. ``task`` is resolved as:

1. a name in :data:`TASKS` (built-in tasks, e.g. ``"spamassassin"``, shipped with the package);
2. a local file path ending in ``.jsonl``, ``.json``, ``.csv`` or ``.parquet`` (loaded with HF
   ``datasets``, fully offline);
3. otherwise a HF hub dataset name, optionally ``"name:config"`` (e.g. ``"nyu-mll/glue:sst2"``),
   which needs internet.

The GLUE tasks of the paper and SNLI are built in by name (:data:`GLUE_TASKS`: ``sst2``,
``qnli``, ``qqp``, ``mnli`` (evaluated on validation_matched), ``mnli-mm`` (the same training data,
evaluated on validation_mismatched), ``snli``), with their text columns, label names and
labelled evaluation split: ``"qnli"`` loads the HF hub dataset, and ``"qnli:<folder>"`` loads
local files in the same format (``<folder>/train.jsonl`` and ``<folder>/validation.jsonl``, or
``.json/.csv/.parquet``; the columns of the hub dataset; labels as ints or label names).

Sentence-pair tasks (QNLI, QQP, MNLI, SNLI; or ``text_pair_field`` for other sources) give
each example as a ``(text, text_pair)`` tuple; :func:`ffa_jax.data.batching.tokenize` passes
such tuples to the tokenizer as pairs (``[CLS] a [SEP] b [SEP]``, ``<s> a </s></s> b </s>``) and
returns ``token_type_ids``.

When the source has no labelled test split, a stratified test split of ``test_fraction`` is drawn
with ``numpy.random.default_rng((seed, 0))``, and both splits are returned in a seeded random
order (so any prefix is a fair sample); ``max_examples`` then caps the train split (stratified)
with ``default_rng((seed, 1))``, keeping the order. Both are deterministic for a given seed.
A test split given by the source keeps its order.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ffa_jax.data.partition import largest_remainder
from ffa_jax.errors import DataError

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
# Splits tried, in order, as the test split of a hub dataset.
HUB_TEST_SPLITS = ("test", "validation")


@dataclasses.dataclass(frozen=True, eq=False)  # eq on arrays is ambiguous
class TextClassificationData:
    """A text-classification data set with a train and a test split.

    Attributes:
      name: the task string it was loaded from.
      train_texts: ``N_train`` strings, or ``(text, text_pair)`` tuples for sentence pairs.
      train_labels: int32 ``[N_train]``, values in ``[0, num_labels)``.
      test_texts: ``N_test`` strings.
      test_labels: int32 ``[N_test]``, values in ``[0, num_labels)``.
      label_names: one name per label id.
    """

    name: str
    train_texts: tuple[str, ...]
    train_labels: np.ndarray
    test_texts: tuple[str, ...]
    test_labels: np.ndarray
    label_names: tuple[str, ...]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


@dataclasses.dataclass(frozen=True)
class RawSplits:
    """What a task loader returns: texts and labels as found, before validation and encoding.

    Labels may be ints (with ``label_names`` giving their names, or ``None`` for ``"0", "1",
    ...``) or strings (mapped to ids in sorted order). ``test_*`` is ``None`` when the source
    has no labelled test split; one is then split off the train split.
    """

    source: str
    train_texts: Sequence[Any]
    train_labels: Sequence[Any]
    test_texts: Sequence[Any] | None = None
    test_labels: Sequence[Any] | None = None
    label_names: tuple[str, ...] | None = None


def _load_spamassassin() -> RawSplits:
    path = ASSETS_DIR / "spamassassin.jsonl.gz"
    if not path.is_file():
        raise DataError(
            f"data.task='spamassassin': the shipped asset {path} is missing; reinstall ffa_jax "
            "or regenerate it with `python experiments/prepare/spamassassin.py --fetch`."
        )
    with gzip.open(path, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    return RawSplits(
        source=str(path),
        train_texts=[r["text"] for r in records],
        train_labels=[r["label"] for r in records],
        label_names=("ham", "spam"),
    )


# Built-in tasks by name. Add one (e.g. a GLUE task) with `register_task`.
TASKS: dict[str, Callable[[], RawSplits]] = {"spamassassin": _load_spamassassin}


def register_task(name: str, loader: Callable[[], RawSplits]) -> None:
    """Register a built-in task: ``load_text_classification(name)`` will call ``loader()``."""
    if name in TASKS:
        raise DataError(f"data.task={name!r} is already registered; pick another name.")
    TASKS[name] = loader


def _columns(
    ds: Any, source: str, text_field: str, label_field: str, pair_field: str | None = None
) -> tuple[list, list]:
    present = list(ds.column_names)
    fields = [("data.text_field", text_field), ("data.label_field", label_field)]
    if pair_field is not None:
        fields.append(("text_pair_field", pair_field))
    for field, value in fields:
        if value not in present:
            raise DataError(
                f"{field}={value!r} is not a column of {source}; the columns present are "
                f"{present}. Set {field} to one of them."
            )
    texts = list(ds[text_field])
    if pair_field is not None:
        texts = list(zip(texts, ds[pair_field], strict=True))
    return texts, list(ds[label_field])


def class_label_names(ds: Any, label_field: str) -> tuple[str, ...] | None:
    """Names of a ``datasets.ClassLabel`` column, or ``None`` for plain int/str labels."""
    feature = ds.features.get(label_field)
    names = getattr(feature, "names", None)
    return tuple(names) if names else None


def _load_local_file(
    path: Path, text_field: str, label_field: str, pair_field: str | None = None
) -> RawSplits:
    if not path.is_file():
        raise DataError(
            f"data.task={str(path)!r}: file not found. Give an existing .jsonl/.json/.csv/"
            f".parquet file, or a built-in task name ({sorted(TASKS)})."
        )
    if path.stat().st_size == 0:
        raise DataError(
            f"data.task={str(path)!r}: the file is empty; give a file with at least one example "
            "per label."
        )
    fmt = LOCAL_FORMATS[path.suffix.lower()]
    if fmt in ("json", "csv"):
        _check_utf8(path)
    import datasets  # deferred: importing datasets takes ~1 s

    try:
        dd = datasets.load_dataset(fmt, data_files=str(path), split="train")
    except Exception as e:  # noqa: BLE001 - datasets raises many types for unreadable files
        cause = e.__cause__ or e  # datasets wraps the parser's error, which is the useful one
        raise DataError(
            f"data.task={str(path)!r}: could not read it as {fmt} "
            f"({type(cause).__name__}: {cause}). "
            "Check the file's format: JSON lines, a JSON list of records, CSV with a header row, "
            "or parquet."
        ) from e
    texts, labels = _columns(dd, str(path), text_field, label_field, pair_field)
    return RawSplits(
        source=str(path),
        train_texts=texts,
        train_labels=labels,
        label_names=class_label_names(dd, label_field),
    )


def _check_utf8(path: Path) -> None:
    """Text formats must be UTF-8 (pyarrow would fail later, deep inside a row access)."""
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"data.task={str(path)!r}: line {line_no} is not valid UTF-8 (byte "
                    f"{line[e.start : e.start + 1]!r} at column {e.start + 1}: {e.reason}). "
                    "Re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8."
                ) from e


def has_labels(ds: Any, label_field: str) -> bool:
    """False for splits whose labels are hidden (GLUE test splits store -1 everywhere)."""
    if label_field not in ds.column_names or len(ds) == 0:
        return False
    labels = np.asarray(ds[: min(len(ds), 1000)][label_field])
    return not (labels.dtype.kind in "iu" and np.all(labels < 0))


def load_hub_dataset(task: str, not_what: str):
    """``datasets.load_dataset`` of ``task`` (``name`` or ``name:config``) from the HF hub.

    Raises:
      DataError: loading failed (offline, unknown name...); the message says that ``task`` is
        not ``not_what`` either and how to fix it.
    """
    import datasets  # deferred: importing datasets takes ~1 s

    name, _, config = task.partition(":")
    try:
        return datasets.load_dataset(name, config or None)
    except Exception as e:  # noqa: BLE001 - offline/hub failures surface as many types
        raise DataError(
            f"data.task={task!r} is neither {not_what}, and loading it from the HF hub failed "
            f"({type(e).__name__}: {e}). Check the name (use 'name:config' for configs, e.g. "
            "'nyu-mll/glue:sst2') and your internet access, or use local data."
        ) from e


def _load_hub(
    task: str, text_field: str, label_field: str, pair_field: str | None = None
) -> RawSplits:
    dd = load_hub_dataset(
        task,
        f"a built-in task ({sorted(TASKS)}), nor a local file (those must end in "
        f"{sorted(LOCAL_FORMATS)})",
    )
    if "train" not in dd:
        raise DataError(
            f"data.task={task!r}: the dataset has no 'train' split (splits: {list(dd)}). "
            "Use a dataset with a train split, or export one to a local .jsonl file."
        )
    train = dd["train"]
    texts, labels = _columns(train, f"{task} (train split)", text_field, label_field, pair_field)
    test_texts = test_labels = None
    for split in HUB_TEST_SPLITS:
        if split in dd and has_labels(dd[split], label_field):
            test_texts, test_labels = _columns(
                dd[split], f"{task} ({split} split)", text_field, label_field, pair_field
            )
            break
    return RawSplits(
        source=task,
        train_texts=texts,
        train_labels=labels,
        test_texts=test_texts,
        test_labels=test_labels,
        label_names=class_label_names(train, label_field),
    )


def _check_texts(texts: Sequence[Any], source: str, split: str) -> tuple[str, ...]:
    if len(texts) == 0:
        raise DataError(
            f"data.task: {source} has no {split} examples; give a data set with at least one "
            "example per label."
        )
    for i, t in enumerate(texts):
        if isinstance(t, tuple) and len(t) == 2 and all(isinstance(x, str) for x in t):
            continue  # a sentence pair (text, text_pair)
        if not isinstance(t, str):
            raise DataError(
                f"data.text_field: {split} example {i} of {source} has text {t!r} of type "
                f"{type(t).__name__}, not str. Fix or drop that row (empty CSV cells load as "
                "None), or point data.text_field at a string column."
            )
    return tuple(texts)


def encode_labels(
    raw: Sequence[Any], names: tuple[str, ...] | None, source: str, split: str
) -> np.ndarray:
    """Integer labels as int32 ``[N]``; strings are mapped through ``names`` (sorted names)."""
    values = np.asarray(raw)
    if values.dtype.kind in "US":
        index = {n: i for i, n in enumerate(names or ())}
        unknown = [v for v in values.tolist() if v not in index]
        if unknown:
            raise DataError(
                f"data.label_field: {split} label {unknown[0]!r} of {source} is not one of the "
                f"label names {names}. Fix the label or the task's label names."
            )
        return np.array([index[v] for v in values.tolist()], dtype=np.int32)
    if values.dtype.kind == "b":
        values = values.astype(np.int32)
    if values.dtype.kind == "f" and np.all(np.isfinite(values) & (values == np.round(values))):
        # CSV readers turn int columns with gaps into floats; integral floats are fine.
        values = values.astype(np.int64)
    if values.dtype.kind not in "iu":
        bad = next(v for v in raw if not _is_int_like(v))
        raise DataError(
            f"data.label_field: {split} labels of {source} must be all ints or all strings; found "
            f"{bad!r} ({type(bad).__name__}). Fix that column or point data.label_field "
            "elsewhere."
        )
    if values.size and values.min() < 0:
        i = int(np.argmin(values))
        raise DataError(
            f"data.label_field: {split} example {i} of {source} has label {int(values[i])}; "
            "labels must be >= 0 (a negative label usually marks a hidden test label). Drop "
            "those rows or use a labelled split."
        )
    if names is not None and values.size and values.max() >= len(names):
        raise DataError(
            f"data.label_field: {split} labels of {source} reach {int(values.max())} but there "
            f"are only {len(names)} label names {names}. Fix the labels or the names."
        )
    return values.astype(np.int32)


def _is_int_like(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) or (
        isinstance(v, (float, np.floating)) and np.isfinite(v) and float(v).is_integer()
    )


def _label_names(raw: RawSplits) -> tuple[str, ...]:
    """Label names: given, the sorted distinct strings, or ``"0".."max"`` for int labels."""
    if raw.label_names is not None:
        return tuple(raw.label_names)
    pooled = list(raw.train_labels) + list(raw.test_labels or [])
    if pooled and all(isinstance(v, str) for v in pooled):
        return tuple(sorted(set(pooled)))
    if any(isinstance(v, str) for v in pooled):
        raise DataError(
            f"data.label_field: labels of {raw.source} mix strings and numbers "
            f"(e.g. {next(v for v in pooled if not isinstance(v, str))!r}); make them all "
            "ints or all strings."
        )
    ints = encode_labels(pooled, None, raw.source, "all")
    return tuple(str(i) for i in range(int(ints.max()) + 1)) if ints.size else ()


def held_out_split(
    labels: np.ndarray, test_fraction: float, seed: int, what: str, source: str
) -> tuple[np.ndarray, np.ndarray]:
    """``(keep, held)`` indices of a source without a test split: a stratified
    ``test_fraction`` held out from the public ``seed`` (every class on both sides), each side
    in a seeded random order.

    Raises:
      DataError: a side would be empty.
    """
    rng = np.random.default_rng((seed, 0))
    keep, held = stratified_split(
        labels, int(round(test_fraction * len(labels))), rng, every_class_both_sides=True
    )
    # Sources are often sorted by class (the SpamAssassin asset is, by group); a random
    # order makes any prefix (e.g. an eval cap) a fair sample.
    keep, held = rng.permutation(keep), rng.permutation(held)
    if len(held) == 0 or len(keep) == 0:
        raise DataError(
            f"data.test_fraction={test_fraction}: splitting the {len(labels)} {what} of "
            f"{source} leaves an empty train or test split; use more data or a different "
            "test_fraction."
        )
    return keep, held


def stratified_split(
    labels: np.ndarray,
    num_taken: int,
    rng: np.random.Generator,
    *,
    every_class_both_sides: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``[N]`` labels into (kept, taken) sorted index arrays, stratified by class.

    ``num_taken`` examples are taken, allocated to classes in proportion to their sizes by
    largest remainder. With ``every_class_both_sides``, each class with >= 2 examples keeps at
    least one and gives at least one (so the total can differ slightly from ``num_taken``).
    """
    classes, counts = np.unique(labels, return_counts=True)
    take = largest_remainder(counts * (num_taken / len(labels)), num_taken)
    if every_class_both_sides:
        take = np.where(counts >= 2, np.clip(take, 1, counts - 1), take)
    taken = []
    for c, k in zip(classes, take, strict=True):
        members = np.flatnonzero(labels == c)
        taken.append(rng.permutation(members)[:k])
    taken_idx = np.sort(np.concatenate(taken))
    kept_idx = np.setdiff1d(np.arange(len(labels)), taken_idx)
    return kept_idx, taken_idx


def check_two_classes(labels: np.ndarray, names: tuple[str, ...], source: str, why: str) -> None:
    present = np.unique(labels)
    if len(present) < 2:
        found = names[int(present[0])] if len(present) else "none"
        raise DataError(
            f"data.label_field: the train labels of {source} have a single class ({found!r}){why}; "
            "classification needs at least two. Check data.label_field and the data."
        )


# --------------------------------------------------------------------------- GLUE / SNLI


@dataclasses.dataclass(frozen=True)
class GlueTask:
    """A GLUE-style task: where it lives on the hub and what its columns mean.

    Attributes:
      dataset, config: the HF ``datasets`` name and config (``None``: no config).
      text_field, pair_field: the text column(s); ``pair_field`` is ``None`` for single texts.
      label_names: the ``label`` column's class names (index = label id).
      eval_split: the labelled split used as the test split (GLUE test labels are hidden).
    """

    dataset: str
    config: str | None
    text_field: str
    pair_field: str | None
    label_names: tuple[str, ...]
    eval_split: str = "validation"


_NLI = ("entailment", "neutral", "contradiction")
GLUE_TASKS: dict[str, GlueTask] = {
    "sst2": GlueTask("nyu-mll/glue", "sst2", "sentence", None, ("negative", "positive")),
    "qnli": GlueTask(
        "nyu-mll/glue", "qnli", "question", "sentence", ("entailment", "not_entailment")
    ),
    "qqp": GlueTask(
        "nyu-mll/glue", "qqp", "question1", "question2", ("not_duplicate", "duplicate")
    ),
    "mnli": GlueTask("nyu-mll/glue", "mnli", "premise", "hypothesis", _NLI, "validation_matched"),
    "mnli-mm": GlueTask(
        "nyu-mll/glue", "mnli", "premise", "hypothesis", _NLI, "validation_mismatched"
    ),
    "snli": GlueTask("stanfordnlp/snli", None, "premise", "hypothesis", _NLI),
}


def _glue_split(ds: Any, spec: GlueTask, source: str) -> tuple[list, list]:
    texts, labels = _columns(ds, source, spec.text_field, "label", spec.pair_field)
    # SNLI marks examples without a gold label with -1 (GLUE test splits are all -1): drop them.
    keep = [i for i, y in enumerate(labels) if not (_is_int_like(y) and y < 0)]
    return [texts[i] for i in keep], [labels[i] for i in keep]


def _load_glue(name: str, folder: str | None = None) -> RawSplits:
    """A :data:`GLUE_TASKS` task from the hub, or from local files in ``folder``."""
    import datasets  # deferred: importing datasets takes ~1 s

    spec = GLUE_TASKS[name]
    if folder is None:
        source = spec.dataset + (f":{spec.config}" if spec.config else "")
        try:
            dd = datasets.load_dataset(spec.dataset, spec.config)
        except Exception as e:  # noqa: BLE001 - offline/hub failures surface as many types
            raise DataError(
                f"data.task={name!r}: loading {source} from the HF hub failed "
                f"({type(e).__name__}: {e}). Check your internet access, or download it once "
                f"and use local files: data.task='{name}:<folder>' with <folder>/train.jsonl "
                f"and <folder>/{spec.eval_split}.jsonl in the same format."
            ) from e
        missing = [s for s in ("train", spec.eval_split) if s not in dd]
        if missing:
            raise DataError(f"data.task={name!r}: {source} has no split(s) {missing}.")
        train, test = dd["train"], dd[spec.eval_split]
    else:
        root = Path(folder).expanduser()
        files = {}
        for split in ("train", spec.eval_split):
            found = [
                root / f"{split}{ext}"
                for ext in LOCAL_FORMATS
                if (root / f"{split}{ext}").is_file()
            ]
            if not found:
                raise DataError(
                    f"data.task='{name}:{folder}': {str(root / split)}.<ext> not found; the folder "
                    f"needs train and {spec.eval_split} files ({sorted(LOCAL_FORMATS)}) with the "
                    f"columns {[c for c in (spec.text_field, spec.pair_field, 'label') if c]}."
                )
            files[split] = found[0]
        formats = {LOCAL_FORMATS[f.suffix.lower()] for f in files.values()}
        if len(formats) != 1:
            raise DataError(
                f"data.task='{name}:{folder}': the train and {spec.eval_split} files have "
                f"different formats ({sorted(formats)}); use one format for both."
            )
        source = str(root)
        try:
            dd = datasets.load_dataset(
                formats.pop(), data_files={k: str(v) for k, v in files.items()}
            )
        except Exception as e:  # noqa: BLE001 - datasets raises many types for unreadable files
            cause = e.__cause__ or e
            raise DataError(
                f"data.task='{name}:{folder}': could not read {sorted(map(str, files.values()))} "
                f"({type(cause).__name__}: {cause})."
            ) from e
        train, test = dd["train"], dd[spec.eval_split]
    train_texts, train_labels = _glue_split(train, spec, f"{source} (train)")
    test_texts, test_labels = _glue_split(test, spec, f"{source} ({spec.eval_split})")
    return RawSplits(
        source=source,
        train_texts=train_texts,
        train_labels=train_labels,
        test_texts=test_texts,
        test_labels=test_labels,
        label_names=spec.label_names,
    )


for _name in GLUE_TASKS:
    register_task(_name, lambda _n=_name: _load_glue(_n))


def load_text_classification(
    task: str,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    text_field: str = "text",
    label_field: str = "label",
    max_examples: int | None = None,
    text_pair_field: str | None = None,
) -> TextClassificationData:
    """Load a text-classification task with train/test splits (see the module docstring).

    Args:
      task: a built-in task name (``TASKS``), a local ``.jsonl/.json/.csv/.parquet`` path, or a
        HF hub dataset name (``"name"`` or ``"name:config"``).
      test_fraction: share of examples held out when the source has no labelled test split.
      seed: seeds the test split and the ``max_examples`` subsample.
      text_field, label_field: column names in local files and hub datasets (the built-in
        GLUE tasks know their own columns).
      text_pair_field: optional second text column of sentence-pair data in local files and
        hub datasets; examples are then ``(text, text_pair)`` tuples.
      max_examples: optional cap on the number of train examples (stratified subsample).

    Returns:
      TextClassificationData with int32 labels in ``[0, num_labels)``.

    Raises:
      DataError: unknown task, missing file, empty data, missing columns, non-string texts,
        negative or single-class labels, or bad ``test_fraction``/``max_examples``.
    """
    if not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise DataError(
            f"data.test_fraction={test_fraction!r} must be a number in (0, 1), e.g. 0.2."
        )
    if max_examples is not None and (not isinstance(max_examples, int) or max_examples < 1):
        raise DataError(
            f"data.max_train_examples={max_examples!r} must be a positive int or None (no cap)."
        )
    if not isinstance(task, str) or not task:
        raise DataError(
            f"data.task={task!r} must be a non-empty string: a built-in task {sorted(TASKS)}, a "
            "local .jsonl/.json/.csv/.parquet path, or a HF hub dataset name."
        )

    glue_name, sep, folder = task.partition(":")
    if task in TASKS:
        raw = TASKS[task]()
    elif sep and glue_name in GLUE_TASKS:
        raw = _load_glue(glue_name, folder)
    elif Path(task).suffix.lower() in LOCAL_FORMATS:
        raw = _load_local_file(Path(task).expanduser(), text_field, label_field, text_pair_field)
    else:
        raw = _load_hub(task, text_field, label_field, text_pair_field)

    names = _label_names(raw)
    train_texts = _check_texts(raw.train_texts, raw.source, "train")
    train_labels = encode_labels(raw.train_labels, names, raw.source, "train")
    check_two_classes(train_labels, names, raw.source, "")

    if raw.test_texts is not None and raw.test_labels is not None:
        test_texts = _check_texts(raw.test_texts, raw.source, "test")
        test_labels = encode_labels(raw.test_labels, names, raw.source, "test")
    else:
        keep, held = held_out_split(train_labels, test_fraction, seed, "examples", raw.source)
        test_texts = tuple(train_texts[i] for i in held)
        test_labels = train_labels[held]
        train_texts = tuple(train_texts[i] for i in keep)
        train_labels = train_labels[keep]

    if max_examples is not None and max_examples < len(train_labels):
        _, chosen = stratified_split(train_labels, max_examples, np.random.default_rng((seed, 1)))
        train_texts = tuple(train_texts[i] for i in chosen)
        train_labels = train_labels[chosen]
        check_two_classes(
            train_labels, names, raw.source, f" after capping to max_examples={max_examples}"
        )

    return TextClassificationData(
        name=task,
        train_texts=train_texts,
        train_labels=train_labels,
        test_texts=test_texts,
        test_labels=test_labels,
        label_names=names,
    )
