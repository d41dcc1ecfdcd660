"""Where a request came from and where its client addressed it, as a trusted reverse proxy tells it.

Behind nginx, Caddy or a tunnel agent the socket's peer is the proxy, and the ``Host`` it sends may
lack the port the client used (Debian's ``proxy_params`` sends ``Host $host``). The proxy says the
rest in ``X-Forwarded-Proto/Host/Port/For`` or in RFC 7239 ``Forwarded``. Anyone can send those
headers, so they count only from the peers named by ``--forwarded-allow-ips`` (the uvicorn and
gunicorn convention: addresses or networks, comma-separated, ``*`` for every peer); from any other
peer the socket and ``Host`` are the truth. Image links (``service.http.asked.links_of``) and the
client address of the access log both come from here.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from functools import cache

from aiohttp import web

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
SCHEMES = {"http": 80, "https": 443}
# A host as a URL may carry it: a name or IPv4 address, or a bracketed IPv6 address, with an optional
# port. Anything else (a path, a space, an ``@``) is not put into a link.
_HOST = re.compile(r"(?:[A-Za-z0-9._~-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


@dataclass(frozen=True)
class TrustedProxies:
    """The peers whose forwarded headers count."""

    networks: tuple[Network, ...]
    everyone: bool = False

    @staticmethod
    @cache
    def parse(text: str) -> TrustedProxies:
        """``"127.0.0.1, 10.0.0.0/8"``, or ``"*"``; ``ValueError`` names an entry that is neither."""
        entries = [entry.strip() for entry in text.split(",") if entry.strip()]
        if "*" in entries:
            return TrustedProxies((), everyone=True)
        networks = []
        for entry in entries:
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address, a network such as 10.0.0.0/8, or *") from None
        return TrustedProxies(tuple(networks))

    def trusts(self, address: str | None) -> bool:
        if self.everyone:
            return True
        ip = _ip(address)
        return ip is not None and any(ip in network for network in self.networks)


@dataclass(frozen=True)
class Origin:
    """A request as its client made it: the scheme and host it addressed, and its own address."""

    scheme: str
    host: str
    client: str | None

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}"


_ORIGIN = web.RequestKey("origin", Origin)


def request_origin(request: web.Request, trusted: TrustedProxies) -> Origin:
    """The request's own socket and ``Host``, corrected by forwarded headers where its peer is trusted.
    Worked out once a request: the per-address cap, the links and the access log all ask, each with
    the server's one ``--forwarded-allow-ips``."""
    known = request.get(_ORIGIN)
    if known is None:
        known = request[_ORIGIN] = _origin(request, trusted)
    return known


def _origin(request: web.Request, trusted: TrustedProxies) -> Origin:
    peer = request.remote
    if not trusted.trusts(peer):
        return Origin(request.scheme, request.host, peer)
    headers = request.headers
    forwarded = request.forwarded  # aiohttp's RFC 7239 parse: one mapping per element, the client's first
    nearest = forwarded[-1] if forwarded else {}

    scheme = (nearest.get("proto") or _last(headers.getall("X-Forwarded-Proto", ())) or "").lower()
    if scheme not in SCHEMES:
        scheme = request.scheme
    host = nearest.get("host") or _last(headers.getall("X-Forwarded-Host", ())) or ""
    if not _HOST.fullmatch(host):
        host = request.host
    port = _last(headers.getall("X-Forwarded-Port", ()))
    if port and port.isdigit() and 0 < int(port) < 65536:
        host = _with_port(host, int(port), scheme)

    chain = [element["for"] for element in forwarded if "for" in element]
    if not chain:
        chain = _items(headers.getall("X-Forwarded-For", ()))
    return Origin(scheme, host, client_address(chain, peer, trusted))


def client_address(chain: list[str], peer: str | None, trusted: TrustedProxies) -> str | None:
    """The first address from the right that is not one of our proxies (each proxy appends the
    address it was reached from); the leftmost where every one is ours; the peer where none is given."""
    addresses = [_node(entry) for entry in chain]
    for address in reversed(addresses):
        if not trusted.trusts(address):
            return address
    return addresses[0] if addresses else peer


def _with_port(host: str, port: int, scheme: str) -> str:
    """``host`` with its port replaced by ``port`` (left out where it is the scheme's default)."""
    name = host.split("]", 1)[0] + "]" if host.startswith("[") else host.split(":", 1)[0]
    return name if SCHEMES.get(scheme) == port else f"{name}:{port}"


def _node(entry: str) -> str:
    """An RFC 7239 node or an X-Forwarded-For entry without brackets and port: ``"[::1]:80"`` is ``::1``."""
    entry = entry.strip().strip('"')
    if entry.startswith("["):
        return entry[1:].split("]", 1)[0]
    if entry.count(":") == 1:  # IPv4 (or a name) with a port; a bare IPv6 address has several colons
        return entry.split(":", 1)[0]
    return entry


def _ip(address: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not address:
        return None
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:  # a dual-stack socket's IPv4 peer
        return ip.ipv4_mapped
    return ip


def _items(values: tuple[str, ...] | list[str]) -> list[str]:
    """The entries of a comma-separated header, over all its lines."""
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def _last(values: tuple[str, ...] | list[str]) -> str | None:
    """The entry the nearest proxy set (a list grows to the right)."""
    items = _items(values)
    return items[-1] if items else None
