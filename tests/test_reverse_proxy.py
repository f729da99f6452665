"""docs/how-to/reverse-proxy.md, run: its nginx configuration terminates TLS in front of the
demo app, started with the page's own uvicorn command, and a client that behaves like a page
served from the public origin connects over ``wss://`` through it.

Only what cannot run here is substituted: the ports (free ones on loopback), the certificate
(a self-signed one for the page's ``dash.example.com``) and nginx's own files (in the test's
directory). Under CI a missing nginx fails the test; locally it skips.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import pytest

from ._helpers import (
    ROOT,
    SCENARIO_TIMEOUT,
    connect,
    free_port,
    refused_status,
    server_process,
    unavailable,
    viewer_bundle_installed,
)
from ._markdown import blocks_marked

pytestmark = pytest.mark.anyio

PAGE = ROOT / "docs" / "how-to" / "reverse-proxy.md"
#: The public name the page's configuration serves, and the origin of its pages.
PUBLIC_HOST = "dash.example.com"
PUBLIC_ORIGIN = f"https://{PUBLIC_HOST}"
#: Keepalive against the proxy's read timeout, scaled down from the page's 20 s and 120 s:
#: a websocket silent for longer than the timeout stays open, because the pings are traffic.
PING_INTERVAL = 0.5
READ_TIMEOUT = 2


@dataclass(frozen=True)
class Proxied:
    """The demo app behind nginx: where to connect, and how to trust its certificate."""

    port: int
    tls: ssl.SSLContext

    @property
    def websocket(self) -> str:
        return f"wss://{PUBLIC_HOST}:{self.port}/websocket"

    def options(self, origin: str = PUBLIC_ORIGIN) -> dict[str, object]:
        # Resolve the public name to loopback, as a hosts entry would, so that the TLS name and
        # the Host header are the page's.
        return {"ssl": self.tls, "host": "127.0.0.1", "port": self.port, "origin": origin}


def substitute(text: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        assert old in text, f"{PAGE.name} no longer says {old!r}"
        text = text.replace(old, new)
    return text


def certificate(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={PUBLIC_HOST}",
         "-addext", f"subjectAltName=DNS:{PUBLIC_HOST}"],
        check=True, capture_output=True, timeout=30,
    )
    return cert, key


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"  # at the scope of ``proxied``, which the module's tests share


@pytest.fixture(scope="module")
async def proxied(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Proxied]:
    tmp_path = tmp_path_factory.mktemp("proxy")
    # Debian installs it in sbin, which a non-root PATH may lack.
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if nginx is None or shutil.which("openssl") is None:
        unavailable("nginx and openssl are not installed (apt-get install nginx-light)",
                    "the reverse proxy test")
    shown = {block.language: block.body for block in blocks_marked(PAGE, "run", "reverse-proxy")}
    config, command = shown["nginx"], shown["sh"]
    app_port, proxy_port = free_port(), free_port()
    cert, key = certificate(tmp_path)
    server = substitute(config, {
        "server 127.0.0.1:8000;": f"server 127.0.0.1:{app_port};",
        "listen 443 ssl;": f"listen 127.0.0.1:{proxy_port} ssl;",
        "/etc/ssl/dash.example.com.pem": str(cert),
        "/etc/ssl/dash.example.com.key": str(key),
        "proxy_read_timeout 120s;": f"proxy_read_timeout {READ_TIMEOUT}s;",
    })
    # The page's server block, in the smallest main configuration nginx runs in the foreground
    # with, every file it writes in the test's directory (its error log: ``-e`` below).
    temp = " ".join(f"{kind}_temp_path {tmp_path}/{kind};"
                    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (tmp_path / "nginx.conf").write_text(
        f"daemon off; master_process off; pid {tmp_path}/nginx.pid;\nevents {{}}\n"
        f"http {{\naccess_log off;\n{temp}\n{server}\n}}\n"
    )
    args = substitute(command.strip(), {"--port 8000": f"--port {app_port}"}).split()
    assert args[0] == "uvicorn"
    app = [sys.executable, "-m", *args, "--ws-ping-interval", str(PING_INTERVAL)]
    proxy = [nginx, "-p", str(tmp_path), "-e", str(tmp_path / "error.log"), "-c",
             str(tmp_path / "nginx.conf")]
    tls = ssl.create_default_context(cafile=str(cert))
    async with server_process(app, tmp_path, port=app_port), \
            server_process(proxy, tmp_path, port=proxy_port):
        yield Proxied(proxy_port, tls)


async def test_a_page_of_the_public_origin_reads_tables_over_wss(proxied: Proxied) -> None:
    with anyio.fail_after(SCENARIO_TIMEOUT):
        async with httpx.AsyncClient(verify=proxied.tls) as http:
            page = await http.get(f"https://127.0.0.1:{proxied.port}/",
                                  headers={"Host": PUBLIC_HOST},
                                  extensions={"sni_hostname": PUBLIC_HOST})
        assert page.status_code == 200
        expected = "<perspective-viewer>" if viewer_bundle_installed() else "unavailable"
        assert expected in page.text

        async with connect(proxied.websocket, **proxied.options()) as conn:
            prices = await conn.client.open_table("prices")
            assert await prices.size() == 50
            view = await prices.view()
            updated = asyncio.Event()
            await view.on_update(lambda *_: updated.set())
            await view.num_rows()  # a round trip: the subscription has reached the engine
            await asyncio.wait_for(updated.wait(), 10)


async def test_another_origin_is_refused_through_the_proxy(proxied: Proxied) -> None:
    with anyio.fail_after(SCENARIO_TIMEOUT):
        status = await refused_status(proxied.websocket, **proxied.options("https://evil.example"))
    assert status == 403


async def test_keepalive_outlasts_the_proxys_read_timeout(proxied: Proxied) -> None:
    with anyio.fail_after(SCENARIO_TIMEOUT):
        async with connect(proxied.websocket, **proxied.options()) as conn:
            orders = await conn.client.open_table("orders")
            # Silent past the proxy's read timeout: only the server's pings cross the proxy.
            await asyncio.sleep(READ_TIMEOUT * 1.5)
            assert await orders.size() == 100_000
