"""Where the server may connect for a webhook, and how it learns a webhook host's addresses.

- **Which addresses** (``address_problem``): never unspecified or multicast; unless
  ``--webhook-allow-private``, never loopback, private, link-local, reserved or any other
  non-public address. An IPv6 address that carries an IPv4 address (IPv4-mapped ``::ffff:0:0/96``,
  6to4 ``2002::/16``, Teredo ``2001::/32``, NAT64 ``64:ff9b::/96`` and the local-use
  ``64:ff9b:1::/48``) is judged as that IPv4 address: the packets end up there, so
  ``http://[2002:7f00:1::]/`` is 127.0.0.1, and a NAT64 address of a public host (what DNS64 gives
  an IPv6-only box) is as public as that host.
- **Name resolution** (``HostResolver``): its own asynchronous resolver (c-ares through aiodns),
  never the thread pool that the job database and the image store use, so a name whose
  nameserver never answers costs a timer and a socket, not a thread. A lookup ends within
  ``RESOLVE_TIMEOUT``. At submit, a key may have ``LOOKUPS_PER_KEY`` lookups in flight and the
  server ``LOOKUPS_IN_ALL``; past them a request is refused at once (``LookupsBusy``), not queued.
- **At delivery** (``CheckingResolver``): aiohttp connects through a resolver that looks the name
  up at that moment (no cache) and hands aiohttp only the addresses that passed the check, so the
  address checked is the address connected to (DNS rebinding never reaches 127.0.0.1). An IP
  literal skips aiohttp's resolver, so the deliverer checks it before the request. The name stays
  in the URL: Host header, SNI and the certificate check are those of the name.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import aiodns
from aiohttp.abc import AbstractResolver, ResolveResult

RESOLVE_TIMEOUT = 5.0  # seconds one lookup may take, all tries together
RESOLVE_TRIES = 2  # c-ares sends the question this many times to each nameserver
LOOKUPS_PER_KEY = 4  # lookups one key may have in flight at submit
LOOKUPS_IN_ALL = 64  # lookups the server has in flight at submit, all keys together
_NUMERIC = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052: the IPv4 address is the last 32 bits
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215: the operator picks the layout
# Where RFC 6052 puts the IPv4 address under a prefix of each length: the bit spans it fills
# (bits 64 to 71, the "u" octet, always stay zero).
_RFC6052_SPANS = {48: ((48, 64), (72, 88)), 56: ((56, 64), (72, 96)), 64: ((72, 104),), 96: ((96, 128),)}


class TargetRefused(OSError):
    """A webhook host the server will not call (its sentence says why), or one that does not resolve."""


class LookupsBusy(Exception):
    """Too many webhook host lookups in flight, for the key (429) or for the server (503)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def _rfc6052_ipv4(address: ipaddress.IPv6Address, prefix: int) -> ipaddress.IPv4Address | None:
    """The IPv4 address under a NAT64 prefix of this length; None where the address cannot be of
    that layout (RFC 6052 keeps the "u" octet and the bits after the IPv4 address zero)."""
    bits, value = int(address), 0
    spans = _RFC6052_SPANS[prefix]
    after = 128 - spans[-1][1]
    if prefix != 96 and ((bits >> 56) & 0xFF or bits & ((1 << after) - 1)):
        return None
    for start, end in spans:
        width = end - start
        value = (value << width) | ((bits >> (128 - end)) & ((1 << width) - 1))
    return ipaddress.IPv4Address(value)


def embedded_ipv4(address: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, ...]:
    """The IPv4 address(es) that packets to ``address`` reach, where it carries one: empty if
    none. The local-use NAT64 prefix gives one candidate per RFC 6052 layout the address fits (the
    operator picks the prefix length): each must pass."""
    if address.ipv4_mapped is not None:
        return (address.ipv4_mapped,)
    if address.sixtofour is not None:
        return (address.sixtofour,)
    if address.teredo is not None:
        return (address.teredo[1],)  # the client: the last 32 bits, inverted
    if address in _NAT64:
        return tuple(filter(None, [_rfc6052_ipv4(address, 96)]))
    if address in _NAT64_LOCAL:
        return tuple(dict.fromkeys(filter(None, (_rfc6052_ipv4(address, prefix) for prefix in _RFC6052_SPANS))))
    return ()


def address_problem(address: IPAddress, allow_private: bool) -> str | None:
    """What kind of address this is, where the server must not call it; None: it may."""
    if isinstance(address, ipaddress.IPv6Address):
        carried = embedded_ipv4(address)
        if carried:
            return next(filter(None, (address_problem(ipv4, allow_private) for ipv4 in carried)), None)
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_multicast:
        return "a multicast address"
    if allow_private:
        return None
    for kind, test in (
        ("a loopback", address.is_loopback),
        ("a link-local", address.is_link_local),
        ("a reserved", address.is_reserved),
        ("a private", address.is_private),
        ("a site-local", isinstance(address, ipaddress.IPv6Address) and address.is_site_local),
        ("a non-public", not address.is_global),  # e.g. 100.64.0.0/10, carrier-grade NAT
    ):
        if test:
            return f"{kind} address"
    return None


def literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _refusal(what: str, problem: str, allow_private: bool) -> TargetRefused:
    if allow_private or problem in ("an unspecified address", "a multicast address"):
        return TargetRefused(f"{what} {problem}, which is never a webhook target.")
    return TargetRefused(
        f"{what} {problem}; this server sends webhooks to public addresses only "
        "(its operator can allow private ones with --webhook-allow-private)."
    )


class HostResolver:
    """The webhook hosts' own resolver: c-ares on the event loop (aiodns), with the system's
    nameservers or ``--webhook-nameservers``; no thread, no cache."""

    def __init__(self, nameservers: Sequence[str] = ()) -> None:
        self._resolver = aiodns.DNSResolver(
            nameservers=list(nameservers) or None, timeout=RESOLVE_TIMEOUT / 2 / RESOLVE_TRIES, tries=RESOLVE_TRIES
        )
        self._in_flight: Counter[str] = Counter()

    async def lookup(self, host: str, port: int) -> list[tuple[int, str]]:
        """Every (family, address) the host resolves to now. Tests replace this method."""
        try:
            found = await self._resolver.getaddrinfo(host, port=port, type=socket.SOCK_STREAM)
        except aiodns.error.DNSError as exc:
            raise socket.gaierror(exc.args[0] if exc.args else 0, exc.args[-1] if exc.args else "DNS error") from exc
        return list(dict.fromkeys((node.family, node.addr[0].decode()) for node in found.nodes))

    @asynccontextmanager
    async def slot(self, key: str) -> AsyncIterator[None]:
        """One submit-time lookup of ``key``'s, or ``LookupsBusy`` at once."""
        if self._in_flight[key] >= LOOKUPS_PER_KEY:
            raise LookupsBusy(
                429,
                f"this API key already has {LOOKUPS_PER_KEY} webhook host lookups in flight; "
                "send the next request once one of them is answered",
            )
        if self._in_flight.total() >= LOOKUPS_IN_ALL:
            raise LookupsBusy(503, f"the server has {LOOKUPS_IN_ALL} webhook host lookups in flight; try again in a few seconds")
        self._in_flight[key] += 1
        try:
            yield
        finally:
            self._in_flight[key] -= 1
            if not self._in_flight[key]:
                del self._in_flight[key]

    async def checked_addresses(self, host: str, port: int, allow_private: bool) -> list[tuple[int, str]]:
        """The host's addresses, each one allowed; ``TargetRefused`` if any is not, or none
        resolves within ``RESOLVE_TIMEOUT``."""
        address = literal(host)
        if address is not None:
            problem = address_problem(address, allow_private)
            if problem:
                raise _refusal(f"the address {host} is", problem, allow_private)
            return [(socket.AF_INET6 if address.version == 6 else socket.AF_INET, str(address))]
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation that
            # arrives as the lookup ends, and a delivery cancelled at shutdown would then never end.
            async with asyncio.timeout(RESOLVE_TIMEOUT):
                addresses = await self.lookup(host, port)
        except TimeoutError as exc:
            raise TargetRefused(f"the host {host} did not resolve within {RESOLVE_TIMEOUT:g} s.") from exc
        except (OSError, UnicodeError) as exc:
            raise TargetRefused(f"the host {host} cannot be resolved ({exc.__class__.__name__}).") from exc
        if not addresses:
            raise TargetRefused(f"the host {host} resolves to no address.")
        for _, found in addresses:
            problem = address_problem(ipaddress.ip_address(found.split("%", 1)[0]), allow_private)
            if problem:
                raise _refusal(f"the host {host} resolves to", problem, allow_private)
        return addresses

    async def close(self) -> None:
        await self._resolver.close()


class CheckingResolver(AbstractResolver):
    """aiohttp's resolver for webhook deliveries: only addresses that passed the check, resolved at
    the moment of connecting (no cache), so the check cannot be raced by the name's next answer."""

    def __init__(self, resolver: HostResolver, allow_private: bool) -> None:
        self.resolver = resolver
        self.allow_private = allow_private

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        addresses = await self.resolver.checked_addresses(host, port, self.allow_private)
        return [
            ResolveResult(hostname=host, host=address, port=port, family=found, proto=0, flags=_NUMERIC)
            for found, address in addresses
            if family in (socket.AF_UNSPEC, found)
        ]

    async def close(self) -> None:
        pass  # the HostResolver is the app's, closed with it
