"""`generate`: answer a prompt in-process (--local) or through a running server (--target)."""
from __future__ import annotations

import argparse
import sys
import time

from orchestrator.cli import UserError
from orchestrator.cli.remote import TARGET_HELP, add_tls_argument


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the user's message (the chat template is applied)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--local", action="store_true", help="run the numpy model in this process (no Ray)")
    where.add_argument("--target", metavar="HOST:PORT", help=TARGET_HELP)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds, with --target")
    add_tls_argument(p)


def _params(args):
    from model.sampling import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed, stop=tuple(args.stop))
    try:
        params.validate()
    except ValueError as e:
        raise UserError(str(e)) from None
    return params


def run(args) -> int:
    if not args.prompt.strip():
        raise UserError("prompt: must not be empty")
    params = _params(args)
    if args.target:
        from orchestrator.cli.generate_remote import run_remote

        return run_remote(args, params)
    return _run_local(args, params)


def _run_local(args, params) -> int:
    from model.errors import ModelFileError
    from model.generation import generate
    from model.loaded import load_model
    from model.tokenizer import ChatMessage

    try:
        lm = load_model()
    except ModelFileError as e:
        raise UserError(str(e)) from None
    tok = lm.tokenizer
    ids = tok.encode(args.prompt) if args.raw else tok.chat_ids([ChatMessage("user", args.prompt)])
    start = time.perf_counter()
    n = 0
    try:
        for t in generate(lm.model, tok, ids, params):
            n += 1
            sys.stdout.write(t.text)
            sys.stdout.flush()
    except ValueError as e:
        raise UserError(str(e)) from None
    elapsed = time.perf_counter() - start
    print(f"\n[{len(ids)} prompt tokens, {n} generated in {elapsed:.2f} s, {n / elapsed:.1f} tok/s]",
          file=sys.stderr)
    return 0
