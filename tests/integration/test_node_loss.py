"""Node loss on a real multi-node Ray cluster on this machine (item 5 of the failover issue).

A head and three worker nodes started with `ray start` on loopback (explicit free ports): node A
with `neuron_cores` for the prefill worker, nodes B and C with one `cs3` each for the two decode
workers. The orchestrator runs as a Ray job (`serve`). The test shows that the prefill and decode
actors run on different nodes and that the KV crossed between them, then kills every process of the
node holding the busy decode worker mid-stream: the request migrates to the other decode node and
streams on exactly (the exactness tests' near-tie rule). Everything started is stopped by PID.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from model.generation import follows_greedy, greedy_reference
from model.loaded import load_model
from model.tokenizer import ChatMessage
from orchestrator import client as cl
from tests.integration.raycluster import BIN, Node, free_ports, ray_env
from tests.integration.stack import cluster_tree

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster():
    tmp = Path(tempfile.mkdtemp(prefix="pdo-mn-", dir="/tmp"))  # short: Ray's socket paths stay < 108 bytes
    env = ray_env()
    nodes: dict[str, Node] = {}
    try:
        nodes["head"] = head = Node(tmp, env, num_cpus=1)
        assert head.ok, head.out.stderr[-3000:]
        for i, (name, res) in enumerate((("A", {"neuron_cores": 1}), ("B", {"cs3": 1}), ("C", {"cs3": 1}))):
            nodes[name] = node = Node(tmp, env, head_gcs=head.gcs, num_cpus=1, resources=res,
                                      worker_ports_after=head.worker_ports[1] + 1 + 400 * i)
            assert node.ok, node.out.stderr[-3000:]
        tree = cluster_tree()
        meta = tree["metadata"]
        meta["pools"]["decode"].update(workers=2, kv_capacity_tokens=8192)
        meta["router"].update(policy="least_loaded", local_prefill_max_tokens=0)  # every prompt's KV crosses nodes
        meta["frontend"]["http_port"] = None  # the gRPC door is the one used here
        cfg = tmp / "cluster.yaml"
        cfg.write_text(yaml.safe_dump(tree))
        port, = free_ports(1)
        submit = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{head.dashboard}", "--no-wait", "--",
             "python", "-m", "orchestrator", "serve", "--config", str(cfg), "--port", str(port), "--metrics-port", "0"],
            env=env, capture_output=True, text=True, timeout=120)
        assert submit.returncode == 0, submit.stderr[-3000:]
        target = f"127.0.0.1:{port}"
        with cl.Client(target, timeout=10) as c:
            deadline = time.monotonic() + 300
            while True:
                try:
                    if c.health() == "SERVING":
                        break
                except cl.ClientError:
                    pass
                assert time.monotonic() < deadline, "the Ray job's frontend never served"
                time.sleep(1)
        yield target, nodes, f"http://127.0.0.1:{head.dashboard}"
    finally:
        for node in reversed(list(nodes.values())):
            node.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _node_of(nodes: dict[str, Node], pid: int) -> str:
    return next(name for name, node in nodes.items() if pid in node.processes())


def _actor_pids(dashboard: str) -> dict[str, int]:
    """Worker id -> pid of its live actor, from Ray's state API (actors are named pdorch.<worker id>.<tag>);
    asked from a process with the cluster's token auth, as the `ray` CLI is."""
    code = ("import json, sys; from ray.util.state import list_actors; "
            "print(json.dumps([[a.name, a.pid] for a in list_actors(address=sys.argv[1], "
            "filters=[('state', '=', 'ALIVE')])]))")
    out = subprocess.run([sys.executable, "-c", code, dashboard], env=ray_env(), capture_output=True, text=True,
                         timeout=60, check=True)
    return {name.split(".")[1]: pid for name, pid in json.loads(out.stdout.strip().splitlines()[-1])
            if name and name.startswith("pdorch.")}


def test_a_lost_decode_node_migrates_its_stream_to_the_other_node(cluster):
    target, nodes, dashboard = cluster
    pids = _actor_pids(dashboard)
    placed = {w: _node_of(nodes, pid) for w, pid in pids.items()}
    assert placed["prefill-0"] == "A" and {placed["decode-0"], placed["decode-1"]} == {"B", "C"}, placed

    lm = load_model()
    prompt = "Tell me a long story about a river."
    ref, margins = greedy_reference(lm.model, lm.tokenizer.chat_ids([ChatMessage("user", prompt)]), 80)
    with cl.Client(target, timeout=300) as c:
        warm = c.complete(messages=[("user", "Hello.")], max_tokens=4).final
        assert warm.prefill_worker == "prefill-0" and warm.timings.transfer_ms > 0  # KV crossed A -> B or C
        stream = c.generate(messages=[("user", prompt)], max_tokens=80, ignore_eos=True)
        chunks = iter(stream)
        got = [t for _ in range(3) for t in next(chunks).token_ids]
        busy = [w.worker_id for p in c.server_info().pools if p.name == "decode" for w in p.workers
                if w.active_requests]
        assert len(busy) == 1, busy
        lost = placed[busy[0]]
        assert nodes[lost].kill() > 0  # the raylet, its agents and the actor's worker process
        got += [t for chunk in chunks for t in chunk.token_ids]
        final = stream.final
    assert final.migrations >= 1 and final.decode_worker != busy[0] and final.usage.completion_tokens == 80
    assert len(got) == 80 and follows_greedy(got, ref, margins), f"diverged from {ref}"
