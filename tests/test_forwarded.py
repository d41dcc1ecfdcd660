"""``service.edge.forwarded``: which peers' forwarded headers count, and what they make of a request.

aiohttp's own request factory builds the requests; ``clone(remote=...)`` sets the peer as a socket would.
"""

from __future__ import annotations

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from service.edge.forwarded import Origin, TrustedProxies, client_address, request_origin
from service.http.asked import links_of
from service.app_keys import SETTINGS
from service.settings import Settings, load_settings

LOCAL = TrustedProxies.parse("127.0.0.1")


def origin(headers: dict[str, str], peer: str = "127.0.0.1", trusted: TrustedProxies = LOCAL) -> Origin:
    request = make_mocked_request("GET", "/generate", headers={"Host": "127.0.0.1:8000", **headers}).clone(remote=peer)
    return request_origin(request, trusted)


def test_parse_addresses_networks_and_everyone() -> None:
    trusted = TrustedProxies.parse(" 127.0.0.1, 10.0.0.0/8 ,::1")
    assert [trusted.trusts(a) for a in ("127.0.0.1", "10.20.30.40", "::1", "127.0.0.2", "11.0.0.1", None, "", "unknown")] == [
        True, True, True, False, False, False, False, False,
    ]
    assert trusted.trusts("::ffff:10.0.0.1")  # an IPv4 peer on a dual-stack socket
    everyone = TrustedProxies.parse("*")
    assert everyone.trusts("203.0.113.9") and everyone.trusts(None)
    assert not TrustedProxies.parse("").trusts("127.0.0.1")
    with pytest.raises(ValueError, match="'proxy.example' is not an IP address"):
        TrustedProxies.parse("127.0.0.1,proxy.example")


def test_the_setting_defaults_to_loopback_and_refuses_a_bad_entry(capsys: pytest.CaptureFixture[str]) -> None:
    assert load_settings([], {}).trusted_proxies() == TrustedProxies.parse("127.0.0.1")
    assert load_settings([], {"SDXL_FORWARDED_ALLOW_IPS": "*"}).trusted_proxies().everyone
    assert load_settings(["--forwarded-allow-ips", "10.0.0.0/8"], {"SDXL_FORWARDED_ALLOW_IPS": "*"}).trusted_proxies().trusts("10.1.2.3")
    with pytest.raises(SystemExit):
        load_settings(["--forwarded-allow-ips", "10.0.0.0/33"], {})
    assert "--forwarded-allow-ips: '10.0.0.0/33' is not an IP address" in capsys.readouterr().err


def test_without_forwarded_headers_the_socket_and_host_decide() -> None:
    assert origin({}) == Origin("http", "127.0.0.1:8000", "127.0.0.1")
    assert origin({}).base_url == "http://127.0.0.1:8000"


def test_nginx_as_the_readme_configures_it() -> None:
    """``Host $host`` drops the port; X-Forwarded-Port puts it back (left out where it is the default)."""
    headers = {"Host": "images.example", "X-Forwarded-Host": "images.example", "X-Forwarded-Proto": "http", "X-Forwarded-For": "198.51.100.7"}
    assert origin({**headers, "X-Forwarded-Port": "8080"}) == Origin("http", "images.example:8080", "198.51.100.7")
    assert origin({**headers, "X-Forwarded-Port": "80"}).base_url == "http://images.example"
    assert origin({**headers, "X-Forwarded-Proto": "https", "X-Forwarded-Port": "443"}).base_url == "https://images.example"
    # a port in the forwarded host is replaced, an IPv6 literal keeps its brackets
    assert origin({"X-Forwarded-Host": "images.example:9", "X-Forwarded-Port": "8443"}).host == "images.example:8443"
    assert origin({"X-Forwarded-Host": "[2001:db8::5]:9", "X-Forwarded-Port": "8443"}).host == "[2001:db8::5]:8443"


def test_caddy_and_tunnel_agents() -> None:
    """Caddy forwards the client's Host (with its port) as X-Forwarded-Host; an ngrok agent only the scheme."""
    assert origin({"X-Forwarded-Host": "127.0.0.1:2080", "X-Forwarded-Proto": "http", "X-Forwarded-For": "127.0.0.1"}) == Origin(
        "http", "127.0.0.1:2080", "127.0.0.1"
    )
    assert origin({"Host": "abc.ngrok.app", "X-Forwarded-Proto": "https"}).base_url == "https://abc.ngrok.app"


def test_rfc_7239_forwarded_wins_over_x_forwarded() -> None:
    headers = {
        "Forwarded": 'for=192.0.2.60;proto=https;host="api.example:8443"',
        "X-Forwarded-Proto": "http",
        "X-Forwarded-Host": "other.example",
        "X-Forwarded-For": "203.0.113.1",
    }
    assert origin(headers) == Origin("https", "api.example:8443", "192.0.2.60")
    assert origin({"Forwarded": 'for="[2001:db8:cafe::17]:4711"'}).client == "2001:db8:cafe::17"
    # the nearest element (our proxy's, the last) is the one read
    assert origin({"Forwarded": "proto=http;host=first.example, proto=https;host=near.example"}).base_url == "https://near.example"


def test_headers_from_an_untrusted_peer_are_ignored() -> None:
    spoofed = {"X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https", "X-Forwarded-Port": "444", "X-Forwarded-For": "10.9.9.9",
               "Forwarded": "for=10.8.8.8;host=evil.example;proto=https"}
    assert origin(spoofed, peer="127.0.0.2") == Origin("http", "127.0.0.1:8000", "127.0.0.2")
    assert origin(spoofed, peer="203.0.113.50") == Origin("http", "127.0.0.1:8000", "203.0.113.50")
    # trusting everyone takes them
    assert origin(spoofed, peer="203.0.113.50", trusted=TrustedProxies.parse("*")).base_url == "https://evil.example:444"


def test_junk_from_a_trusted_proxy_never_reaches_a_link() -> None:
    for junk in ({"X-Forwarded-Host": "evil.example/path"}, {"X-Forwarded-Host": "a b"}, {"X-Forwarded-Host": "user@evil.example"}):
        assert origin(junk).host == "127.0.0.1:8000"
    assert origin({"X-Forwarded-Proto": "javascript"}).scheme == "http"
    assert origin({"X-Forwarded-Port": "99999"}).host == "127.0.0.1:8000"
    assert origin({"X-Forwarded-Port": "eighty"}).host == "127.0.0.1:8000"


def test_the_client_is_the_first_address_from_the_right_that_is_not_a_proxy() -> None:
    """Each proxy appends the address it was reached from; a client can put anything on the left."""
    chain = TrustedProxies.parse("127.0.0.1,10.0.0.0/8")
    assert client_address(["6.6.6.6", "198.51.100.7", "10.0.0.3"], "127.0.0.1", chain) == "198.51.100.7"
    assert client_address(["10.0.0.2", "10.0.0.3"], "127.0.0.1", chain) == "10.0.0.2"
    assert client_address([], "127.0.0.1", chain) == "127.0.0.1"
    assert client_address(["198.51.100.7:5555", "[2001:db8::9]:80"], "127.0.0.1", chain) == "2001:db8::9"
    # several header lines are one list
    request = make_mocked_request(
        "GET", "/", headers=[("X-Forwarded-For", "6.6.6.6, 198.51.100.7"), ("X-Forwarded-For", "10.0.0.3")]
    ).clone(remote="127.0.0.1")
    assert request_origin(request, chain).client == "198.51.100.7"


@pytest.mark.parametrize(
    ("settings", "links"),
    [
        (Settings(), "https://proxy.example:8443"),
        (Settings(public_url="https://tunnel.example/"), "https://tunnel.example"),  # --public-url still wins
        (Settings(forwarded_allow_ips="10.0.0.0/8"), "http://127.0.0.1:8000"),  # the peer is no longer trusted
    ],
)
def test_links_are_decided_in_one_place(settings: Settings, links: str) -> None:
    app = web.Application()
    app[SETTINGS] = settings
    headers = {"Host": "127.0.0.1:8000", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "proxy.example", "X-Forwarded-Port": "8443"}
    request = make_mocked_request("GET", "/jobs/x", headers=headers, app=app).clone(remote="127.0.0.1")
    assert links_of(request) == links
