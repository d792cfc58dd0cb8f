"""The ffa_jax Flower ``ServerApp`` (``ffa_jax.flower.server_app:app``).

It runs the rounds of :func:`ffa_jax.train.train` over Flower's Grid: wait for
``federated.clients`` SuperNodes, then every round send the global trainable tree (B under
FFA-LoRA, an ``ArrayRecord`` ``"trainable"``) and the round index to every node, collect each
node's delta and metrics, aggregate in client order and take the Optax server step
(:class:`ffa_jax.flower.core.ServerRun`), evaluate on eval rounds, and write the run
directory ``<output_dir>/<name>/``: ``config.yaml``, ``metrics.jsonl`` (the simulation's keys
plus the measured bytes of every client), ``adapter.safetensors`` and ``summary.json``.
A relative ``output_dir`` is relative to the directory ``flower-superlink`` was started in.

Nothing here sees client data: only the clients' noised deltas and public numbers (their
diagnostics only with ``flower.send_diagnostics``, which each client must consent to). The
server sends no noise seed and cannot choose a client's noise. Every round's metrics line
records the names of the records and metrics the clients actually sent (``received``).
"""

from __future__ import annotations

import json
import shutil
import time
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from ffa_jax import lora
from ffa_jax.errors import ConfigError, FederationError
from ffa_jax.fileio import atomic_write_text as _atomic_write
from ffa_jax.fileio import json_safe as _json_safe
from ffa_jax.flower import wire
from ffa_jax.flower.app import (
    NODE_TIMEOUT_KEY,
    OVERWRITE_KEY,
    ROUND_TIMEOUT_KEY,
    config_from_run_config,
    positive_seconds,
)
from ffa_jax.flower.core import ServerRun
from ffa_jax.flower.records import from_record, serialized_bytes, to_record
from ffa_jax.run import metric_line as _metric_line
from ffa_jax.run import (
    noise_note,
    run_dir,
    save_adapter,
)
from ffa_jax.run.report import metric_value

app = ServerApp()


def wait_for_nodes(grid: Grid, count: int, timeout: float, log=print) -> list[int]:
    """The ids of the ``count`` connected SuperNodes, waiting up to ``timeout`` seconds.

    Raises:
      FederationError: fewer nodes connected in time, or more than ``count`` are connected.
    """
    deadline = time.monotonic() + timeout
    seen = -1
    while True:
        ids = sorted(grid.get_node_ids())
        if len(ids) != seen:
            log(f"ffa_jax server: {len(ids)} of {count} SuperNodes connected")
            seen = len(ids)
        if len(ids) > count:
            raise FederationError(
                f"{len(ids)} SuperNodes are connected but federated.clients={count}; start "
                f"exactly {count} (one per partition-id 0..{count - 1})."
            )
        if len(ids) == count:
            return ids
        if time.monotonic() > deadline:
            raise FederationError(
                f"only {len(ids)} of federated.clients={count} SuperNodes connected within "
                f"{timeout:g} s; start one flower-supernode per client with --node-config "
                f'"partition-id=<k> num-partitions={count}", or raise {NODE_TIMEOUT_KEY}.'
            )
        time.sleep(0.5)


def _decode_replies(
    server: ServerRun, replies: list[Message], nodes: list[int], round_idx: int
) -> tuple[list[Any], list[dict[str, float]], list[dict[str, int]], list[dict[str, float]]]:
    """Client-ordered deltas, public metrics, measured bytes and diagnostics (empty dicts
    unless sent) from one round's replies."""
    k = server.cfg.federated.clients
    by_client: dict[int, tuple[Any, dict[str, float], dict[str, int], dict[str, float]]] = {}
    answered = set()
    for reply in replies:
        node = reply.metadata.src_node_id
        answered.add(node)
        if reply.has_error():
            raise FederationError(
                f"round {round_idx + 1}: SuperNode {node} failed: {reply.error.reason} (code "
                f"{reply.error.code}); see that SuperNode's log."
            )
        content = reply.content
        if "delta" not in content.array_records or "metrics" not in content.metric_records:
            raise FederationError(
                f"round {round_idx + 1}: SuperNode {node} replied without the 'delta' "
                "ArrayRecord and 'metrics' MetricRecord; run ffa_jax.flower.client_app:app."
            )
        metrics = {name: v for name, v in content.metric_records["metrics"].items()}
        cid = int(metrics.get("partition_id", -1))
        sender = f"client {cid} (SuperNode {node})"
        if not 0 <= cid < k or cid in by_client:
            raise FederationError(
                f"round {round_idx + 1}: {sender} reports partition-id {cid}; each of the "
                f"{k} SuperNodes needs a distinct partition-id in [0, {k - 1}]."
            )
        record = content.array_records["delta"]
        arrays = from_record(record, sender=sender)
        delta = server.decode(arrays, sender)
        measured = {
            "payload": wire.payload_bytes(arrays),
            "serialized": serialized_bytes(record),
            "records": sorted(
                [*content.array_records, *content.metric_records, *content.config_records]
            ),
            "metric_keys": sorted(
                f"{name}/{key}" for name, mr in content.metric_records.items() for key in mr
            ),
        }
        diag = content.metric_records.get("diagnostics")
        by_client[cid] = (delta, metrics, measured, dict(diag.items()) if diag else {})
    if len(by_client) != k:
        silent = sorted(set(nodes) - answered)
        raise FederationError(
            f"round {round_idx + 1}: {len(by_client)} of {k} clients replied (no reply from "
            f"SuperNodes {silent}) within {ROUND_TIMEOUT_KEY}; check their logs or raise it."
        )
    ordered = [by_client[c] for c in range(k)]
    return (
        [o[0] for o in ordered],
        [o[1] for o in ordered],
        [o[2] for o in ordered],
        [o[3] for o in ordered],
    )


def run_server(grid: Grid, run_config: dict[str, Any], log=print) -> dict[str, Any]:
    """The whole server side of a run (see the module docstring); returns the summary."""
    t_start = time.time()
    cfg = config_from_run_config(run_config)
    round_timeout = positive_seconds(run_config, ROUND_TIMEOUT_KEY, 1800.0)
    node_timeout = positive_seconds(run_config, NODE_TIMEOUT_KEY, 300.0)
    overwrite = run_config.get(OVERWRITE_KEY, False)
    if not isinstance(overwrite, bool):
        raise ConfigError(f"Flower run config {OVERWRITE_KEY}={overwrite!r} must be true/false.")
    out = run_dir(cfg)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(
            f"run directory {str(out)!r} already exists; choose another name "
            f"(flwr run ... --run-config '{OVERWRITE_KEY}=true' replaces it)."
        )
    server = ServerRun(cfg)
    wl = server.prep.workload
    k = cfg.federated.clients
    per_client = server.trainable_bytes
    log(
        f"ffa_jax server: {cfg.name}, {k} clients x {cfg.federated.rounds} rounds, "
        f"{lora.tree_bytes(server.prep.trainable)} trainable bytes per client per round"
    )
    nodes = wait_for_nodes(grid, k, node_timeout, log=log)
    history: list[dict[str, Any]] = []
    for r in range(cfg.federated.rounds):
        t0 = time.time()
        down = wire.tree_to_arrays(server.state.trainable)
        messages = [
            Message(
                RecordDict(
                    {"trainable": to_record(down), "config": ConfigRecord({"round-index": r})}
                ),
                dst_node_id=node,
                message_type=MessageType.TRAIN,
                group_id=str(r + 1),
            )
            for node in nodes
        ]
        replies = list(grid.send_and_receive(messages, timeout=round_timeout))
        deltas, metrics, measured, diags = _decode_replies(server, replies, nodes, r)
        record = server.apply_round(r, deltas, metrics, diags if all(diags) else None)
        payloads = [m["payload"] for m in measured]
        record.update(
            uplink_bytes=int(sum(payloads)),
            downlink_bytes=wire.payload_bytes(down) * k,
            uplink_bytes_per_client=per_client,
            uplink_payload_bytes=payloads,
            uplink_serialized_bytes=[m["serialized"] for m in measured],
            client_reported_uplink_bytes=[int(m["uplink_payload_bytes"]) for m in metrics],
            # What the clients' messages held, as received: record names and metric keys.
            received={
                "records": sorted({n for m in measured for n in m["records"]}),
                "metric_keys": sorted({n for m in measured for n in m["metric_keys"]}),
            },
            seconds=time.time() - t0,
        )
        history.append(record)
        if r == 0:
            # Every node answered the first round correctly: from here on the run directory
            # is written (a federation that fails in round 1 leaves nothing behind).
            if overwrite and out.exists():
                shutil.rmtree(out)
            out.mkdir(parents=True, exist_ok=True)
            _atomic_write(out / "config.yaml", cfg.to_yaml())
        with open(out / "metrics.jsonl", "w" if r == 0 else "a") as mf:
            mf.write(_metric_line(record))
        score = record.get(wl.metric)
        loss = metric_value(record, "train_loss")
        log(
            f"ffa_jax server: round {r + 1}/{cfg.federated.rounds}"
            + ("" if loss is None else f" loss {loss:.4f}")
            + f" eps {record['epsilon']:.3f}"
            + ("" if score is None else f" {wl.metric_short} {score:.4f}")
            + f" uplink {payloads} B ({record['seconds']:.1f} s)"
        )
    save_adapter(
        out / "adapter.safetensors", lora.combine(server.state.trainable, server.prep.frozen), cfg
    )
    last = history[-1]
    summary = _json_safe(
        {
            "run_dir": str(out),
            "runtime": "flower",
            **wl.summary_fields(history),
            "epsilon": last["epsilon"],
            "delta": last["delta"],
            "uplink_bytes_total": int(sum(h["uplink_bytes"] for h in history)),
            "uplink_bytes_per_client_per_round": per_client,
            "rounds": cfg.federated.rounds,
            "nodes": [int(n) for n in nodes],
            "noise": noise_note(cfg),
            "wall_seconds": time.time() - t_start,
        }
    )
    _atomic_write(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower entry point: :func:`run_server` with this run's config."""
    summary = run_server(grid, dict(context.run_config))
    print(json.dumps(summary, indent=2), flush=True)


__all__ = ["app", "run_server", "wait_for_nodes"]
