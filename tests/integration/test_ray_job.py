"""`ray job submit` of the bench against a Ray head this test starts on loopback with free ports.

Follows ../shared/DESIGN.md: loopback only; the head is stopped by the PIDs it started, nothing else.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _free_port_range(width: int = 200) -> int:
    """Start of `width` consecutive ports nobody listens on (checked, not guaranteed)."""
    for start in range(21000, 60000, width):
        ok = True
        for port in range(start, start + width, 37):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    ok = False
                    break
        if ok:
            return start
    raise RuntimeError("no free port range")


@pytest.fixture
def ray_head():
    # a short temp dir: Ray's unix socket paths must stay under 108 bytes
    tmp_path = Path(tempfile.mkdtemp(prefix="pdo-ray-", dir="/tmp"))
    gcs, dash, agent, metrics, client, agent_grpc, runtime_env_agent = _free_ports(7)
    w1 = _free_port_range()
    # as with an activated virtualenv: the job's `python` is the project's
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", VIRTUAL_ENV=str(BIN.parent))
    env.pop("RAY_ADDRESS", None)
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env_agent}",
           f"--metrics-export-port={metrics}", f"--ray-client-server-port={client}",
           f"--min-worker-port={w1}", f"--max-worker-port={w1 + 199}", "--num-cpus=4",
           '--resources={"neuron_cores": 1, "cs3": 1}', f"--temp-dir={tmp_path}"]
    before = {p.pid for p in psutil.process_iter()}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    started = [p for p in psutil.process_iter(["cmdline"]) if p.pid not in before
               and str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    try:
        assert out.returncode == 0, out.stderr[-3000:]
        yield env, f"http://127.0.0.1:{dash}"
    finally:
        # stop exactly the processes of this head (children of the ones we saw start)
        procs = {p.pid: p for p in started}
        for p in started:
            try:
                for c in p.children(recursive=True):
                    procs[c.pid] = c
            except psutil.NoSuchProcess:
                pass
        for p in procs.values():
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        gone, alive = psutil.wait_procs(list(procs.values()), timeout=15)
        for p in alive:
            p.kill()
        shutil.rmtree(tmp_path, ignore_errors=True)


def test_bench_runs_as_a_ray_job(ray_head, tmp_path):
    env, address = ray_head
    result = tmp_path / "bench.json"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT),
           "--runtime-env-json", '{"excludes": [".venv", ".git", "bench/results", "results"]}', "--",
           "python", "-m", "orchestrator", "bench", "--config", "cluster.yaml", "--requests", "6", "--no-samples",
           "--output", str(result)]
    start = time.monotonic()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    logs = out.stdout + out.stderr
    assert out.returncode == 0, logs[-4000:]
    assert "succeeded" in logs.lower(), logs[-4000:]
    assert "TTFT" in logs and "SLA" in logs and "attainment" in logs, logs[-4000:]
    bench = json.loads(result.read_text())
    assert bench["failed"] == 0 and len(bench["per_request"]) == 6
    for r in bench["per_request"]:  # the server's phase timings ride along with what the client timed
        assert 0 < r["prefill_ms"] < r["ttft_ms"] and r["queued_ms"] >= 0 and r["transfer_ms"] >= 0, r
    print(f"ray job took {time.monotonic() - start:.1f} s")
