"""Vision end to end: ``ffa-jax pretrain`` (central, public digits) -> private federated
fine-tuning of the saved ViT (FFA-LoRA / LoRA under DP) on disjoint digits; bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from ffa_jax import lora
from ffa_jax.cli import main as cli_main
from ffa_jax.config import load_config, load_pretrain_config
from ffa_jax.errors import ConfigError, DataError
from ffa_jax.models.vit_weights import load_vit
from ffa_jax.run import prepare, train
from ffa_jax.run.pretraining import pretrain

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TINY_VIT = [
    "model.hidden_size=16",
    "model.num_layers=1",
    "model.num_heads=2",
    "model.intermediate_size=32",
    "data.max_train_examples=200",
    "optim.epochs=2",
    "optim.batch_size=32",
    "optim.warmup_steps=2",
]
TINY_RUN = [
    "federated.rounds=2",
    "federated.local_steps=2",
    "client.batch_size=16",
    "data.max_train_examples=240",
    "eval.max_examples=64",
    "eval.batch_size=32",
    "eval.every=1",
]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision")
    cfg = load_pretrain_config(
        ROOT / "configs" / "vision_pretrain_mnist.yaml",
        [*TINY_VIT, f"output_dir={root}", "name=pre", f"data.cache_dir={root / 'cache'}"],
    )
    summary = pretrain(cfg, progress=False, log=lambda *a: None)
    return root, summary


def test_pretrain_writes_a_loadable_hf_model(pretrained):
    root, summary = pretrained
    folder = root / "pre"
    assert summary["model_dir"] == str(folder)
    assert summary["classes"] == ["0", "1", "2", "3", "4"]
    assert summary["train_examples"] == 200 and summary["test_examples"] == 500
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    history = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[-1]["test_accuracy"] == summary["test_accuracy"]
    config, params = load_vit(folder, 5, head_key=jax.random.key(0))
    assert (config.image_size, config.patch_size, config.num_channels) == (28, 7, 1)
    hf = json.loads((folder / "config.json").read_text())
    assert hf["id2label"] == {str(i): str(i) for i in range(5)}
    # load_vit kept the pretrained head (5 labels): it is the saved one, not a new init.
    saved = load_file(folder / "model.safetensors")
    np.testing.assert_array_equal(params["classifier"]["kernel"], saved["classifier.weight"].T)


def test_pretrain_refuses_bad_config_before_writing(tmp_path):
    cfg = load_pretrain_config(
        None,
        [
            "data.max_train_examples=20",
            "optim.batch_size=64",
            f"output_dir={tmp_path}",
            f"data.cache_dir={tmp_path / 'cache'}",
        ],
    )
    with pytest.raises(ConfigError, match="optim.batch_size=64 exceeds the 20 training images"):
        pretrain(cfg, progress=False, log=lambda *a: None)
    assert not (tmp_path / cfg.name).exists()
    with pytest.raises(ConfigError, match="model.patch_size"):
        load_pretrain_config(None, ["model.patch_size=5"])


@pytest.mark.parametrize("mode", ["ffa", "lora"])
def test_private_finetune_of_the_pretrained_vit(pretrained, tmp_path, mode):
    root, _ = pretrained
    cfg = load_config(
        ROOT / "configs" / "vision_mnist.yaml",
        [
            *TINY_RUN,
            f"model.name={root / 'pre'}",
            f"output_dir={tmp_path}",
            f"data.cache_dir={root / 'cache'}",
            f"lora.mode={mode}",
            "privacy.epsilon=6",
        ],
    )
    prep = prepare(cfg, log=lambda *a: None)
    assert prep.data.label_names == ("5", "6", "7", "8", "9")
    assert sorted(prep.target_paths) == [
        "encoder/layer_0/attention/attention/query/kernel",
        "encoder/layer_0/attention/attention/value/kernel",
    ]
    # model.train_head: the new 5-way head is trained and uploaded with B (PEFT's
    # modules_to_save=["classifier"]).
    trainable = jax.tree_util.tree_leaves_with_path(prep.trainable)
    assert {"classifier/kernel", "classifier/bias"} <= {lora.path_str(p) for p, _ in trainable}
    start = lora.lora_nodes(prep.params)
    summary = train(cfg, progress=False, log=lambda *a: None)
    assert summary["uplink_bytes_per_client_per_round"] == sum(x.nbytes for _, x in trainable)
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    assert 0.0 <= summary["start_accuracy"] <= 1.0
    assert summary["epsilon"] <= 6.0 + 1e-6
    adapter = load_file(Path(summary["run_dir"]) / "adapter.safetensors")
    for path, node in start.items():
        a, b = adapter[f"{path}/a"], adapter[f"{path}/b"]
        assert np.all(np.asarray(node.b) == 0) and np.any(b != 0)  # B trained
        if mode == "ffa":
            np.testing.assert_array_equal(a, np.asarray(node.a))  # A frozen
        else:
            assert np.any(a != np.asarray(node.a))  # LoRA trains A too
    history = [
        json.loads(line)
        for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    ]
    assert history[0]["round"] == 0 and history[0]["eval_accuracy"] == summary["start_accuracy"]
    assert history[-1]["eval_accuracy"] == summary["test_accuracy"]


def test_finetune_rejects_images_the_model_cannot_take(pretrained, tmp_path):
    root, _ = pretrained
    rgb = tmp_path / "rgb.npz"
    np.savez(rgb, images=np.zeros((40, 28, 28, 3), np.uint8), labels=np.arange(40) % 2)
    overrides = [
        *TINY_RUN,
        f"model.name={root / 'pre'}",
        f"output_dir={tmp_path}",
        "data.cache_dir=null",
        "data.classes=null",
        "data.partition=iid",
        "client.batch_size=4",
        f"data.task={rgb}",
    ]
    with pytest.raises(DataError, match="has 3 channel\\(s\\).*num_channels=1"):
        train(load_config(ROOT / "configs" / "vision_mnist.yaml", overrides), progress=False)
    assert not (tmp_path / "vision_mnist").exists()


def test_pretrain_cli(tmp_path, capsys):
    code = cli_main(
        [
            "pretrain",
            "--config",
            str(ROOT / "configs" / "vision_pretrain_mnist.yaml"),
            *[x for o in TINY_VIT for x in ("--set", o)],
            "--set",
            "optim.epochs=1",
            "--set",
            f"output_dir={tmp_path}",
            "--set",
            f"data.cache_dir={tmp_path / 'cache'}",
            "--no-progress",
        ]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert out["epochs"] == 1 and Path(out["model_dir"], "model.safetensors").is_file()
    assert cli_main(["pretrain", "--set", f"output_dir={tmp_path}", "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_privacy_planner_reads_the_image_task(pretrained, tmp_path, capsys):
    """``ffa-jax privacy`` partitions the image task (labels only) and plans without weights."""
    root, _ = pretrained
    overrides = [
        *TINY_RUN,
        f"model.name={root / 'pre'}",
        f"output_dir={tmp_path}",
        f"data.cache_dir={root / 'cache'}",
        "privacy.epsilon=6",
    ]
    args = ["privacy", "--config", str(ROOT / "configs" / "vision_mnist.yaml"), "--json"]
    for o in overrides:
        args += ["--set", o]
    assert cli_main(args) == 0
    plan = json.loads(capsys.readouterr().out)
    assert abs(plan["epsilon"] - 6.0) < 0.06
    assert not (tmp_path / "vit-mnist").exists()


def test_a_grid_pretrains_its_backbone_once(tmp_path, monkeypatch):
    """A grid's ``pretrain:`` config is trained before the first cell when its model folder
    is missing (recorded in meta.json), and never again; a grid whose cells fine-tune another
    folder is refused before anything runs."""
    import yaml

    from ffa_jax.experiments import grid as grid_lib
    from ffa_jax.experiments.runner import run_experiment
    from tests._tiny import compilation_cache

    monkeypatch.chdir(ROOT)
    pre = yaml.safe_load((ROOT / "configs" / "vision_pretrain_mnist.yaml").read_text())
    for item in [*TINY_VIT, f"output_dir={tmp_path}", "name=pre"]:
        key, value = item.split("=", 1)
        *sections, field = key.split(".")
        node = pre
        for s in sections:
            node = node[s]
        node[field] = yaml.safe_load(value)
    pre["data"]["cache_dir"] = str(tmp_path / "cache")
    pre_path = tmp_path / "pre.yaml"
    pre_path.write_text(yaml.safe_dump(pre))
    grid = {
        "kind": "train",
        "base": str(ROOT / "configs" / "vision_mnist.yaml"),
        "pretrain": str(pre_path),
        "set": [
            *TINY_RUN,
            "federated.rounds=1",
            "eval.every=0",
            "eval.baseline=false",
            "data.validation_fraction=0.2",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"model.name={tmp_path / 'pre'}",
        ],
        "seeds": [0],
        "axes": {"lora.mode": ["ffa"]},
    }
    grid_path = tmp_path / "vision_tiny.yaml"
    grid_path.write_text(yaml.safe_dump(grid))
    out, logs = tmp_path / "out", []
    with compilation_cache(tmp_path / "jax_cache"):
        res = run_experiment(str(grid_path), out=out, scratch=tmp_path / "scratch", log=logs.append)
        assert res["ran"] == 1
        meta = json.loads((out / "meta.json").read_text())
        assert meta["pretrain"]["model_folder"] == str(tmp_path / "pre")
        assert 0.0 <= meta["pretrain"]["summary"]["test_accuracy"] <= 1.0
        assert (tmp_path / "pre" / "config.json").is_file()
        cell = json.loads(next((out / "cells").glob("*.json")).read_text())
        assert cell["status"] == "ok" and 0.0 <= cell["selected_test_accuracy"] <= 1.0
        # Once there, the backbone is not trained again (a second grid over it, another seed).
        logs.clear()
        run_experiment(
            str(grid_path), out=tmp_path / "out2", scratch=tmp_path / "s2", log=logs.append
        )
        assert any("exists: not retrained" in str(line) for line in logs)
    grid["set"][-1] = f"model.name={tmp_path / 'other'}"
    grid_path.write_text(yaml.safe_dump(grid))
    with pytest.raises(ConfigError, match=r"pretrain=.*writes .*pre.*fine-tune .*other"):
        grid_lib.load_grid(grid_path)


def test_the_vision_evidence_grid_validates(monkeypatch):
    from ffa_jax.experiments import grid as grid_lib

    monkeypatch.chdir(ROOT)
    g = grid_lib.load_grid(ROOT / "experiments" / "grids" / "vision_evidence.yaml")
    assert g.evidence and g.select_on == "validation"
    assert g.pretrain == Path("configs/vision_pretrain_mnist.yaml")
    assert len(grid_lib.main_cells(g, None)) == 2 * 4 * 10
    # (FFA-LoRA, LoRA) x (inf, 6: 3 and 1 reuse 6) x 4 learning rates x 4 alphas
    assert len(grid_lib.tune_cells(g)) == 2 * 2 * 4 * 4
