"""Loopback-only network guard for the test suite (this process and every Python child).

The root ``conftest.py`` loads this file and calls :func:`install` in the pytest process, and
puts this folder first on ``PYTHONPATH`` so that Python subprocesses the tests start (the CLI,
the webhook receiver) import it as ``sitecustomize`` and are guarded too.

The guard wraps ``socket.socket.connect``/``connect_ex``/``sendto`` and ``socket.getaddrinfo``:
a connection (or a datagram) to anything but loopback or a Unix socket, and the resolution of any
name but ``localhost`` or an IP literal, are refused *before* the call reaches the OS, so no
packet leaves. Each refusal raises :class:`NetworkGuardError` in the caller and is recorded:
in-process in :data:`ATTEMPTS` (the conftest fails the test), in children by appending a line
to the file named by ``EXPORT_PIPELINE_NETGUARD_LOG`` (the conftest reads it after each test).
Code that swallows the error (botocore's instance-metadata probe does) still fails the test.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
import traceback

ENV_FLAG = "EXPORT_PIPELINE_NETGUARD"
ENV_LOG = "EXPORT_PIPELINE_NETGUARD_LOG"
# The pytest process's pid: it keeps its own record (ATTEMPTS); any other process, spawned or
# forked, appends to the log file instead.
ENV_PARENT = "EXPORT_PIPELINE_NETGUARD_PARENT"

ATTEMPTS: list[str] = []
_LOCK = threading.Lock()
_LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


class NetworkGuardError(ConnectionRefusedError):
    """A test tried to reach something other than loopback."""


class NetworkGuardDnsError(socket.gaierror):
    """A test tried to resolve a name other than localhost."""


def _literal_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An IP literal in any form the C library accepts (``2852039166``, ``0x7f.1``), else None."""
    text = host.strip("[]").split("%", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    if text and all(c in "0123456789abcdefxABCDEFX." for c in text):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(text))
        except OSError:
            return None
    return None


def _is_loopback(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def _record(what: str) -> None:
    stack = "".join(traceback.format_stack(limit=12)[:-2])
    entry = f"{what} (pid {os.getpid()})\n{stack}"
    with _LOCK:
        ATTEMPTS.append(entry)
    path = os.environ.get(ENV_LOG)
    if path and os.environ.get(ENV_PARENT) != str(os.getpid()):
        try:
            with open(path, "a", encoding="utf-8") as out:
                out.write(what.replace("\n", " ") + f" (pid {os.getpid()})\n")
        except OSError:
            pass


def _check_address(family: int, address: object, what: str) -> None:
    if family == getattr(socket, "AF_UNIX", None):
        return
    host = address[0] if isinstance(address, tuple) and address else address
    ip = _literal_ip(str(host)) if host is not None else None
    if ip is not None and _is_loopback(ip):
        return
    message = f"network guard: {what} to {address!r} refused (tests may only reach loopback)"
    _record(message)
    raise NetworkGuardError(message)


def install() -> None:
    """Patch the socket module once (idempotent)."""
    if getattr(socket, "_export_pipeline_guarded", False):
        return
    socket._export_pipeline_guarded = True  # type: ignore[attr-defined]
    original_connect = socket.socket.connect
    original_connect_ex = socket.socket.connect_ex
    original_sendto = socket.socket.sendto
    original_getaddrinfo = socket.getaddrinfo

    def connect(self: socket.socket, address: object) -> None:
        _check_address(self.family, address, "connect")
        return original_connect(self, address)

    def connect_ex(self: socket.socket, address: object) -> int:
        _check_address(self.family, address, "connect_ex")
        return original_connect_ex(self, address)

    def sendto(self: socket.socket, data: bytes, *args: object) -> int:
        _check_address(self.family, args[-1], "sendto")
        return original_sendto(self, data, *args)  # type: ignore[arg-type]

    def getaddrinfo(host: object, *args: object, **kwargs: object) -> list:
        if host is not None and host != b"" and host != "":
            name = host.decode() if isinstance(host, bytes) else str(host)
            if name.lower().rstrip(".") not in _LOCAL_NAMES and _literal_ip(name) is None:
                message = f"network guard: DNS resolution of {name!r} refused"
                _record(message)
                raise NetworkGuardDnsError(socket.EAI_NONAME, message)
        return original_getaddrinfo(host, *args, **kwargs)  # type: ignore[arg-type]

    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
    socket.socket.sendto = sendto  # type: ignore[method-assign]
    socket.getaddrinfo = getaddrinfo


if os.environ.get(ENV_FLAG) == "1":
    install()
