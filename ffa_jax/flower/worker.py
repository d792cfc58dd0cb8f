"""A node-level process that keeps a client's model loaded between Flower rounds.

Flower's deployment runtime starts a fresh ``ClientApp`` process for every message, so a
client that prepares its model in the ``ClientApp`` reloads the weights, re-tokenises its
data and re-creates its jitted update every round. With the node config ``keep-model=true``
(and a ``state-dir``) the ``ClientApp`` instead hands the round to this **node worker**: a
long-lived process on the same machine, started by the node's first ``ClientApp`` process,
that holds the prepared :class:`ffa_jax.flower.core.ClientNode` in memory, keyed by the
config digest, the partition and the node's secret. The ``ClientApp`` stays thin: it checks
the message, keeps the node state (secret, rounds) and replies to the server exactly as
without the worker.

Transport: a Unix domain socket in the node's ``state-dir`` (the folder and socket are
owner-only), one request per connection: a JSON header and the trainable tree as ``.npz``
bytes (loaded with ``allow_pickle=False``), each length-prefixed. Nothing leaves the machine;
the node's secret crosses only this owner-only local socket.

The worker exits when it has been idle for ``idle_timeout`` seconds or when the process
that started it (the SuperNode's ``ClientApp``'s parent, the SuperNode) is gone.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import io
import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ffa_jax.errors import FederationError

#: Unix socket paths are limited to 107 bytes on Linux.
MAX_SOCKET_PATH = 100
DEFAULT_IDLE_TIMEOUT = 1800.0


# ------------------------------------------------------------------------------ framing


def _send_frame(sock: socket.socket, data: bytes) -> None:
    sock.sendall(struct.pack("!Q", len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(min(n - len(out), 1 << 20))
        if not chunk:
            raise ConnectionError("the node worker's connection closed mid-message")
        out += chunk
    return bytes(out)


def _recv_frame(sock: socket.socket) -> bytes:
    (n,) = struct.unpack("!Q", _recv_exact(sock, 8))
    return _recv_exact(sock, n)


def _pack(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _unpack(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def send_message(sock: socket.socket, header: dict[str, Any], arrays: dict[str, np.ndarray]):
    _send_frame(sock, json.dumps(header).encode())
    _send_frame(sock, _pack(arrays))


def recv_message(sock: socket.socket) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    header = json.loads(_recv_frame(sock).decode())
    return header, _unpack(_recv_frame(sock))


# ------------------------------------------------------------------------------ the worker


def socket_path(state_dir: Path, digest: str, client_id: int) -> Path:
    """The worker's socket for one config and partition, in the node's ``state-dir``."""
    path = Path(state_dir).absolute() / f"w{digest[:8]}-{client_id}.sock"
    if len(str(path)) > MAX_SOCKET_PATH:
        raise FederationError(
            f"node config state-dir={str(state_dir)!r} is too long for the node worker's Unix "
            f"socket ({len(str(path))} > {MAX_SOCKET_PATH} characters); use a shorter folder."
        )
    return path


def _rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


class Worker:
    """Serves rounds for the :class:`~ffa_jax.flower.core.ClientNode` s of one node."""

    def __init__(self, path: Path, idle_timeout: float, parent_pid: int | None):
        self.path = path
        self.idle_timeout = idle_timeout
        self.parent_pid = parent_pid
        self.nodes: dict[tuple[str, int, int], Any] = {}
        # The last round each node trained here: a second guard against a replay, should a
        # ClientApp process die between the worker's reply and saving the node state.
        self.last: dict[tuple[str, int, int], int] = {}
        self.rounds = 0

    def _node(self, header: dict[str, Any]):
        import yaml

        from ffa_jax.config import RunConfig, from_dict
        from ffa_jax.flower.app import config_digest
        from ffa_jax.flower.core import ClientNode, privacy_from_json
        from ffa_jax.privacy import secret as secret_lib

        cfg = from_dict(RunConfig, yaml.safe_load(header["config"]))
        secret = secret_lib.from_hex(header["secret"])
        key = (config_digest(cfg), int(header["client_id"]), secret)
        if key not in self.nodes:
            self.nodes.clear()  # one run at a time: the newest config replaces the old
            p = header.get("privacy")
            privacy = None if p is None else privacy_from_json(p)
            self.nodes[key] = ClientNode(cfg, key[1], privacy=privacy, secret=secret)
            self.last[key] = -1
        return key, self.nodes[key]

    def handle(self, conn: socket.socket) -> None:
        import dataclasses

        from ffa_jax.flower import wire

        header, arrays = recv_message(conn)
        try:
            key, node = self._node(header)
            trainable = wire.arrays_to_tree(arrays, node.prep.trainable, sender="the server")
            last = max(int(header["last_round"]), self.last[key])
            delta, public, diagnostics = node.train_round(
                trainable, header["round_idx"], header["rounds_done"], last
            )
            self.last[key] = int(header["round_idx"])
            self.rounds += 1
            reply = {
                "ok": True,
                "public": public,
                "diagnostics": diagnostics,
                "privacy": dataclasses.asdict(node.privacy),
                "worker_rss_bytes": _rss_bytes(),
                "worker_rounds": self.rounds,
                "worker_pid": os.getpid(),
            }
            send_message(conn, reply, wire.tree_to_arrays(delta))
        except Exception as e:  # the ClientApp re-raises it (Flower reports it to the server)
            send_message(conn, {"ok": False, "type": type(e).__name__, "error": str(e)}, {})

    def _parent_alive(self) -> bool:
        if self.parent_pid is None:
            return True
        try:
            os.kill(self.parent_pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def serve(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)  # the socket is owner-only from the start
        try:
            srv.bind(str(self.path))
        finally:
            os.umask(old)
        srv.listen(4)
        srv.settimeout(2.0)
        last = time.monotonic()
        try:
            while time.monotonic() - last < self.idle_timeout and self._parent_alive():
                try:
                    conn, _ = srv.accept()
                except TimeoutError:
                    continue
                with conn:
                    conn.settimeout(None)
                    self.handle(conn)
                last = time.monotonic()
        finally:
            srv.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


# ------------------------------------------------------------------------------ the client side


def _connect(path: Path) -> socket.socket | None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        s.close()
        return None
    return s


def connect_or_start(
    path: Path, *, idle_timeout: float, parent_pid: int | None, start_timeout: float = 120.0
) -> socket.socket:
    """A connection to the node worker at ``path``, starting it (once per node: a lock file
    serialises starters) when none answers.

    Raises:
      FederationError: the worker did not start listening within ``start_timeout`` s.
    """
    sock = _connect(path)
    if sock is not None:
        return sock
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        sock = _connect(path)
        if sock is not None:
            return sock
        log = open(path.with_suffix(".log"), "ab")
        argv = [sys.executable, "-m", "ffa_jax.flower.worker", "--socket", str(path)]
        argv += ["--idle-timeout", str(idle_timeout)]
        if parent_pid is not None:
            argv += ["--parent-pid", str(parent_pid)]
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives this ClientApp process
        )
        log.close()
        deadline = time.monotonic() + start_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise FederationError(
                    f"the node worker exited with code {proc.returncode} while starting; see "
                    f"{path.with_suffix('.log')}."
                )
            sock = _connect(path)
            if sock is not None:
                return sock
            time.sleep(0.1)
    raise FederationError(
        f"the node worker did not listen on {path} within {start_timeout:g} s; see "
        f"{path.with_suffix('.log')}."
    )


def train_remote(
    sock: socket.socket, header: dict[str, Any], arrays: dict[str, np.ndarray]
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One round on the node worker; raises its error as a FederationError."""
    with sock:
        send_message(sock, header, arrays)
        reply, delta = recv_message(sock)
    if not reply.get("ok"):
        raise FederationError(f"{reply.get('error')} (in the node worker, {reply.get('type')})")
    return reply, delta


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="ffa_jax Flower node worker (started by a ClientApp)")
    p.add_argument("--socket", required=True)
    p.add_argument("--idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT)
    p.add_argument("--parent-pid", type=int, default=None)
    args = p.parse_args(argv)
    Worker(Path(args.socket), args.idle_timeout, args.parent_pid).serve()


if __name__ == "__main__":
    main()
