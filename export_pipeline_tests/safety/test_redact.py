"""The redaction rules on the shapes secrets take in practice."""

from __future__ import annotations

import logging

import pytest

from export_pipeline.core.errors import ExportPipelineError
from export_pipeline.core.redact import get_logger, redact_obj, redact_text, redact_url

S3 = (
    "https://b.s3.amazonaws.com/k.json.gz?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=AKIAXX%2F20250101%2Fus-east-1%2Fs3%2Faws4_request"
    "&X-Amz-Date=20250101T000000Z&X-Amz-Expires=60&X-Amz-SignedHeaders=host"
    "&X-Amz-Security-Token=FQoGZXIvYXdzEJr&X-Amz-Signature=abc123def456"
)


@pytest.mark.parametrize(
    ("text", "secret", "kept"),
    [
        (S3, "abc123def456", "X-Amz-Expires=60"),
        (S3, "AKIAXX", "X-Amz-Date=20250101T000000Z"),
        (S3, "FQoGZXIvYXdzEJr", "https://b.s3.amazonaws.com/k.json.gz"),
        (
            "https://a.blob.core.windows.net/c/f.csv?sv=2021&sig=AzSig%2Bx%3D&se=1",
            "AzSig",
            "sv=2021",
        ),
        ("https://cdn.example/f?Policy=eyJ&Signature=cfSig&Key-Pair-Id=K1", "cfSig", "cdn.example"),
        ("https://x.io/dl?token=t0k3n&format=csv", "t0k3n", "format=csv"),
        ("https://user:hunter2@x.io/f.csv", "hunter2", "x.io/f.csv"),
        ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30.sig", "eyJhbGciOi", "Authorization"),
        ('{"token": "s3cr3t", "code": "E1"}', "s3cr3t", '"code": "E1"'),
        # A signed URL nested, percent-encoded, in another URL's query.
        (
            "https://p/r?next=https%3A%2F%2Fs3%2Fk%3Fx%3D1%26X-Amz-Signature%3Dnested9",
            "nested9",
            "next=",
        ),
        (
            "Authorization: AWS4-HMAC-SHA256 Credential=AKIAZ/2025, Signature=ffee",
            "ffee",
            "Authorization",
        ),
    ],
)
def test_secrets_removed_shape_kept(text: str, secret: str, kept: str) -> None:
    cleaned = redact_text(text)
    assert secret not in cleaned
    assert kept in cleaned
    assert "REDACTED" in cleaned


def test_ordinary_text_is_untouched() -> None:
    text = "export 42 [provider=locations, code=LINK_EXPIRED] primary key=(id) 3 rows"
    assert redact_text(text) == text
    assert (
        redact_url("https://x.io/a.csv?format=csv&page=2") == "https://x.io/a.csv?format=csv&page=2"
    )


def test_errors_logs_and_objects_are_redacted(caplog: pytest.LogCaptureFixture) -> None:
    err = ExportPipelineError(f"cannot fetch {S3}", provider="p", hint=f"retry {S3}")
    assert "abc123def456" not in str(err) and "abc123def456" not in err.message
    log = get_logger("export_pipeline.test_redact")
    with caplog.at_level(logging.INFO, logger="export_pipeline.test_redact"):
        log.info("GET %s failed", S3)
        try:
            raise ValueError(S3)
        except ValueError:
            log.exception("boom")
    assert "abc123def456" not in caplog.text and "X-Amz-Signature=REDACTED" in caplog.text
    body = {"exportUrl": S3, "nested": [{"password": "pw1", "n": 1}], "status": "ok"}
    cleaned = redact_obj(body)
    assert "abc123def456" not in str(cleaned) and "pw1" not in str(cleaned)
    assert cleaned["status"] == "ok" and cleaned["nested"][0]["n"] == 1
