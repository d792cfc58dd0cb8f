"""The run directory's files: metrics.jsonl and its TensorBoard events (the same records, the
same release-safe / diagnostics split), read back; a real run's files are checked with
:func:`assert_events_match_metrics` from tests/e2e/test_train.py."""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path

import pytest

from ffa_jax.run import rundir

RECORD = {
    "round": 2,
    "epsilon": 1.5,
    "epsilon_pld": None,
    "update_norm": 0.25,
    "noise": "secret",
    "eval_accuracy": 0.75,
    "eval_samples": [{"x": 1}],
    "diagnostics": {"train_loss": 0.5, "grad_norm": None, "examples": 16},
}


def test_tensorboard_scalars_split_release_safe_from_diagnostics():
    got = {tag: (value, note) for tag, value, note in rundir.tensorboard_scalars(RECORD)}
    assert {t: v for t, (v, _) in got.items()} == {
        "release/epsilon": 1.5,
        "release/update_norm": 0.25,
        "release/eval_accuracy": 0.75,
        "diagnostics/train_loss": 0.5,
        "diagnostics/examples": 16.0,
    }
    assert got["diagnostics/train_loss"][1] == rundir.DIAGNOSTICS_NOTE
    assert "outside" in rundir.DIAGNOSTICS_NOTE and "epsilon" in rundir.DIAGNOSTICS_NOTE
    assert got["release/epsilon"][1] == rundir.RELEASE_NOTE
    # A non-private run's epsilon is infinite: not plotted (metrics.jsonl has null).
    assert not list(rundir.tensorboard_scalars({"round": 1, "epsilon": float("inf")}))


def test_metrics_log_writes_lines_and_events_only_on_the_primary(tmp_path):
    with rundir.MetricsLog(tmp_path, primary=True) as log:
        log.write(RECORD)
        log.write({**RECORD, "round": 3, "epsilon": 2.0})
    lines = [json.loads(x) for x in (tmp_path / rundir.METRICS_FILE).read_text().splitlines()]
    assert [x["round"] for x in lines] == [2, 3] and "eval_samples" not in lines[0]
    events = rundir.read_events(tmp_path)
    assert events["release/epsilon"] == [(2, 1.5), (3, 2.0)]
    assert events["diagnostics/train_loss"] == [(2, 0.5), (3, 0.5)]
    # A resumed attempt (same second, same host) adds a file; TensorBoard purges its
    # steps >= first_step from the earlier file's view (read_events reads both files).
    with rundir.MetricsLog(tmp_path, primary=True, first_step=3) as log:
        log.write({**RECORD, "round": 3, "epsilon": 2.5})
    assert len(list(tmp_path.glob(rundir.EVENTS_GLOB))) == 2
    assert (2, 1.5) in rundir.read_events(tmp_path)["release/epsilon"]
    other = tmp_path / "other"
    other.mkdir()
    with rundir.MetricsLog(other, primary=False) as log:
        log.write(RECORD)
    assert list(other.iterdir()) == []


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def assert_group_readable(run_dir: Path) -> None:
    """Run files 0640 and folders 0750, checkpoints/ owner-only (0600/0700)."""
    assert stat.S_IMODE(run_dir.stat().st_mode) == rundir.DIR_MODE
    for path in run_dir.rglob("*"):
        mode = stat.S_IMODE(path.stat().st_mode)
        secret = "checkpoints" in path.relative_to(run_dir).parts
        if path.is_dir():
            assert mode == (0o700 if secret else rundir.DIR_MODE), (path, oct(mode))
        else:
            assert mode == (0o600 if secret else rundir.FILE_MODE), (path, oct(mode))


@pytest.mark.parametrize("mask", [0o077, 0o000])
def test_run_files_are_group_readable_whatever_the_umask(tmp_path, mask):
    out = tmp_path / "run"
    with umask(mask):
        rundir.make_dir(out)
        with rundir.MetricsLog(out, primary=True) as log:
            log.write(RECORD)
    assert sorted(p.name for p in out.iterdir())[-1] == rundir.METRICS_FILE
    assert_group_readable(out)


def assert_events_match_metrics(run_dir: Path) -> None:
    """The run's one event file holds metrics.jsonl's numbers under the same split (called on
    the runs of tests/e2e/test_train.py, so that no extra run is paid for)."""
    rows = [json.loads(x) for x in (run_dir / rundir.METRICS_FILE).read_text().splitlines()]
    assert len(list(run_dir.glob(rundir.EVENTS_GLOB))) == 1
    events = rundir.read_events(run_dir)
    for key in ("epsilon", "update_norm", "uplink_bytes_per_client"):
        assert events[f"release/{key}"] == [(r["round"], pytest.approx(r[key])) for r in rows]
    for key in ("train_loss", "clipped_fraction"):
        assert events[f"diagnostics/{key}"] == [
            (r["round"], pytest.approx(r["diagnostics"][key])) for r in rows
        ]
    # Nothing private is plotted as a release-safe scalar.
    assert "release/train_loss" not in events and "release/clipped_fraction" not in events
