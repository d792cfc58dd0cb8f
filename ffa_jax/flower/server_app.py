"""The ffa_jax Flower ``ServerApp`` (``ffa_jax.flower.server_app:app``).

It runs the rounds of :func:`ffa_jax.run.train` over Flower's Grid: wait for
``federated.clients`` SuperNodes; with partial participation (``federated.clients_per_round``)
ask each node its partition id (a ``query`` message, the only thing asked); then every round
send the global trainable tree (B under FFA-LoRA, an ``ArrayRecord`` ``"trainable"``) and the
round index to the round's participants (every node, or the clients drawn from the server's
own secret, the simulation's schedule), collect each one's delta and public metrics,
aggregate in client order and take the Optax server step
(:class:`ffa_jax.flower.core.ServerRun`; under client-level DP the server clips every update
and adds the noise, from its secret, with the simulation's DP-FedAvg function), evaluate on
eval rounds, and write the run directory ``<output_dir>/<name>/``: ``config.yaml``,
``metrics.jsonl`` (the simulation's keys plus the measured bytes of every client),
``checkpoints/`` (``checkpoint.every``; the state, the privacy ledger and the server's
secret, owner-only, :mod:`ffa_jax.checkpoint`), ``adapter.safetensors`` (with the trained
head under ``model.train_head``) and ``summary.json``. A relative ``output_dir`` is relative
to the directory ``flower-superlink`` was started in.

A killed ServerApp resumes with ``flwr run APP --run-config "resume=true"``: the new run
continues from the newest checkpoint, with its secret (the same participants and noise) and
ledger; the SuperNodes restore their own secret and rounds from their ``state-dir``.

Nothing here sees client data: only the clients' (under sample-level DP noised) deltas and
public numbers (their diagnostics only with ``flower.send_diagnostics``, which each client
must consent to). The server sends no noise seed and cannot choose a client's noise. Every
round's metrics line records the names of the records and metrics the clients actually sent
(``received``).
"""

from __future__ import annotations

import json
import shutil
import time
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from ffa_jax import checkpoint as ckpt_lib
from ffa_jax import lora
from ffa_jax.errors import CheckpointError, ConfigError, FederationError
from ffa_jax.fileio import atomic_write_text, json_safe
from ffa_jax.flower import wire
from ffa_jax.flower.app import (
    NODE_TIMEOUT_KEY,
    OVERWRITE_KEY,
    RESUME_KEY,
    ROUND_TIMEOUT_KEY,
    config_from_run_config,
    positive_seconds,
)
from ffa_jax.flower.core import ServerRun
from ffa_jax.flower.records import from_record, serialized_bytes, to_record
from ffa_jax.run import (
    metric_line,
    noise_note,
    resume,
    run_dir,
    save_adapter,
)
from ffa_jax.run.report import metric_value
from ffa_jax.run.rundir import FILE_MODE, METRICS_FILE, MetricsLog, make_dir

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


def discover_partitions(grid: Grid, nodes: list[int], k: int, timeout: float) -> dict[int, int]:
    """``{partition id: node id}`` of the connected SuperNodes, asked with a ``query``
    message (needed under partial participation, where the server sends each round to its
    sampled clients only). The partition id is public; nothing else is asked.

    Raises:
      FederationError: a node failed (e.g. a bad node config, named by the client) or two
        nodes report the same partition id.
    """
    messages = [
        Message(
            RecordDict({"config": ConfigRecord({"ask": "partition-id"})}),
            dst_node_id=node,
            message_type=MessageType.QUERY,
            group_id="partitions",
        )
        for node in nodes
    ]
    by_partition: dict[int, int] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            raise FederationError(
                f"SuperNode {node} failed to report its partition: {reply.error.reason}; see "
                "that SuperNode's log."
            )
        rec = reply.content.metric_records.get("partition")
        cid = int(rec["partition_id"]) if rec is not None and "partition_id" in rec else -1
        if not 0 <= cid < k or cid in by_partition:
            raise FederationError(
                f"SuperNode {node} reports partition-id {cid}; each of the {k} SuperNodes "
                f"needs a distinct partition-id in [0, {k - 1}]."
            )
        by_partition[cid] = node
    if len(by_partition) != k:
        raise FederationError(
            f"{len(by_partition)} of {k} SuperNodes reported their partition within "
            f"{ROUND_TIMEOUT_KEY}; check their logs."
        )
    return by_partition


def _decode_replies(
    server: ServerRun,
    replies: list[Message],
    nodes: list[int],
    round_idx: int,
    members: list[int],
) -> tuple[list[Any], list[dict[str, float]], list[dict[str, int]], list[dict[str, float]]]:
    """Deltas, public metrics, measured bytes and diagnostics (empty dicts unless sent) of
    the round's participants ``members`` (client ids, ascending), in that order."""
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
        if cid not in members:
            raise FederationError(
                f"round {round_idx + 1}: {sender} replied but was not sampled for this round "
                f"(participants {members})."
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
    if len(by_client) != len(members):
        silent = sorted(set(nodes) - answered)
        raise FederationError(
            f"round {round_idx + 1}: {len(by_client)} of {len(members)} clients replied (no "
            f"reply from SuperNodes {silent}) within {ROUND_TIMEOUT_KEY}; check their logs or "
            "raise it."
        )
    ordered = [by_client[c] for c in members]
    return (
        [o[0] for o in ordered],
        [o[1] for o in ordered],
        [o[2] for o in ordered],
        [o[3] for o in ordered],
    )


def check_restored(restored: ckpt_lib.Restored, server: ServerRun) -> None:
    """A ServerApp checkpoint must belong to this model, data and seed, and its ledger to this
    run's schedule and budget: the simulation's checks (:func:`ffa_jax.run.resume.check_restored`).
    Raises CheckpointError / ConfigError naming what differs."""
    prep = server.prep
    resume.check_restored(
        restored,
        prep,
        server.state,
        ckpt_lib.a_matrices_hash(prep.params),
        ckpt_lib.data_hash([prep.train_arrays, prep.test_arrays], prep.client_indices),
    )


def _open_run(cfg, run_config: dict[str, Any]) -> ckpt_lib.Restored | None:
    """Checks the run directory before anything is computed (``overwrite`` / ``resume``);
    the checkpoint to resume from. Raises ConfigError / CheckpointError."""
    flags = {}
    for key in (OVERWRITE_KEY, RESUME_KEY):
        flags[key] = run_config.get(key, False)
        if not isinstance(flags[key], bool):
            raise ConfigError(f"Flower run config {key}={flags[key]!r} must be true/false.")
    out = run_dir(cfg)
    if flags[RESUME_KEY]:
        if flags[OVERWRITE_KEY]:
            raise ConfigError(
                f"Flower run config {RESUME_KEY}=true and {OVERWRITE_KEY}=true exclude each "
                "other; pass one of them."
            )
        if not (out / "config.yaml").is_file():
            raise CheckpointError(
                f"cannot resume {str(out)!r}: not a run directory (no config.yaml); start the "
                f"run without {RESUME_KEY}=true."
            )
        restored = ckpt_lib.read_latest(ckpt_lib.checkpoint_dir(out), cfg)
        if restored is not None and cfg.federated.rounds < restored.round:
            raise ConfigError(
                f"federated.rounds={cfg.federated.rounds} is below the {restored.round} rounds "
                f"the checkpoint {str(restored.step_dir)!r} has done."
            )
        return restored
    if out.exists() and any(out.iterdir()) and not flags[OVERWRITE_KEY]:
        raise ConfigError(
            f"run directory {str(out)!r} already exists; choose another name "
            f"(flwr run ... --run-config '{OVERWRITE_KEY}=true' replaces it, "
            f"'{RESUME_KEY}=true' continues it from its last checkpoint)."
        )
    return None


def run_server(grid: Grid, run_config: dict[str, Any], log=print) -> dict[str, Any]:
    """The whole server side of a run (see the module docstring); returns the summary."""
    t_start = time.time()
    cfg = config_from_run_config(run_config)
    round_timeout = positive_seconds(run_config, ROUND_TIMEOUT_KEY, 1800.0)
    node_timeout = positive_seconds(run_config, NODE_TIMEOUT_KEY, 300.0)
    overwrite = bool(run_config.get(OVERWRITE_KEY, False))
    restored = _open_run(cfg, run_config)
    out = run_dir(cfg)
    server = ServerRun(
        cfg,
        secret=restored.secret if restored is not None else None,
        ledger=restored.ledger if restored is not None else None,
    )
    history: list[dict[str, Any]] = []
    start = 0
    if restored is not None:
        check_restored(restored, server)
        server.state = ckpt_lib.restore_state(restored, server.state)
        history, start = restored.history, restored.round
        # The checkpoint's history is the truth: later lines are dropped and recomputed.
        atomic_write_text(
            out / METRICS_FILE, "".join(metric_line(h) for h in history), mode=FILE_MODE
        )
        log(f"ffa_jax server: resuming {out} at round {start} of {cfg.federated.rounds}")
    wl = server.prep.workload
    k = cfg.federated.clients
    per_client = server.trainable_bytes
    log(
        f"ffa_jax server: {cfg.name}, {cfg.federated.participants} of {k} clients x "
        f"{cfg.federated.rounds} rounds, {lora.tree_bytes(server.prep.trainable)} trainable "
        "bytes per client per round"
    )
    nodes = wait_for_nodes(grid, k, node_timeout, log=log)
    partitions = (
        discover_partitions(grid, nodes, k, round_timeout) if cfg.federated.partial else None
    )
    a_hash = ckpt_lib.a_matrices_hash(server.prep.params)
    d_hash = ckpt_lib.data_hash(
        [server.prep.train_arrays, server.prep.test_arrays], server.prep.client_indices
    )
    ckpt = None
    # metrics.jsonl and TensorBoard events, through the run directory's owner.
    mlog = MetricsLog(out, primary=True, first_step=start + 1 if history else 0)
    try:
        for r in range(start, cfg.federated.rounds):
            t0 = time.time()
            members = server.participants(r)
            targets = nodes if partitions is None else [partitions[c] for c in members]
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
                for node in targets
            ]
            replies = list(grid.send_and_receive(messages, timeout=round_timeout))
            deltas, metrics, measured, diags = _decode_replies(server, replies, targets, r, members)
            record = server.apply_round(r, deltas, metrics, diags if all(diags) else None)
            payloads = [m["payload"] for m in measured]
            counts = dict(
                uplink_bytes=int(sum(payloads)),
                downlink_bytes=wire.payload_bytes(down) * len(targets),
                uplink_payload_bytes=payloads,
                uplink_serialized_bytes=[m["serialized"] for m in measured],
                client_reported_uplink_bytes=[int(m["uplink_payload_bytes"]) for m in metrics],
            )
            # Client-level DP with partial participation hides who took part: what counts
            # the participants is a diagnostic, as in the simulation.
            hidden = server.client_level and cfg.federated.partial
            (record.setdefault("diagnostics", {}) if hidden else record).update(counts)
            record.update(
                uplink_bytes_per_client=per_client,
                # What the clients' messages held, as received: record names and metric keys.
                received={
                    "records": sorted({n for m in measured for n in m["records"]}),
                    "metric_keys": sorted({n for m in measured for n in m["metric_keys"]}),
                },
                seconds=time.time() - t0,
            )
            history.append(record)
            if ckpt is None:
                if restored is None:
                    # Every node answered the first round correctly: from here on the run
                    # directory is written (a federation that fails in round 1 leaves
                    # nothing behind).
                    if overwrite and out.exists():
                        shutil.rmtree(out)
                    make_dir(out)
                    atomic_write_text(out / "config.yaml", cfg.to_yaml(), mode=FILE_MODE)
                    atomic_write_text(out / METRICS_FILE, "", mode=FILE_MODE)  # to append
                ckpt = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(out), keep=cfg.checkpoint.keep)
            mlog.write(record)
            is_last = r + 1 == cfg.federated.rounds
            if is_last or (cfg.checkpoint.every and (r + 1) % cfg.checkpoint.every == 0):
                ckpt.save(
                    r + 1,
                    server.state,
                    cfg=cfg,
                    history=history,
                    ledger=server.ledger(r + 1),
                    a_hash=a_hash,
                    data_fingerprint=d_hash,
                    secret=server.secret,
                )
            score = record.get(wl.metric)
            loss = metric_value(record, "train_loss")
            log(
                f"ffa_jax server: round {r + 1}/{cfg.federated.rounds}"
                + ("" if loss is None else f" loss {loss:.4f}")
                + f" eps {record['epsilon']:.3f}"
                + ("" if score is None else f" {wl.metric_short} {score:.4f}")
                + f" uplink {payloads} B ({record['seconds']:.1f} s)"
            )
    finally:
        mlog.close()
        if ckpt is not None:
            ckpt.close()
    save_adapter(
        out / "adapter.safetensors",
        lora.combine(server.state.trainable, server.prep.frozen),
        cfg,
        head_pattern=wl.head_pattern,  # a train_head run keeps its trained head
    )
    last = history[-1]
    summary = json_safe(
        {
            "run_dir": str(out),
            "runtime": "flower",
            **wl.summary_fields(history),
            "epsilon": last["epsilon"],
            "delta": last["delta"],
            "privacy_unit": cfg.privacy.unit if cfg.privacy.enabled else "none",
            "uplink_bytes_total": int(sum(metric_value(h, "uplink_bytes", 0) for h in history)),
            "uplink_bytes_per_client_per_round": per_client,
            "rounds": cfg.federated.rounds,
            "resumed_at": start if restored is not None else None,
            "nodes": [int(n) for n in nodes],
            "noise": noise_note(cfg),
            "wall_seconds": time.time() - t_start,
        }
    )
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n", mode=FILE_MODE)
    return summary


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower entry point: :func:`run_server` with this run's config."""
    summary = run_server(grid, dict(context.run_config))
    print(json.dumps(summary, indent=2), flush=True)


__all__ = ["app", "check_restored", "discover_partitions", "run_server", "wait_for_nodes"]
