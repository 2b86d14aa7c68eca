"""Signing what a worker sends, so the collector can tell who sent it.

A worker holds one secret, its token (issued by `tokenfarm workers add`); every envelope it
publishes carries an HMAC-SHA256 of the envelope's canonical JSON under that token. This module
knows nothing of the database: the collector looks the token up and calls `verify`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets

TOKEN_BYTES = 32


def new_token() -> str:
    return secrets.token_hex(TOKEN_BYTES)


def canonical(body: dict) -> bytes:
    """The bytes signed: the envelope without its signature, keys sorted, no whitespace."""
    unsigned = {k: v for k, v in body.items() if k != "signature"}
    return json.dumps(unsigned, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign(body: dict, token: str) -> str:
    return hmac.new(token.encode(), canonical(body), hashlib.sha256).hexdigest()


def verify(body: dict, token: str) -> bool:
    signature = body.get("signature")
    # An empty token is a revoked worker's: an HMAC under it is one anybody can make.
    if not token or not isinstance(signature, str) or not signature:
        return False
    return hmac.compare_digest(signature, sign(body, token))
