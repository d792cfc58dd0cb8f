"""One noise-free DP-SGD client step vs Opacus per-sample clipping (fixture, no torch needed).

``tests/fixtures/opacus_step.npz`` is written by ``experiments/prepare/make_opacus_fixture.py``:
the tiny BERT classifier with PEFT LoRA on query/value (r=4, alpha=8), only lora_B trainable
(FFA-LoRA), one step of Opacus ``make_private(noise_multiplier=0, max_grad_norm=C)`` + SGD on a
batch of 6 sentence pairs. ffa_jax runs the same step through ``make_client_update`` with
``private=True``, noise multiplier 0 and expected batch size 6.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ffa_jax import lora
from ffa_jax.config import LoRAConfig
from ffa_jax.federated.client import DpParams, make_client_update
from ffa_jax.models import EncoderClassifier, load_encoder
from ffa_jax.models.objectives import classification_loss
from ffa_jax.privacy import clipped_grad

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="module")
def setup():
    f = dict(np.load(FIXTURES / "opacus_step.npz"))
    cfg, base = load_encoder(
        str(FIXTURES / "encoder_tiny_bert"), 3, head_key=jax.random.key(0), pooling="cls"
    )
    params = lora.init(base, LoRAConfig(rank=4, alpha=8), jax.random.key(1))

    def from_fixture(path, leaf):
        if not lora.is_lora(leaf):
            return leaf
        parts = lora.path_str(path).split("/")  # encoder/layer_i/attention/self/<proj>/kernel
        k = f"layer{parts[1].removeprefix('layer_')}_{parts[4]}"
        return leaf.replace(a=jnp.asarray(f[f"{k}_A"].T), b=jnp.asarray(f[f"{k}_B_before"].T))

    params = jax.tree_util.tree_map_with_path(from_fixture, params, is_leaf=lora.is_lora)
    trainable, frozen = lora.split(params, lora.trainable_mask(params, "ffa"))
    batch = {
        "input_ids": jnp.asarray(f["input_ids"]),
        "attention_mask": jnp.asarray(f["attention_mask"]),
        "token_type_ids": jnp.asarray(f["token_type_ids"]),
        "label": jnp.asarray(f["labels"]),
    }
    return f, EncoderClassifier(cfg), trainable, frozen, batch


def test_per_example_norms_match_opacus(setup):
    f, module, trainable, frozen, batch = setup
    clip = float(f["clip_norm"])
    fn = jax.jit(clipped_grad(classification_loss(module), clip))
    _, stats = fn(trainable, frozen, batch, jnp.ones(len(f["labels"]), bool))
    np.testing.assert_allclose(np.asarray(stats.grad_norms), f["per_sample_norms"], rtol=1e-5)
    # The fixture's C is the median norm: the step clips some examples and not others.
    assert 0 < float(stats.clipped_fraction) < 1


def test_client_step_matches_opacus(setup):
    f, module, trainable, frozen, batch = setup
    n = len(f["labels"])
    update = make_client_update(
        classification_loss(module), optax.sgd(float(f["learning_rate"])), private=True
    )
    dp = DpParams(
        clip_norm=jnp.float32(f["clip_norm"]),
        noise_multiplier=jnp.float32(0.0),
        expected_batch_size=jnp.float32(n),
    )
    batches = {k: v[None] for k, v in batch.items()} | {"mask": jnp.ones((1, n), bool)}
    delta, _ = jax.jit(update)(trainable, frozen, batches, dp, jax.random.key(0))
    new = jax.tree_util.tree_map(jnp.add, trainable, delta)
    worst, moved = 0.0, 0.0
    for path, node in lora.lora_nodes(new).items():
        parts = path.split("/")
        k = f"layer{parts[1].removeprefix('layer_')}_{parts[4]}"
        want = f[f"{k}_B_after"].T
        worst = max(worst, float(np.max(np.abs(np.asarray(node.b) - want))))
        moved = max(moved, float(np.max(np.abs(want - f[f"{k}_B_before"].T))))
    assert moved > 1e-2  # the step really changes B
    assert worst < 1e-5, f"updated B differs from Opacus by {worst:.2e}"
