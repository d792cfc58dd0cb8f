"""LLaMA-family decoders trained end to end on GSM through ``ffa-jax train``: a tiny random
LLaMA (HF folder written by the test, byte-level tokenizer) on a tiny local GSM JSONL, DP-SGD +
FedAvg for 2 rounds; FFA keeps A, moves B, reports epsilon and exact match; resume is
bit-identical with the round-0 baseline in the history; bad input fails before compute."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from ffa_jax import checkpoint as ckpt_lib
from ffa_jax import cli, lora, workloads
from ffa_jax import run as train_lib
from ffa_jax.config import load_config
from ffa_jax.errors import ConfigError, DataError, WeightsError
from ffa_jax.models.llama_weights import load_llama
from tests._tiny import (
    compilation_cache,
    tiny_gsm_jsonl,
    tiny_gsm_overrides,
    tiny_llama_dir,
    tree_of_files,
)

ROOT = Path(__file__).resolve().parents[2]
GSM_CONFIG = ROOT / "configs" / "gsm_smollm2.yaml"
LLAMA7B_CONFIG = ROOT / "configs" / "gsm8k_llama7b.yaml"


def _quiet(*a, **k):
    pass


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    with compilation_cache(base / "jax_cache"):
        yield {
            "model": tiny_llama_dir(base / "tiny_llama"),
            "data": tiny_gsm_jsonl(base / "gsm.jsonl"),
            "base": base,
        }


def _cfg(env, out: Path, name: str, *extra: str):
    return load_config(GSM_CONFIG, tiny_gsm_overrides(env["model"], env["data"], out, name, *extra))


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in open(run / "metrics.jsonl")]


@pytest.fixture(scope="module")
def cli_run(env):
    """``ffa-jax train --config configs/gsm_smollm2.yaml`` on the tiny model, 2 DP rounds."""
    out = env["base"] / "runs"
    args = ["train", "--config", str(GSM_CONFIG), "--no-progress"]
    for o in tiny_gsm_overrides(env["model"], env["data"], out, "gsm"):
        args += ["--set", o]
    assert cli.main(args) == 0
    return out / "gsm"


def test_cli_run_trains_b_only_reports_epsilon_and_exact_match(env, cli_run):
    cfg = load_config(cli_run / "config.yaml")
    assert workloads.resolve_family(cfg) == "llama"
    for f in ("metrics.jsonl", "summary.md", "adapter.safetensors", "plots/metrics.png"):
        assert (cli_run / f).is_file(), f
    rows = _metrics(cli_run)
    # The config asks for a baseline: round 0 is the pretrained model, then rounds 1 and 2.
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert "diagnostics" not in rows[0] and "eval_samples" not in rows[0]
    for r in (rows[0], rows[2]):
        assert 0.0 <= r["eval_exact_match"] <= 1.0 and r["eval_examples"] == 4
        assert 0.0 <= r["eval_exact_match_lenient"] <= 1.0
    assert "eval_exact_match" not in rows[1]  # eval.every = 0: only after the last round
    assert 0 < rows[1]["epsilon"] < rows[2]["epsilon"]
    assert rows[2]["epsilon"] == pytest.approx(6.0, rel=0.01)
    d = [r["diagnostics"] for r in rows[1:]]
    assert all(np.isfinite(x["train_loss"]) and x["examples"] > 0 for x in d)

    # FFA: A is bit-identical to the shared-seed init, B moved; only B is uploaded.
    _, base = load_llama(env["model"])
    fresh = lora.lora_nodes(
        lora.init(
            base,
            cfg.lora,
            jax.random.fold_in(train_lib.root_key(cfg), train_lib.KEY_LORA_A),
        )
    )
    assert len(fresh) == 4  # q_proj and v_proj of 2 layers
    saved = load_file(str(cli_run / "adapter.safetensors"))
    for path, node in fresh.items():
        np.testing.assert_array_equal(saved[f"{path}/a"], np.asarray(node.a))
        assert np.abs(saved[f"{path}/b"]).max() > 0
    b_bytes = sum(n.b.size * 4 for n in fresh.values())  # q: [8, 32], v: [8, 16] per layer
    assert rows[1]["uplink_bytes_per_client"] == b_bytes

    summary = (cli_run / "summary.md").read_text()
    assert "exact match" in summary and "->" in summary  # pretrained -> fine-tuned
    assert "## Sample generations" in summary
    assert "pretrained model (round 0)" in summary and "after round 2" in summary
    assert "Ann has" in summary  # the questions are shown


def test_resume_with_baseline_is_bit_identical(env, cli_run, tmp_path):
    # A crash after round 1's checkpoint: round 2's checkpoint and outputs are gone.
    run = tmp_path / "gsm"
    shutil.copytree(cli_run, run)
    shutil.rmtree(run / "checkpoints" / "2")
    for f in ("adapter.safetensors", "summary.md"):
        (run / f).unlink()
    restored = ckpt_lib.read_latest(run / "checkpoints", load_config(run / "config.yaml"))
    assert restored.round == 1 and [h["round"] for h in restored.history] == [0, 1]
    assert cli.main(["train", "--resume", str(run), "--no-progress"]) == 0
    drop = {"seconds"}
    ref, got = _metrics(cli_run), _metrics(run)
    assert [{k: v for k, v in r.items() if k not in drop} for r in got] == [
        {k: v for k, v in r.items() if k not in drop} for r in ref
    ]
    a = load_file(str(cli_run / "adapter.safetensors"))
    b = load_file(str(run / "adapter.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert "pretrained model (round 0)" in (run / "summary.md").read_text()


# --------------------------------------------------------------------------- bad input


def _edit_config(folder: Path, **kw) -> Path:
    hf = json.loads((folder / "config.json").read_text())
    hf.update(kw)
    (folder / "config.json").write_text(json.dumps(hf))
    return folder


def _long_test_prompt(env, tmp_path) -> Path:
    rows = [json.loads(x) for x in env["data"].read_text().splitlines()]
    rows[-1]["question"] = "How many pens? " * 20
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


BAD = {
    "unsupported-architecture-auto": (
        lambda env, tmp: [f"model.name={_copy_model(env, tmp, model_type='gpt2')}"],
        WeightsError,
        ["model_type='gpt2'", "llama"],
    ),
    "unsupported-architecture-llama": (
        lambda env, tmp: [
            f"model.name={_copy_model(env, tmp, model_type='gpt2')}",
            "model.family=llama",
        ],
        WeightsError,
        ["model_type='gpt2'", "not supported"],
    ),
    "vocab-mismatch": (
        lambda env, tmp: [f"model.name={tiny_llama_dir(tmp / 'small_vocab', vocab_size=200)}"],
        WeightsError,
        ["vocab mismatch", "259 tokens", "200 rows"],
    ),
    "test-prompt-longer-than-max-length": (
        lambda env, tmp: [f"data.task={_long_test_prompt(env, tmp)}"],
        DataError,
        ["test prompts", "model.max_length=160", "eval.max_examples"],
    ),
    "no-training-example-fits": (
        lambda env, tmp: ["model.max_length=40"],
        DataError,
        ["max_length=40"],
    ),
    "context-too-long": (
        lambda env, tmp: ["eval.max_new_tokens=400"],
        ConfigError,
        ["eval.max_new_tokens=400", "512 positions"],
    ),
    "label-mix-partition": (
        lambda env, tmp: ["data.partition=label_mix"],
        ConfigError,
        ["data.partition='label_mix'", "iid"],
    ),
    "train-head": (
        lambda env, tmp: ["model.train_head=true"],
        ConfigError,
        ["model.train_head"],
    ),
    "bfloat16-eval": (
        lambda env, tmp: ["eval.dtype=bfloat16"],
        ConfigError,
        ["eval.dtype='bfloat16'", "eval.dtype=model"],
    ),
    "no-test-eval": (
        lambda env, tmp: ["eval.test=false"],
        ConfigError,
        ["eval.test=false", "eval.test=true"],
    ),
    "not-a-gsm-task": (
        lambda env, tmp: ["data.task=spamassassin"],
        DataError,
        ["data.task='spamassassin'", "gsm_symbolic"],
    ),
}


def _copy_model(env, tmp: Path, **edit) -> Path:
    dst = tmp / "model_copy"
    shutil.copytree(env["model"], dst)
    return _edit_config(dst, **edit)


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_fails_before_compute_and_writes_nothing(env, tmp_path, case):
    build, error, needles = BAD[case]
    cfg = _cfg(env, tmp_path, "bad", *build(env, tmp_path))
    with pytest.raises(error) as e:
        train_lib.train(cfg, progress=False, log=_quiet)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))
    assert not (tmp_path / "bad").exists()


def test_bad_input_through_the_cli(env, tmp_path, capsys):
    args = ["train", "--config", str(GSM_CONFIG), "--no-progress"]
    for o in tiny_gsm_overrides(env["model"], env["data"], tmp_path, "bad", "model.dtype=float16"):
        args += ["--set", o]
    assert cli.main(args) == 2
    assert "model.dtype='float16'" in capsys.readouterr().err
    assert tree_of_files(tmp_path / "bad") == {}


# --------------------------------------------------------------------------- configs


def test_family_detection(env, tmp_path):
    def family(name, *extra):
        return workloads.resolve_family(load_config(None, [f"model.name={name}", *extra]))

    assert family("smollm2") == "llama"
    assert family(str(tmp_path / "x.gguf")) == "llama"
    assert family(str(env["model"])) == "llama"
    assert family("minilm") == "encoder"
    assert family("roberta-large") == "encoder"  # hub ids are not looked up
    assert family("meta-llama/Llama-2-7b-hf", "model.family=llama") == "llama"


def test_llama7b_config_validates_offline():
    cfg = load_config(LLAMA7B_CONFIG)
    assert workloads.check(cfg) == "llama"  # no download: a pure config check
    assert (cfg.model.name, cfg.model.dtype, cfg.perf.remat) == (
        "huggyllama/llama-7b",
        "bfloat16",
        True,
    )
    assert (cfg.federated.rounds, cfg.federated.local_steps, cfg.client.batch_size) == (500, 30, 1)
    assert "Wiring notes" not in LLAMA7B_CONFIG.read_text()
    assert "Wiring notes" not in GSM_CONFIG.read_text()
    gsm = load_config(GSM_CONFIG)
    assert workloads.check(gsm) == "llama" and gsm.eval.baseline


def test_encoder_accepts_bfloat16():
    # bfloat16 compute is supported by every family (encoders and ViTs since issue 9).
    assert workloads.check(load_config(None, ["model.dtype=bfloat16"])) == "encoder"


def test_privacy_plan_matches_the_run(env, cli_run, capsys):
    args = ["privacy", "--json", "--config", str(GSM_CONFIG)]
    for o in tiny_gsm_overrides(env["model"], env["data"], env["base"] / "unused", "plan"):
        args += ["--set", o]
    assert cli.main(args) == 0
    plan = json.loads(capsys.readouterr().out)
    cfg = load_config(cli_run / "config.yaml")
    ledger = ckpt_lib.read_latest(cli_run / "checkpoints", cfg).ledger
    assert plan["noise_multiplier"] == pytest.approx(list(ledger.noise_multipliers), rel=1e-12)
    assert plan["epsilon_curve"][-1] == pytest.approx(ledger.epsilon_spent, rel=1e-9)


def test_peft_export_of_a_decoder_run(cli_run, tmp_path):
    """Decoder runs export as PEFT CAUSAL_LM adapters (tests/e2e/test_inference.py loads them in HF
    PEFT and compares the logits)."""
    assert cli.main(["export-peft", str(cli_run), str(tmp_path / "peft")]) == 0
    acfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert acfg["task_type"] == "CAUSAL_LM" and acfg["target_modules"] == ["q_proj", "v_proj"]
