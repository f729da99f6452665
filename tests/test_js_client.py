"""The stock JS client (``@perspective-dev/client`` under node) against every adapter."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import perspective
import pytest

from perspective_asgi import AuthenticationFailed, HandshakeRequest, Policy, Settings

from ._helpers import DEMO_ROWS, CountingFactory

JS_DIR = Path(__file__).parent / "js"
#: The JS client must match the server's major version (see tests/js/install.sh).
FLAVOUR = "v" + perspective.__version__.split(".")[0]


@pytest.fixture(scope="module")
def node() -> str:
    path = shutil.which("node")
    installed = (JS_DIR / FLAVOUR / "node_modules" / "@perspective-dev" / "client").is_dir()
    if path is None or not installed:
        if os.environ.get("PERSPECTIVE_ASGI_SKIP_JS") == "1":
            pytest.skip("node or the JS client is not installed")
        pytest.fail(f"run tests/js/install.sh {FLAVOUR} first (or set PERSPECTIVE_ASGI_SKIP_JS=1)")
    return path


def test_stock_js_client(
    node: str, url: str, factory: CountingFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    done = subprocess.run(
        [node, str(JS_DIR / "scenario.mjs"), "--flavour", FLAVOUR, url, "demo"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["ok"] is True
    assert sorted(result["tables"]) == ["demo", "other"]
    assert result["size_before"] == len(DEMO_ROWS["id"])
    assert result["size_after"] == len(DEMO_ROWS["id"]) + 1
    assert result["on_update_fired"] is True
    assert result["schema"] == {
        "id": "integer", "name": "string", "group": "string", "value": "float"
    }
    assert result["client_errors"] == []
    # terminate() closes without a status code (1005): a normal close, logged quietly.
    factory.wait_all_closed()
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not loud, [r.getMessage() for r in loud]


async def viewer_token(request: HandshakeRequest) -> object:
    if request.query.get("token") != "viewer-token":
        raise AuthenticationFailed(403, "unknown token")
    return "viewer"


@pytest.mark.parametrize(
    "settings",
    [Settings(authenticate=viewer_token, policy=Policy(tables={"demo"}, read_only=True))],
    ids=["read-only-principal"],
)
def test_stock_js_client_as_a_read_only_principal(
    node: str, url: str, factory: CountingFactory, perspective_server: perspective.Server
) -> None:
    done = subprocess.run(
        [node, str(JS_DIR / "scenario.mjs"), "--flavour", FLAVOUR, "--read-only",
         f"{url}?token=viewer-token", "demo"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # Everything but the update worked: listing (filtered), views, group-by, on_update.
    assert result["tables"] == ["demo"]
    assert result["size_before"] == result["size_after"] == len(DEMO_ROWS["id"])
    assert result["grouped_num_rows"] == 3
    assert "read-only" in result["update_refused"]
    assert result["client_errors"] == []
    factory.wait_all_closed()
    assert perspective_server.new_local_client().open_table("demo").size() == 4
