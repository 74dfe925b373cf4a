"""Hostile download URLs and hostile bodies, against real servers on loopback.

Every refusal is asserted on the policy (the typed error, the servers' request logs, a canary
listener that counts accepted connections, and the suite's network guard), never on a timeout.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import threading
import time
import tracemalloc
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from export_pipeline.core.errors import (
    LimitExceededError,
    TransientProviderError,
    UnsafeUrlError,
)
from export_pipeline.core.http import RetryPolicy
from export_pipeline.core.model import RemoteFile
from export_pipeline.core.netpolicy import UrlPolicy, UrlRefused, literal_ip, parse_allow
from export_pipeline.core.transfer import DownloadLimits, download_file
from export_pipeline.sandbox.server import RunningServer
from export_pipeline_tests.conftest import netguard
from export_pipeline_tests.core.conftest import PAYLOAD, FileHosts

FAST = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05, jitter=0.0)
SIGNED = "?X-Amz-Credential=AKIASECRETCRED&X-Amz-Signature=deadbeefsecretsig"


class Canary:
    """A loopback listener that only counts the connections it accepts."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def canary() -> Iterator[Canary]:
    c = Canary()
    yield c
    c.close()


def _hostile_urls(canary: Canary) -> dict[str, str]:
    return {
        "link-local": "http://169.254.169.254/latest/meta-data/",
        "link-local-decimal": "http://2852039166/latest/meta-data/",
        "link-local-hex": "http://0xa9fea9fe/latest/meta-data/",
        "mapped-v6": "http://[::ffff:169.254.169.254]/latest/",
        "other-loopback-port": f"http://127.0.0.1:{canary.port}/secret",
        "localhost-other-port": f"http://localhost:{canary.port}/secret",
        "private": "http://10.1.2.3/export.json",
        "file": "file:///etc/passwd",
    }


def _only_file_hosts(file_hosts: FileHosts) -> UrlPolicy:
    """What the sandbox does: allow exactly the file hosts' ports on loopback."""
    api_port = file_hosts.api_url.rsplit(":", 1)[1]
    storage_port = file_hosts.storage_url.rsplit(":", 1)[1]
    return UrlPolicy.from_setting(f"127.0.0.1:{api_port},127.0.0.1:{storage_port}")


@pytest.mark.parametrize(
    "name",
    [
        "link-local",
        "link-local-decimal",
        "link-local-hex",
        "mapped-v6",
        "other-loopback-port",
        "localhost-other-port",
        "private",
        "file",
    ],
)
@pytest.mark.parametrize("via_redirect", [False, True], ids=["direct", "redirect"])
def test_hostile_urls_are_refused_before_any_connection(
    name: str, via_redirect: bool, file_hosts: FileHosts, canary: Canary, tmp_path: Path
) -> None:
    hostile = _hostile_urls(canary)[name] + SIGNED
    guard_before = len(netguard.ATTEMPTS)
    if via_redirect:
        file_hosts.api.redirect_target = hostile
        url = f"{file_hosts.api_url}/redirect/x.json{SIGNED}"
    else:
        url = hostile
    file = RemoteFile(url=url, name="x.json")
    with pytest.raises(UnsafeUrlError) as info:
        download_file(
            file,
            tmp_path,
            provider="locations",
            export_id="exp-7",
            policy=FAST,
            url_policy=_only_file_hosts(file_hosts),
        )
    message = str(info.value)
    # Names provider, export and the refused host; never the signature; not retried.
    assert "provider=locations" in message and "export=exp-7" in message
    assert "refused" in message
    if name != "file":
        assert "host " in message
    assert "deadbeefsecretsig" not in message and "AKIASECRETCRED" not in message
    assert info.value.retryable is False
    # No connection was attempted: not to the canary, not off loopback (the guard saw nothing).
    assert canary.accepted == 0
    assert netguard.ATTEMPTS[guard_before:] == []
    # The redirecting hop was asked once (no retry of a refused target), nothing else.
    assert len(file_hosts.api.requests_to("/redirect/x.json")) == (1 if via_redirect else 0)
    assert list(tmp_path.iterdir()) == []


def test_allowed_loopback_port_is_fetched_through_the_pinned_address(
    file_hosts: FileHosts, tmp_path: Path
) -> None:
    # storage_url uses the name "localhost": resolved once, connected by address, Host kept.
    file = RemoteFile(url=f"{file_hosts.storage_url}/files/a.bin", name="a.bin")
    got = download_file(
        file,
        tmp_path,
        provider="p",
        export_id="e",
        url_policy=_only_file_hosts(file_hosts),
    )
    assert got.size_bytes == len(PAYLOAD)
    (seen,) = file_hosts.storage.requests_to("/files/a.bin")
    assert seen.headers["host"] == file_hosts.storage_url.removeprefix("http://")


def test_configured_api_origin_is_trusted_but_nothing_else_on_loopback(
    file_hosts: FileHosts, tmp_path: Path
) -> None:
    # No allow-list: the API origin (configuration) is reachable; its redirect to another
    # loopback port (provider input) is not.
    file_hosts.api.redirect_target = f"{file_hosts.storage_url}/files/a.bin"
    ok = RemoteFile(url=f"{file_hosts.api_url}/files/a.bin", name="a.bin")
    assert download_file(ok, tmp_path, provider="p", export_id="e", api_host=file_hosts.api_url)
    bounced = RemoteFile(url=f"{file_hosts.api_url}/redirect/b.bin", name="b.bin")
    with pytest.raises(UnsafeUrlError, match="loopback"):
        download_file(bounced, tmp_path, provider="p", export_id="e", api_host=file_hosts.api_url)
    assert file_hosts.storage.requests_to("/files/a.bin") == []


def test_policy_reads_ip_forms_like_the_c_library_and_checks_every_address() -> None:
    assert str(literal_ip("2852039166")) == "169.254.169.254"
    assert str(literal_ip("0xa9.0xfe.0xa9.0xfe")) == "169.254.169.254"
    assert str(literal_ip("0251.0376.0251.0376")) == "169.254.169.254"
    assert str(literal_ip("127.1")) == "127.0.0.1"
    assert literal_ip("example.com") is None
    # A name resolving to one public and one private address is refused (all must pass).
    policy = UrlPolicy(
        resolve=lambda host, port: [literal_ip("93.184.216.34"), literal_ip("10.0.0.5")]
    )
    with pytest.raises(UrlRefused, match="private"):
        policy.check("https://files.example.com/x.csv")
    public = UrlPolicy(resolve=lambda host, port: [literal_ip("93.184.216.34")])
    target = public.check("https://files.example.com/x.csv?sig=1")
    assert target.ip == "93.184.216.34" and target.host == "files.example.com"
    assert target.pinned_url().host == "93.184.216.34"
    for url in ("http://0.0.0.0/", "http://224.0.0.1/", "http://[fe80::1]/", "http://100.64.0.1/"):
        with pytest.raises(UrlRefused):
            UrlPolicy().check(url)
    with pytest.raises(ValueError, match="bogus entry"):
        parse_allow("loopback, bogus entry")


# -- bounded inputs ------------------------------------------------------------------------

BOMB_INFLATED = 64 * 1024 * 1024  # zeros: ~64 KB of gzip


@functools.cache
def _gzip_bomb() -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1 << 20)
    parts = [compressor.compress(block) for _ in range(BOMB_INFLATED >> 20)]
    return b"".join(parts) + compressor.flush()


@pytest.fixture
def hostile_host() -> Iterator[tuple[str, threading.Event]]:
    """A file host serving a gzip bomb and a download that stalls after its first bytes."""
    release = threading.Event()

    async def bomb(request: Request) -> Response:
        return Response(_gzip_bomb(), media_type="application/gzip")

    async def stall(request: Request) -> Response:
        async def body() -> Iterator[bytes]:
            yield b'[{"id": 1},'
            while not release.is_set():  # until teardown: far longer than the read timeout
                await asyncio.sleep(0.05)

        return StreamingResponse(
            body(), media_type="application/json", headers={"Content-Length": "1000"}
        )

    app = Starlette(routes=[Route("/bomb.json.gz", bomb), Route("/stall.json", stall)])
    with RunningServer(app) as server:
        yield server.base_url, release
        release.set()


def test_gzip_bomb_is_refused_at_the_cap_with_flat_memory(
    hostile_host: tuple[str, threading.Event], tmp_path: Path
) -> None:
    base, _ = hostile_host
    cap = 8 * 1024 * 1024
    file = RemoteFile(url=f"{base}/bomb.json.gz", name="bomb.json.gz")
    tracemalloc.start()
    try:
        with pytest.raises(LimitExceededError) as info:
            download_file(
                file,
                tmp_path,
                provider="mapping",
                export_id="e-bomb",
                url_policy=UrlPolicy.from_setting("loopback"),
                limits=DownloadLimits(max_decompressed_bytes=cap, max_expansion_ratio=None),
            )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert f"more than {cap} bytes" in str(info.value)
    assert "file=bomb.json.gz" in str(info.value) and info.value.retryable is False
    # Inflated output is counted and thrown away in 1 MiB steps: memory is a few MiB, not 64.
    assert peak < 6 * 1024 * 1024, peak
    assert list(tmp_path.iterdir()) == []  # no partial file left


def test_gzip_expansion_ratio_is_refused_early(
    hostile_host: tuple[str, threading.Event], tmp_path: Path
) -> None:
    base, _ = hostile_host
    file = RemoteFile(url=f"{base}/bomb.json.gz", name="bomb.json.gz")
    with pytest.raises(LimitExceededError, match="max_expansion_ratio") as info:
        download_file(
            file,
            tmp_path,
            provider="mapping",
            export_id="e-bomb",
            url_policy=UrlPolicy.from_setting("loopback"),
            limits=DownloadLimits(max_expansion_ratio=100.0, ratio_grace_bytes=1 << 20),
        )
    assert "inflates more than 100x" in str(info.value)


def test_announced_size_over_the_cap_is_refused_before_downloading(
    file_hosts: FileHosts, tmp_path: Path
) -> None:
    file = RemoteFile(url=f"{file_hosts.api_url}/files/big.bin", name="big.bin", size_bytes=10**12)
    with pytest.raises(LimitExceededError, match="announced size"):
        download_file(
            file,
            tmp_path,
            provider="p",
            export_id="e",
            url_policy=UrlPolicy.from_setting("loopback"),
            limits=DownloadLimits(max_file_bytes=10**9),
        )
    assert file_hosts.api.requests_to("/files/big.bin") == []
    # Content-Length over the cap: refused before the body is read.
    small = RemoteFile(url=f"{file_hosts.api_url}/files/a.bin", name="a.bin")
    with pytest.raises(LimitExceededError, match="announces"):
        download_file(
            small,
            tmp_path,
            provider="p",
            export_id="e",
            url_policy=UrlPolicy.from_setting("loopback"),
            limits=DownloadLimits(max_file_bytes=1000),
        )


def test_stalled_download_fails_within_its_configured_timeout(
    hostile_host: tuple[str, threading.Event], tmp_path: Path
) -> None:
    base, _ = hostile_host
    file = RemoteFile(url=f"{base}/stall.json", name="stall.json")
    started = time.monotonic()
    with pytest.raises(TransientProviderError) as info:
        download_file(
            file,
            tmp_path,
            provider="locations",
            export_id="e-stall",
            url_policy=UrlPolicy.from_setting("loopback"),
            policy=RetryPolicy(max_attempts=2, base_delay=0.01, jitter=0.0),
            timeout=0.5,
        )
    elapsed = time.monotonic() - started
    assert "ReadTimeout" in str(info.value)
    # Two attempts of a 0.5 s read timeout; the server would have stalled until teardown. The
    # bound is loose on purpose (a busy machine), yet far below the old fixed 60 s per attempt.
    assert elapsed < 30, elapsed


# -- TLS through the pinned address ----------------------------------------------------------


def _tls_files(tmp_path: Path, name: str) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for ``name`` (DNS SAN only, no IP SAN)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "export-pipeline test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_path, cert_path, key_path


@pytest.mark.parametrize("cert_name", ["localhost", "elsewhere.example"])
def test_https_through_the_pinned_address_verifies_the_name(cert_name: str, tmp_path: Path) -> None:
    """We connect to 127.0.0.1 but TLS is for the URL's name: SNI and the certificate check
    use ``localhost`` (the certificate has no IP entry, so checking the address would fail),
    and a certificate for another name is refused."""
    import ssl

    import httpx

    ca, cert, key = _tls_files(tmp_path, cert_name)
    seen: list[str] = []

    async def file(request: Request) -> Response:
        seen.append(request.headers["host"])
        return Response(PAYLOAD, media_type="application/octet-stream")

    app = Starlette(routes=[Route("/files/{name}", file)])
    options = {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
    verify = ssl.create_default_context(cafile=str(ca))
    with (
        RunningServer(app, options=options) as server,
        httpx.Client(verify=verify, follow_redirects=False, trust_env=False) as client,
    ):
        url = f"https://localhost:{server.port}/files/a.bin"
        remote = RemoteFile(url=url, name="a.bin")
        fetch = functools.partial(
            download_file,
            remote,
            tmp_path / "out",
            provider="p",
            export_id="e",
            client=client,
            policy=RetryPolicy(max_attempts=1),
            url_policy=UrlPolicy.from_setting(f"loopback:{server.port}"),
        )
        if cert_name == "localhost":
            assert fetch().size_bytes == len(PAYLOAD)
            assert seen == [f"localhost:{server.port}"]
        else:
            with pytest.raises(TransientProviderError, match=r"(?i)certificate"):
                fetch()
            assert seen == []
