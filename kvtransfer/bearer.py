"""A shared secret carried as `authorization: Bearer <token>` gRPC metadata, checked in constant time.

The KV receiver (kvtransfer/grpc_backend.py) checks the deployment's transfer token with it, the
frontend (orchestrator/serving/auth.py) its API key. Neither the expected nor the presented token
ever appears in what `refusal` returns, so its answer is safe in logs and status messages.
"""
from __future__ import annotations

import hmac
from typing import Iterable

METADATA_KEY = "authorization"


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata that presents `token`."""
    return ((METADATA_KEY, f"Bearer {token}"),)


def refusal(metadata: Iterable[tuple[str, str | bytes]] | None, token: str) -> str | None:
    """None when `metadata` presents `token`, else why not (without either token)."""
    values = [v for k, v in metadata or () if k == METADATA_KEY]
    if not values:
        return f"missing; send '{METADATA_KEY}: Bearer <token>' metadata"
    presented = values[0].encode() if isinstance(values[0], str) else values[0]
    if not hmac.compare_digest(presented, f"Bearer {token}".encode()):  # constant time: no timing hint
        return "invalid bearer token"
    return None
