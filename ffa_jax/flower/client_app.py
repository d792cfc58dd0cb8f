"""The ffa_jax Flower ``ClientApp`` (``ffa_jax.flower.client_app:app``).

Each SuperNode is one client. It is started with its partition,
``flower-supernode --node-config "partition-id=k num-partitions=K"``, and on every ``train``
message it

1. reads the run's ffa_jax config from the Flower run config (``ffa-config``) and checks its
   partition against ``federated.clients``;
2. draws its own 256-bit secret from its operating system on its first message and keeps it
   in its node state (``Context.state``, :data:`SECRET_STATE`); the server never learns it
   and never sends a noise seed. A config with ``privacy.noise_seed`` or
   ``flower.send_diagnostics`` set (which the server chooses) is refused unless the node's
   own operator consents with ``--node-config "... allow-non-private=true"``;
3. loads the model and its data partition (:func:`ffa_jax.train.prepare`), regenerating the
   shared frozen A from the public config seed;
4. calibrates its own noise multiplier on the first round (kept in its node state);
5. checks the message: only the next round is trained (a repeated, past or skipped-ahead
   round index is refused by name, :data:`ROUNDS_STATE` records what was trained), the
   received tree must match the trainable tree's names, shapes and dtypes, and the config
   record may hold nothing but ``round-index``;
6. runs its local DP-SGD steps (:class:`ffa_jax.flower.core.ClientNode`);
7. replies with the noised delta of the trainable tree (an ``ArrayRecord``, ``"delta"``) and
   public numbers only (a ``MetricRecord``, ``"metrics"``, keys
   :data:`ffa_jax.flower.core.PUBLIC_METRICS`). Its diagnostics (loss, realised batch size,
   clipped fraction, gradient norm) stay here unless ``flower.send_diagnostics`` is set (and
   consented to), then in a separate ``"diagnostics"`` MetricRecord.

Formal guarantee: sample-level (epsilon, delta)-DP of this client's data over every round it
trains, with the noise added here, on the client, from a secret only this node holds (see
:func:`ffa_jax.flower.core.plan_client_privacy`); the server only ever receives noised,
clipped updates of B and public counts. Not covered: the diagnostics when sent, and timing
(see docs/threat_model.md).
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ffa_jax.errors import FederationError
from ffa_jax.flower import wire
from ffa_jax.flower.app import CONFIG_KEY, config_from_run_config
from ffa_jax.flower.core import ClientNode, ClientPrivacy, check_partition
from ffa_jax.flower.records import from_record, serialized_bytes, to_record
from ffa_jax.privacy import secret as secret_lib

PRIVACY_STATE = "ffa-client-privacy"  # the client's own privacy plan, in Context.state
SECRET_STATE = "ffa-client-secret"  # the client's own secret (never sent)
ROUNDS_STATE = "ffa-client-rounds"  # rounds this client has trained
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
        raise FederationError(
            f"node config {ALLOW_NON_PRIVATE}={allow!r} must be true or false."
        )
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


def client_node(context: Context) -> ClientNode:
    """This node's :class:`ClientNode` for the run in ``context`` (prepared once per process)."""
    cfg = config_from_run_config(context.run_config)
    cid = check_partition(
        cfg, context.node_config.get("partition-id"), context.node_config.get("num-partitions")
    )
    check_consent(cfg, context)
    secret = node_secret(cfg, context)
    key = (str(context.run_config[CONFIG_KEY]), cid, secret)
    if key not in _NODES:
        while len(_NODES) >= _MAX_NODES:
            _NODES.pop(next(iter(_NODES)))
        _NODES[key] = ClientNode(cfg, cid, privacy=_privacy_from_state(context), secret=secret)
    node = _NODES[key]
    _privacy_to_state(context, node.privacy)
    return node


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training; see the module docstring."""
    node = client_node(context)
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
    trainable = wire.arrays_to_tree(received, node.prep.trainable, sender="the server")
    done = rounds_done(context)
    delta, public, diagnostics = node.train_round(trainable, round_idx, done)
    # Recorded before the reply leaves: this round can never be trained again.
    context.state[ROUNDS_STATE] = ConfigRecord({"done": done + 1})
    arrays = wire.tree_to_arrays(delta)
    record = to_record(arrays)
    public["uplink_payload_bytes"] = wire.payload_bytes(arrays)
    public["uplink_serialized_bytes"] = serialized_bytes(record)
    public["downlink_payload_bytes"] = wire.payload_bytes(received)
    reply = {"delta": record, "metrics": MetricRecord(public)}
    if node.cfg.flower.send_diagnostics:
        reply["diagnostics"] = MetricRecord(diagnostics)
    return Message(RecordDict(reply), reply_to=msg)
