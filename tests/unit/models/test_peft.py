"""PEFT LoRA adapters: export, import, parity with PEFT's forward, run directories, bad input.

The fixture adapters in ``tests/fixtures/peft_tiny_{bert,roberta}`` were trained by PEFT
(``experiments/prepare/make_peft_fixtures.py``) and ``peft_parity.npz`` holds PEFT's logits, so
the import tests always run; the test that loads an ffa_jax export with
``peft.PeftModel.from_pretrained`` runs only when torch and peft are installed.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ffa_jax import lora
from ffa_jax.config import LoRAConfig, load_config
from ffa_jax.errors import ConfigError, WeightsError
from ffa_jax.models import EncoderClassifier, key_table, load_encoder
from ffa_jax.models import peft as peft_lib
from ffa_jax.run.inference import export_run_peft, load_run

FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "fixtures"
FAMILIES = ("bert", "roberta")
PARITY = dict(np.load(FIXTURES / "peft_parity.npz"))


def _base(family, num_labels=3, pooling="cls", key=0):
    return load_encoder(
        str(FIXTURES / f"encoder_tiny_{family}"),
        num_labels,
        head_key=jax.random.key(key),
        pooling=pooling,
    )


def _inputs(family):
    return tuple(
        jnp.asarray(PARITY[f"{family}_{k}"])
        for k in ("input_ids", "attention_mask", "token_type_ids")
    )


def _logits(config, params, family):
    return np.asarray(EncoderClassifier(config).apply({"params": params}, *_inputs(family)))


def _adapted(family, rank=4, alpha=8.0, pooling="cls", num_labels=3):
    """A tree with random, non-zero B and a head that differs from the checkpoint's."""
    config, base = _base(family, num_labels=num_labels, pooling=pooling)
    params = lora.init(base, LoRAConfig(rank=rank, alpha=alpha), jax.random.key(1))
    keys = iter(jax.random.split(jax.random.key(2), 64))
    params = jax.tree_util.tree_map(
        lambda x: (
            x.replace(b=0.3 * jax.random.normal(next(keys), x.b.shape)) if lora.is_lora(x) else x
        ),
        params,
        is_leaf=lora.is_lora,
    )
    params["classifier"] = jax.tree_util.tree_map(
        lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), params["classifier"]
    )
    return config, base, params


@pytest.mark.parametrize("family", FAMILIES)
def test_module_names_agree_with_key_table(family):
    config, base = _base(family)
    for e in key_table(config):
        if e.path[-1] == "kernel":
            want = e.export_name.removesuffix(".weight")
            assert peft_lib.hf_module_name(e.path[:-1], family) == want
    assert peft_lib.family_of(base) == family


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_trained_adapter_gives_peft_logits(family):
    """LoRA forward vs PEFT's: same A, B, alpha, r (and PEFT's trained head) -> same logits."""
    adapter = FIXTURES / f"peft_tiny_{family}"
    spec = peft_lib.read_lora_config(adapter, mode="ffa")
    assert (spec.rank, spec.alpha, spec.scale) == (4, 8.0, 2.0)
    config, base = _base(family, key=123)  # the head comes from the adapter, not this key
    params = peft_lib.import_peft(adapter, base, LoRAConfig(rank=4, alpha=8))
    nodes = lora.lora_nodes(params)
    assert len(nodes) == 4 and all(n.scale == 2.0 for n in nodes.values())
    want = PARITY[f"{family}_logits"]
    unmerged = _logits(config, params, family)
    merged = _logits(config, lora.merge(params), family)
    assert np.max(np.abs(unmerged - want)) < 1e-4
    assert np.max(np.abs(merged - want)) < 1e-4
    # FFA: only B trains (the imported A stays frozen); LoRA mode trains both.
    for mode, a_trained in (("ffa", False), ("lora", True)):
        mask = lora.trainable_mask(params, mode)
        assert all(m.b and m.a == a_trained for m in lora.lora_nodes(mask).values())
    assert np.allclose(peft_lib.import_peft(adapter, base)["encoder"]["layer_0"]["attention"]["self"]["query"]["kernel"].b, nodes["encoder/layer_0/attention/self/query/kernel"].b)  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_export_writes_peft_format_and_round_trips(family, tmp_path):
    config, base, params = _adapted(family)
    with pytest.warns(UserWarning, match="records only its name"):
        res = peft_lib.export_peft(
            params, tmp_path / "out", config=config, base_model=FIXTURES / f"encoder_tiny_{family}"
        )
    acfg = json.loads((res.out_dir / "adapter_config.json").read_text())
    assert acfg["peft_type"] == "LORA" and acfg["task_type"] == "SEQ_CLS"
    assert (acfg["r"], acfg["lora_alpha"], acfg["lora_dropout"], acfg["bias"]) == (
        4,
        8,
        0.0,
        "none",
    )
    assert acfg["target_modules"] == ["query", "value"]
    assert acfg["modules_to_save"] == ["classifier"]
    # A local base folder is recorded by its name, never by a path on this machine.
    assert acfg["base_model_name_or_path"] == f"encoder_tiny_{family}"
    tensors = load_file(res.out_dir / "adapter_model.safetensors")
    node = params["encoder"]["layer_1"]["attention"]["self"]["value"]["kernel"]
    k = f"base_model.model.{family}.encoder.layer.1.attention.self.value"
    np.testing.assert_array_equal(tensors[f"{k}.lora_A.weight"], np.asarray(node.a).T)  # [r, d_in]
    np.testing.assert_array_equal(tensors[f"{k}.lora_B.weight"], np.asarray(node.b).T)  # [d_out, r]
    assert tensors[f"{k}.lora_A.weight"].shape == (4, 32)
    head = [t for t in tensors if ".lora_" not in t]
    assert head and all(t.startswith("base_model.model.classifier.") for t in head)

    back = peft_lib.import_peft(res.out_dir, base, LoRAConfig(rank=4, alpha=8))
    for x, y in zip(
        jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # The merged checkpoint is a plain HF folder that ffa_jax (and transformers) loads.
    mcfg, merged = load_encoder(str(res.merged_dir), 3, head_key=jax.random.key(9), pooling="cls")
    np.testing.assert_allclose(
        _logits(mcfg, merged, family), _logits(config, params, family), atol=1e-5
    )


def test_target_modules_fall_back_to_full_names(tmp_path):
    config, base = _base("bert")
    only_first = LoRAConfig(rank=2, alpha=4, targets=r"encoder/layer_0/attention/self/query/kernel")
    params = lora.init(base, only_first, jax.random.key(0))
    res = peft_lib.export_peft(params, tmp_path / "a", config=config, merged=False)
    acfg = json.loads((res.out_dir / "adapter_config.json").read_text())
    assert acfg["target_modules"] == ["bert.encoder.layer.0.attention.self.query"]
    assert res.merged_dir is None
    spec = peft_lib.read_lora_config(res.out_dir)
    assert lora.target_paths(base, spec.targets) == ["encoder/layer_0/attention/self/query/kernel"]
    peft_lib.import_peft(res.out_dir, base, only_first)


def test_mean_pooling_export_warns(tmp_path):
    config, _, params = _adapted("bert", pooling="mean")
    with pytest.warns(UserWarning, match="mean pooling"):
        res = peft_lib.export_peft(params, tmp_path / "a", config=config, merged=False)
    assert res.warnings and "mean pooling" in (res.out_dir / "README.md").read_text()


def test_export_refuses_a_non_empty_folder(tmp_path):
    config, _, params = _adapted("bert")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("")
    with pytest.raises(ConfigError, match="overwrite"):
        peft_lib.export_peft(params, tmp_path / "a", config=config)
    peft_lib.export_peft(params, tmp_path / "a", config=config, merged=False, overwrite=True)
    assert not (tmp_path / "a" / "x").exists()


# --------------------------------------------------------------------------- bad adapters


def _copy_adapter(family, dst, edit_tensors=None, edit_config=None):
    src = FIXTURES / f"peft_tiny_{family}"
    dst.mkdir()
    tensors = load_file(src / "adapter_model.safetensors")
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, dst / "adapter_model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "adapter_config.json").read_text())
    if edit_config:
        edit_config(cfg)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def test_rank_mismatch_names_r():
    _, base = _base("bert")
    with pytest.raises(
        WeightsError, match=r"rank mismatch: adapter_config.json has r=4 but lora.rank=8"
    ):
        peft_lib.import_peft(FIXTURES / "peft_tiny_bert", base, LoRAConfig(rank=8, alpha=8))
    with pytest.raises(WeightsError, match=r"alpha mismatch: .*lora_alpha=8"):
        peft_lib.import_peft(FIXTURES / "peft_tiny_bert", base, LoRAConfig(rank=4, alpha=4))


def test_target_mismatch_names_the_key():
    _, base = _base("bert")
    qkv = LoRAConfig(rank=4, alpha=8, targets=r".*(query|key|value)/kernel")
    with pytest.raises(WeightsError) as e:
        peft_lib.import_peft(FIXTURES / "peft_tiny_bert", base, qkv)
    assert "base_model.model.bert.encoder.layer.0.attention.self.key.lora_A.weight" in str(e.value)
    only_q = LoRAConfig(rank=4, alpha=8, targets=r".*query/kernel")
    with pytest.raises(
        WeightsError, match=r"self\.value\.lora_A\.weight adapts .* does not select"
    ):
        peft_lib.import_peft(FIXTURES / "peft_tiny_bert", base, only_q)


def test_wrong_family_names_the_key():
    _, base = _base("bert")
    with pytest.raises(
        WeightsError,
        match=r"roberta\.encoder\.layer\.0\.attention\.self\.query\.lora_A\.weight.*roberta module name but the base model is bert",
    ):
        peft_lib.import_peft(FIXTURES / "peft_tiny_roberta", base, LoRAConfig(rank=4, alpha=8))


def test_shape_mismatch_names_the_key(tmp_path):
    k = "base_model.model.bert.encoder.layer.1.attention.self.query.lora_B.weight"

    def cut(t):
        t[k] = t[k][:16]

    bad = _copy_adapter("bert", tmp_path / "a", edit_tensors=cut)
    _, base = _base("bert")
    with pytest.raises(
        WeightsError, match=rf"shape mismatch: '{k}' expected \(32, 4\).*got \(16, 4\)"
    ):
        peft_lib.import_peft(bad, base, LoRAConfig(rank=4, alpha=8))

    def drop_a(t):
        del t[k.replace("lora_B", "lora_A")]

    bad = _copy_adapter("bert", tmp_path / "b", edit_tensors=drop_a)
    with pytest.raises(WeightsError, match=r"missing key .*query\.lora_A\.weight"):
        peft_lib.import_peft(bad, base, LoRAConfig(rank=4, alpha=8))

    def wrong_head(t):
        t["base_model.model.classifier.weight"] = np.zeros((5, 32), np.float32)

    bad = _copy_adapter("bert", tmp_path / "c", edit_tensors=wrong_head)
    with pytest.raises(
        WeightsError, match=r"'base_model.model.classifier.weight' expected \(3, 32\)"
    ):
        peft_lib.import_peft(bad, base, LoRAConfig(rank=4, alpha=8))


@pytest.mark.parametrize(
    "field,value", [("use_dora", True), ("use_rslora", True), ("bias", "all"), ("peft_type", "IA3")]
)
def test_unsupported_adapter_options(tmp_path, field, value):
    bad = _copy_adapter("bert", tmp_path / "a", edit_config=lambda c: c.update({field: value}))
    _, base = _base("bert")
    with pytest.raises(WeightsError, match=field):
        peft_lib.import_peft(bad, base)


def test_missing_adapter_folder(tmp_path):
    _, base = _base("bert")
    with pytest.raises(WeightsError, match="adapter_config.json"):
        peft_lib.import_peft(tmp_path, base)


# --------------------------------------------------------------------------- run directories


def _fake_run(tmp_path, *, num_labels=2, train_head=False, save_head=False):
    """A run directory exactly as ffa_jax.run.train leaves it (config.yaml + adapter.safetensors)."""
    from ffa_jax.run import KEY_HEAD, KEY_LORA_A, save_adapter

    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"text": f"t{i}", "label": i % num_labels}) + "\n" for i in range(20))
    )
    cfg = load_config(
        None,
        [
            f"model.name={FIXTURES / 'encoder_tiny_bert'}",
            "model.pooling=cls",
            f"model.train_head={str(train_head).lower()}",
            "lora.rank=4",
            "lora.alpha=8",
            f"data.task={data}",
            "seed=7",
            "name=fake",
            f"output_dir={tmp_path}",
        ],
    )
    run = tmp_path / "fake"
    run.mkdir()
    (run / "config.yaml").write_text(cfg.to_yaml())
    key = jax.random.key(cfg.seed)
    config, base = load_encoder(
        cfg.model.name, num_labels, head_key=jax.random.fold_in(key, KEY_HEAD), pooling="cls"
    )
    params = lora.init(base, cfg.lora, jax.random.fold_in(key, KEY_LORA_A))
    keys = iter(jax.random.split(jax.random.key(5), 8))
    params = jax.tree_util.tree_map(
        lambda x: (
            x.replace(b=0.3 * jax.random.normal(next(keys), x.b.shape)) if lora.is_lora(x) else x
        ),
        params,
        is_leaf=lora.is_lora,
    )
    save_adapter(run / "adapter.safetensors", params, cfg)
    if save_head:
        extra = load_file(run / "adapter.safetensors")
        params["classifier"]["kernel"] = params["classifier"]["kernel"] + 1.0
        extra["classifier/kernel"] = np.asarray(params["classifier"]["kernel"])
        save_file(extra, run / "adapter.safetensors")
    return run, config, params


def test_export_from_run_dir_reproduces_the_seeded_head(tmp_path):
    run, config, params = _fake_run(tmp_path)  # 2 labels: the head is a seeded random init
    res = export_run_peft(run, tmp_path / "out")
    assert res.num_labels == 2 and res.base_model == "encoder_tiny_bert"
    _, base = _base("bert", num_labels=2, key=99)  # a different head init
    back = peft_lib.import_peft(res.out_dir, base)
    np.testing.assert_array_equal(_logits(config, back, "bert"), _logits(config, params, "bert"))
    merged_cfg = json.loads((res.merged_dir / "config.json").read_text())
    assert merged_cfg["id2label"] == {"0": "0", "1": "1"}


def test_run_dir_with_trained_head(tmp_path):
    run, config, params = _fake_run(tmp_path, train_head=True, save_head=True)
    rebuilt = load_run(run)
    np.testing.assert_array_equal(
        _logits(config, rebuilt.params, "bert"), _logits(config, params, "bert")
    )
    run2, _, _ = _fake_run(tmp_path / "b", train_head=True, save_head=False)
    with pytest.raises(WeightsError, match="train_head=true"):
        load_run(run2)


def test_run_dir_errors(tmp_path):
    with pytest.raises(ConfigError, match="config.yaml"):
        export_run_peft(tmp_path, tmp_path / "out")
    run, _, _ = _fake_run(tmp_path)
    t = load_file(run / "adapter.safetensors")
    del t["encoder/layer_0/attention/self/query/kernel/b"]
    save_file(t, run / "adapter.safetensors")
    with pytest.raises(
        WeightsError, match="missing key 'encoder/layer_0/attention/self/query/kernel/b'"
    ):
        load_run(run)
    (run / "adapter.safetensors").unlink()
    with pytest.raises(WeightsError, match="no trained adapter"):
        load_run(run)


def test_cli_export_peft(tmp_path, capsys):
    from ffa_jax.cli import main

    run, config, params = _fake_run(tmp_path)
    assert main(["export-peft", str(run), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "out" / "merged" / "model.safetensors").is_file()
    assert main(["export-peft", str(run), str(tmp_path / "out")]) == 2  # exists: refuse
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export-peft", str(run), str(tmp_path / "out"), "--overwrite", "--no-merged"]) == 0
    assert not (tmp_path / "out" / "merged").exists()


# --------------------------------------------------------------------------- with torch + peft


@pytest.mark.parametrize("family", FAMILIES)
def test_exported_adapter_loads_in_peft(family, tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    src = FIXTURES / f"encoder_tiny_{family}"
    if family == "bert":  # a base checkpoint without BERT's pooler: it is exported too
        stripped = tmp_path / "base"
        stripped.mkdir()
        t = {k: v for k, v in load_file(src / "model.safetensors").items() if "pooler" not in k}
        save_file(t, stripped / "model.safetensors", metadata={"format": "pt"})
        shutil.copy(src / "config.json", stripped / "config.json")
        src = stripped
    config, base = load_encoder(str(src), 3, head_key=jax.random.key(0), pooling="cls")
    params = lora.init(base, LoRAConfig(rank=4, alpha=16), jax.random.key(1))
    keys = iter(jax.random.split(jax.random.key(2), 8))
    params = jax.tree_util.tree_map(
        lambda x: (
            x.replace(b=0.3 * jax.random.normal(next(keys), x.b.shape)) if lora.is_lora(x) else x
        ),
        params,
        is_leaf=lora.is_lora,
    )
    res = peft_lib.export_peft(params, tmp_path / "out", config=config, base_model=src)
    want = _logits(config, params, family)
    ids, mask, types = (torch.from_numpy(np.asarray(x).astype(np.int64)) for x in _inputs(family))

    def torch_logits(model):
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits.numpy()

    assert res.base_model == src.name  # portable: the folder's name, not its path
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        src, num_labels=3, attn_implementation="eager"
    )
    model = peft.PeftModel.from_pretrained(hf, res.out_dir).eval()
    assert np.max(np.abs(torch_logits(model) - want)) < 1e-4
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(
        res.merged_dir, attn_implementation="eager"
    ).eval()
    assert np.max(np.abs(torch_logits(merged) - want)) < 1e-4
