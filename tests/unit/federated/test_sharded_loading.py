"""``perf.model_devices > 1``: the frozen weights go from host memory straight to their shards.

A tiny LLaMA on GSM (``tests/_tiny.py``) through ``prepare`` + ``build_round`` + one DP round +
evaluation with ``perf.model_devices=2`` on the 8 simulated CPU devices (the sharding threshold
lowered so that its embedding and most kernels count as large): until ``build_round`` the
frozen leaves are host numpy arrays, and at no point does a live ``jax.Array`` hold a whole
large frozen leaf on one device (``jax.live_arrays()``), neither the loaded tree, nor the
workload's ``base_params``, nor the LoRA-merged tree of the evaluation. The trained B, the
round's loss and the evaluation equal the ``perf.model_devices=1`` run's.
"""

from __future__ import annotations

import gc
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ffa_jax import lora
from ffa_jax import run as train_lib
from ffa_jax.config import load_config
from ffa_jax.federated import round as round_lib
from ffa_jax.federated.server import server_init
from ffa_jax.models.llama_weights import load_llama
from tests._tiny import tiny_gsm_jsonl, tiny_gsm_overrides, tiny_llama_dir

GSM_CONFIG = Path(__file__).resolve().parents[3] / "configs" / "gsm_smollm2.yaml"
# The tiny LLaMA's embedding (264 x 32) and its 32 x 32, 32 x 64, 64 x 32 kernels count as
# large; the 32 x 16 key/value kernels and the norms stay replicated.
MIN_ELEMENTS = 1000
FAST = (
    "federated.rounds=1",
    "federated.local_steps=1",
    "privacy.noise_multiplier=1.0",  # fixed sigma: no calibration
    "privacy.accountant=rdp",
    "eval.max_examples=2",
    "eval.batch_size=2",
    "eval.max_new_tokens=4",
)


def _whole_on_one_device(shapes: set, known_ids: set) -> list:
    """Live arrays (not in ``known_ids``) of one of ``shapes`` whose every device holds the
    whole array: a single-device array, or a replicated one. A single-device array that is a
    view of one shard of a sharded array (``x.addressable_shards[i].data``, e.g. a 32 x 32
    shard of a 32 x 64 kernel) is not a copy and does not count."""
    gc.collect()
    live = [x for x in jax.live_arrays() if id(x) not in known_ids]
    shard_buffers = {
        s.data.unsafe_buffer_pointer()
        for x in live
        if len(x.sharding.device_set) > 1
        for s in x.addressable_shards
    }
    return [
        (x.shape, str(x.dtype), str(x.sharding))
        for x in live
        if tuple(x.shape) in shapes
        and x.sharding.shard_shape(x.shape) == tuple(x.shape)
        and not (len(x.sharding.device_set) == 1 and x.unsafe_buffer_pointer() in shard_buffers)
    ]


def _round_and_eval(prep):
    round_fn, opt = train_lib.build_round(prep)
    state = jax.device_get(server_init(prep.trainable, opt))
    inp = train_lib.round_inputs(prep, 0)
    new, m = train_lib.run_round(round_fn, prep, state, inp, train_lib.train_key(prep))
    state = jax.device_get(new)
    ev = train_lib.evaluate(prep, lora.combine(state.trainable, prep.frozen))
    return state.trainable, float(m.loss), ev


def test_frozen_weights_never_whole_on_a_device_and_results_equal_one_device(tmp_path, monkeypatch):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (simulated) devices")
    monkeypatch.setattr(round_lib, "MIN_SHARDED_ELEMENTS", MIN_ELEMENTS)
    model = tiny_llama_dir(tmp_path / "tiny_llama")
    data = tiny_gsm_jsonl(tmp_path / "gsm.jsonl")

    def cfg(model_devices):
        sets = tiny_gsm_overrides(model, data, tmp_path, f"md{model_devices}", *FAST)
        return load_config(GSM_CONFIG, [*sets, f"perf.model_devices={model_devices}"])

    before = jax.live_arrays()  # other tests' arrays (kept alive: their ids stay theirs)
    known = {id(x) for x in before}

    prep = train_lib.prepare(cfg(2), log=lambda *a: None)
    # Host memory until placed: the loaded tree and the LoRA nodes' w0 (the same arrays).
    base = jax.tree_util.tree_leaves(prep.workload.base_params)
    assert all(isinstance(x, np.ndarray) for x in base)
    nodes = lora.lora_nodes(prep.frozen).values()
    assert nodes and all(isinstance(n.w0, np.ndarray) for n in nodes)
    large = {
        tuple(x.shape)
        for x in base
        if round_lib.MODEL_AXIS in round_lib.frozen_partition_spec(x.shape, 2, MIN_ELEMENTS)
    }
    assert (264, 32) in large and (32, 32) in large and (32, 64) in large

    found = {"prepare": _whole_on_one_device(large, known)}
    trainable, loss, ev = _round_and_eval(prep)
    sharded = [
        x for x in jax.tree_util.tree_leaves(prep.frozen) if round_lib.MODEL_AXIS in x.sharding.spec
    ]
    assert {tuple(x.shape) for x in sharded} == large
    for x in sharded:
        assert 2 * np.prod(x.addressable_shards[0].data.shape) == x.size
    found["round + evaluation"] = _whole_on_one_device(large, known)
    # What the evaluation decodes with: merged LoRA kernels, sharded as their w0.
    merged = lora.merge_sharded(lora.combine(trainable, prep.frozen))
    found["merged tree"] = _whole_on_one_device(large, known)
    assert found == {k: [] for k in found}, found
    del merged, prep, sharded, base, nodes
    gc.collect()

    ref_prep = train_lib.prepare(cfg(1), log=lambda *a: None)
    assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(ref_prep.frozen))
    ref_trainable, ref_loss, ref_ev = _round_and_eval(ref_prep)
    for x, y in zip(
        jax.tree_util.tree_leaves(trainable), jax.tree_util.tree_leaves(ref_trainable), strict=True
    ):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert {k: v for k, v in ev.items() if k != "eval_samples"} == {
        k: v for k, v in ref_ev.items() if k != "eval_samples"
    }
    assert [s["generation"] for s in ev["eval_samples"]] == [
        s["generation"] for s in ref_ev["eval_samples"]
    ]
    del before


def test_host_loading_equals_device_loading_in_bfloat16(tmp_path):
    """``load_llama(host=True)``: C-contiguous numpy leaves (bfloat16 as ml_dtypes), equal bit
    for bit to the device loading; ``place_frozen`` shards them directly."""
    if len(jax.devices()) < 2:
        pytest.skip("needs 2 (simulated) devices")
    model = tiny_llama_dir(tmp_path / "tiny_llama")
    _, host = load_llama(model, dtype=jnp.bfloat16, host=True)
    _, dev = load_llama(model, dtype=jnp.bfloat16)
    for h, d in zip(jax.tree_util.tree_leaves(host), jax.tree_util.tree_leaves(dev), strict=True):
        assert isinstance(h, np.ndarray) and h.flags.c_contiguous
        assert h.dtype == jnp.bfloat16 == d.dtype
        np.testing.assert_array_equal(h.view(np.uint16), np.asarray(d).view(np.uint16))
    placed = round_lib.place_frozen(host, round_lib.client_mesh(1, 2), MIN_ELEMENTS)
    emb = placed["embed_tokens"]["embedding"]
    assert emb.dtype == jnp.bfloat16
    assert emb.addressable_shards[0].data.shape == (132, 32)
    np.testing.assert_array_equal(
        np.asarray(emb).view(np.uint16), host["embed_tokens"]["embedding"].view(np.uint16)
    )
