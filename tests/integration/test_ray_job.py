"""`ray job submit` of the bench against a Ray head this test starts on loopback with free ports.

Follows ../shared/DESIGN.md: loopback only; the head is stopped by the PIDs it started, nothing else.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.integration.raycluster import BIN, Node, ray_env

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def ray_head():
    # a short temp dir: Ray's unix socket paths must stay under 108 bytes
    tmp_path = Path(tempfile.mkdtemp(prefix="pdo-ray-", dir="/tmp"))
    env = ray_env()
    head = Node(tmp_path, env, num_cpus=4, resources={"neuron_cores": 1, "cs3": 1})
    try:
        assert head.ok, head.out.stderr[-3000:]
        yield env, f"http://127.0.0.1:{head.dashboard}"
    finally:
        head.stop()
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
