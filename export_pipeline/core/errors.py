"""Typed errors: each says what happened, to which export, and what to do about it.

`retryable` tells the transfer layer and Dagster's RetryPolicy whether trying again can help.
Messages and hints are redacted (``core.redact``) when the error is made: an error travels into
Dagster's event log, the ledger and compute logs, and must never carry a signed URL or a token.
"""

from __future__ import annotations

from export_pipeline.core.redact import redact_text


class ExportPipelineError(Exception):
    """Base class. Carries enough context to find the export, file and line at fault."""

    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        provider: str | None = None,
        kind: str | None = None,
        export_id: str | None = None,
        file: str | None = None,
        line: int | None = None,
        code: str | None = None,
        request_id: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.message = redact_text(message)
        self.provider = provider
        self.kind = kind
        self.export_id = export_id
        self.file = file
        self.line = line
        self.code = code
        self.request_id = request_id
        self.hint = redact_text(hint) if hint else hint
        super().__init__(self._render())

    def _render(self) -> str:
        where = [
            f"{label}={value}"
            for label, value in (
                ("provider", self.provider),
                ("kind", self.kind),
                ("export", self.export_id),
                ("file", self.file),
                ("line", self.line),
                ("code", self.code),
                ("request_id", self.request_id),
            )
            if value is not None
        ]
        text = self.message
        if where:
            text += " [" + ", ".join(where) + "]"
        if self.hint:
            text += f" -> {self.hint}"
        # Fields may be set after construction (transfer fills provider/export/file in).
        return redact_text(text)

    def __str__(self) -> str:
        return self._render()


class ConfigurationError(ExportPipelineError):
    """Credentials or settings are wrong (e.g. HTTP 401). Retrying will not help."""


class ProviderRejectedError(ExportPipelineError):
    """The provider refused the request for a reason that retrying cannot fix
    (INVALID_FORMAT, INVALID_DATE_RANGE, EXPORT_SIZE_EXCEEDED, success:false...)."""


class UnsafeUrlError(ProviderRejectedError):
    """A provider handed us a URL the download policy refuses (``core.netpolicy``): wrong
    scheme, or a loopback/private/link-local/... address that no setting allows. Not retried."""


class LimitExceededError(ProviderRejectedError):
    """A download is larger than allowed (announced, sent or decompressed), or inflates more
    than the expansion-ratio cap (a decompression bomb). Not retried."""


class TransientProviderError(ExportPipelineError):
    """429 / 5xx / network fault that outlived the retries. Trying later may work."""

    retryable = True


class ExportInFlightError(ExportPipelineError):
    """The provider allows one export at a time per kind and one is already running."""

    retryable = True


class ExportClaimedError(ExportPipelineError):
    """Another live run holds the export's lease (it is downloading or loading it now)."""


class ExportFailedError(ExportPipelineError):
    """The provider reports the export as failed; `code`/`message` are the provider's."""


class ExportExpiredError(ExportPipelineError):
    """The export's files are gone for good; the same request has to be made again."""


class ExportLostError(ExportPipelineError):
    """The provider does not know the export id (404/NOT_FOUND)."""


class ExportNotReadyError(ExportPipelineError):
    """The export is not finished yet (e.g. EXPORT_NOT_READY); keep waiting."""

    retryable = True


class ExportTimeoutError(ExportPipelineError):
    """We waited for the export as long as configured; it stays in the ledger for the sensor."""

    retryable = True


class LinkExpiredError(ExportPipelineError):
    """A signed download link stopped working; ask the provider for a fresh one."""

    retryable = True


class IntegrityError(ExportPipelineError):
    """What arrived differs from what the provider announced (size, row count)."""


class ParseError(ExportPipelineError):
    """A file could not be read; `file` and `line` point at the bad input."""


class WarehouseBusyError(ExportPipelineError):
    """The DuckDB file is locked by another process for longer than we were willing to wait."""

    retryable = True
