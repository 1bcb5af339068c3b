"""Serving overheads of the live system on this host, for the `cpu` profile (hardware/cpu.py).

`python -m bench.serving_overheads` starts the live pools from cluster.yaml (local Ray, as the bench
does), sends requests *one at a time* (an idle system: no queueing, no prefill/decode co-running),
then, for each batch in CORUN_BATCHES, keeps that many requests decoding while prompts are prefilled
one at a time, and compares the client-side timings with the engine times measured in-process (the
cached `cpu` tables):

- prefill_extra_s + prefill_extra_per_token_s x prompt tokens: the prefill worker's own prefill_ms +
  transfer_tail_ms minus the in-process prefill_batch time (KV framing/sending in the per-layer
  callbacks, the commit round trip), a least-squares line over the idle requests. It occupies the
  prefill worker, so the simulator adds it to each prefill batch.
- request_path_s: client TTFT minus the worker's queued + prefill + transfer time: frontend, Ray
  calls, gRPC to the client. It delays the first token but occupies no worker.
- token_overhead_s at batch 1 and at each of CORUN_BATCHES: client time per token minus the
  in-process decode step (forward + sample) at that batch: the step loop's asyncio/executor hops, the
  engine's `next_outputs` poll, gRPC streaming, and the step itself running slower next to the other
  processes than alone (most at small batches, whose steps stream the weights from memory). Batch 1
  from the idle requests' TPOT; the others from their co-run phase's per-token gaps outside any
  prefill window, when all the phase's streams are decoding (a burst of requests measured too low:
  its TPOT averages over the steps while the batch fills up). Interpolated linearly in batch by the
  performance model (batch 4 because live steps between 1 and 8 ran above the straight line).

- corun_slowdown_decode / corun_slowdown_prefill: the two actors share the host's 2 cores (and the
  KV receiver runs in the decode actor's process). With a co-run phase's sequences decoding, prompts
  are prefilled one at a time: the decode streams' per-token gaps inside the prefill windows over
  those outside them (the mean over the phases), and the prefill worker's time over its idle-system
  time (the median over every phase's prompts).

Medians over the requests; writes serving.json next to the cpu profile cache (about 60 s).
No bench request is involved: these are idle-system measurements, not fits to the bench.
"""
from __future__ import annotations

import asyncio
import json
import sys

import numpy as np

SERVING_PROMPTS = (16, 64, 256, 512, 16, 64, 256, 512)  # idle, one at a time (bench prompts <= 512)
SERVING_OUTPUT = 17  # tokens per idle request
CORUN_BATCHES = (4, 8)  # co-run phases: decode batches kept busy while prompts are prefilled
CORUN_OUTPUT = 110  # tokens each of a phase's decoding requests generates
CORUN_DECODE_PROMPT = 32  # prompt tokens of each decoding request of a co-run phase
# prefilled one at a time while that batch decodes: short and long, as the bench's prompts (mostly
# under 100 tokens, up to 512); short prefills slow down more (their fixed KV-send cost shares the cores too)
CORUN_PROMPTS = (16, 256, 64, 128, 32, 256)


async def _request(client, ids: list[int], max_tokens: int, rid: str, stamps: list | None = None) -> dict:
    """One request; `stamps` collects (time, tokens) per streamed chunk."""
    from orchestrator.client.timing import StreamTiming

    timing = await StreamTiming().consume(
        client.generate(token_ids=ids, max_tokens=max_tokens, request_id=rid, ignore_eos=True),
        None if stamps is None else lambda now, n: stamps.append((now, n)))
    t = timing.final.timings
    return dict(prompt=len(ids), start=timing.start, ttft_s=timing.ttft_s, tpot_s=timing.tpot_s,
                queued_s=t.queued_ms / 1e3, prefill_s=t.prefill_ms / 1e3, transfer_s=t.transfer_ms / 1e3)


async def _corun(client, tok, filler, batch: int) -> tuple[list[dict], list[list]]:
    """Decode `batch` long requests; once all stream, prefill CORUN_PROMPTS one at a time.
    Returns the prompts' results and the decoding streams' (time, tokens) stamps."""
    from bench.live import prompt_ids

    stamps: list[list] = [[] for _ in range(batch)]
    decoders = [asyncio.create_task(_request(client, prompt_ids(tok, CORUN_DECODE_PROMPT, filler, 200 + i),
                                             CORUN_OUTPUT, f"corun{batch}-d{i}", stamps[i])) for i in range(batch)]
    while min(len(s) for s in stamps) < 4:  # all decoding, a few steps in
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)  # a stretch of decode without prefill
    prefills = []
    for j, n in enumerate(CORUN_PROMPTS):
        prefills.append(await _request(client, prompt_ids(tok, n, filler, 300 + j), 1, f"corun{batch}-p{j}"))
        await asyncio.sleep(0.6)
    await asyncio.gather(*decoders)
    return prefills, stamps


async def _collect(cfg) -> tuple[list[dict], dict[int, tuple[list[dict], list[list]]]]:
    from model.loaded import load_model
    from orchestrator.client import AsyncClient
    from bench.live import FILLER, prompt_ids
    from orchestrator.serving.deployment import Deployment

    tok = load_model().tokenizer
    filler = tok.encode(FILLER)
    async with Deployment(cfg, port=0, metrics_port=0, http_port=0) as dep, AsyncClient(dep.target) as client:
        await _request(client, prompt_ids(tok, 16, filler, 0), 4, "warmup")
        idle = []
        for i, n in enumerate(SERVING_PROMPTS):
            idle.append(await _request(client, prompt_ids(tok, n, filler, i), SERVING_OUTPUT, f"idle-{i}"))
            await asyncio.sleep(0.2)
        corun = {}
        for batch in CORUN_BATCHES:
            await asyncio.sleep(0.5)
            corun[batch] = await _corun(client, tok, filler, batch)
    return idle, corun


def _gaps(stamps: list[list], windows: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    """Per-token gaps of the decoding streams, split into those inside a prefill window and outside."""
    inside, outside = [], []
    for s in stamps:
        for (t0, _), (t1, n) in zip(s[1:-1], s[2:]):  # skip the first token (from prefill)
            gap = (t1 - t0) / max(n, 1)
            if any(a <= t0 and t1 <= b for a, b in windows):
                inside.append(gap)
            elif not any(t0 < b and a < t1 for a, b in windows):  # no overlap at all
                outside.append(gap)
    return inside, outside


def overheads(t, idle: list[dict], corun: dict[int, tuple[list[dict], list[list]]]) -> dict:
    """The serving overheads (module docstring) from the requests' timings and the `cpu` tables `t`
    (hardware.profiles.MeasuredTables): idle requests, and per co-run batch its prompts and the
    decoding streams' (time, tokens) stamps."""
    from hardware.perf import _interp, _measured_decode

    pf_extra = [r["prefill_s"] + r["transfer_s"] - _interp(r["prompt"], t.prefill_tokens, t.prefill_s) for r in idle]
    # extra = a + b * tokens (least squares over the idle requests: KV framing/sending grows with the prompt)
    slope, icept = np.polyfit([r["prompt"] for r in idle], pf_extra, 1)
    path = [r["ttft_s"] - r["queued_s"] - r["prefill_s"] - r["transfer_s"] for r in idle]
    # mean context over the generated tokens: prompt + half the output
    tok1 = [r["tpot_s"] - _measured_decode(t, 1, r["prompt"] + SERVING_OUTPUT / 2) for r in idle]
    prefills, decode_factors, tok_batches, gaps_ms = [], [], [], {}
    for batch, (phase_prefills, stamps) in corun.items():
        # prefill worker busy from start + queued to start + queued + prefill + transfer
        windows = [(r["start"] + r["queued_s"], r["start"] + r["queued_s"] + r["prefill_s"] + r["transfer_s"])
                   for r in phase_prefills]
        inside, outside = _gaps(stamps, windows)
        gap_in = float(np.median(inside)) if inside else None  # seconds per token
        gap_out = float(np.median(outside)) if outside else None
        if gap_in is not None and gap_out is not None:
            decode_factors.append(gap_in / gap_out)
        ctx = batch * (CORUN_DECODE_PROMPT + CORUN_OUTPUT / 2)  # the batch's mean cached tokens
        tok_batches.append(gap_out - _measured_decode(t, batch, ctx) if gap_out is not None else 0.0)
        gaps_ms[batch] = dict(inside=None if gap_in is None else gap_in * 1e3,
                              outside=None if gap_out is None else gap_out * 1e3,
                              n_inside=len(inside), n_outside=len(outside))
        prefills += phase_prefills
    alone = [_interp(r["prompt"], t.prefill_tokens, t.prefill_s) + icept + slope * r["prompt"] for r in prefills]
    corun_prefill = float(np.median([(r["prefill_s"] + r["transfer_s"]) / a for r, a in zip(prefills, alone)]))
    return dict(corun_slowdown_prefill=corun_prefill,
                corun_slowdown_decode=float(np.mean(decode_factors)) if decode_factors else 1.0,
                corun_gaps_ms=gaps_ms, prefill_extra_s=float(icept), prefill_extra_per_token_s=float(slope),
                request_path_s=float(np.median(path)), token_overhead_batches=[1, *corun],
                token_overhead_s=[float(np.median(tok1)), *tok_batches])


def measure(config: str = "cluster.yaml") -> dict:
    """Measure on the live stack of `config` and write serving.json; returns what it wrote."""
    from bench.cpu_profile import ensure_measured
    from hardware.cpu import serving_path
    from orchestrator.core.config import load_config

    m = ensure_measured()
    t = m.tables()
    assert t is not None, "the cpu profile has no engine tables (model wheel missing?)"
    idle, corun = asyncio.run(_collect(load_config(config)))
    out = dict(fingerprint=m.fingerprint, **overheads(t, idle, corun),
               raw=dict(idle=idle, corun_prefills=[r for prefills, _ in corun.values() for r in prefills]))
    serving_path().write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    res = measure(sys.argv[1] if len(sys.argv) > 1 else "cluster.yaml")
    print(json.dumps({k: v for k, v in res.items() if k != "raw"}, indent=1))
    for kind in ("idle", "corun_prefills"):
        for r in res["raw"][kind]:
            print(kind, {k: round(v * 1e3, 1) if k.endswith("_s") and v is not None else v for k, v in r.items()})
