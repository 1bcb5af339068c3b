"""`generate --target HOST:PORT`: stream an answer from a running frontend through the client library."""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from orchestrator.cli import UserError

if TYPE_CHECKING:
    from orchestrator.client import Final


def run_remote(args, params) -> int:
    from orchestrator.client import ClientError
    from orchestrator.cli.remote import open_client

    kwargs = dict(max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
                  seed=params.seed, stop=list(params.stop))
    prompt = {"prompt": args.prompt} if args.raw else {"messages": [("user", args.prompt)]}
    try:
        with open_client(args.target, args.tls_ca, args.timeout) as client:
            stream = client.generate(**prompt, **kwargs)
            for chunk in stream:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
    except ClientError as e:
        raise UserError(f"{args.target}: {e}") from None
    print(f"\n{summary(stream.final)}", file=sys.stderr)
    return 0


def summary(f: Final) -> str:
    """The one-line summary of a Final: usage, timings next to the router's prediction (when it made
    one), workers. E.g. `TTFT 812 ms (predicted 790, p90 bound 905), TPOT 41.2 ms (predicted 39.8, ...)`."""
    t, p = f.timings, f.prediction
    ttft, tpot = f"TTFT {t.ttft_ms:.0f} ms", f"TPOT {t.mean_tpot_ms:.1f} ms"
    if p is not None and p.quantile > 0:
        q = f"p{p.quantile * 100:g}"
        ttft += f" (predicted {p.ttft_ms:.0f}, {q} bound {p.ttft_bound_ms:.0f})"
        tpot += f" (predicted {p.tpot_ms:.1f}, {q} bound {p.tpot_bound_ms:.1f})"
    return (f"[{f.usage.prompt_tokens} prompt tokens, {f.usage.completion_tokens} generated, "
            f"finish {f.finish_reason.value}; {ttft}, {tpot}; {f.prefill_worker} -> {f.decode_worker}]")
