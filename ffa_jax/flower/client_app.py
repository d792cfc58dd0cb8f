"""The ffa_jax Flower ``ClientApp`` (``ffa_jax.flower.client_app:app``).

Each SuperNode is one client. It is started with its partition,
``flower-supernode --node-config "partition-id=k num-partitions=K"`` (optionally
``state-dir=<folder>`` and ``keep-model=true``), and on every ``train`` message it

1. reads the run's ffa_jax config from the Flower run config (``ffa-config`` and the
   run-config keys, :func:`ffa_jax.flower.app.config_from_run_config`) and checks its
   partition against ``federated.clients``;
2. draws its own 256-bit secret from its operating system on its first message and keeps it
   in its node state (``Context.state``, :data:`SECRET_STATE`, and with a ``state-dir`` in an
   owner-only file there, so that it survives into a new Flower run of the same config, e.g.
   a resumed ServerApp); the server never learns it and never sends a noise seed. A config
   with ``privacy.noise_seed`` or ``flower.send_diagnostics`` set (which the server chooses)
   is refused unless the node's own operator consents with
   ``--node-config "... allow-non-private=true"``;
3. loads the model and its data partition (:func:`ffa_jax.run.prepare`), regenerating the
   shared frozen A from the public config seed: in this process, or, with
   ``keep-model=true``, once in the node worker (:mod:`ffa_jax.flower.worker`) that keeps it
   loaded between rounds;
4. calibrates its own noise multiplier on the first round (kept in its node state; zero
   under client-level DP, where the server adds the noise);
5. checks the message: a round at or before the last one it trained is refused by name (a
   replay), and so is a skipped-ahead round when every client takes part in every round
   (:data:`ROUNDS_STATE` records the rounds trained and the last one); the received tree
   must match the trainable tree's names, shapes and dtypes, and the config record may hold
   nothing but ``round-index``. One exception: with a ``state-dir``, the node keeps its last
   reply (:func:`save_reply`), and the same round asked again *with the same received tree*
   (a ServerApp stopped after this node trained the round, then resumed from the checkpoint
   before it) gets that reply again, byte for byte, without training: resending an output
   already released spends no privacy;
6. runs its local DP-SGD steps (:class:`ffa_jax.flower.core.ClientNode`);
7. replies with the delta of the trainable tree (an ``ArrayRecord``, ``"delta"``; noised
   under sample-level DP) and public numbers only (a ``MetricRecord``, ``"metrics"``, keys
   :data:`ffa_jax.flower.core.PUBLIC_METRICS`). Its diagnostics (loss, realised batch size,
   clipped fraction, gradient norm) stay here unless ``flower.send_diagnostics`` is set (and
   consented to), then in a separate ``"diagnostics"`` MetricRecord.

A ``query`` message may ask its partition id (public; for partial participation), nothing
else.

Formal guarantee: under ``privacy.unit: sample``, sample-level (epsilon, delta)-DP of this
client's data over every round it trains, with the noise added here, on the client, from a
secret only this node holds (see :func:`ffa_jax.flower.core.plan_client_privacy`); the
server only ever receives noised, clipped updates of B and public counts. Under
``privacy.unit: client`` the client sends its un-noised update and the (trusted) server
clips and noises it: client-level DP of what the server releases, not of the uplink. Not
covered: the diagnostics when sent, and timing (see docs/threat_model.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import resource
import tempfile
from pathlib import Path

import numpy as np
import psutil
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ffa_jax.config import RunConfig
from ffa_jax.errors import FederationError
from ffa_jax.flower import wire, worker
from ffa_jax.flower.app import config_digest, config_from_run_config
from ffa_jax.flower.core import ClientNode, ClientPrivacy, check_partition, privacy_from_json
from ffa_jax.flower.records import from_record, serialized_bytes, to_record
from ffa_jax.privacy import secret as secret_lib

PRIVACY_STATE = "ffa-client-privacy"  # the client's own privacy plan, in Context.state
SECRET_STATE = "ffa-client-secret"  # the client's own secret (never sent)
ROUNDS_STATE = "ffa-client-rounds"  # rounds this client has trained, and the last one
#: Node-config key: a folder where the node keeps its secret and the rounds it trained
#: across Flower runs of the same config (a resumed ServerApp starts a new Flower run, whose
#: ``Context.state`` is empty). Without it they live in the Flower run's node state only.
STATE_DIR = "state-dir"
#: Node-config key: ``true`` keeps the model loaded between rounds in a node worker
#: (:mod:`ffa_jax.flower.worker`, its socket in ``state-dir``) instead of reloading it in
#: every round's fresh ClientApp process.
KEEP_MODEL = "keep-model"
#: Node-config key by which a node's operator consents to a non-private run
#: (``privacy.noise_seed`` or ``flower.send_diagnostics`` chosen by the server).
ALLOW_NON_PRIVATE = "allow-non-private"
#: The only key the server's ``config`` ConfigRecord may hold.
MESSAGE_CONFIG_KEYS = ("round-index",)

app = ClientApp()

# Prepared clients of this process, newest last. Flower's deployment runtime starts a process
# per message; a process that serves several messages (or several nodes, as in tests) reuses
# the model, data and compiled update.
_NODES: dict[tuple[str, int, int], ClientNode] = {}
_MAX_NODES = 8


def _privacy_from_state(context: Context) -> ClientPrivacy | None:
    rec = context.state.get(PRIVACY_STATE)
    if rec is None:
        return None
    return ClientPrivacy(
        noise_multiplier=float(rec["noise-multiplier"]),
        sampling_rate=float(rec["sampling-rate"]),
        epsilon_curve=tuple(float(e) for e in rec["epsilon-curve"]),
        delta_curve=tuple(float(d) for d in rec.get("delta-curve", [])),
    )


def _privacy_to_state(context: Context, p: ClientPrivacy) -> None:
    context.state[PRIVACY_STATE] = ConfigRecord(
        {
            "noise-multiplier": p.noise_multiplier,
            "sampling-rate": p.sampling_rate,
            "epsilon-curve": list(p.epsilon_curve),
            "delta-curve": list(p.delta_curve),
        }
    )


def _consents(context: Context) -> bool:
    allow = context.node_config.get(ALLOW_NON_PRIVATE, False)
    if not isinstance(allow, bool):
        raise FederationError(f"node config {ALLOW_NON_PRIVATE}={allow!r} must be true or false.")
    return allow


def check_consent(cfg, context: Context) -> None:
    """A server-chosen setting that voids this client's guarantee needs its node's consent.

    Raises:
      FederationError: ``privacy.noise_seed`` or ``flower.send_diagnostics`` is set and the
        node config lacks ``allow-non-private=true``; naming the field and the fix.
    """
    asked = []
    if cfg.privacy.noise_seed is not None:
        asked.append("privacy.noise_seed (the server could regenerate and subtract the noise)")
    if cfg.flower.send_diagnostics:
        asked.append("flower.send_diagnostics (un-noised loss and gradient norms)")
    if asked and not _consents(context):
        raise FederationError(
            "this client refuses the run: the server's config sets "
            + " and ".join(asked)
            + ", which voids its privacy guarantee. Drop it from the config, or start this "
            f'SuperNode with --node-config "... {ALLOW_NON_PRIVATE}=true" to accept a '
            "non-private research run."
        )


def node_secret(cfg, context: Context) -> int:
    """This node's secret: from its node state, else drawn from the OS (or, with consent,
    ``privacy.noise_seed``) and stored there. It never leaves the node."""
    rec = context.state.get(SECRET_STATE)
    if rec is not None:
        return secret_lib.from_hex(str(rec["secret"]))
    secret = secret_lib.resolve(cfg.privacy.noise_seed)
    context.state[SECRET_STATE] = ConfigRecord({"secret": secret_lib.to_hex(secret)})
    return secret


def rounds_done(context: Context) -> int:
    """Rounds this node has trained so far (its node state)."""
    rec = context.state.get(ROUNDS_STATE)
    return 0 if rec is None else int(rec["done"])


def last_round(context: Context) -> int:
    """The index of the last round this node trained (-1: none), from its node state."""
    rec = context.state.get(ROUNDS_STATE)
    if rec is None:
        return -1
    return int(rec["last"]) if "last" in rec else int(rec["done"]) - 1


def state_file(cfg, cid: int, context: Context) -> Path | None:
    """This node's state file under the node config's ``state-dir`` (None without one):
    ``<state-dir>/<config digest>-partition-<k>.json``."""
    where = context.node_config.get(STATE_DIR)
    if where is None:
        return None
    if not isinstance(where, str) or not where:
        raise FederationError(f"node config {STATE_DIR}={where!r} must be a folder path.")
    return Path(where).expanduser() / f"{config_digest(cfg)[:24]}-partition-{cid}.json"


def load_node_state(path: Path | None, context: Context) -> None:
    """Fills the node state (secret, rounds trained) from ``path`` when the Flower node state
    has none (a new Flower run of the same config: a resumed ServerApp)."""
    if path is None or not path.is_file() or SECRET_STATE in context.state:
        return
    try:
        data = json.loads(path.read_text())
        secret, done, last = str(data["secret"]), int(data["done"]), int(data["last"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FederationError(
            f"node state file {str(path)!r} is unreadable ({e}); it records this client's "
            "secret and the rounds it trained. Restore it, or delete it to start over (its "
            "privacy budget for this config is then no longer tracked)."
        ) from e
    context.state[SECRET_STATE] = ConfigRecord({"secret": secret})
    context.state[ROUNDS_STATE] = ConfigRecord({"done": done, "last": last})


def save_node_state(path: Path | None, context: Context) -> None:
    """Writes the node's secret and rounds trained to ``path`` (owner-only, atomic)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "secret": str(context.state[SECRET_STATE]["secret"]),
        "done": rounds_done(context),
        "last": last_round(context),
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:  # mkstemp: mode 0600
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def reply_file(cfg, cid: int, context: Context) -> Path | None:
    """Where this node keeps its last reply (:func:`save_reply`): ``<state-dir>/<config
    digest>-partition-<k>-reply.npz``, or None without a ``state-dir``."""
    store = state_file(cfg, cid, context)
    return None if store is None else store.with_name(store.stem + "-reply.npz")


def received_digest(received: dict[str, np.ndarray]) -> str:
    """SHA-256 of the received tree (names, dtypes, shapes and bytes, in name order)."""
    h = hashlib.sha256()
    for name in sorted(received):
        a = np.ascontiguousarray(received[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_reply(
    path: Path | None,
    round_idx: int,
    digest: str,
    arrays: dict[str, np.ndarray],
    public: dict[str, float],
    diagnostics: dict[str, float],
) -> None:
    """Keeps the reply of round ``round_idx`` (to the received tree of SHA-256 ``digest``) in
    ``path`` (owner-only, atomic; ``.npz`` without pickles), replacing the previous one."""
    if path is None:
        return
    meta = {"round": round_idx, "digest": digest, "public": public, "diagnostics": diagnostics}
    entries = {f"a/{k}": np.asarray(v) for k, v in arrays.items()}
    entries["meta"] = np.frombuffer(json.dumps(meta, default=float).encode(), np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:  # mkstemp: mode 0600
        np.savez(f, **entries)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def cached_reply(
    path: Path | None, round_idx: int, digest: str
) -> tuple[dict[str, np.ndarray], dict[str, float], dict[str, float]] | None:
    """The kept reply ``(arrays, public, diagnostics)`` when it answers round ``round_idx``
    to the same received tree (``digest``); else None."""
    if path is None or not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            if meta["round"] != round_idx or meta["digest"] != digest:
                return None
            arrays = {k[2:]: z[k] for k in z.files if k.startswith("a/")}
    except (OSError, ValueError, KeyError) as e:
        raise FederationError(
            f"this node's kept reply {str(path)!r} is unreadable ({e}); delete it (round "
            f"{round_idx + 1} then cannot be answered again: the server must start a new run)."
        ) from e
    return arrays, dict(meta["public"]), dict(meta["diagnostics"])


def node_identity(context: Context) -> tuple[RunConfig, int, int]:
    """``(config, partition id, secret)`` of this node for the run in ``context``: checks the
    partition and the operator's consent, and restores (``state-dir``) or draws its secret."""
    cfg = config_from_run_config(context.run_config)
    cid = check_partition(
        cfg, context.node_config.get("partition-id"), context.node_config.get("num-partitions")
    )
    check_consent(cfg, context)
    store = state_file(cfg, cid, context)
    load_node_state(store, context)
    secret = node_secret(cfg, context)
    save_node_state(store, context)
    return cfg, cid, secret


def client_node(context: Context) -> ClientNode:
    """This node's :class:`ClientNode` for the run in ``context`` (prepared once per process)."""
    cfg, cid, secret = node_identity(context)
    key = (config_digest(cfg), cid, secret)
    if key not in _NODES:
        while len(_NODES) >= _MAX_NODES:
            _NODES.pop(next(iter(_NODES)))
        _NODES[key] = ClientNode(cfg, cid, privacy=_privacy_from_state(context), secret=secret)
    node = _NODES[key]
    _privacy_to_state(context, node.privacy)
    return node


def keep_model(context: Context) -> Path | None:
    """The node's ``state-dir`` when the node config sets ``keep-model=true`` (the model
    stays loaded in a node worker, :mod:`ffa_jax.flower.worker`), else None."""
    keep = context.node_config.get(KEEP_MODEL, False)
    if not isinstance(keep, bool):
        raise FederationError(f"node config {KEEP_MODEL}={keep!r} must be true or false.")
    if not keep:
        return None
    where = context.node_config.get(STATE_DIR)
    if not isinstance(where, str) or not where:
        raise FederationError(
            f"node config {KEEP_MODEL}=true needs {STATE_DIR}=<folder> (the node worker's "
            "socket lives there)."
        )
    return Path(where).expanduser()


def _train_in_worker(
    context: Context, state_dir: Path, received, round_idx: int
) -> tuple[dict[str, np.ndarray], dict[str, float], dict[str, float], RunConfig, int]:
    """One round on this node's worker, which keeps the model loaded between rounds."""
    cfg, cid, secret = node_identity(context)
    prior = _privacy_from_state(context)
    header = {
        "config": cfg.to_yaml(),
        "client_id": cid,
        "secret": secret_lib.to_hex(secret),
        "privacy": None if prior is None else dataclasses.asdict(prior),
        "round_idx": round_idx,
        "rounds_done": rounds_done(context),
        "last_round": last_round(context),
    }
    path = worker.socket_path(state_dir, config_digest(cfg), cid)
    sock = worker.connect_or_start(
        path, idle_timeout=worker.DEFAULT_IDLE_TIMEOUT, parent_pid=os.getppid()
    )
    reply, delta = worker.train_remote(sock, header, received)
    _privacy_to_state(context, privacy_from_json(reply["privacy"]))
    print(
        f"ffa_jax client {cid}: round {round_idx + 1} in node worker pid {reply['worker_pid']} "
        f"(its round {reply['worker_rounds']}), worker RSS "
        f"{reply['worker_rss_bytes'] / 2**20:.1f} MiB, ClientApp RSS "
        f"{psutil.Process().memory_info().rss / 2**20:.1f} MiB",
        flush=True,
    )
    return delta, reply["public"], reply["diagnostics"], cfg, cid


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training; see the module docstring."""
    state_dir = keep_model(context)
    node = None if state_dir is not None else client_node(context)
    content = msg.content
    if "trainable" not in content.array_records or "config" not in content.config_records:
        raise FederationError(
            "the server's train message lacks the 'trainable' ArrayRecord or the 'config' "
            "ConfigRecord; run the ffa_jax ServerApp (ffa_jax.flower.server_app:app)."
        )
    config = content.config_records["config"]
    extra = sorted(k for k in config if k not in MESSAGE_CONFIG_KEYS)
    if extra:
        raise FederationError(
            f"the server's train message carries config keys {extra}; a client takes only "
            f"{list(MESSAGE_CONFIG_KEYS)} from the server (never a noise seed)."
        )
    round_idx = config.get("round-index")
    if isinstance(round_idx, bool) or not isinstance(round_idx, int):
        raise FederationError(f"the server sent round-index={round_idx!r}; expected an int.")
    received = from_record(content.array_records["trainable"], sender="the server")
    digest = received_digest(received)
    # The node state first: a new Flower run (a resumed ServerApp) restores it from state-dir.
    cfg, cid, _ = node_identity(context)
    done = rounds_done(context)
    kept = None
    if round_idx == last_round(context):
        kept = cached_reply(reply_file(cfg, cid, context), round_idx, digest)
    if kept is not None:  # asked again after a resume: the same reply, nothing retrained
        arrays, public, diagnostics = kept
        print(
            f"ffa_jax client {cid}: round {round_idx + 1} asked again with the same tree (a "
            "resumed server); resending the reply already sent, nothing retrained",
            flush=True,
        )
        return _reply(msg, cfg, arrays, public, diagnostics, received)
    if node is None:
        arrays, public, diagnostics, cfg, cid = _train_in_worker(
            context, state_dir, received, round_idx
        )
    else:
        trainable = wire.arrays_to_tree(received, node.prep.trainable, sender="the server")
        delta, public, diagnostics = node.train_round(
            trainable, round_idx, done, last_round(context)
        )
        arrays, cfg, cid = wire.tree_to_arrays(delta), node.cfg, node.client_id
        print(
            f"ffa_jax client {cid}: round {round_idx + 1} in the ClientApp process, RSS "
            f"{psutil.Process().memory_info().rss / 2**20:.1f} MiB (peak "
            f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.1f} MiB)",
            flush=True,
        )
    # Recorded before the reply leaves: this round can never be trained again (and the reply
    # is kept after that, so that a crash in between leaves the round refused, never retrained).
    context.state[ROUNDS_STATE] = ConfigRecord({"done": done + 1, "last": round_idx})
    save_node_state(state_file(cfg, cid, context), context)
    save_reply(reply_file(cfg, cid, context), round_idx, digest, arrays, public, diagnostics)
    return _reply(msg, cfg, arrays, public, diagnostics, received)


def _reply(msg, cfg, arrays, public, diagnostics, received) -> Message:
    """The train reply: the delta and public numbers (and the diagnostics when sent)."""
    public = dict(public)
    record = to_record(arrays)
    public["uplink_payload_bytes"] = wire.payload_bytes(arrays)
    public["uplink_serialized_bytes"] = serialized_bytes(record)
    public["downlink_payload_bytes"] = wire.payload_bytes(received)
    reply = {"delta": record, "metrics": MetricRecord(public)}
    if cfg.flower.send_diagnostics:
        reply["diagnostics"] = MetricRecord(diagnostics)
    return Message(RecordDict(reply), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """The server asks for this node's partition id (public), to send each round to the
    clients it sampled (partial participation). Nothing else is answered."""
    cfg = config_from_run_config(context.run_config)
    cid = check_partition(
        cfg, context.node_config.get("partition-id"), context.node_config.get("num-partitions")
    )
    config = msg.content.config_records.get("config")
    if config is None or dict(config) != {"ask": "partition-id"}:
        raise FederationError(
            "the server's query asks for something other than the partition id; a client "
            "answers only {'ask': 'partition-id'}."
        )
    return Message(RecordDict({"partition": MetricRecord({"partition_id": cid})}), reply_to=msg)
