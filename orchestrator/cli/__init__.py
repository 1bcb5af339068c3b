"""`python -m orchestrator <command>`: one module per command under orchestrator/cli/.

Each command module defines `add_arguments(parser)` and `run(args) -> int`; modules are
imported only when their command runs, so `generate --local` never imports Ray.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "generate": "answer a prompt (in-process with --local, or through a server with --target)",
    "serve": "start the prefill and decode pools and the gRPC frontend from cluster.yaml",
    "status": "show a running frontend's model, SLA classes and the health and load of every worker",
    "bench": "replay a real trace through local pools and report TTFT / TPOT / SLA attainment",
    "simulate": "run the scaling experiments listed in cluster.yaml in the discrete-event simulator",
    "predict": "predict TTFT, ITL and tokens/s of one model on one hardware configuration",
    "plan": "find the cheapest pool sizes that meet an SLA at a request rate",
    "chaos": "run the live system under load while seeded faults kill, freeze and corrupt its workers, and check "
             "that no token was lost",
}


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 2, no traceback."""


def _command_module(name: str):
    return importlib.import_module(f"orchestrator.cli.{name}")


def build_parser(names: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m orchestrator", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name in names:
            _command_module(name).add_arguments(p)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    wanted = [a for a in argv if a in COMMANDS][:1]
    parser = build_parser(wanted)
    args = parser.parse_args(argv)
    try:
        return int(_command_module(args.command).run(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
