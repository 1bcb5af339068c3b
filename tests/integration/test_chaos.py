"""`python -m orchestrator chaos` at a small size: every fault kind once on a live deployment (2 prefill +
2 decode workers, real Ray, real gRPC), and not a token lost, duplicated, missing or different from
the uninterrupted reference, no KV left held, every fault confirmed; then 10 s at 3x the predicted
capacity: the excess turned away with RESOURCE_EXHAUSTED, nothing else failing or left held."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from orchestrator.chaos.faults import KINDS
from tests.paths import REPO

pytestmark = pytest.mark.integration


def test_the_chaos_command_survives_every_fault_kind(tmp_path):
    out = subprocess.run(  # cluster.yaml as shipped (the run raises both pools to 2 workers)
        [sys.executable, "-m", "orchestrator", "chaos", "--config", "cluster.yaml", "--requests", "14",
         "--seed", "3", "--overload", "3", "--overload-s", "10", "--json", "--output", str(tmp_path / "chaos.json")],
        cwd=REPO, capture_output=True, text=True, timeout=1200, env={**os.environ, "PYTHONPATH": str(REPO)})
    last = out.stdout.strip().splitlines()[-1:] or [""]
    assert last[0].startswith("{"), (out.returncode, out.stdout[-2000:], out.stderr[-4000:])
    result = json.loads(last[0])  # the last line is the report
    assert result["faults"] == {k: 1 for k in KINDS}, result["faults_not_fired"]
    assert (result["lost"], result["duplicated_tokens"], result["missing_tokens"]) == (0, 0, 0)
    assert result["token_mismatches"] == 0, result["mismatched_requests"]
    assert (result["leaked_kv_blocks"], result["leaked_prefill_tokens"], result["orphaned_kv_released"]) == (0, 0, 0)
    rejected = result["failed_by_status"].pop("RESOURCE_EXHAUSTED", 0)  # the router's early rejection only
    assert result["failed_by_status"] == {}
    assert result["completed"] + result["cancelled_by_client"] + rejected == result["sent"] >= 14
    assert result["cancelled_by_client"] == 1 and result["recovery_s_max"] is not None
    over = result["overload"]  # then 3x the predicted capacity: turned away at once, nothing else fails
    assert over["rejected"] > 0 and over["completed"] > 0 and over["failed_by_status"] == {}
    assert over["rejected"] + over["completed"] == over["sent"]
    assert over["queue_peaks"]["live"] <= over["max_concurrent_requests"]
    assert (over["leaked_kv_blocks"], over["leaked_prefill_tokens"], over["orphaned_kv_released"]) == (0, 0, 0)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((tmp_path / "chaos.json").read_text())["fault_log"]
