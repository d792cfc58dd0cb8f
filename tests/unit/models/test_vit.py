"""ViT: parity with the PyTorch reference (committed fixtures), HF key table, LoRA targets."""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ffa_jax import lora
from ffa_jax.config import DEFAULT_TARGETS, LoRAConfig
from ffa_jax.errors import ConfigError, DataError, WeightsError
from ffa_jax.models.vit import ViTClassifier, ViTConfig, normalise
from ffa_jax.models.vit_weights import load_vit, read_image_processor, save_vit, vit_key_table

FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "fixtures"
PARITY = FIXTURES / "vit_parity.npz"
# (fixture name in the npz, folder, labels in the checkpoint head)
VARIANTS = [("tiny", "vit_tiny", 3), ("gray", "vit_tiny_gray", 4)]


@functools.cache
def _apply(config: ViTConfig):
    return jax.jit(ViTClassifier(config).apply, static_argnames="method")


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(PARITY))


def _pixels(ref, name):
    # The fixture stores PyTorch's [B, C, H, W]; the Flax ViT is channels-last.
    return jnp.asarray(ref[f"{name}_pixel_values"]).transpose(0, 2, 3, 1)


@pytest.mark.parametrize("name,folder,labels", VARIANTS)
def test_logits_match_torch(ref, name, folder, labels):
    config, params = load_vit(FIXTURES / folder, labels, head_key=jax.random.key(0))
    logits = _apply(config)({"params": params}, _pixels(ref, name))
    assert logits.shape == (4, labels) and logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits), ref[f"{name}_logits"], atol=1e-4, rtol=0)
    hidden = _apply(config)({"params": params}, _pixels(ref, name), method="encode")
    np.testing.assert_allclose(
        np.asarray(hidden), ref[f"{name}_last_hidden_state"], atol=1e-4, rtol=0
    )


def test_fixture_detects_wrong_activation(ref):
    # The fixture is sensitive enough to tell exact from tanh-approximate GELU.
    config, params = load_vit(FIXTURES / "vit_tiny", 3, head_key=jax.random.key(0))
    other = dataclasses.replace(config, hidden_act="gelu_new")
    logits = _apply(other)({"params": params}, _pixels(ref, "tiny"))
    assert np.abs(np.asarray(logits) - ref["tiny_logits"]).max() > 1e-4


def test_bare_vitmodel_checkpoint_loads_with_new_head(ref):
    # google/vit-base-patch16-224-in21k layout: no "vit." prefix, a pooler, no classifier.
    keys = load_file(FIXTURES / "vit_tiny_base" / "model.safetensors")
    assert "pooler.dense.weight" in keys and not any(k.startswith("vit.") for k in keys)
    config, params = load_vit(FIXTURES / "vit_tiny_base", 7, head_key=jax.random.key(1))
    hidden = _apply(config)({"params": params}, _pixels(ref, "base"), method="encode")
    np.testing.assert_allclose(np.asarray(hidden), ref["base_last_hidden_state"], atol=1e-4, rtol=0)
    head = params["classifier"]
    assert head["kernel"].shape == (32, 7)
    assert np.all(np.asarray(head["bias"]) == 0)
    assert 0.005 < float(jnp.std(head["kernel"])) < 0.05  # normal(initializer_range=0.02)


def test_head_is_replaced_for_another_label_count_or_on_request():
    ck = load_file(FIXTURES / "vit_tiny" / "model.safetensors")
    _, p5 = load_vit(FIXTURES / "vit_tiny", 5, head_key=jax.random.key(0))
    assert p5["classifier"]["kernel"].shape == (32, 5)
    _, kept = load_vit(FIXTURES / "vit_tiny", 3, head_key=jax.random.key(0))
    np.testing.assert_array_equal(kept["classifier"]["kernel"], ck["classifier.weight"].T)
    _, new = load_vit(FIXTURES / "vit_tiny", 3, head_key=jax.random.key(0), new_head=True)
    assert not np.allclose(new["classifier"]["kernel"], ck["classifier.weight"].T)
    np.testing.assert_array_equal(
        new["layernorm"]["scale"], kept["layernorm"]["scale"]
    )  # only the head changes


def test_default_lora_targets_are_query_and_value():
    config, params = load_vit(FIXTURES / "vit_tiny", 3, head_key=jax.random.key(0))
    paths = lora.target_paths(params, DEFAULT_TARGETS)
    expected = [
        f"encoder/layer_{i}/attention/attention/{p}/kernel"
        for i in range(config.num_layers)
        for p in ("query", "value")
    ]
    assert sorted(paths) == sorted(expected)


def test_lora_b_zero_is_the_base_model_and_b_changes_logits(ref):
    config, params = load_vit(FIXTURES / "vit_tiny", 3, head_key=jax.random.key(0))
    tree = lora.init(params, LoRAConfig(rank=4, alpha=8), jax.random.key(2))
    x = _pixels(ref, "tiny")
    base = _apply(config)({"params": params}, x)
    np.testing.assert_allclose(_apply(config)({"params": tree}, x), base, atol=1e-6)
    bumped = jax.tree_util.tree_map(
        lambda n: dataclasses.replace(n, b=n.b + 0.1) if lora.is_lora(n) else n,
        tree,
        is_leaf=lora.is_lora,
    )
    assert np.abs(np.asarray(_apply(config)({"params": bumped}, x) - base)).max() > 1e-3


def test_save_load_round_trip_merges_lora(tmp_path, ref):
    config, params = load_vit(FIXTURES / "vit_tiny_gray", 4, head_key=jax.random.key(0))
    tree = lora.init(params, LoRAConfig(rank=2, alpha=4), jax.random.key(3))
    tree = jax.tree_util.tree_map(
        lambda n: dataclasses.replace(n, b=n.b + 0.05) if lora.is_lora(n) else n,
        tree,
        is_leaf=lora.is_lora,
    )
    save_vit(tree, config, tmp_path / "m", image_mean=[0.25], image_std=[0.5], label_names="abcd")
    config2, params2 = load_vit(tmp_path / "m", 4, head_key=jax.random.key(9))
    assert config2 == config
    x = _pixels(ref, "gray")
    np.testing.assert_allclose(
        _apply(config)({"params": params2}, x),
        _apply(config)({"params": tree}, x),
        atol=1e-5,
    )
    hf = json.loads((tmp_path / "m" / "config.json").read_text())
    assert hf["id2label"] == {"0": "a", "1": "b", "2": "c", "3": "d"}
    assert hf["qkv_bias"] is False and hf["architectures"] == ["ViTForImageClassification"]
    assert read_image_processor(tmp_path / "m", 1) == ([0.25], [0.5])
    assert not list((tmp_path / "m").glob(".*tmp"))  # atomic writes leave no temporaries


def test_key_table_matches_the_hf_checkpoint_exactly():
    config, _ = load_vit(FIXTURES / "vit_tiny", 3, head_key=jax.random.key(0))
    hf = load_file(FIXTURES / "vit_tiny" / "model.safetensors")
    table = {e.export_name: e.hf_shape for e in vit_key_table(config)}
    assert table == {k: v.shape for k, v in hf.items()}


def _damaged(tmp_path, edit) -> pathlib.Path:
    dst = tmp_path / "damaged"
    shutil.copytree(FIXTURES / "vit_tiny", dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


def test_loader_lists_every_key_problem(tmp_path):
    def edit(t):
        del t["vit.encoder.layer.1.attention.attention.value.bias"]
        t["vit.embeddings.position_embeddings"] = np.zeros((1, 5, 32), np.float32)
        t["vit.encoder.layer.0.extra.weight"] = np.zeros((2,), np.float32)
        t["vit.layernorm.weight"] = np.full((32,), np.nan, np.float32)

    with pytest.raises(WeightsError) as e:
        load_vit(_damaged(tmp_path, edit), 3, head_key=jax.random.key(0))
    msg = str(e.value)
    assert "4 problem(s)" in msg
    assert "missing key: 'encoder.layer.1.attention.attention.value.bias'" in msg
    assert (
        "shape mismatch: 'embeddings.position_embeddings' expected (1, 10, 32), got (1, 5, 32)"
        in msg
    )
    assert "unmapped key: 'encoder.layer.0.extra.weight'" in msg
    assert "non-finite values: 'layernorm.weight'" in msg


def test_loader_rejects_other_architectures(tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(FIXTURES / "vit_tiny", dst)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    with pytest.raises(WeightsError, match="model_type='bert'.*expected 'vit'"):
        load_vit(dst, 3, head_key=jax.random.key(0))
    (dst / "config.json").write_text(json.dumps({**cfg, "image_size": [12, 16]}))
    with pytest.raises(WeightsError, match="image_size=\\[12, 16\\].*square"):
        load_vit(dst, 3, head_key=jax.random.key(0))
    with pytest.raises(WeightsError, match="does not exist"):
        load_vit(tmp_path / "nope" / "x", 3, head_key=jax.random.key(0))


@pytest.mark.parametrize(
    "shape,match",
    [
        ((2, 12, 12, 1), "channel count 1 differs from the model's num_channels=3"),
        ((2, 16, 16, 3), "images must be 12x12 with 3 channel"),
        ((12, 12, 3), "expects \\[batch, 12, 12, 3\\]"),
    ],
)
def test_wrong_pixel_shapes_fail_clearly(shape, match):
    config, params = load_vit(FIXTURES / "vit_tiny", 3, head_key=jax.random.key(0))
    with pytest.raises(DataError, match=match):
        ViTClassifier(config).apply({"params": params}, jnp.zeros(shape))


def test_config_validation():
    kw = dict(
        image_size=12,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_layers=1,
        num_heads=4,
        intermediate_size=8,
        num_labels=2,
    )
    with pytest.raises(ConfigError, match="patch_size=5 does not divide image_size=12"):
        ViTConfig(**{**kw, "patch_size": 5})
    with pytest.raises(ConfigError, match="num_heads=3"):
        ViTConfig(**{**kw, "num_heads": 3})
    with pytest.raises(ConfigError, match="num_labels=0"):
        ViTConfig(**{**kw, "num_labels": 0})


def test_normalise_is_the_vit_processor_affine_map():
    x = np.array([0, 51, 255], np.uint8)[:, None]
    np.testing.assert_allclose(normalise(x, 0.5, 0.5)[:, 0], [-1.0, -0.6, 1.0], atol=1e-6)
