"""The HF conversion engine (ffa_jax.models.convert) on a tiny hand-written table."""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ffa_jax import lora
from ffa_jax.config import LoRAConfig
from ffa_jax.errors import WeightsError
from ffa_jax.models import convert

# A Linear 3 -> 2 (with bias), a LayerNorm(2), a 2x1x2x2 patch conv, one optional head 2 -> 4.
TABLE = (
    *convert.linear("enc.proj", ("enc", "proj"), 3, 2, prefix="base."),
    *convert.layer_norm("enc.norm", ("enc", "norm"), 2, prefix="base."),
    convert.KeyEntry("patch.weight", ("patch", "kernel"), (4, 2), (2, 1, 2, 2), "conv"),
    *convert.linear("head", ("head",), 2, 4, optional=True, label_dim=True),
)


def _hf_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {e.hf: rng.normal(size=e.hf_shape).astype(np.float32) for e in TABLE}


def _write(folder, tensors, *, prefix: bool = True):
    folder.mkdir(parents=True, exist_ok=True)
    names = {e.hf: (e.export_name if prefix else e.hf) for e in TABLE}
    save_file({names.get(k, k): v for k, v in tensors.items()}, folder / convert.SINGLE_FILE)
    return folder


def _load(folder, **kw):
    source, problems = convert.safetensors_source(folder, lambda k: k.removeprefix("base."))
    kw.setdefault("leaf", convert.leaf_converter(host=True))
    return convert.import_tree(TABLE, source, what="tiny", problems=problems, **kw)


def test_table_layouts():
    convert.check_table(TABLE)
    conv = TABLE[4]
    w = np.arange(8, dtype=np.float32).reshape(conv.hf_shape)
    assert conv.to_tree(w).shape == conv.shape
    np.testing.assert_array_equal(conv.to_hf(conv.to_tree(w)), w)
    kernel = TABLE[0]
    assert (kernel.shape, kernel.hf_shape, kernel.export_name) == (
        (3, 2),
        (2, 3),
        "base.enc.proj.weight",
    )
    with pytest.raises(ValueError, match="two rows with hf"):
        convert.check_table((*TABLE, TABLE[0]))
    with pytest.raises(ValueError, match="differ in size"):
        convert.KeyEntry("x", ("x",), (2,), (3,))


def test_import_export_round_trip(tmp_path):
    tensors = _hf_tensors()
    params = _load(_write(tmp_path / "m", tensors))
    np.testing.assert_array_equal(params["enc"]["proj"]["kernel"], tensors["enc.proj.weight"].T)
    np.testing.assert_array_equal(
        params["patch"]["kernel"], tensors["patch.weight"].reshape(2, 4).T
    )
    exported = convert.export_state_dict(params, TABLE)
    assert sorted(exported) == sorted(e.export_name for e in TABLE)
    for e in TABLE:
        np.testing.assert_array_equal(exported[e.export_name], tensors[e.hf])
    # Written and read back: the same bytes.
    convert.write_hf_folder(tmp_path / "out", exported, {"config.json": {"b": 1, "a": [2]}})
    again = load_file(tmp_path / "out" / convert.SINGLE_FILE)
    assert {k: v.tobytes() for k, v in again.items()} == {
        k: v.tobytes() for k, v in exported.items()
    }
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == {"a": [2], "b": 1}
    assert not list((tmp_path / "out").glob(".*tmp"))


def test_export_merges_lora_nodes(tmp_path):
    params = _load(_write(tmp_path / "m", _hf_tensors()))
    adapted = lora.init(
        jax.tree_util.tree_map(np.asarray, params),
        LoRAConfig(rank=1, alpha=1, targets="enc/proj/kernel"),
        jax.random.key(0),
    )
    adapted = jax.tree_util.tree_map(
        lambda x: x.replace(b=x.b + 1.0) if lora.is_lora(x) else x, adapted, is_leaf=lora.is_lora
    )
    merged = convert.export_state_dict(adapted, TABLE)["base.enc.proj.weight"]
    node = adapted["enc"]["proj"]["kernel"]
    want = (np.asarray(node.w0) + float(node.scale) * np.asarray(node.a) @ np.asarray(node.b)).T
    np.testing.assert_allclose(merged, want, rtol=1e-6)


def test_every_problem_is_named_with_the_file(tmp_path):
    tensors = _hf_tensors()
    del tensors["enc.norm.bias"]  # missing
    tensors["enc.proj.bias"] = np.zeros((3,), np.float32)  # shape mismatch
    tensors["enc.extra.weight"] = np.zeros((2,), np.float32)  # unmapped
    tensors["enc.norm.weight"] = np.array([np.nan, 1.0], np.float32)  # non-finite
    tensors["patch.weight"] = np.zeros((2, 1, 2, 2), np.int32)  # not a float
    folder = _write(tmp_path / "m", tensors)
    with pytest.raises(WeightsError) as e:
        _load(folder)
    msg = str(e.value)
    assert "cannot load tiny weights from" in msg and str(folder) in msg
    assert "model.safetensors" in msg and "5 problem(s)" in msg
    assert "missing key: 'enc.norm.bias' (for enc/norm/bias, shape (2,))" in msg
    assert "shape mismatch: 'enc.proj.bias' expected (2,), got (3,)" in msg
    assert "unmapped key: 'base.enc.extra.weight'" not in msg  # names after the rename
    assert "unmapped key: 'enc.extra.weight'" in msg
    assert "non-finite values: 'enc.norm.weight'" in msg
    assert "dtype mismatch: 'patch.weight' is int32" in msg


def test_ignored_keys_are_not_unmapped(tmp_path):
    tensors = _hf_tensors()
    tensors["enc.position_ids"] = np.arange(3)
    folder = _write(tmp_path / "m", tensors)
    with pytest.raises(WeightsError, match="unmapped key: 'enc.position_ids'"):
        _load(folder)
    params = _load(folder, ignored=(r"enc\.position_ids",))
    assert "position_ids" not in params["enc"]


def test_duplicate_key(tmp_path):
    tensors = _hf_tensors()
    folder = _write(tmp_path / "m", tensors)
    stored = load_file(folder / convert.SINGLE_FILE)
    stored["enc.norm.bias"] = stored["base.enc.norm.bias"]  # the same name after the rename
    save_file(stored, folder / convert.SINGLE_FILE)
    with pytest.raises(WeightsError, match=r"duplicate key: .* both map to 'enc.norm.bias'"):
        _load(folder)


def test_duplicate_across_shards(tmp_path):
    tensors = {e.export_name: v for e, v in zip(TABLE, _hf_tensors().values(), strict=True)}
    folder = tmp_path / "m"
    folder.mkdir()
    save_file(tensors, folder / "a.safetensors")
    save_file({"head.bias": tensors["head.bias"]}, folder / "b.safetensors")
    index = {
        "weight_map": {**dict.fromkeys(tensors, "a.safetensors"), "head.bias": "b.safetensors"}
    }
    (folder / convert.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(WeightsError, match="'head.bias' appears in both"):
        convert.safetensors_source(folder)


def test_names_and_shapes_fail_before_reading_without_value_checks(tmp_path):
    tensors = _hf_tensors()
    tensors["enc.proj.weight"] = np.zeros((3, 3), np.float32)
    folder = _write(tmp_path / "m", tensors)
    source, _ = convert.safetensors_source(folder, lambda k: k.removeprefix("base."))

    def read(names):
        raise AssertionError("read after a shape problem")

    with pytest.raises(WeightsError, match=r"expected \(2, 3\), got \(3, 3\)"):
        convert.import_tree(
            TABLE,
            convert.TensorSource(source.shapes, read, source.where),
            what="tiny",
            leaf=np.asarray,
            check_values=False,
        )


def test_optional_module_initialised_when_absent_or_relabelled(tmp_path):
    tensors = _hf_tensors()
    absent = {k: v for k, v in tensors.items() if not k.startswith("head.")}
    source, _ = convert.safetensors_source(_write(tmp_path / "a", absent))
    assert convert.modules_to_init(TABLE, source.shapes) == {"head"}
    relabelled = {**tensors, "head.weight": np.zeros((7, 2)), "head.bias": np.zeros((7,))}
    source, _ = convert.safetensors_source(_write(tmp_path / "b", relabelled, prefix=False))
    assert convert.modules_to_init(TABLE, source.shapes, num_labels=4) == {"head"}
    source, _ = convert.safetensors_source(_write(tmp_path / "c", tensors, prefix=False))
    assert convert.modules_to_init(TABLE, source.shapes) == set()
    assert convert.modules_to_init(TABLE, source.shapes, all_optional=True) == {"head"}
    # A partial head is read: its absent row is a missing key.
    partial = {k: v for k, v in tensors.items() if k != "head.bias"}
    source, _ = convert.safetensors_source(_write(tmp_path / "d", partial, prefix=False))
    assert convert.modules_to_init(TABLE, source.shapes) == set()

    key = jax.random.key(0)
    params = _load(tmp_path / "a", init={"head": lambda e: convert.init_leaf(e, key, 0.02)})
    assert np.all(params["head"]["bias"] == 0) and params["head"]["kernel"].shape == (2, 4)
    again = convert.init_leaf(TABLE[-2], key, 0.02)
    np.testing.assert_array_equal(params["head"]["kernel"], again)  # a function of key + path


def test_export_errors_name_the_path():
    params = {"enc": {"proj": {"kernel": np.zeros((3, 2)), "bias": np.zeros(5)}}, "x": np.zeros(1)}
    with pytest.raises(WeightsError) as e:
        convert.export_state_dict(params, TABLE, what="tiny")
    msg = str(e.value)
    assert msg.startswith("cannot export the tiny parameters:")
    assert "parameter enc/proj/bias expected (2,), got (5,)" in msg
    assert "missing parameter enc/norm/scale" in msg
    assert "unexpected parameter x" in msg


def test_family_tables_are_bijections():
    """Every family's table maps distinct HF names, export names and paths (and GGUF names)."""
    from ffa_jax.models.encoder import EncoderConfig
    from ffa_jax.models.llama import LlamaConfig
    from ffa_jax.models.llama_weights import llama_key_table
    from ffa_jax.models.vit import ViTConfig
    from ffa_jax.models.vit_weights import vit_key_table
    from ffa_jax.models.weights import key_table

    fixtures = pathlib.Path(__file__).resolve().parents[2] / "fixtures"
    tables = []
    for name in ("encoder_tiny_bert", "encoder_tiny_roberta"):
        hf = json.loads((fixtures / name / "config.json").read_text())
        tables.append(key_table(EncoderConfig.from_hf(hf, 3)))
    for name in ("vit_tiny", "vit_tiny_gray"):
        hf = json.loads((fixtures / name / "config.json").read_text())
        tables.append(vit_key_table(ViTConfig.from_hf(hf, 3)))
    for tied in (False, True):
        cfg = LlamaConfig(
            vocab_size=16,
            hidden_size=8,
            num_layers=2,
            num_heads=2,
            intermediate_size=8,
            tie_word_embeddings=tied,
            attention_bias=True,
        )
        table = llama_key_table(cfg)
        assert len({e.gguf for e in table}) == len(table)
        tables.append(table)
    for table in tables:
        convert.check_table(table)
