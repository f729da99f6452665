"""Validation of ``Settings``: bad values fail at construction, naming the field."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
from typing import Any

import pytest

from perspective_asgi import Settings
from perspective_asgi._core.wire import CHEAP_REQUEST_KINDS

COUNT_FIELDS = [
    "max_message_size",
    "max_send_queue_bytes",
    "max_pending_requests",
    "max_request_threads",
    "virtual_server_threads",
]


def test_defaults() -> None:
    settings = Settings()
    assert settings.max_message_size == 64 * 1024 * 1024
    assert settings.max_send_queue_bytes == 16 * 1024 * 1024
    assert settings.max_pending_requests == 8
    assert settings.max_request_threads == 8
    assert settings.virtual_server_threads == 1
    assert settings.observer is None
    assert settings.allowed_origins == frozenset()
    assert settings.allow_missing_origin is True
    assert settings.inline_request_kinds == CHEAP_REQUEST_KINDS
    assert settings.executor is None
    assert settings.close_timeout == 5.0


@pytest.mark.parametrize("name", COUNT_FIELDS)
@pytest.mark.parametrize(
    "value", [0, -1, -(2**40), True, False, 1.0, 8.5, "8", None, math.inf],
    ids=["zero", "minus-one", "very-negative", "True", "False", "float", "fraction", "str",
         "None", "inf"],
)
def test_count_fields_refuse_non_positive_integers(name: str, value: Any) -> None:
    with pytest.raises(ValueError, match=name):
        Settings(**{name: value})


@pytest.mark.parametrize("name", COUNT_FIELDS)
def test_count_fields_accept_positive_integers(name: str) -> None:
    for value in (1, 2**40):
        options: dict[str, Any] = {name: value}
        assert getattr(Settings(**options), name) == value


@pytest.mark.parametrize("value", [0, 0.0, -1, -0.5, math.nan, -math.inf])
def test_close_timeout_refuses_non_positive(value: float) -> None:
    with pytest.raises(ValueError, match="close_timeout"):
        Settings(close_timeout=value)


@pytest.mark.parametrize("value", [True, "5", None], ids=["True", "str", "None"])
def test_close_timeout_refuses_non_numbers(value: Any) -> None:
    with pytest.raises(ValueError, match="close_timeout"):
        Settings(close_timeout=value)


@pytest.mark.parametrize("value", [0.001, 1, 30.0])
def test_close_timeout_accepts_positive_numbers(value: float) -> None:
    assert Settings(close_timeout=value).close_timeout == value


def test_replace_validates_too() -> None:
    with pytest.raises(ValueError, match="max_pending_requests"):
        dataclasses.replace(Settings(), max_pending_requests=0)


def test_allowed_origins_refuses_a_bare_string() -> None:
    # A string is an iterable of one-letter "origins": refuse it rather than allow "h", "t"...
    with pytest.raises(ValueError, match="allowed_origins"):
        Settings(allowed_origins="https://dash.example.com")  # type: ignore[arg-type]


@pytest.mark.parametrize("entry", ["", None, 1, b"https://dash.example.com"])
def test_allowed_origins_refuses_bad_entries(entry: Any) -> None:
    with pytest.raises(ValueError, match="allowed_origins"):
        Settings(allowed_origins=frozenset({"https://ok.example.com", entry}))


@pytest.mark.parametrize(
    "origins", [["https://a.example"], ("https://a.example",), {"https://a.example"}]
)
def test_allowed_origins_accepts_any_collection(origins: Any) -> None:
    settings = Settings(allowed_origins=origins)
    assert settings.allowed_origins == frozenset({"https://a.example"})
    assert isinstance(settings.allowed_origins, frozenset)


def test_inline_request_kinds_become_a_frozenset() -> None:
    settings = Settings(inline_request_kinds=[8, 4, 8])  # type: ignore[arg-type]
    assert settings.inline_request_kinds == frozenset({4, 8})
    assert isinstance(settings.inline_request_kinds, frozenset)


def test_is_frozen() -> None:
    settings = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.max_message_size = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.allowed_origins = frozenset({"*"})  # type: ignore[misc]
    assert settings.max_message_size == 64 * 1024 * 1024


def test_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        Settings(1024)  # type: ignore[call-arg]


def test_executor_is_kept() -> None:
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        assert Settings(executor=executor).executor is executor


def test_adapters_take_an_executor_beside_settings() -> None:
    import concurrent.futures

    from perspective_asgi import PerspectiveASGIApp
    from perspective_asgi._config import resolve_settings

    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        assert resolve_settings(None) == Settings()
        given = Settings(max_pending_requests=3)
        assert resolve_settings(given) is given
        merged = resolve_settings(given, executor)
        assert (merged.executor, merged.max_pending_requests) == (executor, 3)
        app = PerspectiveASGIApp(settings=given, executor=executor)
        assert app.settings == merged
