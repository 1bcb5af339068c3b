"""bench.router at a toy size: the JSON's shape, and the router choosing the reference's pair on every decision."""
import json

from bench.router import main


def test_router_bench_writes_rows_and_agrees_with_the_reference(tmp_path):
    out = tmp_path / "router.json"
    rows = main(["--sizes", "3x3,5x4", "--decisions", "20", "--out", str(out)])
    doc = json.loads(out.read_text())
    assert doc["rows"] == rows and set(doc) == {"rows", "targets", "machine"}
    assert [(r["prefill_workers"], r["decode_workers"]) for r in rows] == [(3, 3), (5, 4)]
    for r in rows:
        assert r["decisions"] == 20 and 0 < r["p50_us"] <= r["p99_us"] and 0 <= r["placed_fraction"] <= 1
        assert r["agree"] == 1.0 and r["naive_p50_us"] > 0
        assert (r["placed_p50_us"] is None) == (r["placed_fraction"] == 0)
    assert doc["targets"] == {} and doc["machine"]["cpus"] >= 1
