"""The third-party load generator's glue (bench/aiperf_io.py, bench/loadgen.py) and our own timing of the
OpenAI door (bench/door_timing.py, against a stand-in door on loopback): the request file aiperf reads,
its command line, reading its exports back, and the comparison. aiperf is neither installed nor run
here; its export formats are written out as aiperf 0.13.0 writes them."""
from __future__ import annotations

import json

import pytest

from bench.aiperf_io import LoadRequest, command, dataset_lines, figures, records
from bench.loadgen import AGREEMENT, compare, summarise


def _metric(unit: str, **values) -> dict:
    return {"unit": unit, **values}


def test_dataset_lines_carry_the_bench_request_exactly():
    reqs = [LoadRequest(0.0, [1, 2, 3], 5), LoadRequest(1.2345678, [7, 8], 1)]
    lines = [json.loads(line) for line in dataset_lines(reqs, lambda ids: "-".join(map(str, ids)))]
    assert lines[0] == {"text": "1-2-3", "timestamp": 0.0, "output_length": 5,
                        "extra": {"prompt": [1, 2, 3], "ignore_eos": True}}
    assert lines[1]["timestamp"] == 1234.568  # ms, aiperf's unit for single_turn timestamps
    assert lines[1]["extra"]["prompt"] == [7, 8] and lines[1]["output_length"] == 1


def test_command_replays_the_schedule_with_server_token_counts(tmp_path):
    argv = command(tmp_path / "aiperf", url="http://127.0.0.1:1", model="m", dataset=tmp_path / "d.jsonl",
                   tokenizer=tmp_path / "tok", artifacts=tmp_path / "art", request_count=40)
    assert argv[:2] == [str(tmp_path / "aiperf"), "profile"]
    for flag in ("--streaming", "--fixed-schedule", "--use-server-token-count"):
        assert flag in argv
    pairs = dict(zip(argv[2::1], argv[3::1]))
    assert pairs["--endpoint-type"] == "completions" and pairs["--custom-dataset-type"] == "single_turn"
    assert pairs["--request-count"] == "40" and pairs["--tokenizer"] == str(tmp_path / "tok")


def test_figures_from_the_summary_export():
    summary = {"time_to_first_token": _metric("ms", p50=300.0, p90=900.0, count=40),
               "inter_token_latency": _metric("ms", p50=45.0, p90=60.0, count=38),
               "error_request_count": _metric("requests", avg=2.0)}
    f = figures(summary)
    assert (f.ttft_p50, f.ttft_p90, f.tpot_p50, f.tpot_p90, f.ttft_n, f.tpot_n, f.failed) == (300, 900, 45, 60, 40, 38, 2)
    assert figures({k: v for k, v in summary.items() if k != "error_request_count"}).failed == 0
    with pytest.raises(ValueError, match="inter_token_latency"):
        figures({"time_to_first_token": summary["time_to_first_token"]})
    with pytest.raises(ValueError, match="expected 'ms'"):
        figures(summary | {"time_to_first_token": _metric("ns", p50=1.0, p90=2.0)})


def _record(session: int, start_ns: int, ttft=None, itl=None, osl=None, phase="profiling", error=None) -> str:
    metrics = {}
    if ttft is not None:
        metrics["time_to_first_token"] = {"value": ttft, "unit": "ms"}
    if itl is not None:
        metrics["inter_token_latency"] = {"value": itl, "unit": "ms"}
    if osl is not None:
        metrics["output_sequence_length"] = {"value": osl, "unit": "tokens"}
    return json.dumps({"metadata": {"session_num": session, "request_start_ns": start_ns, "benchmark_phase": phase},
                       "metrics": metrics, "error": error})


def test_records_in_request_file_order_profiling_only():
    lines = [_record(1, 2_000, ttft=310.0, itl=44.0, osl=20), "",
             _record(0, 1_000, ttft=290.5, osl=1),  # one token: no inter-token latency
             _record(0, 500, ttft=1.0, phase="warmup"),
             _record(2, 3_000, error={"code": 429, "message": "rejected"})]
    recs = records(lines)
    assert [r.index for r in recs] == [0, 1, 2]
    assert (recs[0].ttft_ms, recs[0].itl_ms, recs[0].output_tokens, recs[0].error) == (290.5, None, 1, False)
    assert (recs[1].start_ns, recs[1].itl_ms, recs[1].output_tokens) == (2_000, 44.0, 20)
    assert recs[2].error and recs[2].ttft_ms is None
    with pytest.raises(ValueError, match="expected 'ms'"):
        records([json.dumps({"metadata": {"session_num": 0, "request_start_ns": 0},
                             "metrics": {"time_to_first_token": {"value": 1, "unit": "ns"}}})])


def test_summarise_pools_rounds_and_skips_failures():
    row = lambda ttft, tpot, error="": {"ttft_ms": ttft, "tpot_ms": tpot, "error": error}  # noqa: E731
    rounds = [{"ours": {"per_request": [row(100, 10), row(300, None), row(None, None, "boom")],
                        "server": {"ttft_mean_ms": 196.0, "tpot_mean_ms": 9.0}}},
              {"ours": {"per_request": [row(200, 30)], "server": {"ttft_mean_ms": 198.0, "tpot_mean_ms": None}}}]
    s = summarise(rounds, "ours")
    assert s["ttft_ms"]["n"] == 3 and s["ttft_ms"]["p50"] == 200
    assert s["tpot_ms"]["n"] == 2 and s["tpot_ms"]["p50"] == 20
    # per round: the client's mean less the server's over the same run; a round without a server mean is left out
    assert s["mean_beyond_server"] == {"ttft_ms": pytest.approx(((200 - 196) + (200 - 198)) / 2),
                                       "tpot_ms": pytest.approx(10 - 9)}


def test_compare_ratio_and_the_ten_percent_rule():
    fig = lambda ttft, tpot: {"ttft_ms": {"p50": ttft, "p90": 2 * ttft}, "tpot_ms": {"p50": tpot, "p90": 2 * tpot}}  # noqa: E731
    v = compare(fig(100.0, 40.0), fig(100.0 * (1 + AGREEMENT - 0.01), 40.0 * 1.2))
    assert v["ratio_aiperf_over_ours"]["ttft_ms_p50"] == pytest.approx(1.09)
    assert v["ratio_aiperf_over_ours"]["tpot_ms_p90"] == pytest.approx(1.2)
    assert v["agree_within_10pct"] == {"ttft_ms": True, "tpot_ms": False, "both": False}
    assert compare(fig(0.0, 40.0), fig(1.0, 40.0))["agree_within_10pct"]["ttft_ms"] is False


def test_door_event_reads_the_door_stream():
    from bench.door_timing import door_event

    assert door_event(b'data: {"object": "text_completion", "choices": [{"index": 0, "text": "Hi"}]}\n') == ("text", "Hi")
    assert door_event(b'data: {"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}\n') is None
    assert door_event(b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 7}}\n') == ("usage", 7)
    assert door_event(b'data: {"choices": [{"text": "x"}], "usage": null}\n') == ("text", "x")
    assert door_event(b'data: {"error": {"message": "boom", "type": "server_error"}}\n') == ("error", "boom")
    assert door_event(b"data: [DONE]\n") == ("done", None)
    assert door_event(b"\n") is None



def _serve_and_time(handler):
    """timed_completion against a stand-in door on a loopback port (aiohttp, as the real door)."""
    import asyncio

    import aiohttp
    from aiohttp import web

    from bench.door_timing import timed_completion
    from orchestrator.serving.metrics import serve_app

    async def main():
        app = web.Application()
        app.router.add_post("/v1/completions", handler)
        runner, port = await serve_app(app, "127.0.0.1", 0)
        try:
            async with aiohttp.ClientSession() as session:
                return await timed_completion(session, f"http://127.0.0.1:{port}/v1", "m", [1, 2], 3, 0.0, 0.0)
        finally:
            await runner.cleanup()

    return asyncio.run(main())


def test_timed_completion_times_text_events_and_counts_usage_tokens():
    import asyncio

    from aiohttp import web

    seen = {}

    async def door(request):
        seen.update(await request.json())
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for text in ("", "a", "b"):  # an event without text does not start the clock
            await resp.write(f'data: {json.dumps({"choices": [{"text": text}]})}\n\n'.encode())
            await asyncio.sleep(0.02)
        await resp.write(b'data: {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 4}}\n\n')
        await resp.write(b"data: [DONE]\n\n")
        return resp

    timing, err = _serve_and_time(door)
    assert err == "" and timing.tokens == 4
    assert seen == {"model": "m", "prompt": [1, 2], "max_tokens": 3, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
    assert timing.ttft_s >= 0.02  # after the text-less first event
    assert timing.tpot_s == pytest.approx((timing.end - timing.first) / 3)


def test_timed_completion_reports_a_refusal():
    from aiohttp import web

    async def door(request):
        return web.json_response({"error": {"message": "busy"}}, status=429)

    timing, err = _serve_and_time(door)
    assert err.startswith("HTTP 429") and "busy" in err and timing.first is None
