"""Remove secrets from text before it is written anywhere (errors, logs, metadata, stores).

A presigned download link is a bearer credential until it expires: whoever reads it from a log
can fetch the export. So every URL or text we write keeps its shape (scheme, host, path, the
harmless query parameters) but loses the values of the parameters below, any ``user:password@``
part, and any ``Bearer``/``Basic`` credential.

The documented list (case-insensitive; extend ``SECRET_PARAMS`` when a provider adds one):

* AWS SigV4/SigV2: ``X-Amz-Signature``, ``X-Amz-Credential``, ``X-Amz-Security-Token``,
  ``Signature``, ``AWSAccessKeyId``
* Google Cloud Storage: ``X-Goog-Signature``, ``X-Goog-Credential``
* Azure SAS: ``sig``; CloudFront: ``Signature``, ``Policy``, ``Key-Pair-Id``
* generic: ``token``, ``access_token``, ``refresh_token``, ``id_token``, ``key``, ``api_key``,
  ``apikey``, ``secret``, ``client_secret``, ``password``, ``passwd``, ``auth``, ``code``,
  ``session``, ``credential``

The same names as JSON object keys (``"token": "..."``) have their values redacted too, except
``code``, ``key``, ``policy``, ``session`` and ``auth``, which are ordinary fields in a body.
No Dagster and no I/O here.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

REDACTED = "REDACTED"

SECRET_PARAMS: frozenset[str] = frozenset(
    {
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
        "signature",
        "awsaccesskeyid",
        "x-goog-signature",
        "x-goog-credential",
        "sig",
        "policy",
        "key-pair-id",
        "token",
        "access_token",
        "refresh_token",
        "id_token",
        "key",
        "api_key",
        "apikey",
        "secret",
        "client_secret",
        "password",
        "passwd",
        "auth",
        "code",
        "session",
        "credential",
    }
)
# JSON object keys whose whole value is a credential. Narrower than the query names: ``code``,
# ``key``, ``policy`` and ``session`` are ordinary fields in a JSON body (an error code...).
SECRET_KEYS: frozenset[str] = (SECRET_PARAMS - {"code", "key", "policy", "session", "auth"}) | {
    "authorization",
    "webhook-signature",
    "cookie",
}

_NAMES = "|".join(sorted((re.escape(n) for n in SECRET_PARAMS), key=len, reverse=True))
# A query parameter, also percent-encoded inside another URL (``%26sig%3D...``). The value runs
# to the next separator; ``%xx`` escapes other than ``%26`` (``&``) are part of the value.
_QUERY_PARAM = re.compile(
    rf"((?:[?&;]|%26|%3F)(?:{_NAMES})(?:=|%3D))((?:[^&;\s#'\"<>%\\]|%(?!26)[0-9A-Fa-f]{{2}})*)",
    re.IGNORECASE,
)
_KEY_NAMES = "|".join(sorted((re.escape(n) for n in SECRET_KEYS), key=len, reverse=True))
# "token": "value" / 'token': 'value' (JSON or a Python repr of a dict).
_JSON_PAIR = re.compile(
    rf"""((["'])(?:{_KEY_NAMES})\2\s*:\s*)(["'])((?:\\.|(?!\3).)*)\3""", re.IGNORECASE
)
_USERINFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^/\s@'\"<>]+@", re.IGNORECASE)
_AUTH_SCHEME = re.compile(r"\b(Bearer|Basic|Token)\s+[A-Za-z0-9._~+/=-]{6,}", re.IGNORECASE)
# An AWS SigV4 Authorization header value (botocore's debug log prints request headers).
_SIGV4 = re.compile(r"(AWS4-HMAC-SHA256)\s+[^'\"\n]*", re.IGNORECASE)


def redact_text(text: str) -> str:
    """``text`` with every secret query value, URL password and bearer credential replaced."""
    if not text:
        return text
    text = _QUERY_PARAM.sub(lambda m: m.group(1) + REDACTED, text)
    text = _JSON_PAIR.sub(lambda m: f"{m.group(1)}{m.group(3)}{REDACTED}{m.group(3)}", text)
    text = _USERINFO.sub(lambda m: m.group(1) + REDACTED + "@", text)
    text = _SIGV4.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    return _AUTH_SCHEME.sub(lambda m: f"{m.group(1)} {REDACTED}", text)


def redact_url(url: object) -> str:
    """A URL (``str`` or ``httpx.URL``) safe to show: same shape, no secret values."""
    return redact_text(str(url))


def redact_obj(value: Any) -> Any:
    """A JSON-like value with secret keys' values and every string redacted (copies)."""
    if isinstance(value, Mapping):
        return {
            k: (REDACTED if str(k).lower() in SECRET_KEYS else redact_obj(v))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact_obj(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


class RedactingFilter(logging.Filter):
    """A logging filter that redacts the rendered message (and drops the args it used).

    Attached to our module loggers and to the handlers our entry points install, so a URL or an
    exception text passed as a ``%s`` argument is cleaned before any handler formats it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to logging's own error path
            return True
        cleaned = redact_text(message)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            # Render the traceback now, redacted: handlers reuse exc_text when it is set.
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
        return True


_FILTER = RedactingFilter()


# Libraries whose INFO/DEBUG lines carry full request URLs or headers (httpx logs every
# "HTTP Request: GET <signed url>"; botocore prints signed headers). Logger filters do not
# apply to child loggers, so each logger that emits is listed.
LIBRARY_LOGGERS = (
    "httpx",
    "httpcore",
    "httpcore.connection",
    "httpcore.http11",
    "httpcore.http2",
    "httpcore.proxy",
    "urllib3.connectionpool",
    "botocore.endpoint",
    "botocore.auth",
    "botocore.hooks",
    "botocore.parsers",
    "uvicorn.access",
    "uvicorn.error",
)


def protect_library_loggers() -> None:
    """Attach the redacting filter to the HTTP libraries' loggers (idempotent)."""
    for name in LIBRARY_LOGGERS:
        get_logger(name)


def get_logger(name: str) -> logging.Logger:
    """``logging.getLogger(name)`` with the redacting filter attached (once)."""
    logger = logging.getLogger(name)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    return logger
