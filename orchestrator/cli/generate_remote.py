"""`generate --target HOST:PORT`: stream an answer from a running frontend through the client library."""
from __future__ import annotations

import sys

from orchestrator.cli import UserError


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
    f = stream.final
    t = f.timings
    print(f"\n[{f.usage.prompt_tokens} prompt tokens, {f.usage.completion_tokens} generated, finish {f.finish_reason.value}; "
          f"TTFT {t.ttft_ms:.0f} ms, TPOT {t.mean_tpot_ms:.1f} ms; {f.prefill_worker} -> {f.decode_worker}]",
          file=sys.stderr)
    return 0
