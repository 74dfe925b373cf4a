"""Which URLs a provider may make us fetch (server-side request forgery defence).

Every URL a provider hands over (a status ``exportUrl``, a ``Location`` of a redirect, the link
in a webhook body) is untrusted input: a compromised or buggy provider could point it at the
cloud metadata service (169.254.169.254), at another service on this machine, or at the private
network. Following the OWASP SSRF prevention cheat sheet:

* only ``http`` and ``https`` (``file://``, ``ftp://``, ``gopher://`` ... are refused);
* the host is resolved **once**, *every* address it resolves to must be acceptable, and the
  connection then goes to the checked address (the caller pins it; see ``Target``), so a DNS
  answer that changes between the check and the connect (DNS rebinding) cannot redirect us;
* addresses that are not public are refused: loopback, private (RFC 1918, ULA), link-local,
  shared (CGNAT), multicast, unspecified, reserved, and IPv4-mapped IPv6 forms of those; IPv4
  written in decimal, octal or hex (``http://2852039166/``) is read the way the C library would
  read it and checked as what it is;
* the check runs on the first hop and on every redirect hop;
* exceptions are explicit: ``allow`` entries (a setting), and the provider's own configured API
  origin (an endpoint the operator configured, not one the provider chose).

``allow`` entries: ``loopback``, ``private``, ``link-local`` (address classes), a CIDR
(``10.20.0.0/16``), an address (``127.0.0.1``) or a host name (``minio.internal``), each
optionally with ``:port`` (``127.0.0.1:8705``, ``[::1]:9000``, ``loopback:8705``), which then
allows that port only. No Dagster here.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ALLOWED_SCHEMES = frozenset({"http", "https"})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT: not public either
_CLASSES = ("loopback", "private", "link-local")


class UrlRefused(Exception):
    """The policy refuses a URL; ``host`` and ``reason`` say why (never the URL's query)."""

    def __init__(self, host: str, reason: str) -> None:
        super().__init__(f"download URL refused: host {host!r} {reason}")
        self.host = host
        self.reason = reason


class UrlUnresolvable(OSError):
    """The host name does not resolve (now): a network fault, worth retrying."""


@dataclass(frozen=True)
class Target:
    """Where to connect for a checked URL: ``ip`` is pinned, ``host`` goes in Host and SNI."""

    url: httpx.URL
    host: str
    port: int
    ip: str

    def pinned_url(self) -> httpx.URL:
        """The URL with its host replaced by the checked address (what we connect to)."""
        return self.url.copy_with(host=self.ip)


@dataclass(frozen=True)
class _Rule:
    network: IPNetwork | None = None
    klass: str | None = None
    host: str | None = None
    port: int | None = None

    def matches(self, ip: IPAddress, klass: str | None, host: str, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.host is not None:
            return self.host == host.lower().rstrip(".")
        if self.klass is not None:
            return self.klass == klass
        assert self.network is not None
        return ip.version == self.network.version and ip in self.network


def parse_allow(entries: str | Iterable[str]) -> tuple[_Rule, ...]:
    """``"loopback, 10.0.0.0/8, minio.internal:9000"`` (or a list) -> rules. Bad entries raise
    ValueError naming the entry, so a typo stops the run instead of silently allowing nothing."""
    if isinstance(entries, str):
        entries = entries.replace(";", ",").split(",")
    rules: list[_Rule] = []
    for raw in entries:
        entry = raw.strip()
        if not entry:
            continue
        target, port = entry, None
        if entry.startswith("["):  # [v6]:port or [v6]
            inside, _, rest = entry[1:].partition("]")
            target = inside
            if rest:
                if not rest.startswith(":") or not rest[1:].isdigit():
                    raise ValueError(f"allow entry {entry!r}: expected [address]:port")
                port = int(rest[1:])
        elif entry.count(":") == 1:
            target, _, port_text = entry.partition(":")
            if not port_text.isdigit():
                raise ValueError(f"allow entry {entry!r}: the port must be a number")
            port = int(port_text)
        lowered = target.lower()
        if lowered in _CLASSES:
            rules.append(_Rule(klass=lowered, port=port))
            continue
        try:
            rules.append(_Rule(network=ipaddress.ip_network(target, strict=False), port=port))
            continue
        except ValueError:
            pass
        if not target or "/" in target or " " in target:
            raise ValueError(f"allow entry {entry!r} is not a class, CIDR, address or host name")
        rules.append(_Rule(host=lowered.rstrip("."), port=port))
    return tuple(rules)


def literal_ip(host: str) -> IPAddress | None:
    """The address a host *literal* denotes, including the inet_aton forms (``2852039166``,
    ``0xa9.0xfe.0xa9.0xfe``, ``0251.0376.0251.0376``, ``169.254.43518``); None for a name."""
    text = host.strip("[]").split("%", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    if text and all(c in "0123456789abcdefxABCDEFX." for c in text) and text[0].isdigit():
        try:
            return ipaddress.IPv4Address(socket.inet_aton(text))
        except OSError:
            return None
    return None


def address_class(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a public address (``"loopback"``, ``"link-local"`` ...), or None."""
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:
        ip = mapped
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.version == 4 and ip in _SHARED:
        return "private"
    if ip.is_private:
        return "private"
    if ip.is_reserved:
        return "reserved"
    if not ip.is_global:
        return "private"
    return None


def _resolve(host: str, port: int) -> list[IPAddress]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UrlUnresolvable(f"cannot resolve {host!r}: {exc}") from None
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if ip not in addresses:
            addresses.append(ip)
    if not addresses:
        raise UrlUnresolvable(f"{host!r} resolved to no address")
    return addresses


@dataclass(frozen=True)
class UrlPolicy:
    """The download URL policy. ``allow``: see the module doc; ``trusted``: configured API
    origins (``host:port``), accepted whatever their address class (they are configuration,
    not provider input). The default (nothing allowed) accepts public addresses only."""

    allow: tuple[_Rule, ...] = ()
    trusted: tuple[str, ...] = ()
    resolve: Callable[[str, int], Sequence[IPAddress]] = field(default=_resolve, repr=False)

    @classmethod
    def from_setting(cls, allow: str | Iterable[str] = "", **kwargs: object) -> UrlPolicy:
        return cls(allow=parse_allow(allow), **kwargs)  # type: ignore[arg-type]

    def trusting(self, origin: str | None) -> UrlPolicy:
        """This policy plus one trusted origin (``host:port`` or a URL)."""
        if not origin:
            return self
        url = httpx.URL(origin if "://" in origin else f"//{origin}")
        if not url.host:
            return self
        port = url.port or _DEFAULT_PORTS.get(url.scheme)
        key = f"{url.host.lower()}:{port}" if port else url.host.lower()
        if key in self.trusted:
            return self
        return UrlPolicy(allow=self.allow, trusted=(*self.trusted, key), resolve=self.resolve)

    def check(self, url: str | httpx.URL) -> Target:
        """Accept ``url`` and say where to connect, or raise UrlRefused / UrlUnresolvable."""
        try:
            parsed = httpx.URL(str(url))
        except (httpx.InvalidURL, ValueError, TypeError):
            raise UrlRefused("?", "is not a valid URL") from None
        scheme = parsed.scheme.lower()
        host = parsed.host
        if scheme not in ALLOWED_SCHEMES:
            shown = host or f"{scheme}:"
            raise UrlRefused(shown, f"uses scheme {scheme or '(none)'!r} (http/https only)")
        if not host:
            raise UrlRefused("", "has no host")
        port = parsed.port or _DEFAULT_PORTS[scheme]
        lowered = host.lower().rstrip(".")
        trusted = f"{lowered}:{port}" in self.trusted or lowered in self.trusted
        literal = literal_ip(host)
        addresses = [literal] if literal is not None else list(self.resolve(host, port))
        if not trusted:
            for ip in addresses:
                klass = address_class(ip)
                if klass is None:
                    continue
                if any(rule.matches(ip, klass, lowered, port) for rule in self.allow):
                    continue
                shown = host if str(ip) == host.strip("[]") else f"{host} ({ip})"
                raise UrlRefused(
                    shown,
                    f"is {'an' if klass[0] in 'aeiou' else 'a'} {klass} address (port {port}); "
                    "refused unless allowed "
                    "(sync_settings.allowed_download_hosts)",
                )
        return Target(url=parsed, host=host, port=port, ip=str(addresses[0]))
