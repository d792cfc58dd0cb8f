"""perf.cpu_library_fusion: which XLA:CPU kernels the training jits use (speed only)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ffa_jax import lora, xla_options
from ffa_jax.bench import TINY, BenchSpec, random_batches, random_encoder
from ffa_jax.config import LoRAConfig, PerfConfig
from ffa_jax.errors import ConfigError
from ffa_jax.federated.client import DpParams, make_client_update
from ffa_jax.models.objectives import classification_loss

OPTION = "xla_cpu_experimental_ynn_fusion_type"


def test_settings_resolve_per_family():
    assert xla_options.resolve("auto", "encoder") == "off"
    assert xla_options.resolve("auto", "vit") == "off"
    assert xla_options.resolve("auto", "llama") == "dots"
    assert xla_options.resolve("auto", "something-new") == "jax"
    assert xla_options.resolve("dots", "encoder") == "dots"
    assert xla_options.compiler_options("jax", "encoder") is None
    with pytest.raises(ValueError, match="cpu_library_fusion='fast'"):
        xla_options.resolve("fast", "encoder")


def test_config_validates_the_setting():
    assert PerfConfig(cpu_library_fusion="off").cpu_library_fusion == "off"
    with pytest.raises(ConfigError, match="perf.cpu_library_fusion='fast'"):
        PerfConfig(cpu_library_fusion="fast")


def test_user_xla_flags_win(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", f"--{OPTION}=LIBRARY_FUSION_TYPE_DOT")
    assert xla_options.compiler_options("off", "encoder") is None


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the options are XLA:CPU's")
def test_every_setting_compiles_to_the_same_update():
    """Same client update under jax / dots / off: equal to float rounding (other kernels)."""
    if not xla_options._option_supported():
        pytest.skip(f"this jaxlib has no {OPTION}")
    assert xla_options.compiler_options("off", "encoder") == {OPTION: ""}
    spec = BenchSpec(model="tiny", batch_size=4, seq_len=16, local_steps=2)
    module, params = random_encoder(spec)
    lp = lora.init(params, LoRAConfig(mode="ffa", rank=4), jax.random.key(1))
    trainable, frozen = lora.split(lp, lora.trainable_mask(lp, "ffa"))
    one = jax.tree_util.tree_map(lambda x: x[0], random_batches(spec, 1, TINY["vocab_size"]))
    dp = DpParams(jnp.float32(1.0), jnp.float32(1.0), jnp.float32(4))
    update = make_client_update(classification_loss(module), optax.sgd(0.5), private=True)
    outs = {}
    for setting in ("jax", "dots", "off"):
        options = xla_options.compiler_options(setting, "encoder")
        outs[setting] = jax.jit(update, compiler_options=options)(
            trainable, frozen, one, dp, jax.random.key(0)
        )[0]
    for setting in ("dots", "off"):
        for a, b in zip(jax.tree.leaves(outs["jax"]), jax.tree.leaves(outs[setting]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
        assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(outs[setting]))
