"""The same-origin rule applied to websocket handshakes."""

from __future__ import annotations

import pytest

from perspective_asgi import Settings, origin_allowed

DEFAULTS = Settings()


def test_missing_origin_is_allowed_by_default() -> None:
    # Scripts and the Python and Node clients send no Origin header.
    assert origin_allowed(None, "example.com", DEFAULTS)
    assert origin_allowed(None, None, DEFAULTS)


def test_missing_origin_can_be_refused() -> None:
    settings = Settings(allow_missing_origin=False)
    assert not origin_allowed(None, "example.com", settings)
    assert not origin_allowed(None, None, settings)
    # Refusing a missing origin does not refuse same-origin pages.
    assert origin_allowed("http://example.com", "example.com", settings)


@pytest.mark.parametrize(
    ("origin", "host"),
    [
        ("http://example.com", "example.com"),
        ("https://example.com", "example.com"),
        ("http://localhost:8080", "localhost:8080"),
        ("http://127.0.0.1:8080", "127.0.0.1:8080"),
        ("http://[::1]:8080", "[::1]:8080"),
        # A default port may be explicit on either side, per the origin's scheme.
        ("http://example.com", "example.com:80"),
        ("http://example.com:80", "example.com"),
        ("https://example.com", "example.com:443"),
        ("https://example.com:443", "example.com"),
        ("https://example.com:443", "example.com:443"),
        # Hosts and schemes compare without regard to case.
        ("HTTP://Example.COM", "example.com"),
        ("http://example.com", "EXAMPLE.com"),
        ("https://Example.com:8443", "example.COM:8443"),
        # A trailing slash and surrounding whitespace are not part of the origin.
        ("http://example.com/", "example.com"),
        ("  http://example.com:8080  ", " example.com:8080 "),
    ],
)
def test_same_origin_is_allowed(origin: str, host: str) -> None:
    assert origin_allowed(origin, host, DEFAULTS)


@pytest.mark.parametrize(
    ("origin", "host"),
    [
        ("http://evil.example", "example.com"),
        ("http://sub.example.com", "example.com"),
        ("http://example.com", "sub.example.com"),
        ("http://example.com.evil.example", "example.com"),
        ("http://example.com@evil.example", "example.com"),
        ("http://evil.example#@example.com", "example.com"),
        # Wrong port, explicit or implied by the scheme.
        ("http://example.com:8080", "example.com:9090"),
        ("http://example.com:8080", "example.com"),
        ("http://example.com", "example.com:8080"),
        ("http://example.com", "example.com:443"),
        ("https://example.com", "example.com:80"),
        ("https://example.com", "example.com:8443"),
        ("http://localhost:8080", "127.0.0.1:8080"),
        # Sandboxed frames and file:// pages send "null": never same-origin.
        ("null", "example.com"),
        ("null", "null"),
        ("", "example.com"),
        ("file://", "example.com"),
        ("ws://example.com", "example.com"),
        ("example.com", "example.com"),
        ("http://", "example.com"),
        # No Host header: nothing to be the same as.
        ("http://example.com", None),
    ],
)
def test_other_origins_are_refused(origin: str, host: str | None) -> None:
    assert not origin_allowed(origin, host, DEFAULTS)


def test_allow_list() -> None:
    settings = Settings(
        allowed_origins=frozenset({"https://dash.example.com", "http://localhost:3000"})
    )
    for origin in (
        "https://dash.example.com",
        "HTTPS://Dash.Example.com",
        "https://dash.example.com/",
        "http://localhost:3000",
    ):
        assert origin_allowed(origin, "api.example.com", settings), origin
        assert origin_allowed(origin, None, settings), origin
    for origin in (
        "http://dash.example.com",  # another scheme is another origin
        "https://dash.example.com:8443",
        "https://other.example.com",
        "http://localhost:3001",
        "null",
    ):
        assert not origin_allowed(origin, "api.example.com", settings), origin
    # The allow-list adds to same-origin; it does not replace it.
    assert origin_allowed("https://api.example.com", "api.example.com", settings)


def test_allow_list_entries_are_normalised() -> None:
    settings = Settings(allowed_origins=frozenset({"HTTPS://Dash.Example.COM/"}))
    assert settings.allowed_origins == frozenset({"https://dash.example.com"})
    assert origin_allowed("https://dash.example.com", "api.example.com", settings)


def test_null_can_be_allowed_explicitly() -> None:
    assert origin_allowed("null", "example.com", Settings(allowed_origins=frozenset({"null"})))


def test_star_allows_every_origin() -> None:
    settings = Settings(allowed_origins=frozenset({"*"}))
    for origin in ("https://evil.example", "null", "http://example.com:1", "file://"):
        assert origin_allowed(origin, "example.com", settings), origin
        assert origin_allowed(origin, None, settings), origin


def test_star_does_not_override_a_refused_missing_origin() -> None:
    settings = Settings(allowed_origins=frozenset({"*"}), allow_missing_origin=False)
    assert not origin_allowed(None, "example.com", settings)
