"""`ffa-jax bench --quick` runs end to end (no timing is asserted)."""

import json
import math

import pytest

from ffa_jax import cli
from ffa_jax.bench import TINY, BenchSpec, run_memory_probes


def test_bench_quick_writes_report(tmp_path, capsys):
    assert cli.main(["bench", "--quick", "--reference", "none", "--out", str(tmp_path)]) == 0
    report = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert report["results"]["round_ffa_dp"]["recompiles_after_first"] == 0
    assert report["ratios"]["uplink_lora_over_ffa"] > 1.0
    assert set(report["ratios"]) >= {"ffa_dp_over_nodp", "round_over_k_sequential_clients"}
    assert "reference" not in report
    assert len(report["machine"]["loadavg_start"]) == 3
    assert report["command"].startswith("ffa-jax bench --quick")
    assert "| ratio | value |" in capsys.readouterr().out


def test_memory_probe_runs_in_a_subprocess():
    spec = BenchSpec(model="tiny", batch_size=2, seq_len=8, local_steps=1, repeats=1)
    (probe,) = run_memory_probes(spec, [(2, 1)])
    assert probe["clients"] == 2 and probe["clients_per_chunk"] == 1
    assert probe["temp_mb"] is None or probe["temp_mb"] >= 0
    # The sampled peak while running can not be below the RSS just before the rounds.
    assert probe["run_extra_mb"] >= 0
    assert probe["max_rss_mb"] >= probe["setup_rss_mb"] > 0


def test_bench_reference_torch_tiny(tmp_path):
    pytest.importorskip("torch", reason="the PyTorch reference needs the optional torch extra")
    pytest.importorskip("peft", reason="the PyTorch reference needs the optional torch extra")
    pytest.importorskip("opacus", reason="the PyTorch reference needs the optional torch extra")
    assert cli.main(["bench", "--quick", "--reference", "torch", "--out", str(tmp_path)]) == 0
    report = json.loads(next(tmp_path.glob("*.json")).read_text())
    ref = report["reference"]
    assert ref["torch_threads"] >= 1
    assert ref["round_ffa_dp"]["clients"] == report["spec"]["clients"]
    for name in ("speedup_vs_torch_client_dp", "speedup_vs_torch_round_dp"):
        assert math.isfinite(report["ratios"][name]) and report["ratios"][name] > 0


def test_reference_client_is_ffa_with_opacus_clipping():
    pytest.importorskip("torch", reason="the PyTorch reference needs the optional torch extra")
    pytest.importorskip("peft", reason="the PyTorch reference needs the optional torch extra")
    pytest.importorskip("opacus", reason="the PyTorch reference needs the optional torch extra")
    import torch

    from ffa_jax.bench_torch import _batches, _DpClient

    clip, lr, steps = 1e-3, 0.1, 2  # C far below the gradient norms: every example is clipped
    client = _DpClient(TINY, 4, 8.0, 16, 4, clip_norm=clip, noise_multiplier=0.0)
    names = [n for n, p in client.model.named_parameters() if p.requires_grad]
    assert names and all(".lora_B." in n for n in names)  # FFA: only B trains
    start = [p.detach().clone() for p in client.params]
    delta = client.update(_batches(steps, 4, 16, TINY["vocab_size"]), start)
    norm = float(torch.sqrt(sum((d.double() ** 2).sum() for d in delta)))
    # Without noise each step moves B by lr * (sum of clipped per-example grads) / B, whose
    # norm is at most lr * C; B moves (the step is real) and no more than that.
    assert 0 < norm <= steps * lr * clip * (1 + 1e-5)
