"""The stock JS client (``@perspective-dev/client`` under node) against every adapter."""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import perspective
import pytest

from perspective_asgi import AuthenticationFailed, HandshakeRequest, Policy, Settings
from perspective_asgi._core import sharing

from ._helpers import DEMO_ROWS, CountingFactory, StdoutLines

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


#: Grouped twice, so that ``set_depth(0)`` has rows to collapse. No ``aggregates`` or
#: ``expressions``: the client encodes those maps in hash order, which differs between two
#: views of one configuration, and views that differ in bytes are not shared.
SHARED_CONFIG = {"group_by": ["group", "name"], "columns": ["value"]}
#: Bounds each of the scenario's waits; its whole run takes at most 8 times that.
SHARED_STEP_TIMEOUT_MS = 5000


class Scenario:
    """A JS scenario in a subprocess that reports each step in a JSON line on stdout and
    waits for a line on stdin before the next one."""

    def __init__(self, args: list[str], logs: Path) -> None:
        self.stderr_path = logs / "js-stderr.txt"
        with open(self.stderr_path, "wb") as stderr:
            self.popen = subprocess.Popen(
                args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True
            )
        # The script's own deadline, and time for node to start and exit.
        self.deadline = time.monotonic() + 8 * SHARED_STEP_TIMEOUT_MS / 1000 + 10
        self._stdout = StdoutLines(self.popen)

    def next_message(self) -> dict[str, Any]:
        """Return the script's next JSON line; fail if it exits or runs out of time first."""
        try:
            line = self._stdout.next(self.deadline)
        except queue.Empty:
            pytest.fail(f"no word from the JS scenario in time:\n{self.stderr}")
        if line is None:
            pytest.fail(f"the JS scenario exited with {self.popen.wait()}:\n{self.stderr}")
        message: dict[str, Any] = json.loads(line)
        assert message.get("ok") is not False, json.dumps(message, indent=1)
        return message

    def step(self, event: str) -> dict[str, Any]:
        """Return the report of the step ``event``, the scenario waiting meanwhile."""
        message = self.next_message()
        assert message.get("event") == event, message
        return message

    def proceed(self) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write("next\n")
        self.popen.stdin.flush()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-4000:]

    def stop(self) -> int:
        """Let the script end (killing it if it does not) and return its exit code."""
        # A script waiting for the next step gives up at once when its stdin closes.
        if self.popen.stdin is not None:
            self.popen.stdin.close()
        try:
            return self.popen.wait(10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait()
        finally:
            self._stdout.join(10)


def test_stock_js_clients_share_one_view(
    node: str, url: str, factory: CountingFactory, perspective_server: perspective.Server,
    tmp_path: Path,
) -> None:
    table = perspective_server.new_local_client().open_table("demo")

    def server_columns() -> dict[str, Any]:
        # Read the way the clients read, as JSON.
        view = table.view(**SHARED_CONFIG)
        try:
            columns: dict[str, Any] = json.loads(json.dumps(view.to_columns()))
        finally:
            view.delete()
        return columns

    def collapsed(columns: dict[str, Any]) -> dict[str, Any]:
        # What set_depth(0) leaves: the root row and the first level of groups.
        shown = [len(path) <= 1 for path in columns["__ROW_PATH__"]]
        return {name: [v for v, keep in zip(values, shown, strict=True) if keep]
                for name, values in columns.items()}

    assert sharing.totals() == (0, 0)
    scenario = Scenario(
        [node, str(JS_DIR / "shared.mjs"), "--flavour", FLAVOUR,
         "--timeout", str(SHARED_STEP_TIMEOUT_MS), "--config", json.dumps(SHARED_CONFIG),
         url, "demo"],
        tmp_path,
    )
    try:
        # Three connections, one configuration: one engine view, three aliases of it.
        made = scenario.step("made")
        assert sharing.totals() == (1, 3)
        expected = server_columns()
        # The root, x (alpha, gamma) and y (beta, delta) of DEMO_ROWS.
        assert expected["value"] == [12.0, 5.0, 1.5, 3.5, 7.0, 2.5, 4.5]
        assert made["columns"] == [expected] * 3
        scenario.proceed()

        # One client's update reached every client's callback, once.
        updated = scenario.step("updated")
        assert updated["heard"] == [1, 1, 1]
        expected = server_columns()
        assert expected["value"] == [22.0, 15.0, 1.5, 10.0, 3.5, 7.0, 2.5, 4.5]  # x: epsilon
        assert updated["columns"] == [expected] * 3
        scenario.proceed()

        # The first client's set_depth gave it a view of its own (copy on write): it reads
        # its root row alone, the others read what they read before.
        depth = scenario.step("set_depth")
        assert sharing.totals() == (2, 3)
        assert collapsed(expected)["value"] == [22.0, 15.0, 7.0]
        assert depth["columns"] == [collapsed(expected), expected, expected]
        scenario.proceed()

        # Another client's update still reaches all three, each view showing it its own way.
        again = scenario.step("updated again")
        assert again["heard"] == [2, 2, 2]
        expected = server_columns()
        assert collapsed(expected)["value"] == [42.0, 15.0, 27.0]  # y: zeta
        assert again["columns"] == [collapsed(expected), expected, expected]
        assert sharing.totals() == (2, 3)
        scenario.proceed()

        result = scenario.next_message()
    finally:
        code = scenario.stop()
    assert (code, result["ok"], result["client_errors"]) == (0, True, []), scenario.stderr
    factory.wait_all_closed()
    assert sharing.totals() == (0, 0)
