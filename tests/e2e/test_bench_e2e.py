"""``ffa-jax bench --quickstart`` / ``--config``: the report and ratio logic (no torch), the
subprocess measurement, and a tiny config through the whole path (torch extra). No timing is
asserted."""

from __future__ import annotations

import json
import sys

import pytest

from ffa_jax import cli
from ffa_jax.bench import e2e
from ffa_jax.bench.torch_ref import torch_available
from ffa_jax.config import load_config
from ffa_jax.errors import ConfigError
from tests._tiny import TINY, tiny_model_dir


def _rows(seconds, evals):
    return [
        {"round": i + 1, "seconds": s, **({"eval_accuracy": 0.5 + i / 100} if i in evals else {})}
        for i, s in enumerate(seconds)
    ]


def _run(wall, rss, rows, rc=0, **extra):
    return {
        "wall_s": wall,
        "cpu_s": wall / 2,
        "peak_rss_mb": rss,
        "returncode": rc,
        "loadavg_start": [1.0, 1.0, 1.0],
        "loadavg_end": [2.0, 1.0, 1.0],
        **e2e.round_summary(rows),
        **extra,
    }


def test_round_summary_leaves_out_the_first_and_eval_rounds():
    rows = [{"round": 0, "seconds": 9.0, "eval_accuracy": 0.1}] + _rows(
        [10.0, 2.0, 4.0, 3.0, 8.0], evals={4}
    )
    s = e2e.round_summary(rows)
    assert s["first_round_s"] == 10.0  # round 1 (compilation), not the baseline eval
    assert s["round_s"] == 3.0 and (s["round_min_s"], s["round_max_s"]) == (2.0, 4.0)
    assert s["eval_round_s"] == 8.0
    assert s["accuracy"] == pytest.approx(0.54) and s["rounds"] == 5


def test_summarize_ratios_are_ffa_over_reference_and_skip_failed_runs():
    ffa = [
        _run(100.0, 1000.0, _rows([5.0, 2.0, 2.0], {2})),
        _run(80.0, 900.0, _rows([3.0, 1.0, 1.0], {2})),
        _run(1.0, 1.0, [], rc=1),  # failed: left out of the medians
    ]
    ref = [_run(200.0, 2000.0, _rows([4.0, 4.0, 4.0], {2})) for _ in range(2)]
    s = e2e.summarize(ffa, ref)
    assert s["ffa_jax"]["wall_s"] == 90.0 and s["reference"]["wall_s"] == 200.0
    assert s["ratio"]["wall_s"] == pytest.approx(0.45)
    assert s["ratio"]["peak_rss_mb"] == pytest.approx(950 / 2000)
    assert s["ratio"]["round_s"] == pytest.approx(1.5 / 4.0)
    assert [p["wall_s"] for p in s["pair_ratios"]] == pytest.approx([0.5, 0.4])
    assert s["failed_runs"] == 1
    alone = e2e.summarize(ffa[:1], [])
    assert alone["reference"] is None and alone["ratio"] is None


def test_markdown_report_names_load_ratios_and_runs(tmp_path):
    ffa = [_run(100.0, 1000.0, _rows([5.0, 2.0, 2.0], {2}), compilation_cache="cold")]
    ref = [_run(200.0, 2000.0, _rows([4.0, 4.0, 4.0], {2}), noise_multipliers=[0.7, 0.8])]
    report = {
        "config": "configs/quickstart.yaml",
        "config_name": "quickstart",
        "overrides": [],
        "pairs": 1,
        "prepare_s": 1.0,
        "machine": {
            "platform": "linux",
            "usable_cores": 2,
            "jax": "0",
            "backend": "cpu",
            "allocator": "system",
            "loadavg_1min_range": [1.0, 2.0],
        },
        "ffa_jax_runs": ffa,
        "reference_runs": ref,
        "command": "ffa-jax bench --quickstart",
        "commit": "abc",
        **e2e.summarize(ffa, ref),
    }
    md = e2e.to_markdown(report)
    assert "load average 1.0-2.0" in md and "`ffa-jax bench --quickstart`" in md
    assert "| whole-run wall s | 100.00 | 200.00 | **0.50x** |" in md
    assert "sigma 0.700/0.800" in md and "| ffa_jax 1 |" in md and "| reference 1 |" in md
    j, m = e2e.write_report(report, tmp_path)
    assert j.name == "e2e_quickstart.json" and m.read_text() == md
    assert json.loads(j.read_text())["ratio"]["wall_s"] == pytest.approx(0.5)


def test_reference_settings_mirror_the_config():
    assert e2e.target_modules(".*(query|value|q_proj|v_proj)/kernel") == ["query", "value"]
    with pytest.raises(ConfigError, match="lora.targets"):
        e2e.target_modules(".*gate_proj/kernel")
    cfg = load_config(None, ["federated.rounds=7", "eval.every=3"])
    assert e2e.eval_after_rounds(cfg) == [3, 6, 7]
    e2e.check_reference_config(cfg)
    bad = load_config(None, ["federated.clients_per_round=2"])
    with pytest.raises(ConfigError, match="federated.clients_per_round"):
        e2e.check_reference_config(bad)
    with pytest.raises(ConfigError, match="--pairs"):
        e2e.E2ESpec(config=None, pairs=0)


def test_measure_reports_the_child_tree_peak_rss(tmp_path):
    # 200 MB touched in a grandchild: the tree's sampled peak sees it; a plain child's
    # ru_maxrss would not.
    code = (
        "import subprocess, sys; subprocess.run([sys.executable, '-c', "
        "'import time; b = bytearray(200 * 2**20); time.sleep(0.5)'], check=True)"
    )
    m = e2e.measure([sys.executable, "-c", code], env={}, log_path=tmp_path / "log")
    assert m["returncode"] == 0 and m["wall_s"] > 0.5
    assert m["peak_rss_mb"] > 150
    failed = e2e.measure(
        [sys.executable, "-c", "raise SystemExit(3)"], env={}, log_path=tmp_path / "l2"
    )
    assert failed["returncode"] == 3


@pytest.mark.slow
@pytest.mark.skipif(not torch_available(), reason="needs the torch extra (torch, peft, opacus)")
def test_bench_config_runs_both_sides_of_a_tiny_config(tmp_path, capsys):
    model = tiny_model_dir(tmp_path / "model")
    sets = [a for o in [f"model.name={model}", *TINY, "federated.rounds=2"] for a in ("--set", o)]
    argv = ["bench", "--config", "configs/quickstart.yaml", *sets, "--pairs", "1"]
    argv += ["--workdir", str(tmp_path / "wd"), "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 0
    report = json.loads((tmp_path / "out" / "e2e_quickstart.json").read_text())
    (f,), (r,) = report["ffa_jax_runs"], report["reference_runs"]
    assert f["returncode"] == 0 and r["returncode"] == 0
    assert f["rounds"] == r["rounds"] == 2 and f["epsilon"] == pytest.approx(6.0, abs=1e-3)
    assert 0 <= f["accuracy"] <= 1 and 0 <= r["accuracy"] <= 1
    assert len(r["noise_multipliers"]) == 3 and all(s > 0 for s in r["noise_multipliers"])
    assert report["ratio"]["wall_s"] > 0 and report["ratio"]["peak_rss_mb"] > 0
    assert "ffa_jax / reference" in capsys.readouterr().out
