"""The ``clients x model`` mesh: frozen weights sharded over ``model`` give the same DP rounds.

A one-layer BERT encoder (on a 2 x 4 mesh of the 8 simulated CPU devices) and a one-layer
LLaMA (on 1 x 8) run two DP-SGD FedAvg rounds with the same keys as unsharded on one device;
the trainable trees agree to float tolerance, and the frozen leaves really are split over the
model axis. (One mesh per family: each compile of a DP round costs seconds on CI.)
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from ffa_jax import lora
from ffa_jax.config import LoRAConfig, ServerConfig
from ffa_jax.errors import ConfigError
from ffa_jax.federated.client import DpParams, make_client_update
from ffa_jax.federated.round import (
    MODEL_AXIS,
    RoundInputs,
    client_mesh,
    frozen_partition_spec,
    make_round,
    place_frozen,
)
from ffa_jax.federated.server import make_server_optimizer, server_init
from ffa_jax.models.encoder import EncoderClassifier, EncoderConfig
from ffa_jax.models.llama import LlamaConfig, LlamaForCausalLM, causal_lm_loss
from ffa_jax.models.objectives import classification_loss

K, S, B, L = 4, 2, 3, 8
MIN_ELEMENTS = 256  # the tiny models' kernels (32 x 32) count as "large"


def _random_params(shapes):
    # Values do not matter for sharded == unsharded; eval_shape + numpy compiles nothing.
    rng = np.random.default_rng(0)
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype), shapes
    )


@functools.cache  # each model is built once
def _encoder():
    cfg = EncoderConfig(
        family="bert",
        vocab_size=64,
        hidden_size=32,
        num_layers=1,
        num_heads=4,
        intermediate_size=64,
        max_position_embeddings=16,
        type_vocab_size=2,
        layer_norm_eps=1e-12,
        pad_token_id=0,
        num_labels=3,
    )
    module = EncoderClassifier(cfg)
    ids = jnp.ones((1, L), jnp.int32)
    params = _random_params(jax.eval_shape(module.init, jax.random.key(0), ids, ids)["params"])
    rng = np.random.default_rng(0)
    batches = {
        "input_ids": rng.integers(1, 64, (K, S, B, L)).astype(np.int32),
        "attention_mask": np.ones((K, S, B, L), np.int32),
        "label": rng.integers(0, 3, (K, S, B)).astype(np.int32),
    }
    return params, classification_loss(module), batches, ".*(query|value)/kernel"


@functools.cache
def _llama():
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        tie_word_embeddings=True,
    )
    ids = jnp.ones((1, L), jnp.int32)
    shapes = jax.eval_shape(LlamaForCausalLM(cfg).init, jax.random.key(0), ids, ids)
    params = _random_params(shapes["params"])
    rng = np.random.default_rng(1)
    batches = {
        "input_ids": rng.integers(1, 64, (K, S, B, L)).astype(np.int32),
        "attention_mask": np.ones((K, S, B, L), np.int32),
        "loss_mask": np.tile((np.arange(L) >= L // 2).astype(np.int32), (K, S, B, 1)),
    }
    return params, causal_lm_loss(LlamaForCausalLM(cfg)), batches, ".*(q_proj|v_proj)/kernel"


def _two_rounds(family, mesh):
    params, loss_fn, batches, targets = {"encoder": _encoder, "llama": _llama}[family]()
    batches = dict(batches)
    batches["mask"] = np.random.default_rng(2).random((K, S, B)) < 0.8
    lp = lora.init(params, LoRAConfig(mode="ffa", rank=4, targets=targets), jax.random.key(1))
    trainable, frozen = lora.split(lp, lora.trainable_mask(lp, "ffa"))
    if mesh is not None:
        frozen = place_frozen(frozen, mesh, MIN_ELEMENTS)
    cu = make_client_update(loss_fn, optax.sgd(0.5), private=True)
    opt = make_server_optimizer(ServerConfig())
    round_fn = make_round(cu, opt, mesh=mesh, min_sharded_elements=MIN_ELEMENTS)
    dp = DpParams(jnp.full((K,), 0.5), jnp.full((K,), 0.8), jnp.full((K,), float(B)))
    state = server_init(trainable, opt)
    for _ in range(2):
        state, m = round_fn(
            state, frozen, RoundInputs(batches, jnp.ones(K), jnp.arange(K), dp), jax.random.key(7)
        )
    return jax.device_get(state.trainable), frozen, float(m.loss)


def _check_sharded(frozen, model_size):
    # The big frozen leaves live in pieces: each device holds 1/model_devices of them.
    sharded = [x for x in jax.tree_util.tree_leaves(frozen) if MODEL_AXIS in x.sharding.spec]
    assert len(sharded) >= 5  # the embedding and the layer's kernels
    for x in sharded:
        piece = x.addressable_shards[0].data.shape
        assert np.prod(piece) * model_size == x.size, (x.shape, piece)
    held = sum(x.addressable_shards[0].data.nbytes for x in jax.tree_util.tree_leaves(frozen))
    assert held < 0.5 * lora.tree_bytes(frozen)


def test_model_sharded_dp_rounds_equal_unsharded():
    """Two DP rounds of a BERT on a 2 x 4 mesh == on one device (same keys)."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (simulated) devices")
    ref, _, ref_loss = _two_rounds("encoder", None)
    got, frozen, loss = _two_rounds("encoder", client_mesh(2, 4))
    for x, y in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    _check_sharded(frozen, 4)


def test_llama_loss_and_b_gradient_with_weights_sharded_8_ways():
    """A LLaMA's loss and B-gradient with its frozen weights (tied embedding included) split
    over a 1 x 8 mesh == on one device. (A whole DP round of the LLaMA costs ~20 s more of
    compile on CI; the round's sharding logic is the encoder test's.)"""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (simulated) devices")
    params, loss_fn, batches, targets = _llama()
    lp = lora.init(params, LoRAConfig(mode="ffa", rank=4, targets=targets), jax.random.key(1))
    trainable, frozen = lora.split(lp, lora.trainable_mask(lp, "ffa"))
    trainable = jax.tree_util.tree_map(lambda b: b + 0.05, trainable)  # B != 0: A matters
    examples = jax.tree_util.tree_map(lambda x: x[:, 0].reshape((-1,) + x.shape[3:]), batches)

    @jax.jit
    def mean_loss_and_grad(trainable, frozen):
        def f(t):
            return jnp.mean(jax.vmap(loss_fn, in_axes=(None, None, 0))(t, frozen, examples))

        return jax.value_and_grad(f)(trainable)

    want = mean_loss_and_grad(trainable, frozen)
    sharded = place_frozen(frozen, client_mesh(1, 8), MIN_ELEMENTS)
    _check_sharded(sharded, 8)
    got = mean_loss_and_grad(trainable, sharded)
    for x, y in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_partition_rule():
    assert frozen_partition_spec((1002, 32), 4, 256) == P(None, MODEL_AXIS)  # 1002 % 4 != 0
    assert frozen_partition_spec((1024, 32), 4, 256) == P(MODEL_AXIS)  # the largest dim
    assert frozen_partition_spec((64, 64), 4, 256) == P(MODEL_AXIS)  # ties: the first
    assert frozen_partition_spec((32,), 4, 256) == P()  # small: replicated
    assert frozen_partition_spec((999, 33), 4, 256) == P()  # nothing divisible
    assert frozen_partition_spec((1024, 32), 1, 256) == P()  # no model axis


def test_mesh_larger_than_the_devices_is_a_config_error():
    n = len(jax.devices())
    with pytest.raises(ConfigError, match="perf.model_devices"):
        client_mesh(2, n)
    assert client_mesh(None, 2).devices.shape == (n // 2, 2)
