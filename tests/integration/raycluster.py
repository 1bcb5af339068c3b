"""Ray nodes this test run starts with `ray start` on loopback, with explicit free ports, and stops by
the PIDs it started (../shared/DESIGN.md: never `ray stop`, nothing else on the machine is touched)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent


# `ray start --address` for a worker node on this machine. Ray 2.60's CLI refuses to join a node while
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER is 0 (what keeps Ray on loopback, DESIGN.md), and with it at 1
# rewrites the head's 127.0.0.1 into the machine's external address. This runs the same `ray start`
# with only those two decisions made for loopback; the processes it starts keep the variable at 0.
_JOIN_ON_LOOPBACK = (
    "import sys; import ray._private.ray_constants as c; import ray._private.services as s; "
    "c.ENABLE_RAY_CLUSTER = True; s.resolve_ip_for_localhost = lambda host: host; "
    "from ray.scripts.scripts import main; sys.argv = ['ray'] + sys.argv[1:]; main()")


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def free_port_range(width: int = 200, after: int = 21000) -> int:
    """Start of `width` consecutive ports nobody listens on (checked, not guaranteed)."""
    for start in range(after, 60000, width):
        ok = True
        for port in range(start, start + width, 37):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    ok = False
                    break
        if ok:
            return start
    raise RuntimeError("no free port range")


def ray_env() -> dict:
    """The environment `ray` and the jobs it runs get: the project's python first (as with an activated venv)."""
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", VIRTUAL_ENV=str(BIN.parent))
    env.pop("RAY_ADDRESS", None)
    return env


class Node:
    """One `ray start`: its ports and the processes it left running (found by the temp dir, new PIDs only)."""

    def __init__(self, temp_dir: Path, env: dict, *, head_gcs: int | None = None, num_cpus: int = 1,
                 resources: dict | None = None, worker_ports_after: int = 21000):
        agent, agent_grpc, runtime_env_agent, metrics, node_manager, object_manager = free_ports(6)
        self.gcs, self.dashboard = (free_ports(2) if head_gcs is None else (head_gcs, None))
        self.node_manager_port = node_manager
        w = free_port_range(after=worker_ports_after)
        cmd = [str(BIN / "ray"), "start", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
               f"--resources={json.dumps(resources or {})}", f"--dashboard-agent-listen-port={agent}",
               f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env_agent}",
               f"--metrics-export-port={metrics}", f"--node-manager-port={node_manager}",
               f"--object-manager-port={object_manager}", f"--min-worker-port={w}", f"--max-worker-port={w + 199}"]
        if head_gcs is None:
            client, = free_ports(1)
            cmd += ["--head", f"--port={self.gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard}",
                    f"--ray-client-server-port={client}", f"--temp-dir={temp_dir}"]
        else:
            cmd = [sys.executable, "-c", _JOIN_ON_LOOPBACK, *cmd[1:], f"--address=127.0.0.1:{head_gcs}"]
        self.worker_ports = (w, w + 199)
        before = {p.pid for p in psutil.process_iter()}
        self.out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        self.started = [p for p in psutil.process_iter(["cmdline"]) if p.pid not in before
                        and str(temp_dir) in " ".join(p.info["cmdline"] or [])]

    @property
    def ok(self) -> bool:
        return self.out.returncode == 0

    def processes(self) -> dict[int, psutil.Process]:
        """Every live process of this node: what `ray start` left, and their descendants (actors included)."""
        procs = {}
        for p in self.started:
            try:
                procs[p.pid] = p
                for c in p.children(recursive=True):
                    procs[c.pid] = c
            except psutil.NoSuchProcess:
                pass
        return procs

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> int:
        """Signal every process of this node; returns how many."""
        procs = self.processes()
        for p in procs.values():
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        return len(procs)

    def stop(self) -> None:
        procs = list(self.processes().values())
        self.kill(signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=15)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
