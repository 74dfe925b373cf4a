"""HTTP calls to provider APIs with bounded, jittered retries that honour ``Retry-After``.

Providers build on :class:`ApiClient`; the download path (``transfer``) shares :class:`RetryPolicy`.
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import httpx

from export_pipeline.core.errors import ConfigurationError, TransientProviderError
from export_pipeline.core.redact import get_logger, protect_library_loggers

log = get_logger(__name__)  # redacts secrets from every message
protect_library_loggers()  # httpx/httpcore log full (signed) URLs at INFO/DEBUG

T = TypeVar("T")

RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 30.0
    # A server may ask for a long wait; beyond this we give up rather than block a run for hours.
    max_retry_after: float = 120.0
    jitter: float = 0.25  # fraction of the delay added at random

    def backoff(self, attempt: int) -> float:
        """Delay before retry number ``attempt`` (1-based): exponential, capped, jittered."""
        delay = min(self.max_delay, self.base_delay * (2 ** (attempt - 1)))
        return delay * (1 + random.uniform(0, self.jitter))


def retry_after_seconds(response: httpx.Response) -> float | None:
    """Parse ``Retry-After`` as delta-seconds or an HTTP date; None when absent or unreadable."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def call_with_retries(
    send: Callable[[], httpx.Response],
    *,
    policy: RetryPolicy,
    describe: str,
    provider: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> httpx.Response:
    """Run ``send`` until it gives a non-retryable answer or the attempts run out.

    Returns the last response for the caller to classify; raises TransientProviderError when
    every attempt met a network fault or a retryable status.
    """
    last_problem = ""
    for attempt in range(1, policy.max_attempts + 1):
        try:
            response = send()
        except (httpx.TransportError, httpx.TimeoutException) as exc:
            last_problem = f"{type(exc).__name__}: {exc}"
            delay = policy.backoff(attempt)
        else:
            if response.status_code not in RETRYABLE_STATUS:
                return response
            last_problem = f"HTTP {response.status_code}"
            wait = retry_after_seconds(response)
            if wait is not None and wait > policy.max_retry_after:
                raise TransientProviderError(
                    f"{describe}: server asked to wait {wait:.0f}s (Retry-After), "
                    f"more than max_retry_after={policy.max_retry_after:.0f}s",
                    provider=provider,
                    hint="try again later",
                )
            delay = wait if wait is not None else policy.backoff(attempt)
        if attempt == policy.max_attempts:
            break
        log.warning(
            "%s failed (%s); retry %d/%d in %.2fs",
            describe,
            last_problem,
            attempt,
            policy.max_attempts - 1,
            delay,
        )
        sleep(delay)
    raise TransientProviderError(
        f"{describe} still failing after {policy.max_attempts} attempts ({last_problem})",
        provider=provider,
        hint="the provider is unavailable or rate-limiting; the run can be retried",
    )


class ApiClient:
    """A provider API: base URL, auth headers, timeouts, retries, and a clear 401.

    ``token_env_var`` is only used to name the setting in error messages, never read here.
    """

    def __init__(
        self,
        *,
        provider: str,
        base_url: str,
        headers: Mapping[str, str] | None = None,
        token_env_var: str | None = None,
        retry: RetryPolicy | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        raise_on_401: bool = True,
    ) -> None:
        self.provider = provider
        # False: hand a 401 back to the provider, whose error body may carry what support
        # needs (a request id); the provider must then raise ConfigurationError itself.
        self.raise_on_401 = raise_on_401
        self.base_url = base_url.rstrip("/")
        self.token_env_var = token_env_var
        self.retry = retry or RetryPolicy()
        # Also the download timeout for this provider's files (connect, read/stall, write).
        self.timeout = timeout
        self._client = httpx.Client(
            base_url=self.base_url,
            headers=dict(headers or {}),
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            follow_redirects=False,
            transport=transport,
        )

    @property
    def auth_headers(self) -> dict[str, str]:
        return {k: v for k, v in self._client.headers.items() if k.lower() == "authorization"}

    @property
    def host(self) -> str:
        """``host[:port]`` of the API: credentials go to exactly this origin and nowhere else."""
        url = httpx.URL(self.base_url)
        # An explicit port even for defaults: a bare host would match every port of it.
        port = url.port or {"http": 80, "https": 443}.get(url.scheme)
        return f"{url.host}:{port}" if port else url.host

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        data: Mapping[str, Any] | None = None,  # form-encoded body (e.g. Stripe)
        describe: str | None = None,
    ) -> httpx.Response:
        describe = describe or f"{self.provider} {method} {path}"
        response = call_with_retries(
            lambda: self._client.request(method, path, json=json, params=params, data=data),
            policy=self.retry,
            describe=describe,
            provider=self.provider,
        )
        if response.status_code == 401 and self.raise_on_401:
            setting = f" (check {self.token_env_var})" if self.token_env_var else ""
            raise ConfigurationError(
                f"{describe}: the provider rejected our credentials (HTTP 401){setting}",
                provider=self.provider,
                hint=f"set a valid token in {self.token_env_var}"
                if self.token_env_var
                else "check the credentials",
            )
        return response

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
