"""The live bench's requests through a load generator the project did not write (issue 18, item 3):
`python -m bench.loadgen` (`make bench-loadgen`).

NVIDIA's aiperf (bench/aiperf_io.py: the request file, the command line, its definitions) drives the
OpenAI door (`/v1/completions`, streamed) with the same requests as `bench`: the config's trace, fitted
and rescaled as `bench` does, each prompt as the same token ids, the same max_tokens with ignore_eos,
replayed at the same arrival times (aiperf's `--fixed-schedule`). Beside it, two measurements of ours:
the `bench` path itself (bench/live.py over the gRPC client, timed by orchestrator/client/timing.py),
the figure the README reports, and our own timing of the OpenAI door (bench/door_timing.py, the same
definitions). aiperf vs bench is the issue's check; the door column says whether a gap between them is
the door's (it shows in both HTTP columns) or aiperf's (only in its own).

All three run on one deployment, after the bench's warm-up request, each in turn per round, the order
reversed every other round so the machine's drift does not favour one. The router is `least_loaded`
(ROUTER_POLICY) so that every run serves every request. Each tool's per-request TTFT and TPOT
(aiperf: its inter-token latency) are pooled over the rounds and summarised by the same percentile
function (orchestrator/core/summary.py); aiperf's own summary per round is kept beside them, and so is
the server's own mean TTFT and TPOT over each run (its metrics histograms), which no client's clock
touches. Agreement: |aiperf / bench - 1| <= 10% for TTFT p50 and TPOT p50. aiperf runs from its own
virtualenv (`.venv-loadgen`, made by `make bench-loadgen`): its dependencies (protobuf 7, transformers)
clash with the project's pins. Writes bench/results/loadgen.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import aiohttp

from bench import RESULTS
from bench.aiperf_io import RECORDS_FILE, SUMMARY_FILE, TOOL, LoadRequest, command, dataset_lines, figures, records
from bench.door_timing import timed_completion
from bench.live import FILLER, _one, auto_rate, prompt_ids
from orchestrator.core.summary import Summary, format_table

REPO = Path(__file__).resolve().parents[1]
AIPERF = REPO / ".venv-loadgen" / "bin" / "aiperf"
AGREEMENT = 0.10  # the tolerance on TTFT p50 and TPOT p50
AIPERF_TIMEOUT_S = 600.0
# not the config's `sla` policy: that one rejects early, on this shared machine a different subset in each run,
# and picks local or remote prefill from what it has learned; with one prefill and one decode worker
# least_loaded places every request on the one pair and every prompt on the prefill worker
ROUTER_POLICY = "least_loaded"
TOOLS = ("ours", "ours_http", TOOL)  # the bench's gRPC client, our timing of the OpenAI door, aiperf on the door


def bench_requests(cfg, tok, requests: int | None, rate: float | None) -> tuple[list[LoadRequest], object, float]:
    """The requests `bench` sends (bench/live.py run_bench): (requests, the trace scaling, the rate)."""
    from orchestrator.core.trace import fit_trace, load_azure_trace

    wl = cfg.workload
    rows = load_azure_trace(wl.trace, limit=requests or wl.requests)
    rate = rate or wl.target_rate or auto_rate(cfg, rows)
    trace, scaling = fit_trace(rows, wl.max_prompt_tokens, wl.max_output_tokens, rate)
    filler = tok.encode(FILLER)
    return ([LoadRequest(r.arrival_s, prompt_ids(tok, r.prompt_tokens, filler, i), r.output_tokens)
             for i, r in enumerate(trace)], scaling, rate)


async def _ours(client, reqs: list[LoadRequest], sla, round_: int) -> dict:
    """The bench's client on `reqs` at their arrivals: per-request figures, as bench/live.py measures them."""
    t0 = time.perf_counter()
    outcomes = await asyncio.gather(*(_one(client, f"loadgen-{round_}-{i}", r.prompt_ids, r.max_tokens, sla,
                                           r.arrival_s, t0) for i, r in enumerate(reqs)))
    return {"failed": sum(bool(o.error) for o in outcomes),
            "per_request": [{"ttft_ms": o.ttft_ms, "tpot_ms": o.tpot_ms, "output_tokens": o.output_tokens,
                             "error": o.error} for o in outcomes]}


async def _ours_http(session, base_url: str, model: str, reqs: list[LoadRequest]) -> dict:
    """Our own timing of the OpenAI door (bench/door_timing.py) on `reqs` at their arrivals."""
    t0 = time.perf_counter()
    done = await asyncio.gather(*(timed_completion(session, base_url, model, r.prompt_ids, r.max_tokens, r.arrival_s, t0)
                                  for r in reqs))
    return {"failed": sum(bool(err) for _, err in done),
            "per_request": [{"ttft_ms": None if t.ttft_s is None else t.ttft_s * 1e3,
                             "tpot_ms": None if t.tpot_s is None else t.tpot_s * 1e3, "output_tokens": t.tokens,
                             "error": err} for t, err in done]}


async def _aiperf(exe: Path, url: str, model: str, dataset: Path, tokenizer: Path, artifacts: Path,
                  reqs: list[LoadRequest]) -> dict:
    """aiperf on the request file, to completion (its console output in artifacts/console.log): its
    per-request figures, its own summary, and how late it sent each request against the schedule."""
    artifacts.mkdir(parents=True)
    # HF_HUB_OFFLINE is left unset: aiperf 0.13.0 then asks the hub cache for the local directory by name and
    # fails; a local tokenizer directory is read from disk with or without it, so nothing is downloaded
    with open(artifacts / "console.log", "wb") as log:
        proc = await asyncio.create_subprocess_exec(
            *command(exe, url=url, model=model, dataset=dataset, tokenizer=tokenizer, artifacts=artifacts,
                     request_count=len(reqs)),
            stdout=log, stderr=asyncio.subprocess.STDOUT, env={**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1"})
        try:
            rc = await asyncio.wait_for(proc.wait(), AIPERF_TIMEOUT_S)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise RuntimeError(f"aiperf did not finish in {AIPERF_TIMEOUT_S:.0f} s; see {artifacts / 'console.log'}")
    if rc != 0 or not (artifacts / SUMMARY_FILE).exists():
        tail = (artifacts / "console.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"aiperf exited with {rc}; the end of its output:\n{tail}")
    summary = json.loads((artifacts / SUMMARY_FILE).read_text())
    recs = records((artifacts / RECORDS_FILE).read_text().splitlines())
    if [r.index for r in recs] != list(range(len(reqs))):
        raise RuntimeError(f"aiperf recorded requests {[r.index for r in recs]}, expected 0..{len(reqs) - 1}")
    first = min(r.start_ns for r in recs)
    return {"version": summary.get("aiperf_version"), "failed": sum(r.error for r in recs),
            "own_summary": figures(summary).as_dict(),
            "send_lag_ms": Summary.of((r.start_ns - first) / 1e6 - q.arrival_s * 1e3 for r, q in zip(recs, reqs)).as_dict(),
            "per_request": [{"ttft_ms": r.ttft_ms, "tpot_ms": r.itl_ms, "output_tokens": r.output_tokens,
                             "error": r.error} for r in recs]}


def _server(dep) -> dict[str, float]:
    """The frontend's own TTFT and TPOT histograms (sum, count): the server's clock, neither client's."""
    reg = dep.frontend.service.metrics.registry
    return {f"{m}_{k}": reg.get_sample_value(f"pdorch_{name}_{k}") or 0.0
            for m, name in (("ttft", "time_to_first_token_seconds"), ("tpot", "time_per_output_token_seconds"))
            for k in ("sum", "count")}


def _server_means(before: dict, after: dict) -> dict:
    """Mean server-side TTFT and TPOT (ms) of the requests that finished between two _server snapshots."""
    out = {}
    for m in ("ttft", "tpot"):
        n = after[f"{m}_count"] - before[f"{m}_count"]
        out[f"{m}_mean_ms"] = (after[f"{m}_sum"] - before[f"{m}_sum"]) / n * 1e3 if n else None
    return out


def summarise(rounds: list[dict], who: str) -> dict:
    """One tool's TTFT and TPOT over every round's completed requests (the same percentile function for all),
    and how far its mean stands above the server's own mean over the same run, averaged over the rounds
    (what the client's path and clock add; the run-to-run noise of the load cancels in the difference)."""
    rows = [r for rnd in rounds for r in rnd[who]["per_request"] if not r["error"]]
    beyond = {}
    for m in ("ttft", "tpot"):
        gaps = [Summary.of(r[f"{m}_ms"] for r in rnd[who]["per_request"] if not r["error"]).mean
                - rnd[who]["server"][f"{m}_mean_ms"] for rnd in rounds if rnd[who]["server"][f"{m}_mean_ms"] is not None]
        beyond[f"{m}_ms"] = statistics.fmean(gaps) if gaps else None
    return {"ttft_ms": Summary.of(r["ttft_ms"] for r in rows).as_dict(),
            "tpot_ms": Summary.of(r["tpot_ms"] for r in rows).as_dict(), "mean_beyond_server": beyond}


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def compare(ours: dict, theirs: dict) -> dict:
    """aiperf / ours for each figure, and whether TTFT p50 and TPOT p50 agree within AGREEMENT."""
    ratios = {f"{m}_{q}": _ratio(theirs[m][q], ours[m][q])
              for m in ("ttft_ms", "tpot_ms") for q in ("p50", "p90")}
    agree = {m: ratios[f"{m}_p50"] is not None and abs(ratios[f"{m}_p50"] - 1) <= AGREEMENT
             for m in ("ttft_ms", "tpot_ms")}
    return {"ratio_aiperf_over_ours": ratios, "agree_within_10pct": agree | {"both": all(agree.values())}}


async def run(cfg, requests: int | None = None, rate: float | None = None, repeats: int = 2,
              aiperf: Path = AIPERF, keep: Path | None = None) -> dict:
    """The side-by-side run; the result JSON. `keep`: a directory for the request file, the tokenizer and
    aiperf's artifacts (default: a temporary one, removed at the end)."""
    from decode import blas
    from model.loaded import load_model
    from orchestrator.client import AsyncClient
    from orchestrator.serving.deployment import Deployment

    cfg = replace(cfg, router_policy=ROUTER_POLICY)
    if not aiperf.exists():
        raise FileNotFoundError(f"{aiperf}: aiperf is not installed; `make bench-loadgen` installs it")
    tok = load_model().tokenizer
    reqs, scaling, rate = bench_requests(cfg, tok, requests, rate)
    print(f"trace: {cfg.workload.trace.name}, {len(reqs)} requests; scaled: {scaling.describe()}")
    sla = cfg.sla_classes[cfg.default_sla_class]
    rounds = []
    with tempfile.TemporaryDirectory(prefix="loadgen-") as tmp:
        work = Path(tmp) if keep is None else keep
        tokenizer = tok.save_pretrained(work / "tokenizer")
        dataset = work / "requests.jsonl"
        dataset.write_text("\n".join(dataset_lines(reqs, lambda ids: tok.decode(ids, skip_special_tokens=False))) + "\n")
        async with Deployment(cfg, port=0, metrics_port=0, http_port=0) as dep:
            print(f"frontend {dep.target}, OpenAI door {dep.http_url}; {TOOL} from {aiperf}")
            async with AsyncClient(dep.target) as client, aiohttp.ClientSession() as session:
                await _one(client, "warmup", prompt_ids(tok, 16, tok.encode(FILLER), 0), 4, sla, 0.0, time.perf_counter())
                for k in range(repeats):
                    entry = {"round": k, "order": list(TOOLS if k % 2 == 0 else TOOLS[::-1])}
                    for who in entry["order"]:
                        started, before = time.time(), _server(dep)
                        if who == "ours":
                            entry[who] = await _ours(client, reqs, sla, k)
                        elif who == "ours_http":
                            entry[who] = await _ours_http(session, dep.http_url, cfg.model_name, reqs)
                        else:
                            entry[who] = await _aiperf(aiperf, dep.http_url.removesuffix("/v1"), cfg.model_name,
                                                       dataset, tokenizer, work / f"aiperf-{k}", reqs)
                        entry[who] |= {"started_unix": started, "server": _server_means(before, _server(dep))}
                        print(f"round {k + 1}/{repeats}: {who} done ({time.time() - started:.0f} s)", flush=True)
                    rounds.append(entry)
    ours, ours_http, theirs = (summarise(rounds, who) for who in TOOLS)
    verdict = compare(ours, theirs)
    r, r_http = verdict["ratio_aiperf_over_ours"], compare(ours_http, theirs)["ratio_aiperf_over_ours"]
    rows = [[f"{name} {q} (ms)", ours[m][q], ours_http[m][q], theirs[m][q], f"{r[f'{m}_{q}']:.3f}",
             f"{r_http[f'{m}_{q}']:.3f}"] for name, m in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms")) for q in ("p50", "p90")]
    print()
    print(format_table(["metric", "ours: bench (gRPC)", "ours: OpenAI door", f"{TOOL}: OpenAI door",
                        "aiperf / bench", "aiperf / ours on the door"], rows))
    print()
    beyond = [[f"mean {name} - the server's own (ms)", *(s["mean_beyond_server"][m] for s in (ours, ours_http, theirs))]
              for name, m in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"))]
    print(format_table(["", "ours: bench (gRPC)", "ours: OpenAI door", f"{TOOL}: OpenAI door"], beyond, "{:.2f}"))
    for rnd in rounds:
        print(f"round {rnd['round'] + 1}: " + "; ".join(
            f"{who} failed {rnd[who]['failed']}, server mean TTFT {rnd[who]['server']['ttft_mean_ms']:.0f} ms"
            for who in rnd["order"]))
    agree = verdict["agree_within_10pct"]
    print(f"\n{len(reqs)} requests x {repeats} rounds per tool at {rate:.3g} req/s; within 10% on TTFT p50: "
          f"{agree['ttft_ms']}, on TPOT p50: {agree['tpot_ms']}")
    shown = command(aiperf, url="URL", model=cfg.model_name, dataset=Path("requests.jsonl"),
                    tokenizer=Path("tokenizer"), artifacts=Path("ARTIFACTS"), request_count=len(reqs))
    return {"tool": {"name": TOOL, "version": rounds[0][TOOL]["version"], "command": shown[1:]},
            "trace": str(cfg.workload.trace.name), "requests": len(reqs), "repeats": repeats, "rate_req_s": rate,
            "router_policy": cfg.router_policy,
            "scaling": asdict(scaling), "blas_core": blas.openblas_core(), "ours": ours, "ours_http": ours_http,
            TOOL: theirs, **verdict, "ratio_aiperf_over_ours_http": r_http,
            "rounds": rounds}


def main(argv: list[str] | None = None) -> int:
    from orchestrator.cli.serve import add_config_argument, load_config_or_exit
    from orchestrator.logging_setup import configure_logging

    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n\n")[0])
    add_config_argument(p)
    p.add_argument("--requests", type=int, default=None, help="requests per round (default: the config's workload)")
    p.add_argument("--rate", type=float, default=None, help="arrival rate in requests/s (default: as `bench`)")
    p.add_argument("--repeats", type=int, default=2, help="rounds per tool, in alternating order (default 2)")
    p.add_argument("--aiperf", type=Path, default=AIPERF, help=f"the aiperf executable (default {AIPERF})")
    p.add_argument("--output", type=Path, default=RESULTS / "loadgen.json")
    p.add_argument("--keep", type=Path, default=None,
                   help="keep the request file, the tokenizer and aiperf's artifacts in this new directory")
    args = p.parse_args(argv)
    if args.repeats < 1 or (args.requests is not None and args.requests < 1):
        p.error("--repeats and --requests must be >= 1")
    configure_logging()
    cfg = load_config_or_exit(args.config)
    try:
        result = asyncio.run(run(cfg, args.requests, args.rate, args.repeats, args.aiperf, args.keep))
    except (FileNotFoundError, RuntimeError) as e:  # aiperf missing or failed: say so, without a traceback
        print(f"bench.loadgen: {e}", file=sys.stderr)
        return 1
    args.output.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
