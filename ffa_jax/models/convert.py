"""The HF conversion engine: key tables, shape checks, the import loop and the export loop.

Every model family (:mod:`~ffa_jax.models.weights` for BERT/RoBERTa,
:mod:`~ffa_jax.models.vit_weights`, :mod:`~ffa_jax.models.llama_weights`) describes its
checkpoint by one explicit table of :class:`KeyEntry` rows, built from its config; this module
does the rest, once, for all of them:

* :func:`import_tree`: stored tensors (a :class:`TensorSource`: names, shapes, a streaming
  reader) -> parameter tree. Every table row must be present with its shape; every stored
  tensor must be a table row or match one of the family's ``ignored`` patterns. All problems
  (missing key, unmapped key, duplicate key, shape mismatch, non-float dtype, non-finite
  values) are collected and raised together as one :class:`ffa_jax.errors.WeightsError` that
  names each key and the files read.
* :func:`export_state_dict`: parameter tree (LoRA nodes merged) -> ``{HF name: float32 numpy}``;
  the tree must hold exactly the table's paths with the table's shapes.
* :func:`safetensors_source` and :func:`write_hf_folder`: the HF folder formats both
  directions use (single or sharded ``model.safetensors``; atomic writes).

Layouts of a row (``KeyEntry.kind``), HF tensor <-> tree leaf:

* ``"plain"``: unchanged (biases, norms, embeddings);
* ``"linear"``: PyTorch ``Linear.weight`` ``[out, in]`` <-> Flax kernel ``[in, out]``
  (transpose);
* ``"conv"``: a patch ``Conv2d.weight`` ``[out, C, P, P]`` <-> a Dense kernel ``[C*P*P, out]``
  over ``(C, P, P)``-flattened patches (reshape + transpose).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ffa_jax.errors import WeightsError
from ffa_jax.fileio import atomic_write
from ffa_jax.types import PyTree

log = logging.getLogger(__name__)


SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
KINDS = ("plain", "linear", "conv")


# --------------------------------------------------------------------------- tables


@dataclasses.dataclass(frozen=True)
class KeyEntry:
    """One row of a HF <-> parameter-tree table.

    Attributes:
      hf: the tensor name the loader matches (after the family's key normalisation, e.g.
        without ``bert.``).
      path: parameter-tree path (tuple of names).
      shape: shape of the tree leaf.
      hf_shape: shape of the stored HF tensor.
      kind: ``"plain"``, ``"linear"`` or ``"conv"`` (see the module docstring).
      prefix: prepended to ``hf`` in exported state dicts (``"bert."`` for the base model's
        tensors of a ``*ForSequenceClassification`` checkpoint; ``""`` for heads).
      optional: the row's module is initialised (not read) when the checkpoint lacks all of
        its tensors, e.g. a classification head or BERT's pooler.
      label_dim: the leading HF axis counts labels: a checkpoint module whose rows all have
        ``label_dim`` and only another label count is initialised instead of read.
    """

    hf: str
    path: tuple[str, ...]
    shape: tuple[int, ...]
    hf_shape: tuple[int, ...]
    kind: str = "plain"
    prefix: str = ""
    optional: bool = False
    label_dim: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"KeyEntry {self.hf!r}: kind={self.kind!r} is not one of {KINDS}")
        if int(np.prod(self.shape)) != int(np.prod(self.hf_shape)):
            raise ValueError(
                f"KeyEntry {self.hf!r}: shape {self.shape} and hf_shape {self.hf_shape} differ "
                "in size"
            )

    @property
    def export_name(self) -> str:
        """The tensor name in an exported (HF task-model) state dict."""
        return self.prefix + self.hf

    @property
    def module(self) -> str:
        """The HF module name (``hf`` without its last component)."""
        return self.hf.rsplit(".", 1)[0]

    def to_tree(self, value: np.ndarray) -> np.ndarray:
        """A stored HF tensor (shape ``hf_shape``) as the tree leaf (shape ``shape``)."""
        if self.kind == "linear":
            return value.T
        if self.kind == "conv":
            return value.reshape(value.shape[0], -1).T
        return value

    def to_hf(self, value: np.ndarray) -> np.ndarray:
        """A tree leaf (shape ``shape``) as the HF tensor (shape ``hf_shape``)."""
        if self.kind == "linear":
            return value.T
        if self.kind == "conv":
            return value.T.reshape(self.hf_shape)
        return value


def plain(hf: str, path: tuple[str, ...], shape: tuple[int, ...], **kw) -> KeyEntry:
    """A row stored unchanged (bias, norm, embedding, token)."""
    return KeyEntry(hf, tuple(path), tuple(shape), tuple(shape), "plain", **kw)


def linear(
    module: str, path: tuple[str, ...], d_in: int, d_out: int, *, bias: bool = True, **kw
) -> list[KeyEntry]:
    """The rows of a ``Linear`` / Dense layer: ``{module}.weight`` ``[d_out, d_in]`` <->
    ``path/kernel`` ``[d_in, d_out]`` and, with ``bias``, ``{module}.bias`` <-> ``path/bias``."""
    rows = [
        KeyEntry(
            f"{module}.weight", (*path, "kernel"), (d_in, d_out), (d_out, d_in), "linear", **kw
        )
    ]
    if bias:
        rows.append(plain(f"{module}.bias", (*path, "bias"), (d_out,), **kw))
    return rows


def layer_norm(module: str, path: tuple[str, ...], dim: int, **kw) -> list[KeyEntry]:
    """A LayerNorm's rows: ``{module}.weight`` <-> ``path/scale``, ``{module}.bias`` <->
    ``path/bias``, both ``[dim]``."""
    return [
        plain(f"{module}.weight", (*path, "scale"), (dim,), **kw),
        plain(f"{module}.bias", (*path, "bias"), (dim,), **kw),
    ]


def check_table(table: Sequence[KeyEntry]) -> None:
    """Raises ValueError when two rows share a HF name, an export name or a tree path (a
    table is then not a bijection)."""
    for what, key in (
        ("hf", lambda e: e.hf),
        ("export_name", lambda e: e.export_name),
        ("path", lambda e: e.path),
    ):
        seen: set = set()
        for e in table:
            k = key(e)
            if k in seen:
                raise ValueError(f"key table has two rows with {what} {k!r}")
            seen.add(k)


# --------------------------------------------------------------------------- sources


class TensorSource(NamedTuple):
    """Stored tensors, read lazily.

    Attributes:
      shapes: ``{name: shape}`` of every stored tensor (from metadata; no data read).
      read: ``read(names)`` yields ``(name, numpy array)`` for those names, one at a time
        (in any order), so that a loader holds one stored tensor at a time.
      where: the source for error messages (folder and files, or a file).
    """

    shapes: Mapping[str, tuple[int, ...]]
    read: Callable[[Sequence[str]], Iterable[tuple[str, np.ndarray]]]
    where: str


def read_json(path: pathlib.Path, what: str = "") -> dict[str, Any]:
    """A JSON file as a dict; WeightsError when it is missing or not valid JSON."""
    path = pathlib.Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise WeightsError(f"{str(path)!r} does not exist{what}.") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{str(path)!r} is not valid JSON: {e}") from e


def safetensors_index(model_dir: str | os.PathLike) -> dict[str, str]:
    """``{tensor name: file name}`` of a single-file or sharded safetensors checkpoint.

    Raises:
      WeightsError: there is no checkpoint, the index is invalid, a shard is missing or
        unreadable, or a tensor appears in two shards.
    """
    from safetensors import safe_open

    model_dir = pathlib.Path(model_dir)
    if (model_dir / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    elif (model_dir / INDEX_FILE).is_file():
        index = read_json(model_dir / INDEX_FILE)
        if not isinstance(index.get("weight_map"), Mapping):
            raise WeightsError(
                f"{str(model_dir / INDEX_FILE)!r} is not a valid safetensors index (needs "
                "'weight_map')."
            )
        files = sorted(set(index["weight_map"].values()))
    else:
        raise WeightsError(f"{str(model_dir)!r} has neither {SINGLE_FILE} nor {INDEX_FILE}.")
    where: dict[str, str] = {}
    for f in files:
        try:
            with safe_open(model_dir / f, framework="numpy") as fh:
                keys = list(fh.keys())
        except FileNotFoundError as e:
            raise WeightsError(f"checkpoint shard {str(model_dir / f)!r} is missing.") from e
        except Exception as e:
            raise WeightsError(f"cannot read {str(model_dir / f)!r} as safetensors: {e}") from e
        for k in keys:
            if k in where:
                raise WeightsError(
                    f"tensor {k!r} appears in both {where[k]!r} and {f!r} of {str(model_dir)!r}."
                )
            where[k] = f
    return where


def safetensors_source(
    model_dir: str | os.PathLike, rename: Callable[[str], str] | None = None
) -> tuple[TensorSource, list[str]]:
    """The tensors of a HF folder's safetensors checkpoint as a :class:`TensorSource`.

    Args:
      model_dir: folder with ``model.safetensors`` or shards + ``model.safetensors.index.json``.
      rename: maps a stored name to the name the table uses (e.g. strips ``bert.``); two
        stored names that map to one name are a duplicate-key problem.

    Returns:
      ``(source, problems)``: ``problems`` lists duplicate keys (for :func:`import_tree`).
    """
    from safetensors import safe_open

    model_dir = pathlib.Path(model_dir)
    where = safetensors_index(model_dir)
    stored_of: dict[str, str] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    problems: list[str] = []
    for f in sorted(set(where.values())):
        with safe_open(model_dir / f, framework="numpy") as fh:
            for k in fh.keys():
                name = rename(k) if rename is not None else k
                if name in stored_of:
                    problems.append(
                        f"duplicate key: {k!r} and {stored_of[name]!r} both map to {name!r}"
                    )
                    continue
                stored_of[name] = k
                shapes[name] = tuple(fh.get_slice(k).get_shape())

    def read(names: Sequence[str]) -> Iterator[tuple[str, np.ndarray]]:
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(where[stored_of[n]], []).append(n)
        for f, ns in by_file.items():
            with safe_open(model_dir / f, framework="numpy") as fh:
                for n in ns:
                    yield n, fh.get_tensor(stored_of[n])

    files = sorted(set(where.values()))
    return TensorSource(shapes, read, f"{str(model_dir)!r} (files {files})"), problems


# --------------------------------------------------------------------------- import


def set_path(tree: dict, path: Sequence[str], value: Any) -> None:
    """``tree[path[0]]...[path[-1]] = value``, creating the intermediate dicts."""
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def leaf_converter(dtype: Any = jnp.float32, host: bool = False) -> Callable[[np.ndarray], Any]:
    """The ``leaf`` of :func:`import_tree`: C-contiguous numpy of ``dtype`` in host memory
    (``host``; bfloat16 as ``ml_dtypes.bfloat16``) or a ``jax.Array`` on the default device."""
    if host:
        return lambda x: np.ascontiguousarray(x, np.dtype(dtype))
    return lambda x: jnp.asarray(x, dtype)


def init_leaf(entry: KeyEntry, key: jax.Array, stddev: float) -> np.ndarray:
    """HF's initialisation of a new head/pooler leaf: zeros for a bias, else ``normal(0,
    stddev)`` from ``key`` folded with the path's CRC-32 (so a leaf does not depend on which
    other leaves were initialised). float32 numpy of ``entry.shape``."""
    if entry.path[-1] == "bias":
        return np.zeros(entry.shape, np.float32)
    k = jax.random.fold_in(key, zlib.crc32("/".join(entry.path).encode()) & 0x7FFFFFFF)
    return np.asarray(stddev * jax.random.normal(k, entry.shape, jnp.float32))


def modules_to_init(
    table: Sequence[KeyEntry],
    shapes: Mapping[str, tuple[int, ...]],
    *,
    all_optional: bool = False,
    num_labels: int | None = None,
    where: str = "",
) -> set[str]:
    """The optional modules (:attr:`KeyEntry.optional`) to initialise instead of read: those
    whose tensors are all absent, those stored whole with only another label count (every row
    ``label_dim``; a warning is logged), or every optional module with ``all_optional``.

    A partially stored module is read, so its absent rows are reported as missing keys."""
    groups: dict[str, list[KeyEntry]] = {}
    for e in table:
        if e.optional:
            groups.setdefault(e.module, []).append(e)
    out: set[str] = set()
    for module, entries in groups.items():
        present = [e for e in entries if e.hf in shapes]
        if all_optional or not present:
            out.add(module)
            if not present:
                log.info("%s: %s not in the checkpoint; initialised from head_key", where, module)
        elif len(present) == len(entries) and all(e.label_dim for e in entries):
            got = {tuple(shapes[e.hf]) for e in entries}
            want = {e.hf_shape for e in entries}
            same_n = len({s[0] for s in got}) == 1
            if got != want and same_n and {s[1:] for s in got} == {s[1:] for s in want}:
                out.add(module)
                log.warning(
                    "%s: checkpoint head %s has %d labels, %d requested; initialised from head_key",
                    where,
                    module,
                    shapes[entries[0].hf][0],
                    num_labels if num_labels is not None else entries[0].hf_shape[0],
                )
    return out


def _value_problem(name: str, value: np.ndarray) -> str | None:
    if value.dtype.kind != "f":
        return (
            f"dtype mismatch: {name!r} is {value.dtype}, expected a floating-point dtype "
            "(float32, float16 or bfloat16)"
        )
    if not np.all(np.isfinite(np.asarray(value, np.float32))):
        return f"non-finite values: {name!r} holds NaN or inf"
    return None


def import_tree(
    table: Sequence[KeyEntry],
    source: TensorSource,
    *,
    what: str,
    leaf: Callable[[np.ndarray], Any],
    name_of: Callable[[KeyEntry], str] = lambda e: e.hf,
    ignored: Sequence[str] = (),
    init: Mapping[str, Callable[[KeyEntry], np.ndarray]] | None = None,
    check_values: bool = True,
    transform: Callable[[KeyEntry, np.ndarray], np.ndarray] | None = None,
    problems: Sequence[str] = (),
) -> dict:
    """The parameter tree of ``table`` read from ``source`` (the import loop of every family).

    Args:
      table: the family's rows.
      source: the stored tensors.
      what: the model kind for messages (``"bert"``, ``"ViT"``, ``"LLaMA"``).
      leaf: makes a tree leaf of a converted numpy value (dtype, host or device).
      name_of: the stored name of a row (``e.hf``; the GGUF name for GGUF files).
      ignored: regexes (``fullmatch``) of stored tensors that are not weights.
      init: ``{module: f}``: rows of these modules are ``f(entry)`` instead of read (see
        :func:`modules_to_init`); their stored tensors, if any, are not unmapped.
      check_values: read every wanted tensor and report non-float dtypes and NaN/inf too
        (values become float32 before ``transform``); without it, name and shape problems
        raise before any tensor is read and values keep their stored dtype.
      transform: applied to each stored value before :meth:`KeyEntry.to_tree` (GGUF's
        rotary un-permutation).
      problems: problems found while reading names (duplicate keys), reported with the rest.

    Returns:
      The nested dict of leaves.

    Raises:
      WeightsError: listing every missing key, unmapped key, duplicate, shape mismatch (and
        with ``check_values`` non-float dtype and non-finite tensor), with ``source.where``.
    """
    init = init or {}
    errors = list(problems)
    leaves: dict[tuple[str, ...], Any] = {}
    wanted: dict[str, KeyEntry] = {}
    known: set[str] = set()
    for e in table:
        name = name_of(e)
        known.add(name)
        if e.module in init:
            leaves[e.path] = leaf(init[e.module](e))
        elif name not in source.shapes:
            errors.append(f"missing key: {name!r} (for {'/'.join(e.path)}, shape {e.hf_shape})")
        elif tuple(source.shapes[name]) != e.hf_shape:
            errors.append(
                f"shape mismatch: {name!r} expected {e.hf_shape}, got {tuple(source.shapes[name])}"
            )
        else:
            wanted[name] = e
    pats = [re.compile(p) for p in ignored]
    for k in source.shapes:
        if k not in known and not any(p.fullmatch(k) for p in pats):
            errors.append(f"unmapped key: {k!r}")
    if errors and not check_values:
        _raise(what, source.where, errors)
    for name, value in source.read(list(wanted)):
        e = wanted[name]
        value = np.asarray(value)
        if check_values:
            problem = _value_problem(name, value)
            if problem is not None:
                errors.append(problem)
                continue
            value = np.asarray(value, np.float32)
        if transform is not None:
            value = transform(e, value)
        leaves[e.path] = leaf(e.to_tree(value))
    if errors:
        _raise(what, source.where, errors)
    params: dict = {}
    for e in table:  # table order, whatever order the source was read in
        set_path(params, e.path, leaves[e.path])
    return params


def _raise(what: str, where: str, errors: Sequence[str]) -> None:
    raise WeightsError(
        f"cannot load {what} weights from {where}, {len(errors)} problem(s):\n  "
        + "\n  ".join(errors)
    )


# --------------------------------------------------------------------------- export


def flat_merged(params: PyTree) -> dict[tuple[str, ...], Any]:
    """``{path tuple: leaf}`` of ``params`` with LoRA nodes merged (``w0 + scale * a @ b``)."""
    from ffa_jax import lora

    return {
        tuple(lora.path_str([k]) for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(lora.merge(params))
    }


def export_state_dict(
    params: PyTree, table: Sequence[KeyEntry], *, what: str = ""
) -> dict[str, np.ndarray]:
    """``{export name: float32 C-contiguous numpy}`` of ``params`` (the export loop of every
    family); LoRA nodes are merged first.

    Raises:
      WeightsError: ``params`` lacks a row's path, has another shape there, or has a path
        that is no row (each listed).
    """
    flat = flat_merged(params)
    errors, out = [], {}
    for e in table:
        if e.path not in flat:
            errors.append(f"missing parameter {'/'.join(e.path)}")
            continue
        value = np.asarray(flat[e.path], np.float32)
        if value.shape != e.shape:
            errors.append(f"parameter {'/'.join(e.path)} expected {e.shape}, got {value.shape}")
            continue
        out[e.export_name] = np.ascontiguousarray(e.to_hf(value))
    errors += [
        f"unexpected parameter {'/'.join(p)}" for p in sorted(set(flat) - {e.path for e in table})
    ]
    if errors:
        what = f"{what} " if what else ""
        raise WeightsError(f"cannot export the {what}parameters:\n  " + "\n  ".join(errors))
    return out


def write_hf_folder(
    out_dir: str | os.PathLike,
    state: Mapping[str, np.ndarray],
    json_files: Mapping[str, Mapping[str, Any]],
) -> pathlib.Path:
    """Writes ``model.safetensors`` (``state``, metadata ``format: pt``) and each
    ``{file name: dict}`` of ``json_files`` (indent 2, sorted keys) to ``out_dir`` (created),
    every file atomically."""
    from safetensors.numpy import save_file

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(
        out / SINGLE_FILE, lambda tmp: save_file(dict(state), tmp, metadata={"format": "pt"})
    )
    for name, obj in json_files.items():

        def write_json(tmp, obj=obj):
            with open(tmp, "w") as f:
                json.dump(obj, f, indent=2, sort_keys=True)
                f.write("\n")

        atomic_write(out / name, write_json)
    return out
