"""The three benchmark commands run end to end at toy sizes and write the JSON the README is built from.

Only the shape and sanity of the results are checked (every row present, positive rates, the fields
the issue names): timings never decide a test on this shared machine.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from decode import blas

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str, timeout: float = 300) -> str:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    done = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.integration  # a bench process end to end (the model, gRPC servers; handoff starts Ray)
def test_decode_bench_rows(tmp_path):
    out = tmp_path / "decode.json"
    text = _run("bench.decode", "--batches", "1", "3", "--prompt", "16", "--gen", "4", "--out", str(out))
    rows = json.loads(out.read_text())
    engines = {"numpy-paged-core", "hf-transformers-fp32-torch-cpu", "roofline-bandwidth", "roofline-compute"}
    assert {(r["engine"], r["batch"]) for r in rows} == {(e, b) for e in engines for b in (1, 3)}
    assert all(r["tokens_per_s"] > 0 and r["ms_per_step"] > 0 and r["blas_threads"] >= 1 for r in rows)
    assert {r["blas_core"] for r in rows} == {blas.openblas_core()}  # the kernels the numbers came from
    assert "of the bandwidth roofline" in text and f"wrote {out}" in text
    png = tmp_path / "plots" / "decode.png"  # every decode*.json beside --out, in one figure
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"plotted {png}" in text


@pytest.mark.integration  # a bench process end to end (the model, gRPC servers; handoff starts Ray)
def test_kvtransfer_bench_rows(tmp_path):
    out = tmp_path / "kv.json"
    text = _run("bench.kvtransfer", "--mb", "8", "--repeats", "1", "--streams", "1", "--checksum", "xxh3,none",
                "--out", str(out))
    doc = json.loads(out.read_text())
    rows = {r["transport"]: r for r in doc["rows"]}
    assert set(rows) == {"kvtransfer", "kvtransfer[none]", "kvtransfer[no-pool-write]", "grpc-bare", "tcp"}
    for r in rows.values():
        assert r["bytes"] == 8 * 2**20 and r["seconds"] > 0 and r["gb_per_s"] > 0
        assert r["ratio_to_grpc_bare"] > 0 and r["ratio_to_tcp"] > 0 and r["receiver_cpu_s_per_gb"] >= 0
    assert rows["grpc-bare"]["ratio_to_grpc_bare"] == 1.0 and rows["tcp"]["ratio_to_tcp"] == 1.0
    assert doc["meta"]["cpus"] == os.cpu_count() and "kvtransfer[no-pool-write]" in text


def test_handoff_overhead_is_median_over_median_minus_one():
    from bench.handoff import overhead

    # medians 1.2 s and 1.0 s: 20% slower; a mean (1.7 / 1.333) or a ratio the other way round would differ
    assert overhead([1.1, 3.0, 1.2], [1.0, 1.0, 2.0]) == pytest.approx(0.2)
    assert overhead([0.5], [1.0]) == pytest.approx(-0.5)  # faster than colocated is a negative overhead
    assert overhead([2.0, 2.0], [2.0, 2.0]) == 0.0


@pytest.mark.integration  # a bench process end to end (the model, gRPC servers; handoff starts Ray)
def test_handoff_bench_fields(tmp_path):
    out = tmp_path / "handoff.json"
    text = _run("bench.handoff", "--prompt-tokens", "48", "--repeats", "1", "--output", str(out))
    doc = json.loads(out.read_text())
    assert doc["ttft_disaggregated_s"] > 0 and doc["ttft_colocated_s"] > 0
    assert doc["ttft_disaggregated_s"] == doc["samples"]["disaggregated_s"][0]  # the median of one repeat
    assert f"overhead {100 * doc['overhead']:+.1f}%" in text
    assert doc["prompt_tokens"] == 48 and len(doc["samples"]["disaggregated_s"]) == 1
    assert doc["transfer_tail_s"] >= 0 and doc["prefill_in_actor_s"] > 0 and "overhead" in text
