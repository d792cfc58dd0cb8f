"""The public API: ``import ffa_jax`` lists it, ``finetune`` runs a config,
``finetune_model`` runs private federated rounds on a stock Flax model and numpy arrays."""

from __future__ import annotations

import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
import yaml

import ffa_jax
from ffa_jax import lora
from ffa_jax.errors import ConfigError, DataError
from tests._tiny import TINY, tiny_model_dir


def test_import_lists_the_api_without_importing_jax():
    code = (
        "import sys, ffa_jax; print(ffa_jax.__all__); "
        "assert 'jax' not in sys.modules, 'import ffa_jax imported jax'"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    for name in ("finetune", "finetune_model", "load_config", "lora", "privacy", "federated"):
        assert repr(name) in out.stdout
    for mod in ("lora", "privacy", "federated", "models", "data"):
        sub = getattr(ffa_jax, mod)
        assert sub.__all__ and all(hasattr(sub, n) for n in sub.__all__), mod


def test_make_config_sections_and_errors(tmp_path):
    cfg = ffa_jax.make_config("configs/quickstart.yaml", federated={"rounds": 1}, seed=3)
    assert cfg.federated.rounds == 1 and cfg.seed == 3
    assert cfg.lora == ffa_jax.load_config("configs/quickstart.yaml").lora
    assert ffa_jax.make_config({"lora": {"rank": 2}}, lora={"alpha": 4.0}).lora.scale == 2.0
    with pytest.raises(ConfigError, match="lora.rnak"):
        ffa_jax.make_config(lora={"rnak": 2})
    with pytest.raises(ConfigError, match="federated.rounds"):
        ffa_jax.make_config(federated={"rounds": 0})


def test_finetune_runs_a_config_and_returns_the_run(tmp_path):
    model = tiny_model_dir(tmp_path / "model")
    sections = {}
    for text in TINY:
        key, value = text.split("=", 1)
        sec, field = key.split(".")
        sections.setdefault(sec, {})[field] = yaml.safe_load(value)
    sections["federated"]["rounds"] = 1
    sections["model"]["name"] = str(model)
    run = ffa_jax.finetune(None, output_dir=str(tmp_path / "runs"), name="api", **sections)
    assert run.run_dir == tmp_path / "runs" / "api"
    assert [m["round"] for m in run.metrics] == [1]
    assert run.metrics[0]["epsilon"] == pytest.approx(run.config.privacy.epsilon, rel=0.01)
    assert run.adapter_path.is_file()
    b = {k: v for k, v in run.adapter.items() if k.endswith("/b")}
    assert b and all(v.shape[0] == run.config.lora.rank for v in b.values())
    assert any(np.any(v) for v in b.values())  # B moved from zero


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2, name="head")(nn.relu(nn.Dense(16, name="hidden")(x)))


def _data(n=240):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    return {"x": x, "y": (x[:, 0] > 0).astype(np.int32)}


def _loss(logits, ex):
    return optax.softmax_cross_entropy_with_integer_labels(logits, ex["y"])


def test_finetune_model_private_ffa_rounds_on_a_stock_model():
    data = _data()
    model = MLP()
    params = model.init(jax.random.key(0), data["x"][:1])["params"]
    run = ffa_jax.finetune_model(
        model,
        params,
        data,
        _loss,
        lora={"rank": 2, "targets": "hidden/kernel"},
        federated={"clients": 3, "rounds": 2, "local_steps": 2},
        client={"batch_size": 16, "learning_rate": 1.0},
        privacy={"epsilon": 2.0, "clip_norm": 1.0},
        secret_seed=5,
    )
    assert [m["round"] for m in run.metrics] == [1, 2]
    assert run.metrics[-1]["epsilon"] == pytest.approx(2.0, rel=0.01)
    assert run.metrics[0]["epsilon"] < run.metrics[1]["epsilon"]
    assert np.all(run.noise_multipliers > 0)
    node = run.params["hidden"]["kernel"]
    start = lora.attach(
        model, params, run.config.lora, jax.random.fold_in(jax.random.key(0), 1), data["x"][:1]
    )["hidden"]["kernel"]
    np.testing.assert_array_equal(node.a, start.a)  # FFA: A never moves
    np.testing.assert_array_equal(node.w0, params["hidden"]["kernel"])
    assert np.any(np.asarray(node.b))
    # uplink = B of 3 clients: 3 x r x d_out x 4 bytes
    assert run.metrics[0]["uplink_bytes"] == 3 * 2 * 16 * 4
    assert run.apply(run.params, data["x"][:4]).shape == (4, 2)


def test_finetune_model_bad_input_is_refused_before_compute():
    data = _data()
    model = MLP()
    params = model.init(jax.random.key(0), data["x"][:1])["params"]
    with pytest.raises(ConfigError, match="privacy.unit"):
        ffa_jax.finetune_model(model, params, data, _loss, privacy={"unit": "client"})
    with pytest.raises(DataError, match="leading sizes"):
        ffa_jax.finetune_model(model, params, {"x": data["x"], "y": data["y"][:5]}, _loss)
    with pytest.raises(ConfigError, match="lora.targets"):
        ffa_jax.finetune_model(model, params, data, _loss)  # default targets: query/value
