"""Config: YAML loading, CLI overrides, validation messages that name the field."""

import math

import pytest

from ffa_jax.config import RunConfig, load_config, replace
from ffa_jax.errors import ConfigError


def test_defaults_are_the_quickstart_and_round_trip(tmp_path):
    cfg = RunConfig()
    assert cfg.lora.mode == "ffa" and cfg.lora.rank == 8 and cfg.lora.alpha == 8
    assert cfg.privacy.epsilon == 6 and cfg.privacy.delta == 1e-5
    assert cfg.federated.clients == 3 and cfg.data.partition == "label_mix"
    p = tmp_path / "c.yaml"
    p.write_text(cfg.to_yaml())
    assert load_config(p) == cfg


def test_overrides_public_names(tmp_path):
    cfg = load_config(
        None,
        [
            "lora.mode=lora",
            "lora.rank=16",
            "lora.alpha=32",
            "privacy.epsilon=inf",
            "privacy.delta=1e-6",
            "privacy.clip_norm=0.5",
            "federated.clients=6",
            "federated.rounds=2",
            "federated.local_steps=3",
            "data.partition=dirichlet",
            "seed=7",
        ],
    )
    assert cfg.lora.mode == "lora" and cfg.lora.rank == 16 and cfg.lora.alpha == 32.0
    assert math.isinf(cfg.privacy.epsilon) and not cfg.privacy.enabled
    assert cfg.privacy.delta == 1e-6 and cfg.privacy.clip_norm == 0.5
    assert (cfg.federated.clients, cfg.federated.rounds, cfg.federated.local_steps) == (6, 2, 3)
    assert cfg.data.partition == "dirichlet" and cfg.seed == 7
    assert replace(cfg, ["lora.rank=4"]).lora.rank == 4
    # epsilon inf survives a YAML round trip
    p = tmp_path / "c.yaml"
    p.write_text(cfg.to_yaml())
    assert math.isinf(load_config(p).privacy.epsilon)


@pytest.mark.parametrize(
    "override, field",
    [
        ("lora.rnk=4", "lora.rnk"),
        ("nosuch.x=1", "nosuch"),
        ("lora.rank=0", "lora.rank"),
        ("lora.rank=2.5", "lora.rank"),
        ("lora.mode=full", "lora.mode"),
        ("lora.alpha=-1", "lora.alpha"),
        ("privacy.epsilon=0", "privacy.epsilon"),
        ("privacy.epsilon=-3", "privacy.epsilon"),
        ("privacy.delta=0", "privacy.delta"),
        ("privacy.delta=1.5", "privacy.delta"),
        ("privacy.clip_norm=0", "privacy.clip_norm"),
        ("privacy.accountant=gdp", "privacy.accountant"),
        ("federated.clients=0", "federated.clients"),
        ("federated.clients=4", "federated.clients"),  # not a multiple of the 3 label_mix rows
        ("data.partition=shards", "data.partition"),
        ("data.label_mix=[[0.5,0.6],[0.9,0.1],[0.5,0.5]]", "data.label_mix[0]"),
        ("data.dirichlet_alpha=0", "data.dirichlet_alpha"),
        ("client.learning_rate=0", "client.learning_rate"),
        ("server.optimizer=adagrad", "server.optimizer"),
        ("model.train_head=maybe", "model.train_head"),
        ("model.dtype=float16", "model.dtype"),
        ("perf.model_devices=0", "perf.model_devices"),
        ("name=a/b", "name"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert field in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config(None, ["lora.rank"])


def test_quickstart_yaml_equals_the_defaults():
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"
    assert load_config(path) == RunConfig()
