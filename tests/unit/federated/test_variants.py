"""The federated LoRA variants (lora.mode, ffa_jax.federated.modes): each mode's defining
invariant, exact uplink/downlink bytes against the analytic count, refusals by name."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ffa_jax import lora
from ffa_jax.config import LoRAConfig, ServerConfig
from ffa_jax.errors import ConfigError
from ffa_jax.federated import modes
from ffa_jax.federated.client import DpParams, make_client_update
from ffa_jax.federated.round import RoundInputs, make_round
from ffa_jax.federated.server import ServerDpParams, make_server_optimizer, server_init
from ffa_jax.models.layers import Dense

D_IN, D_H, N_LABELS, RANK, K = 12, 16, 3, 4, 3


class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(Dense(D_H, name="query")(x))
        h = h + jnp.tanh(Dense(D_H, name="value")(x))
        return Dense(N_LABELS, name="head")(h)


def loss_fn_for(module):
    def loss_fn(trainable, frozen, ex):
        logits = module.apply({"params": lora.combine(trainable, frozen)}, ex["x"][None])[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, ex["label"])

    return loss_fn


def setup(mode, **lora_kw):
    module = Tiny()
    params = module.init(jax.random.key(0), jnp.zeros((1, D_IN)))["params"]
    lp = lora.init(params, LoRAConfig(mode=mode, rank=RANK, alpha=8, **lora_kw), jax.random.key(1))
    if mode in ("lora", "rolora", "fedex", "fedsvd"):
        # Non-zero B so that A receives a gradient.
        lp = jax.tree_util.tree_map(
            lambda n: (
                n.replace(b=0.1 * jax.random.normal(jax.random.key(5), n.b.shape))
                if lora.is_lora(n)
                else n
            ),
            lp,
            is_leaf=lora.is_lora,
        )
    trainable, frozen = lora.split(lp, lora.trainable_mask(lp, mode, extra="head/.*"))
    return module, lp, trainable, frozen


def batches(seed):
    rng = np.random.default_rng(seed)
    return {
        "x": rng.normal(size=(K, 2, 8, D_IN)).astype(np.float32) * 3,
        "label": rng.integers(0, N_LABELS, size=(K, 2, 8)).astype(np.int32),
        "mask": rng.random((K, 2, 8)) < 0.8,
    }


def dp(sigma=1.0):
    return DpParams(
        clip_norm=jnp.full((K,), 0.5),
        noise_multiplier=jnp.full((K,), sigma),
        expected_batch_size=jnp.full((K,), 6.0),
    )


SERVER_DP = ServerDpParams(
    clip_norm=np.float32(0.3), noise_multiplier=np.float32(1.0), expected_clients=np.float32(K)
)
# The DP variants of each invariant take ~20-60 s on 2 shared cores (compiles): marked slow.
SLOW = pytest.mark.slow
UNITS = ("none", pytest.param("sample", marks=SLOW), pytest.param("client", marks=SLOW))
NONE_SAMPLE = ("none", pytest.param("sample", marks=SLOW))


LORA_KEY = jax.random.key(1)


def build(mode, unit, trainable, module, server=None, return_deltas=False, client_ranks=None):
    cu = make_client_update(loss_fn_for(module), optax.sgd(0.5), private=unit == "sample")
    opt = make_server_optimizer(server or ServerConfig())

    def make(update, releases):
        return make_round(update, opt, client_level_dp=unit == "client", return_deltas=releases)

    fn = modes.mode_round(
        mode,
        trainable,
        make,
        cu,
        return_deltas=return_deltas,
        lora_key=LORA_KEY,
        client_ranks=client_ranks,
    )
    return fn, opt


def run_round(round_fn, state, frozen, r, unit):
    return round_fn(
        state,
        frozen,
        RoundInputs(
            batches(r), jnp.ones(K), jnp.arange(K), dp(), SERVER_DP if unit == "client" else None
        ),
        jax.random.key(7),
    )


def leaves(tree):
    return {lora.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


HEAD_BYTES = 4 * (D_H * N_LABELS + N_LABELS)


@pytest.mark.parametrize("unit", UNITS)
def test_rolora_untrained_factor_bit_identical_and_alternates(unit):
    module, _, trainable, frozen = setup("rolora")
    # Momentum: a zero update would still move the held factor; the mode must keep it.
    round_fn, opt = build("rolora", unit, trainable, module, ServerConfig(optimizer="momentum"))
    state = server_init(trainable, opt)
    for r in range(4):
        before = leaves(state.trainable)
        state, _ = run_round(round_fn, state, frozen, r, unit)
        after = leaves(state.trainable)
        trained = "b" if r % 2 == 0 else "a"
        held = "a" if trained == "b" else "b"
        for p in before:
            if p.endswith("/" + held):
                np.testing.assert_array_equal(after[p], before[p])  # bit-identical
            else:
                assert not np.array_equal(after[p], before[p]), (r, p)


def test_rolora_bytes_are_the_trained_factor_and_head():
    _, lp, trainable, _ = setup("rolora")
    b_bytes = 2 * 4 * RANK * D_H  # two targets, b [r, d_out]
    a_bytes = 2 * 4 * D_IN * RANK  # a [d_in, r]
    assert modes.uplink_bytes("rolora", trainable, 0) == b_bytes + HEAD_BYTES
    assert modes.uplink_bytes("rolora", trainable, 1) == a_bytes + HEAD_BYTES
    assert modes.downlink_bytes("rolora", lp, trainable, 3, 3) == a_bytes + HEAD_BYTES
    assert modes.downlink_bytes("rolora", lp, trainable, 4, 3) == b_bytes + HEAD_BYTES
    assert modes.mean_uplink_bytes("rolora", trainable) == (a_bytes + b_bytes) / 2 + HEAD_BYTES
    names = sorted(leaves(modes.sent_tree("rolora", trainable, 1)))
    assert names == ["head/bias", "head/kernel", "query/kernel/a", "value/kernel/a"]


def test_rolora_sample_dp_noise_only_on_the_sent_factor():
    """The restricted client update clips and noises the sent leaves only: its delta of the
    held factor is exactly zero (nothing about it leaves the client)."""
    module, _, trainable, frozen = setup("rolora")
    cu = make_client_update(loss_fn_for(module), optax.sgd(0.5), private=True)
    mask = modes.round_mask("rolora", trainable, 0)
    one = jax.tree_util.tree_map(lambda x: x[0], (batches(0), dp()))
    delta, _ = jax.jit(modes.restrict_client_update(cu, mask))(
        trainable, frozen, *one, jax.random.key(3)
    )
    d = leaves(delta)
    assert all(not d[p].any() for p in d if p.endswith("/a"))
    assert all(d[p].any() for p in d if p.endswith("/b"))


@pytest.mark.parametrize("unit", UNITS)
def test_fedsb_only_rxr_moves(unit):
    module, lp, trainable, frozen = setup("fedsb")
    assert sorted(leaves(trainable)) == [
        "head/bias",
        "head/kernel",
        "query/kernel/mid",
        "value/kernel/mid",
    ]
    assert modes.uplink_bytes("fedsb", trainable, 0) == 2 * 4 * RANK * RANK + HEAD_BYTES
    round_fn, opt = build("fedsb", unit, trainable, module)
    state = server_init(trainable, opt)
    for r in range(2):
        state, _ = run_round(round_fn, state, frozen, r, unit)
    for p, n in lora.lora_nodes(state.trainable).items():
        assert n.mid.shape == (RANK, RANK) and np.abs(np.asarray(n.mid)).max() > 0, p
    # Everything else of the LoRA nodes (w0, a, b) is in the frozen tree: untouched.
    final = lora.combine(state.trainable, frozen)
    for p, n in lora.lora_nodes(final).items():
        n0 = lora.lora_nodes(lp)[p]
        for f in ("w0", "a", "b"):
            np.testing.assert_array_equal(np.asarray(getattr(n, f)), np.asarray(getattr(n0, f)))


@pytest.mark.parametrize("how", ["svd", "random"])
def test_fedsb_init_and_peft_fold(how):
    module, lp, _, _ = setup("fedsb", sb_init=how)
    for n in lora.lora_nodes(lp).values():
        np.testing.assert_allclose(np.asarray(n.b @ n.b.T), np.eye(RANK), atol=1e-5)
        if how == "svd":
            np.testing.assert_allclose(np.asarray(n.a.T @ n.a), np.eye(RANK), atol=1e-5)
        assert not np.asarray(n.mid).any()  # starts as the base model
    moved = jax.tree_util.tree_map(
        lambda n: (
            n.replace(mid=jax.random.normal(jax.random.key(2), (RANK, RANK)))
            if lora.is_lora(n)
            else n
        ),
        lp,
        is_leaf=lora.is_lora,
    )
    folded = lora.fold_mid(moved)
    for p, n in lora.lora_nodes(folded).items():
        assert n.mid is None
        np.testing.assert_allclose(
            np.asarray(n.merged()), np.asarray(lora.lora_nodes(moved)[p].merged()), atol=1e-5
        )
    x = jnp.ones((2, D_IN))
    np.testing.assert_allclose(
        np.asarray(module.apply({"params": folded}, x)),
        np.asarray(module.apply({"params": lora.merge(moved)}, x)),
        atol=1e-5,
    )


def test_fedsb_refuses_init_from_by_name():
    from ffa_jax.config import RunConfig

    cfg = RunConfig(lora=LoRAConfig(mode="fedsb", init_from="/some/adapter"))
    with pytest.raises(ConfigError, match="lora.init_from"):
        modes.check_config(cfg)


def test_unknown_mode_is_refused_by_name():
    with pytest.raises(ConfigError, match="lora.mode"):
        LoRAConfig(mode="fedfoo")


@pytest.mark.parametrize("mode", ["ffa", "lora"])
def test_paper_modes_bytes_unchanged(mode):
    _, _, trainable, _ = setup(mode)
    assert modes.uplink_bytes(mode, trainable, 0) == lora.tree_bytes(trainable)
    expected = 2 * 4 * RANK * (D_H + (D_IN if mode == "lora" else 0)) + HEAD_BYTES
    assert modes.uplink_bytes(mode, trainable, 5) == expected


def f64(x):
    return np.asarray(x, np.float64)


@pytest.mark.parametrize("unit", NONE_SAMPLE)
def test_fedex_effective_weight_is_the_mean_of_the_clients(unit):
    module, lp, trainable, frozen = setup("fedex")
    round_fn, opt = build("fedex", unit, trainable, module, return_deltas=True)
    state = modes.init_state("fedex", server_init(trainable, opt), lp)
    w = np.ones(K) / K
    for r in range(2):
        new, _, rel = run_round(round_fn, state, frozen, r, unit)
        old_nodes = lora.lora_nodes(modes.model_params(state, frozen))
        new_nodes = lora.lora_nodes(modes.model_params(new, frozen))
        deltas = lora.lora_nodes(rel.deltas)
        for p, n in new_nodes.items():
            o, d = old_nodes[p], deltas[p]
            clients = [
                f64(o.w0) + o.scale * (f64(o.a) + f64(d.a[k])) @ (f64(o.b) + f64(d.b[k]))
                for k in range(K)
            ]
            expected = sum(wk * c for wk, c in zip(w, clients, strict=True))
            np.testing.assert_allclose(f64(n.merged()), expected, rtol=0, atol=2e-6)
            # The residual really is folded in: without it the mean would not be matched.
            assert np.abs(f64(new.extra["w0_delta"][p])).max() > 0
        state = new


def test_fedex_and_flora_refused_with_client_level_dp_and_stateful_server():
    from ffa_jax.config import PrivacyConfig, RunConfig

    for mode in ("fedex", "flora"):
        cfg = RunConfig(lora=LoRAConfig(mode=mode), privacy=PrivacyConfig(unit="client"))
        with pytest.raises(ConfigError, match="privacy.unit='client'"):
            modes.check_config(cfg)
        cfg = RunConfig(lora=LoRAConfig(mode=mode), server=ServerConfig(learning_rate=0.5))
        with pytest.raises(ConfigError, match="server.learning_rate"):
            modes.check_config(cfg)
    for mode in ("fedex", "flora", "fedsvd"):
        cfg = RunConfig(lora=LoRAConfig(mode=mode), server=ServerConfig(optimizer="adam"))
        with pytest.raises(ConfigError, match="server.optimizer"):
            modes.check_config(cfg)
    # Client-level DP is fine where only the noised sum is post-processed.
    for mode in ("fedsvd", "fedsb", "rolora"):
        modes.check_config(
            RunConfig(lora=LoRAConfig(mode=mode), privacy=PrivacyConfig(unit="client"))
        )


@pytest.mark.parametrize("unit", UNITS)
def test_fedsvd_a_orthonormal_after_each_round_and_product_kept(unit):
    module, lp, trainable, frozen = setup("fedsvd")
    assert sorted(leaves(trainable)) == [
        "head/bias",
        "head/kernel",
        "query/kernel/b",
        "value/kernel/b",
    ]
    round_fn, opt = build("fedsvd", unit, trainable, module, return_deltas=True)
    state = modes.init_state("fedsvd", server_init(trainable, opt), lp)
    for r in range(2):
        new, _, rel = run_round(round_fn, state, frozen, r, unit)
        for p, n in lora.lora_nodes(new.trainable).items():
            a_old, a_new = f64(state.extra["a"][p]), f64(new.extra["a"][p])
            np.testing.assert_allclose(a_new.T @ a_new, np.eye(RANK), atol=1e-5)
            b_avg = f64(lora.lora_nodes(state.trainable)[p].b) + f64(
                lora.lora_nodes(rel.mean_delta)[p].b
            )
            np.testing.assert_allclose(a_new @ f64(n.b), a_old @ b_avg, atol=1e-5)
        # The clients compute with the server's current a.
        got = lora.lora_nodes(modes.client_frozen(frozen, new.extra))
        for p, n in got.items():
            np.testing.assert_array_equal(np.asarray(n.a), np.asarray(new.extra["a"][p]))
        state = new


def test_flora_stack_product_is_the_sum_of_products():
    rng = np.random.default_rng(0)
    a_k = jnp.asarray(rng.normal(size=(3, 5, 2)), jnp.float32)
    b_k = jnp.asarray(rng.normal(size=(3, 2, 7)), jnp.float32)
    w = jnp.asarray([0.2, 0.5, 0.3], jnp.float32)
    a_s, b_s = modes.flora_stack(a_k, b_k, w)
    assert a_s.shape == (5, 6) and b_s.shape == (6, 7)
    expected = sum(float(w[k]) * f64(a_k[k]) @ f64(b_k[k]) for k in range(3))
    np.testing.assert_allclose(f64(a_s) @ f64(b_s), expected, atol=1e-5)


@pytest.mark.parametrize("unit", NONE_SAMPLE)
def test_flora_merges_the_stacked_products_and_reinitialises(unit):
    module, lp, trainable, frozen = setup("flora")
    round_fn, opt = build("flora", unit, trainable, module, return_deltas=True)
    state = modes.init_state("flora", server_init(trainable, opt), lp)
    for r in range(2):
        new, _, rel = run_round(round_fn, state, frozen, r, unit)
        olds, deltas = lora.lora_nodes(state.trainable), lora.lora_nodes(rel.deltas)
        for p, n in lora.lora_nodes(new.trainable).items():
            o, d = olds[p], deltas[p]
            merged = sum((f64(o.a) + f64(d.a[k])) @ (f64(o.b) + f64(d.b[k])) / K for k in range(K))
            step = f64(new.extra["w0_delta"][p]) - f64(state.extra["w0_delta"][p])
            np.testing.assert_allclose(step, n.scale * merged, atol=2e-6)
            assert not np.asarray(n.b).any()  # re-initialised: b = 0
            fresh = lora.draw_a(jax.random.fold_in(LORA_KEY, r + 1), p, D_IN, RANK, "uniform")
            np.testing.assert_array_equal(np.asarray(n.a), np.asarray(fresh))
        state = new


def test_server_rule_downlink_bytes_analytic():
    targets, d_in, d_out, r = 2, D_IN, D_H, RANK
    per = 4 * r * (d_in + d_out)
    for mode, expected in (
        ("fedex", targets * (per + 4 * d_in * d_out)),
        ("fedsvd", targets * per),
        ("flora", targets * 5 * per),
    ):
        _, lp, trainable, _ = setup(mode)
        assert modes.downlink_bytes(mode, lp, trainable, 0, participants=5) == expected + HEAD_BYTES
    _, lp, trainable, _ = setup("fedsvd")
    assert modes.uplink_bytes("fedsvd", trainable, 0) == targets * 4 * r * d_out + HEAD_BYTES


@pytest.mark.parametrize("unit", NONE_SAMPLE)
def test_fedsa_b_never_leaves_a_client(unit):
    module, lp, trainable, frozen = setup("fedsa")
    assert sorted(leaves(trainable)) == [
        "head/bias",
        "head/kernel",
        "query/kernel/a",
        "value/kernel/a",
    ]
    a_bytes = 2 * 4 * D_IN * RANK
    assert modes.uplink_bytes("fedsa", trainable, 0) == a_bytes + HEAD_BYTES
    assert modes.downlink_bytes("fedsa", lp, trainable, 0, 3) == a_bytes + HEAD_BYTES
    round_fn, opt = build("fedsa", unit, trainable, module, return_deltas=True)
    n_clients = K + 1  # client 3 never takes part
    state = modes.init_state("fedsa", server_init(trainable, opt), lp, num_clients=n_clients)
    for r in range(2):
        new, _, rel = round_fn(
            state,
            frozen,
            RoundInputs(batches(r), jnp.ones(K), jnp.arange(K), dp()),
            jax.random.key(7),
        )
        # What leaves the clients (uploads and their aggregate) holds no b at all.
        for tree in (rel.deltas, rel.mean_delta, new.trainable):
            assert not any(p.endswith("/b") for p in leaves(tree))
        for p, bs in new.extra["client_b"].items():
            old = np.asarray(state.extra["client_b"][p])
            bs = np.asarray(bs)
            for k in range(K):
                assert not np.array_equal(bs[k], old[k])  # each participant trained its own b
            assert not np.array_equal(bs[0], bs[1])  # personalised, not averaged
            np.testing.assert_array_equal(bs[K], old[K])  # the absent client's b is untouched
        state = new
    # The evaluated global model is the personalised models' mean (exact: a is shared).
    mean_model = lora.lora_nodes(modes.model_params(state, frozen))
    for p, n in mean_model.items():
        personal = [
            f64(lora.lora_nodes(modes.personal_params(state, frozen, k))[p].merged())
            for k in range(n_clients)
        ]
        np.testing.assert_allclose(f64(n.merged()), np.mean(personal, axis=0), atol=1e-6)


def test_fedsa_refused_with_client_level_dp():
    from ffa_jax.config import PrivacyConfig, RunConfig

    cfg = RunConfig(lora=LoRAConfig(mode="fedsa"), privacy=PrivacyConfig(unit="client"))
    with pytest.raises(ConfigError, match="privacy.unit='client'"):
        modes.check_config(cfg)


@pytest.mark.parametrize("unit", NONE_SAMPLE)
def test_flora_heterogeneous_ranks_stack_exactly(unit):
    ranks = (2, 4, 3)
    module, lp, trainable, frozen = setup("flora")
    round_fn, opt = build("flora", unit, trainable, module, return_deltas=True, client_ranks=ranks)
    state = modes.init_state("flora", server_init(trainable, opt), lp)
    new, _, rel = run_round(round_fn, state, frozen, 0, unit)
    olds, deltas = lora.lora_nodes(state.trainable), lora.lora_nodes(rel.deltas)
    for p, n in lora.lora_nodes(new.trainable).items():
        o, d = olds[p], deltas[p]
        for k, r_k in enumerate(ranks):
            # The padding never leaves the client (DP noise may have touched it locally).
            assert not np.asarray(d.a[k][:, r_k:]).any() and not np.asarray(d.b[k][r_k:]).any()
            assert np.asarray(d.b[k][:r_k]).any()
        merged = sum(
            (f64(o.a) + f64(d.a[k]))[:, :r_k] @ (f64(o.b) + f64(d.b[k]))[:r_k] / K
            for k, r_k in enumerate(ranks)
        )
        step = f64(new.extra["w0_delta"][p]) - f64(state.extra["w0_delta"][p])
        np.testing.assert_allclose(step, n.scale * merged, atol=2e-6)
    per = 4 * (D_IN + D_H)
    assert [modes.uplink_bytes("flora", trainable, 0, rank=r) for r in ranks] == [
        2 * r * per + HEAD_BYTES for r in ranks
    ]
    down = modes.downlink_bytes("flora", lp, trainable, 0, 3, participant_ranks=ranks)
    assert down == 2 * sum(ranks) * per + HEAD_BYTES


def test_client_ranks_refused_by_name_where_the_method_does_not_allow_them():
    from ffa_jax.config import FederatedConfig, RunConfig

    for mode in ("ffa", "lora", "fedsa", "rolora", "fedsb", "fedex", "fedsvd"):
        cfg = RunConfig(lora=LoRAConfig(mode=mode, client_ranks=(2, 4)))
        with pytest.raises(ConfigError, match="lora.client_ranks"):
            modes.check_config(cfg)
    cfg = RunConfig(
        lora=LoRAConfig(mode="flora", client_ranks=(2, 4)), federated=FederatedConfig(clients=3)
    )
    with pytest.raises(ConfigError, match="federated.clients"):
        modes.check_config(cfg)
    with pytest.raises(ConfigError, match="lora.client_ranks"):
        LoRAConfig(mode="flora", rank=4, client_ranks=(2, 5))
