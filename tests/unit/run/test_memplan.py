"""``ffa-jax plan``: per-device memory of a config's round from XLA's compiled memory analysis
at abstract shapes (no weights), and the paper configs fit one 32 GiB chip per replica."""

from __future__ import annotations

import json

import pytest

from ffa_jax import cli
from ffa_jax.config import load_config
from ffa_jax.errors import ConfigError
from ffa_jax.run import memplan

GIB = 2**30
PAPER_CONFIGS = [
    "configs/glue/mnli.yaml",
    "configs/glue/qnli.yaml",
    "configs/glue/qqp.yaml",
    "configs/glue/snli.yaml",
    "configs/glue/sst2.yaml",
    "configs/gsm8k_llama7b.yaml",
    "configs/food101_vit.yaml",
]


def test_parse_memory_units():
    assert memplan.parse_memory("32GiB") == 32 * GIB
    assert memplan.parse_memory("16 GB") == 16 * 10**9
    assert memplan.parse_memory("512MiB") == 512 * 2**20
    assert memplan.parse_memory("1024") == 1024
    for bad in ("32 parsecs", "-1GiB", "0GiB", ""):
        with pytest.raises(ConfigError, match="--device-memory"):
            memplan.parse_memory(bad)


def test_clients_axis_follows_choose_devices_rule():
    assert memplan.clients_devices(chunk=3, devices=4) == 3
    assert memplan.clients_devices(chunk=1, devices=8) == 1
    assert memplan.clients_devices(chunk=10, devices=4) == 2  # divisors of the chunk only
    assert memplan.clients_devices(chunk=8, devices=8, requested=4) == 4


def test_paper_models_are_known_offline_and_unknown_ones_are_named():
    for path in PAPER_CONFIGS:
        cfg = load_config(path)
        assert memplan.hf_config(cfg)["num_hidden_layers"] > 0
    assert memplan.num_labels(load_config("configs/glue/mnli.yaml")) == 3
    assert memplan.num_labels(load_config("configs/food101_vit.yaml")) == 101
    with pytest.raises(ConfigError, match="model.name='someone/unknown-model'"):
        memplan.hf_config(load_config(None, ["model.name=someone/unknown-model"]))


@pytest.mark.slow
def test_quickstart_plan_cli_and_extrapolation_bounds_the_exact_compile(capsys):
    # 1- and 2-layer compiles extrapolated to MiniLM's 6 layers vs the 6-layer compile.
    cfg = load_config("configs/quickstart.yaml")
    est = memplan.plan_memory(cfg, device_memory=32 * GIB, devices=4)
    exact = memplan.plan_memory(cfg, device_memory=32 * GIB, devices=4, exact=True)
    assert est.fits and exact.fits and est.clients_axis_devices == 3
    assert est.frozen_bytes == exact.frozen_bytes  # weights are exactly linear in depth
    assert exact.xla["total"] <= est.xla["total"] <= 1.5 * exact.xla["total"]
    assert cli.main(["plan", "--device-memory", "1MiB", "--json"]) == 1  # does not fit
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is False and out["xla"]["total"] > 2**20


@pytest.mark.slow
@pytest.mark.parametrize("path", PAPER_CONFIGS)
def test_paper_config_fits_one_32gib_chip_per_replica(path):
    """On a 4-chip host (TPU v4-8: 4 chips of 32 GiB; perf auto resolves for the
    accelerator), each chip's share of the round fits with the config's perf settings."""
    cfg = load_config(path)
    plan = memplan.plan_memory(cfg, device_memory=32 * GIB, devices=4, backend="tpu")
    assert plan.fits, memplan.describe(plan)
