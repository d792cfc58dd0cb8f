"""Image data: MNIST 5k, local .npz arrays, datasets folders (the hub code path), the cache and
bad input."""

from __future__ import annotations

import os

import numpy as np
import pytest

from ffa_jax.data import images
from ffa_jax.data.images import check_image_arrays, load_image_classification
from ffa_jax.errors import DataError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def test_mnist5k_public_and_private_halves_are_disjoint(tmp_path):
    kw = dict(image_size=28, num_channels=1, cache_dir=tmp_path)
    pub = load_image_classification("mnist5k", classes=[0, 1, 2, 3, 4], **kw)
    priv = load_image_classification("mnist5k", classes=[5, 6, 7, 8, 9], **kw)
    for d in (pub, priv):
        assert d.train_images.shape == (2000, 28, 28, 1) and d.train_images.dtype == np.uint8
        assert d.test_images.shape == (500, 28, 28, 1)
        assert sorted(np.unique(d.train_labels)) == [0, 1, 2, 3, 4]
        assert np.bincount(d.test_labels).tolist() == [100] * 5  # stratified
    assert pub.label_names == ("0", "1", "2", "3", "4")
    assert priv.label_names == ("5", "6", "7", "8", "9")
    pub_rows = {x.tobytes() for x in pub.train_images}
    assert not pub_rows & {x.tobytes() for x in priv.train_images}
    # An order in `classes` is the new label order.
    rev = load_image_classification("mnist5k", classes=[9, 5], **kw)
    assert rev.label_names == ("9", "5")


def test_mnist5k_as_rgb_and_resized(tmp_path):
    d = load_image_classification(
        "mnist5k", image_size=14, num_channels=3, classes=[0, 1], cache_dir=None
    )
    assert d.train_images.shape[1:] == (14, 14, 3)
    np.testing.assert_array_equal(d.train_images[..., 0], d.train_images[..., 2])


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_npz_arrays_resize_and_split(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 10, 10, 3), dtype=np.uint8)
    y = np.arange(40) % 4
    path = _npz(tmp_path / "a.npz", images=x, labels=y, label_names=np.array(list("wxyz")))
    d = load_image_classification(path, image_size=8, num_channels=3, test_fraction=0.25)
    assert d.train_images.shape == (30, 8, 8, 3) and d.test_images.shape == (10, 8, 8, 3)
    assert d.label_names == ("w", "x", "y", "z")
    # Floats in [0, 1] are the same images as uint8 0..255.
    f = _npz(tmp_path / "f.npz", images=x / 255.0, labels=y, label_names=np.array(list("wxyz")))
    d2 = load_image_classification(f, image_size=8, num_channels=3, test_fraction=0.25)
    np.testing.assert_array_equal(d.train_images, d2.train_images)
    # A given test split is used as is.
    t = _npz(
        tmp_path / "t.npz",
        images=x[:, :, :, 0],
        labels=y,
        test_images=x[:8, :, :, 0],
        test_labels=y[:8],
    )
    d3 = load_image_classification(t, image_size=10, num_channels=1)
    assert len(d3.train_labels) == 40
    # ... shuffled with the seed (the pairs of image and label stay together).
    assert sorted(d3.test_labels.tolist()) == sorted(y[:8].tolist())
    pairs = {
        (img.tobytes(), int(lab)) for img, lab in zip(d3.test_images, d3.test_labels, strict=True)
    }
    assert pairs == {
        (img[..., None].tobytes(), int(lab)) for img, lab in zip(x[:8, :, :, 0], y[:8], strict=True)
    }


@pytest.mark.parametrize(
    "arrays,match",
    [
        (
            dict(images=np.zeros((4, 8, 8, 3), np.uint8), labels=np.arange(4) % 2),
            "has 3 channel\\(s\\).*num_channels=1",
        ),
        (
            dict(images=np.zeros((4, 8), np.uint8), labels=np.arange(4) % 2),
            "shape \\(4, 8\\); give \\[N, H, W\\]",
        ),
        (
            dict(images=np.full((4, 8, 8), 2.0), labels=np.arange(4) % 2),
            "float images must hold finite values in \\[0, 1\\]",
        ),
        (dict(images=np.full((4, 8, 8), 300), labels=np.arange(4) % 2), "0..255"),
        (
            dict(images=np.zeros((4, 8, 8), np.uint8), labels=np.arange(3) % 2),
            "labels has shape \\(3,\\); expected \\[4\\]",
        ),
        (
            dict(
                images=np.zeros((4, 8, 8), np.uint8),
                labels=np.array([0, 1, 2, 1]),
                label_names=np.array(["a", "b"]),
            ),
            "reach 2 but there are only 2 label names",
        ),
        (
            dict(images=np.zeros((4, 8, 8), np.uint8), labels=np.array([0, -1, 1, 1])),
            "labels must be >= 0",
        ),
        (
            dict(pictures=np.zeros((4, 8, 8), np.uint8), labels=np.arange(4) % 2),
            "lacks the arrays \\['images'\\]",
        ),
    ],
)
def test_bad_npz_inputs(tmp_path, arrays, match):
    path = _npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=match):
        load_image_classification(path, image_size=8, num_channels=1, cache_dir=tmp_path / "c")
    assert not list((tmp_path / "c").glob("*.npz")) if (tmp_path / "c").exists() else True


def test_bad_task_and_classes(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        load_image_classification("./missing_folder", image_size=8, num_channels=1)
    with pytest.raises(DataError, match="the .npz file does not exist"):
        load_image_classification(str(tmp_path / "x.npz"), image_size=8, num_channels=1)
    with pytest.raises(DataError, match="data.classes=\\[3, 12\\]"):
        load_image_classification("mnist5k", image_size=28, num_channels=1, classes=[3, 12])


def _dataset_dict(rng, n=12, size=(10, 14), mode="RGB"):
    import datasets
    from PIL import Image

    imgs = [
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).convert(mode)
        for _ in range(n)
    ]
    feat = datasets.Features(
        {"img": datasets.Image(), "y": datasets.ClassLabel(names=["cat", "dog", "eel"])}
    )
    ds = datasets.Dataset.from_dict({"img": imgs, "y": [i % 3 for i in range(n)]}, features=feat)
    return datasets.DatasetDict({"train": ds, "validation": ds.select(range(6))}), imgs


def test_datasets_folder_same_code_as_hub(tmp_path):
    from PIL import Image

    dd, imgs = _dataset_dict(np.random.default_rng(0))
    dd.save_to_disk(str(tmp_path / "ds"))
    kw = dict(image_field="img", label_field="y", cache_dir=None)
    d = load_image_classification(str(tmp_path / "ds"), image_size=8, num_channels=3, **kw)
    assert d.label_names == ("cat", "dog", "eel")
    assert d.train_images.shape == (12, 8, 8, 3) and d.test_images.shape == (6, 8, 8, 3)
    # Resized once with PIL bilinear, as ViTImageProcessor does.
    want = np.asarray(imgs[0].resize((8, 8), Image.BILINEAR))
    np.testing.assert_array_equal(d.train_images[0], want)
    gray = load_image_classification(str(tmp_path / "ds"), image_size=8, num_channels=1, **kw)
    assert gray.train_images.shape == (12, 8, 8, 1)
    with pytest.raises(
        DataError, match="data.image_field='image' is not a column.*\\['img', 'y'\\]"
    ):
        load_image_classification(
            str(tmp_path / "ds"), image_size=8, num_channels=3, label_field="y", cache_dir=None
        )


def test_image_folder(tmp_path):
    rng = np.random.default_rng(1)
    _, imgs = _dataset_dict(rng, n=6)
    for c in ("ant", "bee"):
        (tmp_path / "f" / c).mkdir(parents=True)
        for j, img in enumerate(imgs[:3]):
            img.save(tmp_path / "f" / c / f"{j}.png")
    d = load_image_classification(
        str(tmp_path / "f"), image_size=8, num_channels=3, test_fraction=0.34, cache_dir=None
    )
    assert d.label_names == ("ant", "bee")
    assert len(d.train_labels) + len(d.test_labels) == 6


def test_cache_is_used_and_invalidated(tmp_path, monkeypatch):
    x = np.random.default_rng(0).integers(0, 256, (20, 9, 9), dtype=np.uint8)
    path = _npz(tmp_path / "a.npz", images=x, labels=np.arange(20) % 2)
    kw = dict(image_size=6, num_channels=1, cache_dir=tmp_path / "cache")
    first = load_image_classification(path, **kw)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1

    def boom(*a, **k):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(images, "_load_npz", boom)
    second = load_image_classification(path, **kw)
    np.testing.assert_array_equal(first.train_images, second.train_images)
    # A changed file (size/mtime) is a new cache entry: the loader runs again.
    _npz(tmp_path / "a.npz", images=x[:18], labels=np.arange(18) % 2)
    with pytest.raises(AssertionError, match="decoded again"):
        load_image_classification(path, **kw)
    # A damaged cache entry is rebuilt, not trusted.
    monkeypatch.undo()
    for f in (tmp_path / "cache").glob("*.npz"):
        f.write_bytes(b"garbage")
    third = load_image_classification(path, **kw)
    assert len(third.train_labels) + len(third.test_labels) == 18


def test_check_image_arrays():
    x = np.zeros((3, 8, 8, 1), np.uint8)
    check_image_arrays(x, np.array([0, 1, 2]), (8, 8, 1), 3, "set")
    with pytest.raises(DataError, match="set: label 3 is outside the head's range 0..2"):
        check_image_arrays(x, np.array([0, 1, 3]), (8, 8, 1), 3, "set")
    with pytest.raises(DataError, match="1 channel\\(s\\) where the model takes 3"):
        check_image_arrays(x, np.array([0, 1, 2]), (8, 8, 3), 3, "set")
    with pytest.raises(DataError, match="images must be 7x7x1"):
        check_image_arrays(x, np.array([0, 1, 2]), (7, 7, 1), 3, "set")
    with pytest.raises(DataError, match="dtype float64; expected integers"):
        check_image_arrays(x, np.array([0.0, 1, 2]), (8, 8, 1), 3, "set")
