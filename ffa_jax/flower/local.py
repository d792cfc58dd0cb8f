"""A whole Flower federation on this machine, on 127.0.0.1 only: SuperLink, SuperNodes, ``flwr run``.

:class:`LocalFederation` starts ``flower-superlink`` and one ``flower-supernode`` per client
as separate processes (Flower's deployment runtime, insecure transport on the loopback
interface), writes a Flower configuration (``$FLWR_HOME/config.toml``) with a SuperLink
connection named ``ffa-local``, submits a Flower App with ``flwr run``, waits for the run to
finish (``flwr ls``), and stops every process it started, and their descendants, when the
``with`` block ends (SIGTERM, then SIGKILL after a grace period), whatever happened.

Every process gets ``FLWR_HOME`` inside the work folder, Flower's telemetry and update check
switched off, and (unless set already) a JAX persistent compilation cache in the work folder:
Flower starts a fresh ClientApp process for every message, and the cache lets rounds after
the first reuse the compiled client update. Logs go to ``<work_dir>/logs/``.

``ffa-jax flower local`` is the command-line front end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from ffa_jax.errors import FederationError

HOST = "127.0.0.1"
CONNECTION = "ffa-local"
FINISHED = "finished"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _executable(name: str) -> str:
    """A Flower console script next to this Python, or on PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise FederationError(
            f'{name!r} was not found; install Flower with pip install "ffa_jax[flower]".'
        )
    return found


def _with_parent_death_signal(argv: list[str]) -> list[str]:
    """``argv`` run so that it gets SIGTERM when the process that started it dies, even by
    SIGKILL (Linux ``PR_SET_PDEATHSIG`` via util-linux ``setpriv``), so a killed launcher
    leaves no SuperLink or SuperNode behind. Unchanged where ``setpriv`` is missing."""
    setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    return [setpriv, "--pdeathsig", "TERM", "--", *argv] if setpriv else argv


def _wait_for_port(port: int, proc: subprocess.Popen, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FederationError(f"{what} exited with code {proc.returncode} while starting.")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.2)
    raise FederationError(f"{what} did not listen on {HOST}:{port} within {timeout:g} s.")


class LocalFederation:
    """SuperLink + ``num_nodes`` SuperNodes on 127.0.0.1 (a context manager).

    Args:
      work_dir: folder for ``FLWR_HOME``, logs and the compilation cache (created).
      num_nodes: SuperNodes to start; node k gets ``--node-config
        "partition-id=k num-partitions=num_nodes"``.
      env: extra environment variables for every process.
      start_timeout: seconds to wait for the SuperLink to listen.
      node_config: extra ``key=value`` pairs (space-separated) for every node's
        ``--node-config``, e.g. ``"allow-non-private=true"`` for a reproducible research run
        (see :mod:`ffa_jax.flower.client_app`).
      keep_model: every node keeps its model loaded between rounds in a node worker
        (``keep-model=true``, :mod:`ffa_jax.flower.worker`); False: every round's fresh
        ClientApp process reloads it. Every node has a ``state-dir`` (:meth:`node_dir`).

    Attributes (after ``__enter__``):
      superlink_port, node_ports: the TCP ports in use (all on 127.0.0.1).
      processes: ``{name: Popen}`` of the processes started here.
      non_loopback: ``(process name, address)`` of every socket seen on any address other
        than 127.0.0.1 by a background check of all processes and their descendants (empty
        when everything stayed on the loopback interface).
      sockets_seen: distinct ``(local, remote)`` TCP/UDP endpoints that check saw (so an empty
        ``non_loopback`` means something).
    """

    def __init__(
        self,
        work_dir: str | Path,
        num_nodes: int,
        *,
        env: dict[str, str] | None = None,
        start_timeout: float = 60.0,
        node_config: str = "",
        keep_model: bool = True,
    ):
        if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
            raise FederationError(f"num_nodes={num_nodes!r} must be a positive integer.")
        self.work_dir = Path(work_dir).absolute()
        self.num_nodes = num_nodes
        self.start_timeout = start_timeout
        self.node_config = node_config.strip()
        self.keep_model = bool(keep_model)
        self.home = self.work_dir / "flwr-home"
        self.log_dir = self.work_dir / "logs"
        self.env = dict(os.environ)
        self.env.setdefault("JAX_COMPILATION_CACHE_DIR", str(self.work_dir / "jax-cache"))
        self.env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        self.env.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
        self.env.update(
            FLWR_HOME=str(self.home),
            FLWR_TELEMETRY_ENABLED="0",
            FLWR_DISABLE_UPDATE_CHECK="1",
            PYTHONUNBUFFERED="1",
            NO_COLOR="1",
            TERM="dumb",
            TOKENIZERS_PARALLELISM="false",
        )
        self.env.update(env or {})
        self.processes: dict[str, subprocess.Popen] = {}
        self.non_loopback: list[tuple[str, str]] = []
        self.sockets_seen: set[tuple[str, str]] = set()
        self._tracked: dict[int, object] = {}  # pid -> psutil.Process (guards pid reuse)
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.superlink_port = 0
        self.node_ports: list[int] = []

    # ------------------------------------------------------------------ processes

    def _start(self, name: str, argv: list[str]) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "wb")
        try:
            proc = subprocess.Popen(
                _with_parent_death_signal(argv),
                env=self.env,
                cwd=self.work_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: signals reach its children
            )
        finally:
            log.close()
        self.processes[name] = proc
        self._track(proc.pid, name)
        return proc

    def _track(self, pid: int, name: str) -> None:
        import psutil

        try:
            p = psutil.Process(pid)
            p.info_name = name  # type: ignore[attr-defined]
            self._tracked.setdefault(pid, p)
        except psutil.NoSuchProcess:
            pass

    def _scan(self) -> None:
        """Tracks new descendants and records any socket not on 127.0.0.1."""
        import psutil

        for proc in list(self._tracked.values()):
            try:
                if not proc.is_running():
                    continue
                for child in proc.children(recursive=True):
                    self._track(child.pid, f"{proc.info_name}/{child.pid}")
                for c in proc.net_connections(kind="inet"):
                    self.sockets_seen.add((_fmt(c.laddr), _fmt(c.raddr)))
                    for addr in (c.laddr, c.raddr):
                        if addr and addr.ip not in ("127.0.0.1", "::ffff:127.0.0.1"):
                            self.non_loopback.append((proc.info_name, f"{addr.ip}:{addr.port}"))
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            self._scan()

    def __enter__(self) -> LocalFederation:
        try:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            self.home.mkdir(parents=True, exist_ok=True)
            self.superlink_port = free_port()
            self._write_flower_config()
            superlink = self._start(
                "superlink",
                [
                    _executable("flower-superlink"),
                    "--insecure",
                    "--host",
                    HOST,
                    "--port",
                    str(self.superlink_port),
                    # Never `uv sync` app dependencies from an index: ffa_jax is installed.
                    "--disable-runtime-dependency-installation",
                ],
            )
            self._watcher = threading.Thread(target=self._watch, daemon=True)
            self._watcher.start()
            _wait_for_port(self.superlink_port, superlink, "flower-superlink", self.start_timeout)
            for k in range(self.num_nodes):
                port = free_port()
                self.node_ports.append(port)
                self._start(
                    f"supernode-{k}",
                    [
                        _executable("flower-supernode"),
                        "--insecure",
                        "--superlink",
                        f"{HOST}:{self.superlink_port}",
                        "--host",
                        HOST,
                        "--port",
                        str(port),
                        "--node-config",
                        self.node_config_of(k),
                    ],
                )
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def node_dir(self, k: int) -> Path:
        """Node k's ``state-dir``: its secret and rounds across Flower runs of a config (a
        resumed ServerApp) and its node worker's socket (``keep-model``)."""
        return self.work_dir / "nodes" / str(k)

    def node_config_of(self, k: int) -> str:
        """Node k's ``--node-config``: its partition, its ``state-dir``, ``keep-model``
        (unless ``keep_model=False``) and the extra ``node_config``."""
        parts = [f"partition-id={k}", f"num-partitions={self.num_nodes}"]
        parts.append(f'state-dir="{self.node_dir(k)}"')
        if self.keep_model:
            parts.append("keep-model=true")
        return " ".join([*parts, self.node_config]).strip()

    def close(self, grace: float = 10.0) -> None:
        """Stops every process started here and every descendant seen (idempotent)."""
        import psutil

        with contextlib.suppress(Exception):
            self._scan()
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        procs = [p for p in self._tracked.values() if _alive(p)]
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=grace)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=5)
        for proc in self.processes.values():
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)

    def alive(self) -> list[str]:
        """Names of tracked processes that are still running."""
        return [p.info_name for p in self._tracked.values() if _alive(p)]

    # ------------------------------------------------------------------ flwr CLI

    def _write_flower_config(self) -> None:
        (self.home / "config.toml").write_text(
            "\n".join(
                [
                    "[superlink]",
                    f'default = "{CONNECTION}"',
                    "",
                    f"[superlink.{CONNECTION}]",
                    f'address = "{HOST}:{self.superlink_port}"',
                    "insecure = true",
                    "",
                ]
            )
        )

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Runs ``flwr ARGS`` against this federation's SuperLink; raises on failure."""
        argv = [_executable("flwr"), *args]
        try:
            res = subprocess.run(
                argv,
                env=self.env,
                cwd=self.work_dir,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as e:
            raise FederationError(f"`flwr {' '.join(args)}` timed out after {timeout:g} s.") from e
        if res.returncode != 0:
            raise FederationError(
                f"`flwr {' '.join(args)}` failed (exit {res.returncode}): "
                f"{(res.stderr or res.stdout).strip()[-2000:]}"
            )
        return res

    def submit(self, app_dir: str | Path, run_config: str = "") -> int:
        """``flwr run APP_DIR ffa-local [--run-config RUN_CONFIG]``; returns the run id.

        ``run_config``: Flower run-config overrides, e.g. ``"resume=true"`` (a stopped run
        continues from its last checkpoint) or ``"num-server-rounds=5"``."""
        extra = ["--run-config", run_config] if run_config.strip() else []
        res = self.flwr(
            "run", str(Path(app_dir).absolute()), CONNECTION, *extra, "--format", "json"
        )
        data = _last_json(res.stdout)
        if not data.get("success") or data.get("run-id") is None:
            raise FederationError(f"flwr run did not start a run: {res.stdout.strip()[-2000:]}")
        return int(data["run-id"])

    def stop(self, run_id: int) -> None:
        """``flwr stop RUN_ID``: the SuperLink stops the run (its ServerApp and the ClientApps
        it started); :meth:`wait` then returns ``finished:stopped``."""
        self.flwr("stop", str(run_id), CONNECTION)

    def status(self, run_id: int) -> str:
        """The run's status as ``flwr ls`` reports it (e.g. ``running``, ``finished:completed``)."""
        res = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
        data = _last_json(res.stdout)
        runs = data.get("runs") or []
        if not runs:
            raise FederationError(f"flwr ls knows no run {run_id}: {res.stdout.strip()[-500:]}")
        return str(runs[0].get("status", ""))

    def wait(self, run_id: int, timeout: float, poll: float = 2.0) -> str:
        """Waits until the run finishes; returns its final status (``finished:<how>``).

        Raises:
          FederationError: the run did not finish in ``timeout`` seconds, or a process of the
            federation died meanwhile.
        """
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(run_id)
            if status.startswith(FINISHED):
                return status
            dead = [n for n, p in self.processes.items() if p.poll() is not None]
            if dead:
                raise FederationError(
                    f"run {run_id} ({status}): {dead} exited; see {self.log_dir}/."
                )
            if time.monotonic() > deadline:
                raise FederationError(
                    f"run {run_id} did not finish within {timeout:g} s (status {status}); "
                    f"see {self.log_dir}/."
                )
            time.sleep(poll)

    def stream_logs(self, run_id: int) -> subprocess.Popen:
        """Streams the run's ServerApp log to this process's stdout (``flwr log --stream``)
        until the run ends; the streaming process is stopped with the federation."""
        argv = [_executable("flwr"), "log", str(run_id), CONNECTION, "--stream"]
        proc = subprocess.Popen(argv, env=self.env, cwd=self.work_dir, stdin=subprocess.DEVNULL)
        self._track(proc.pid, "flwr-log")
        return proc

    def logs(self, run_id: int) -> str:
        """The run's ServerApp log (``flwr log RUN_ID --show``)."""
        return self.flwr("log", str(run_id), CONNECTION, "--show").stdout


def _fmt(addr) -> str:
    return f"{addr.ip}:{addr.port}" if addr else ""


def _alive(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _last_json(text: str) -> dict:
    """The last JSON object printed on stdout (flwr may print notes before it)."""
    start = text.find("{")
    while start != -1:
        try:
            return json.loads(text[start:])
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
    raise FederationError(f"expected JSON from flwr, got: {text.strip()[-1000:]}")
