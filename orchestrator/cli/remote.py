"""Connecting a command to a running frontend: --target, --tls-ca, and PDORCH_API_KEY as the token."""
from __future__ import annotations

from pathlib import Path

from orchestrator.cli import UserError

TARGET_HELP = "a running frontend (python -m orchestrator serve); PDORCH_API_KEY, if set, goes as its bearer token"


def add_tls_argument(p) -> None:
    p.add_argument("--tls-ca", type=Path, default=None, metavar="PEM",
                   help="connect over TLS, trusting the certificate(s) in this file")


def open_client(target: str, tls_ca: Path | None, timeout: float):
    """A Client for `target`, over TLS when `tls_ca` is given, with PDORCH_API_KEY as its token."""
    from orchestrator.serving.auth import api_key_from_env
    from orchestrator.client import Client

    root = None
    if tls_ca is not None:
        try:
            root = tls_ca.read_bytes()
        except OSError as e:
            raise UserError(f"--tls-ca: cannot read {tls_ca}: {e.strerror}") from None
    return Client(target, timeout=timeout, token=api_key_from_env(), root_certificates=root)
