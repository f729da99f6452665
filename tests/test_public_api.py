"""The public surface: ``__all__`` is the API, and importing it pulls in no web framework."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import perspective_asgi

ROOT = Path(__file__).resolve().parent.parent

EXPECTED = {
    "AuthenticationFailed",
    "CloseCode",
    "ConnectionClosed",
    "HandshakeRequest",
    "PerspectiveASGIApp",
    "PerspectiveASGIError",
    "Policy",
    "ProtocolError",
    "SessionBridge",
    "SessionObserver",
    "SessionState",
    "Settings",
    "Transport",
    "close_all_connections",
    "origin_allowed",
    "postgres_server",
}

FRAMEWORKS = ("starlette", "tornado", "aiohttp", "fastapi", "uvicorn")


def test_all_is_exactly_the_public_api() -> None:
    assert set(perspective_asgi.__all__) == EXPECTED
    assert len(perspective_asgi.__all__) == len(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_public_name_is_importable_and_documented(name: str) -> None:
    namespace: dict[str, object] = {}
    exec(f"from perspective_asgi import {name}", namespace)
    value = namespace[name]
    assert value is getattr(perspective_asgi, name)
    assert getattr(value, "__module__", "").startswith("perspective_asgi"), name
    assert (getattr(value, "__doc__", None) or "").strip(), f"{name} has no docstring"


def test_errors_share_one_base() -> None:
    assert issubclass(perspective_asgi.ConnectionClosed, perspective_asgi.PerspectiveASGIError)
    assert issubclass(perspective_asgi.ProtocolError, perspective_asgi.PerspectiveASGIError)
    assert issubclass(perspective_asgi.PerspectiveASGIError, Exception)


def _frameworks_imported_by(statement: str) -> list[str]:
    """Run ``statement`` in a fresh interpreter; return the frameworks it left imported."""
    script = (
        "import json, sys\n"
        f"{statement}\n"
        f"roots = {{name.partition('.')[0] for name in sys.modules}}\n"
        f"print(json.dumps(sorted(roots & {set(FRAMEWORKS)!r})))\n"
    )
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    imported: list[str] = json.loads(result.stdout.strip().splitlines()[-1])
    return imported


def test_import_pulls_in_no_framework() -> None:
    assert _frameworks_imported_by("import perspective_asgi") == []


def test_the_raw_asgi_adapter_pulls_in_no_framework() -> None:
    assert _frameworks_imported_by("import perspective_asgi.adapters.asgi") == []


@pytest.mark.parametrize(
    ("module", "framework"),
    [("starlette", "starlette"), ("tornado", "tornado"), ("aiohttp", "aiohttp")],
)
def test_each_adapter_imports_only_its_own_framework(module: str, framework: str) -> None:
    imported = _frameworks_imported_by(f"import perspective_asgi.adapters.{module}")
    assert imported == [framework]
