"""Signed, expiring download links for the simulators (an HMAC over path and expiry)."""

from __future__ import annotations

import hashlib
import hmac
import time
from urllib.parse import urlencode

SANDBOX_SIGNING_KEY = b"export-pipeline-sandbox"


def sign_path(path: str, expires_at: float, key: bytes = SANDBOX_SIGNING_KEY) -> str:
    """Return ``path?expires=..&signature=..`` valid until ``expires_at`` (epoch seconds)."""
    expires = str(int(expires_at))
    sig = hmac.new(key, f"{path}\n{expires}".encode(), hashlib.sha256).hexdigest()
    return f"{path}?{urlencode({'expires': expires, 'signature': sig})}"


def check_signature(
    path: str, expires: str | None, signature: str | None, key: bytes = SANDBOX_SIGNING_KEY
) -> str | None:
    """None when the link is valid, else the reason ("invalid signature" / "expired")."""
    if not expires or not signature:
        return "missing signature"
    expected = hmac.new(key, f"{path}\n{expires}".encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signature):
        return "invalid signature"
    if time.time() > int(expires):
        return "expired"
    return None
