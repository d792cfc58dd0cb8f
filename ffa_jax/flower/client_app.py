"""The ffa_jax Flower ``ClientApp`` (``ffa_jax.flower.client_app:app``).

Each SuperNode is one client. It is started with its partition,
``flower-supernode --node-config "partition-id=k num-partitions=K"``, and on every ``train``
message it

1. reads the run's ffa_jax config from the Flower run config (``ffa-config``) and checks its
   partition against ``federated.clients``;
2. loads the model and its data partition (:func:`ffa_jax.train.prepare`), regenerating the
   shared frozen A from the config seed;
3. calibrates its own noise multiplier on the first round (kept in the node's Flower
   ``Context.state`` for later rounds);
4. runs its local DP-SGD steps from the received trainable tree (B) with the simulation's
   batches and PRNG keys (:class:`ffa_jax.flower.core.ClientNode`);
5. replies with the delta of the trainable tree (an ``ArrayRecord``, ``"delta"``) and its
   metrics (a ``MetricRecord``, ``"metrics"``).

Formal guarantee: sample-level (epsilon, delta)-DP of this client's data over the whole run,
with the noise added here, on the client (see :func:`ffa_jax.flower.core.plan_client_privacy`);
the server only ever receives noised, clipped updates of B.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ffa_jax.errors import FederationError
from ffa_jax.flower import wire
from ffa_jax.flower.app import CONFIG_KEY, config_from_run_config
from ffa_jax.flower.core import ClientNode, ClientPrivacy, check_partition
from ffa_jax.flower.records import from_record, serialized_bytes, to_record

PRIVACY_STATE = "ffa-client-privacy"  # the client's own privacy plan, in Context.state

app = ClientApp()

# Prepared clients of this process, newest last. Flower's deployment runtime starts a process
# per message; a process that serves several messages (or several nodes, as in tests) reuses
# the model, data and compiled update.
_NODES: dict[tuple[str, int], ClientNode] = {}
_MAX_NODES = 8


def _privacy_from_state(context: Context) -> ClientPrivacy | None:
    rec = context.state.get(PRIVACY_STATE)
    if rec is None:
        return None
    return ClientPrivacy(
        noise_multiplier=float(rec["noise-multiplier"]),
        sampling_rate=float(rec["sampling-rate"]),
        epsilon_curve=tuple(float(e) for e in rec["epsilon-curve"]),
    )


def _privacy_to_state(context: Context, p: ClientPrivacy) -> None:
    context.state[PRIVACY_STATE] = ConfigRecord(
        {
            "noise-multiplier": p.noise_multiplier,
            "sampling-rate": p.sampling_rate,
            "epsilon-curve": list(p.epsilon_curve),
        }
    )


def client_node(context: Context) -> ClientNode:
    """This node's :class:`ClientNode` for the run in ``context`` (prepared once per process)."""
    cfg = config_from_run_config(context.run_config)
    cid = check_partition(
        cfg, context.node_config.get("partition-id"), context.node_config.get("num-partitions")
    )
    key = (str(context.run_config[CONFIG_KEY]), cid)
    if key not in _NODES:
        while len(_NODES) >= _MAX_NODES:
            _NODES.pop(next(iter(_NODES)))
        _NODES[key] = ClientNode(cfg, cid, privacy=_privacy_from_state(context))
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
    round_idx = content.config_records["config"].get("round-index")
    if isinstance(round_idx, bool) or not isinstance(round_idx, int):
        raise FederationError(f"the server sent round-index={round_idx!r}; expected an int.")
    received = from_record(content.array_records["trainable"], sender="the server")
    trainable = wire.arrays_to_tree(received, node.prep.trainable, sender="the server")
    delta, metrics = node.train_round(trainable, round_idx)
    arrays = wire.tree_to_arrays(delta)
    record = to_record(arrays)
    metrics["uplink_payload_bytes"] = wire.payload_bytes(arrays)
    metrics["uplink_serialized_bytes"] = serialized_bytes(record)
    metrics["downlink_payload_bytes"] = wire.payload_bytes(received)
    return Message(RecordDict({"delta": record, "metrics": MetricRecord(metrics)}), reply_to=msg)
