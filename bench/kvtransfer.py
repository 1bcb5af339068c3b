"""`python -m bench.kvtransfer`: move 256 MB of KV three ways in one run and compare.

Transports (see bench/transports.py): "kvtransfer" (real sender and receiver into a KV
pool), "grpc-bare" (raw-bytes gRPC stream, same chunks and channel options) and "tcp" (a plain
loopback socket); each receiver runs in its own process, as a decode worker would. A fourth row,
"kvtransfer[no-pool-write]", runs the real path with the pool's block copy skipped: it shows what
the protocol and checksums cost without the memory-bound copy into the pool. Rounds are
interleaved so machine noise hits every transport alike; medians are reported. With --streams 1,4
the same bytes are also split over 4 concurrent streams (4 transfers on 4 channels / 4 sockets).
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import structlog

from bench import transports as bt
from kvtransfer import heap
from kvtransfer.layout import KVLayout
from kvtransfer.sender import SenderConfig
from kvtransfer.wire import DEFAULT_CHECKSUM
from bench import RESULTS

LAYOUT = KVLayout(n_layers=32, n_kv_heads=8, head_dim=128, dtype="float32")  # Llama-3.1-8B-like: 256 KB/token
TRANSPORTS = ("kvtransfer", "kvtransfer-nopool", "grpc-bare", "tcp")


def _quiet_logs() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def _child(kind: str, n_tokens: int, streams: int, conn) -> None:
    _quiet_logs()
    bt.serve(kind, LAYOUT, n_tokens, streams, conn)


def _payloads(n_tokens: int, streams: int, chunk_bytes: int):
    """Per stream: (k, v) of shape (n_layers, T, Hkv, Dh), and the same bytes cut into the same chunks."""
    rng = np.random.default_rng(0)
    per = n_tokens // streams
    shape = (LAYOUT.n_layers, per, LAYOUT.n_kv_heads, LAYOUT.head_dim)
    kv = [(rng.standard_normal(shape, dtype=np.float32), rng.standard_normal(shape, dtype=np.float32))
          for _ in range(streams)]
    step = max(1, chunk_bytes // LAYOUT.bytes_per_token_per_layer)
    views = [[m for layer in range(LAYOUT.n_layers) for t0 in range(0, per, step)
              for m in (memoryview(k[layer, t0:t0 + step]).cast("B"), memoryview(v[layer, t0:t0 + step]).cast("B"))]
             for k, v in kv]
    # K and V of a chunk travel together: pair the halves so chunk counts and sizes match kvtransfer
    views = [[bytes(a) + bytes(b) for a, b in zip(vs[::2], vs[1::2])] for vs in views]
    return kv, views


def _label(kind: str, streams: int, checksum: str, default_checksum: str) -> str:
    label = kind if kind != "kvtransfer" or checksum == default_checksum else f"kvtransfer[{checksum}]"
    return label if streams == 1 else f"{label}-x{streams}"


def run(args) -> list[dict]:
    total = args.mb * 1024 * 1024
    n_tokens = total // LAYOUT.bytes_per_token_per_layer // LAYOUT.n_layers
    heap.keep_large_buffers()  # the senders' process, as GrpcTransferBackend does: the same for every transport
    ctx = mp.get_context("spawn")
    children, clients = {}, {}  # clients: (label, kind, streams) -> client
    try:
        for kind in TRANSPORTS:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_child, args=(kind, n_tokens, max(args.streams), child), daemon=True)
            proc.start()
            children[kind] = (proc, parent)
        ports = {kind: parent.recv() for kind, (_, parent) in children.items()}
        data = {s: _payloads(n_tokens, s, args.chunk_kb * 1024) for s in args.streams}
        def sender(kind: str, streams: int, checksum: str) -> bt.KVTransferClient:
            config = SenderConfig(chunk_bytes=args.chunk_kb * 1024, window=args.window, checksum=checksum)
            return bt.KVTransferClient(ports[kind], LAYOUT, config, streams)

        for s in args.streams:
            for checksum in args.checksum:
                label = _label("kvtransfer", s, checksum, args.checksum[0])
                clients[(label, "kvtransfer", s)] = sender("kvtransfer", s, checksum)
            clients[(_label("kvtransfer[no-pool-write]", s, "", ""), "kvtransfer-nopool", s)] = \
                sender("kvtransfer-nopool", s, args.checksum[0])
            clients[(_label("grpc-bare", s, "", ""), "grpc-bare", s)] = bt.BareClient(ports["grpc-bare"], s)
            clients[(_label("tcp", s, "", ""), "tcp", s)] = bt.TcpClient(ports["tcp"], s)

        def once(key) -> tuple[float, float, float]:
            _, kind, s = key
            kv, chunks = data[s]
            payload = kv if kind.startswith("kvtransfer") else chunks if kind == "grpc-bare" else \
                [[memoryview(c) for c in cs] for cs in chunks]
            return bt.timed(clients[key].run, payload, receiver=children[kind][1])

        times: dict[tuple, list[tuple[float, float, float]]] = {key: [] for key in clients}
        for key in clients:
            once(key)  # warm-up: connections, page faults
        for r in range(args.repeats):
            for key in clients:
                times[key].append(once(key))
            line = "  ".join(f"{key[0]}={total / t[-1][0] / 1e9:.2f}" for key, t in times.items())
            print(f"[round {r + 1}/{args.repeats}] GB/s {line}", file=sys.stderr, flush=True)
    finally:
        for c in clients.values():
            c.close()
        for proc, parent in children.values():
            try:
                parent.send("stop")
            except OSError:
                pass
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
    return _rows(times, total)


def _rows(times: dict[tuple, list[tuple[float, float, float]]], total: int) -> list[dict]:
    rows = []
    for (label, kind, s), runs in times.items():
        ts = [r[0] for r in runs]
        med = statistics.median(ts)
        gb = total / 1e9
        rows.append(dict(transport=label, kind=kind, streams=s, bytes=total, seconds=med,
                         gb_per_s=gb / med, gb_per_s_min=gb / max(ts), gb_per_s_max=gb / min(ts), runs=len(ts),
                         sender_cpu_s_per_gb=statistics.median(r[1] for r in runs) / gb,
                         receiver_cpu_s_per_gb=statistics.median(r[2] for r in runs) / gb))
    for row in rows:
        peer = {r["kind"]: r for r in rows if r["streams"] == row["streams"] and r["kind"] != "kvtransfer"}
        row["ratio_to_grpc_bare"] = row["gb_per_s"] / peer["grpc-bare"]["gb_per_s"]
        row["ratio_to_tcp"] = row["gb_per_s"] / peer["tcp"]["gb_per_s"]
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'transport':<30}{'MB':>6}{'median s':>10}{'GB/s':>7}{'(min-max)':>14}{'/grpc-bare':>12}{'/tcp':>7}"
          f"{'CPU s/GB snd+rcv':>18}")
    for r in rows:
        print(f"{r['transport']:<30}{r['bytes'] / 2**20:>6.0f}{r['seconds']:>10.3f}{r['gb_per_s']:>7.2f}"
              f"{'(' + format(r['gb_per_s_min'], '.2f') + '-' + format(r['gb_per_s_max'], '.2f') + ')':>14}"
              f"{r['ratio_to_grpc_bare']:>11.0%}{r['ratio_to_tcp']:>8.0%}"
              f"{r['sender_cpu_s_per_gb']:>10.2f}+{r['receiver_cpu_s_per_gb']:.2f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kvtransfer", description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=256, help="MiB of KV per run")
    p.add_argument("--chunk-kb", type=int, default=1024, help="payload bytes per frame")
    p.add_argument("--window", type=int, default=SenderConfig().window, help="unacknowledged frames in flight")
    p.add_argument("--checksum", type=lambda s: s.split(","), default=[DEFAULT_CHECKSUM, "crc32", "none"],
                   help="comma-separated schemes; the first is the 'kvtransfer' row, others add rows")
    p.add_argument("--repeats", type=int, default=15, help="interleaved rounds per transport (7 left runs +-6 points apart)")
    p.add_argument("--streams", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4],
                   help="comma-separated stream counts, e.g. 1,4")
    p.add_argument("--out", type=Path, default=RESULTS / "kvtransfer.json")
    args = p.parse_args(argv)
    _quiet_logs()
    start, load = time.time(), os.getloadavg()
    rows = run(args)
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(layout=str(LAYOUT), chunk_kb=args.chunk_kb, window=args.window, checksums=args.checksum,
                repeats=args.repeats, cpus=os.cpu_count(), loadavg_at_start=load, loadavg_at_end=os.getloadavg(),
                started_unix=start, note="medians over interleaved rounds; receivers in child processes",
                baseline_note="grpc-bare sends raw-bytes chunks built before the timed run (no per-frame copy "
                              "or checksum); kvtransfer builds each frame from the KV arrays inside it (one "
                              "copy + checksum per frame) and its receiver checks and copies into a KV pool")
    args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
