"""The built distribution, as a user installs it: ``python -m build`` makes an sdist and a wheel,
``twine check --strict`` accepts both, and the wheel, installed into a fresh virtualenv (not
this checkout), serves the dashboard with ``[all]`` and, bare, imports and says which extra a
command needs.

Building and installing take about a minute (the packages come from pip's cache after the
suite's own install), so this runs once per suite, on perspective-python 5.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import perspective
import pytest

import perspective_asgi

from ._helpers import ROOT, START_TIMEOUT, free_port

pytestmark = pytest.mark.skipif(
    perspective.__version__.startswith("4."),
    reason="the wheel is built and installed once per suite, in the perspective-python 5 run",
)

#: What the dashboard needs besides its code, and what makes the package typed.
PACKAGE_DATA = [
    "perspective_asgi/py.typed",
    "perspective_asgi/static/dashboard.css",
    "perspective_asgi/static/dashboard.js",
    "perspective_asgi/templates/index.html",
    "perspective_asgi/templates/unavailable.html",
]


def outside_checkout() -> dict[str, str]:
    """This environment with none of this checkout importable."""
    return {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}


def run(*args: str | Path, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run a command outside this checkout; fail with its output if it fails."""
    result = subprocess.run([str(arg) for arg in args], cwd=cwd, env=outside_checkout(),
                            capture_output=True,
                            text=True, timeout=timeout, check=False)
    if result.returncode:
        pytest.fail(f"{' '.join(map(str, args))} exited {result.returncode}:\n"
                    f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--outdir", out, ROOT, cwd=out)
    return out


def wheel_of(dist: Path) -> Path:
    (wheel,) = dist.glob("*.whl")
    return wheel


def venv(where: Path) -> Path:
    """A fresh virtualenv; its interpreter."""
    run(sys.executable, "-m", "venv", where, cwd=where.parent)
    return where / "bin" / "python"


def pip_install(python: Path, requirement: str) -> None:
    run(python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", requirement,
        cwd=python.parent)


def test_sdist_and_wheel_pass_twine_check_and_carry_the_package_data(dist: Path) -> None:
    (sdist,) = dist.glob("*.tar.gz")
    wheel = wheel_of(dist)
    run(sys.executable, "-m", "twine", "check", "--strict", sdist, wheel, cwd=dist)
    # One source for the version: perspective_asgi.__version__, read by the build backend.
    assert wheel.name.startswith(f"perspective_asgi-{perspective_asgi.__version__}-")
    assert sdist.name == f"perspective_asgi-{perspective_asgi.__version__}.tar.gz"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(
            f"perspective_asgi-{perspective_asgi.__version__}.dist-info/METADATA"
        ).decode()
    missing = [name for name in PACKAGE_DATA if name not in names]
    assert not missing, f"not in the wheel: {missing}"
    assert not [name for name in names if name.startswith(("tests/", "benchmarks/"))]
    # Classifiers claim only the interpreter the suite runs on.
    versions = re.findall(r"^Classifier: Programming Language :: Python :: (3\.\d+)$",
                          metadata, re.MULTILINE)
    assert versions == [f"{sys.version_info.major}.{sys.version_info.minor}"]


def fetch(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read()


@pytest.fixture
def installed_server(dist: Path, tmp_path: Path) -> Iterator[str]:
    python = venv(tmp_path / "all")
    pip_install(python, f"{wheel_of(dist)}[all]")
    port = free_port()
    # From an empty directory, so only the installed copy can be imported.
    process = subprocess.Popen(
        [str(python), "-m", "uvicorn", "perspective_asgi.app:app", "--port", str(port)],
        cwd=tmp_path, env=outside_checkout(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                fetch(f"{base}/healthz")
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    process.kill()
                    output = process.communicate()[0].decode(errors="replace")
                    pytest.fail(f"the installed app did not start:\n{output}")
                time.sleep(0.1)
        yield base
    finally:
        process.terminate()
        process.communicate(timeout=15)


def test_the_installed_wheel_serves_the_dashboard(installed_server: str, tmp_path: Path) -> None:
    status, page = fetch(f"{installed_server}/")
    assert status == 200
    html = page.decode()
    assets = re.findall(r'(?:href|src)="(/static/[^"]+)"', html)
    # The viewer bundle's stylesheet, and the dashboard's stylesheet and script.
    assert len(assets) >= 3, html
    for asset in assets:
        status, body = fetch(f"{installed_server}{asset}")
        assert status == 200 and body, asset
    status, body = fetch(f"{installed_server}/healthz")
    assert status == 200
    # Served from the virtualenv, not from this checkout.
    site = run(tmp_path / "all" / "bin" / "python", "-c",
               "import perspective_asgi; print(perspective_asgi.__file__)", cwd=tmp_path)
    assert str(tmp_path / "all") in site.stdout


def test_the_bare_wheel_imports_and_names_the_missing_extra(dist: Path, tmp_path: Path) -> None:
    python = venv(tmp_path / "bare")
    pip_install(python, str(wheel_of(dist)))
    run(python, "-c", "import perspective_asgi, perspective_asgi.adapters.asgi", cwd=tmp_path)
    cli = tmp_path / "bare" / "bin" / "perspective-asgi"
    for command in (["serve"], ["edge", "ws://127.0.0.1:1/websocket"]):
        result = subprocess.run([str(cli), *command], cwd=tmp_path, env=outside_checkout(),
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 2, result
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert "pip install 'perspective-asgi[" in lines[0], lines[0]
