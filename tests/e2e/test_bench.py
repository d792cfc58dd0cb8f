"""`ffa-jax bench --quick` runs end to end (no timing is asserted)."""

import dataclasses
import json
import math
import sys

import pytest

from ffa_jax import allocator, cli
from ffa_jax.bench import (
    TINY,
    BenchSpec,
    chunk_bound,
    library_fusion_ab,
    memory_probe,
    to_markdown,
)
from ffa_jax.bench.core import _fusion_md
from ffa_jax.errors import ConfigError


def test_bench_quick_writes_report(tmp_path, capsys):
    argv = ["bench", "--quick", "--reference", "none", "--out", str(tmp_path)]
    assert cli.main(argv + ["--memory", "2", "--chunks", "1", "--memory-budget-mb", "0"]) == 0
    (path,) = tmp_path.glob("*.json")
    assert path.name == "bench_tiny_b4_l16_r4x16.json"  # the shapes are in the name
    report = json.loads(path.read_text())
    assert report["results"]["round_ffa_dp"]["recompiles_after_first"] == 0
    assert report["ratios"]["uplink_lora_over_ffa"] > 1.0
    assert set(report["ratios"]) >= {"ffa_dp_over_nodp", "round_over_k_sequential_clients"}
    assert "reference" not in report
    assert len(report["machine"]["loadavg_start"]) == 3
    assert report["command"].startswith("ffa-jax bench --quick")
    # Each (K, k) in a fresh subprocess, the single-client baseline of the bound first.
    single, probe = report["memory"]
    assert [(r["clients"], r["clients_per_chunk"]) for r in (single, probe)] == [(1, 1), (2, 1)]
    assert single["ran"] and probe["ran"] and "error" not in probe
    # The sampled peak while running can not be below the RSS just before the rounds.
    assert probe["run_extra_mb"] >= 0
    assert probe["max_rss_mb"] >= probe["setup_rss_mb"] > 0
    if report["results"]["ffa_dp"]["xla"] is not None:
        assert report["ratios"]["ffa_dp_over_nodp_memory"] > 0
        assert single["chunk_bound"]["ratio"] == pytest.approx(1.0)
        assert probe["chunk_bound"]["ratio"] > 0
    # Model FLOP rates everywhere; no MFU on a CPU (its peak is unknown without --peak-tflops).
    for name in ("ffa_nodp", "ffa_dp", "lora_nodp", "lora_dp", "round_ffa_dp"):
        assert report["results"][name]["model_gflop_per_s"] > 0
        assert report["results"][name]["mfu"] is None
    assert report["peak_tflops"]["value"] is None
    out = capsys.readouterr().out
    assert "| ratio | value |" in out and "| K | k | XLA temp MB |" in out
    assert "pass --peak-tflops" in out


def test_model_flops_and_mfu(tmp_path):
    from ffa_jax.bench.spec import model_flops_per_example, peak_tflops

    spec = BenchSpec(model="minilm", seq_len=64, rank=8)
    # MiniLM at 64 tokens: 6 layers x 64 tokens x (2 (4 h^2 + 2 h i) + 4 T h + 8 h r), h 384,
    # i 1536, plus the pooler and head, twice (forward, data gradients), plus B's gradients.
    h, i, t, r = 384, 1536, 64, 8
    forward = 6 * t * (2 * (4 * h * h + 2 * h * i) + 4 * t * h + 8 * h * r) + 2 * (h * h + 2 * h)
    assert model_flops_per_example(spec, "ffa") == 2 * forward + 6 * t * 4 * r * h
    assert model_flops_per_example(spec, "lora") > model_flops_per_example(spec, "ffa")
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4
    assert peak_tflops("cpu", "float32") is None
    argv = ["bench", "--quick", "--reference", "none", "--out", str(tmp_path)]
    assert cli.main([*argv, "--peak-tflops", "0.5"]) == 0
    report = json.loads(next(tmp_path.glob("*.json")).read_text())
    ffa = report["results"]["ffa_dp"]
    assert ffa["mfu"] == pytest.approx(ffa["model_gflop_per_s"] / 500)
    assert report["peak_tflops"] == {
        "value": 0.5,
        "source": "--peak-tflops",
        "device_kind": "cpu",
        "dtype": "float32",
    }


def test_memory_probe_over_budget_is_compiled_not_run():
    spec = BenchSpec(model="tiny", batch_size=2, seq_len=8, local_steps=1, repeats=1)
    probe = memory_probe(spec, 2, 1, budget_mb=1e-9)  # in this process: it only compiles
    if probe["xla"] is None:
        pytest.skip("this backend reports no compiled memory, so there is no budget to exceed")
    assert probe["xla"]["total_mb"] >= probe["xla"]["temp_mb"] > 0
    assert not probe["ran"] and probe["run_peak_rss_mb"] is None and probe["round_s"] is None
    probe["chunk_bound"] = chunk_bound(probe, single_temp_mb=probe["xla"]["temp_mb"])
    assert probe["chunk_bound"]["ratio"] == pytest.approx(1.0)  # k=1: its own single client
    assert "not run (compiled only)" in to_markdown(_report_with_memory([probe]))


def test_memory_settings_pairs_every_k_with_every_chunk():
    assert cli.memory_settings("1,3,10", "1,3,K") == [
        (1, 1),
        (3, 1),
        (3, 3),
        (10, 1),
        (10, 3),
        (10, 10),
    ]
    with pytest.raises(ConfigError, match="--chunks"):
        cli.memory_settings("3", "0")


def _report_with_memory(memory):
    variant = {"compile_s": 0.0, "client_update_s": 1.0, "examples_per_s": 1.0}
    variant.update(uplink_bytes=1, xla=None)
    return {
        "spec": dataclasses.asdict(BenchSpec(model="tiny")),
        "machine": {
            "platform": "p",
            "cpus": 1,
            "usable_cores": 1,
            "jax": "0",
            "backend": "cpu",
            "devices": 1,
            "loadavg_start": [0.0, 0.0, 0.0],
        },
        "peak_rss_mb": 0.0,
        "results": {
            **dict.fromkeys(("ffa_nodp", "ffa_dp", "lora_nodp", "lora_dp"), variant),
            "round_ffa_dp": {
                "clients": 1,
                "clients_per_chunk": 1,
                "compile_s": 0.0,
                "round_s": 1.0,
                "recompiles_after_first": 0,
            },
        },
        "ratios": {},
        "memory": memory,
        "memory_budget_mb": 1e-9,
    }


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

    from ffa_jax.bench.torch_ref import _batches, _DpClient

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


def test_bench_fusion_ab(tmp_path, capsys):
    spec = BenchSpec(model="tiny", batch_size=4, seq_len=16, local_steps=1, repeats=2)
    ab = library_fusion_ab(spec, ["jax", "off"])
    assert list(ab) == ["jax", "off"] and ab["jax"]["relative"] == 1.0
    assert ab["jax"]["compiler_options"] is None
    assert ab["off"]["client_update_s"] > 0
    assert "| off |" in "\n".join(_fusion_md(ab))
    argv = ["bench", "--quick", "--reference", "none", "--out", str(tmp_path)]
    assert cli.main(argv + ["--fusion-ab", "jax,fast"]) == 2  # bad input, before any compute
    assert "--fusion-ab: 'fast' is not one of" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(
    allocator.find_tcmalloc() is None or not sys.platform.startswith("linux"),
    reason="no tcmalloc on this machine (apt-get install libtcmalloc-minimal4)",
)
def test_bench_allocator_ab_runs_each_worker_on_its_allocator():
    from ffa_jax.bench.allocator_ab import allocator_ab
    from ffa_jax.bench.allocator_ab import to_markdown as allocator_md

    spec = BenchSpec(model="tiny", batch_size=4, seq_len=16, local_steps=1, repeats=2)
    ab = allocator_ab(spec)
    assert ab["system"]["allocator"] == "system"
    assert ab["tcmalloc"]["allocator"] == "tcmalloc"
    assert ab["system"]["relative"] == 1.0 and ab["tcmalloc"]["client_update_s"] > 0
    assert ab["tcmalloc"]["minor_faults_per_update"] >= 0
    assert "| tcmalloc (tcmalloc) |" in "\n".join(allocator_md(ab))


def test_bench_allocator_ab_without_tcmalloc_is_bad_input(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
    argv = ["bench", "--quick", "--reference", "none", "--out", str(tmp_path), "--allocator-ab"]
    assert cli.main(argv) == 2  # before any compute
    assert "libtcmalloc-minimal4" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
