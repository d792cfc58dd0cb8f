"""`ffa-jax bench --quick` runs end to end (no timing is asserted)."""

import json

from ffa_jax import cli


def test_bench_quick_writes_report(tmp_path, capsys):
    assert cli.main(["bench", "--quick", "--out", str(tmp_path)]) == 0
    report = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert report["results"]["round_ffa_dp"]["recompiles_after_first"] == 0
    assert report["ratios"]["uplink_lora_over_ffa"] > 1.0
    assert set(report["ratios"]) >= {"ffa_dp_over_nodp", "round_over_k_sequential_clients"}
    assert "| ratio | value |" in capsys.readouterr().out
