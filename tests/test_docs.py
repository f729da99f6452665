"""The documentation cannot break silently: the site builds strictly, its generated reference
lists everything the code has, every Python block is run, included from a program the suite
runs, or marked as a fragment with its reason, and every block passes ruff.

A block's kind is an HTML comment on the line before its fence (invisible on the page):

- ``<!-- run -->``: a self-contained program, executed here;
- ``<!-- same-as: PATH -->``: its lines appear, in order and together, in the file at PATH,
  which another test runs (the README shows short parts of the examples this way, since
  GitHub cannot include files);
- ``<!-- client: demo -->`` or ``<!-- client: examples/PROGRAM.py -->``: a client, run here
  against that server (the demo app, or the example) started on a free port, which replaces
  the port the block names (8000 for the demo, 8080 for an example); top-level ``await`` is
  allowed, as in ``python -m asyncio``;
- ``<!-- fragment: REASON -->``: part of a program (needs a server, a user's module, ...);
  only ruff checks it, with undefined names allowed;
- a block whose only line is ``--8<-- "examples/..."`` includes that file on the site:
  tests/test_examples.py runs every file of examples/.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import html
import inspect
import os
import re
import subprocess
import sys
import textwrap
from collections import deque
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import anyio
import pytest

import perspective_asgi
from perspective_asgi import CloseCode, Settings, cli
from perspective_asgi.metrics import PrometheusObserver

from ._helpers import ROOT, SCENARIO_TIMEOUT, connect, free_port, in_thread, server_process
from ._markdown import Block, blocks, blocks_marked

#: The Markdown that readers meet: the README, the site's pages and what they include.
PAGES = sorted(
    [ROOT / "README.md", ROOT / "SECURITY.md", ROOT / "CHANGELOG.md",
     ROOT / "examples" / "README.md", *(ROOT / "docs").rglob("*.md")]
)
#: How long a `run` block may take: each builds objects, none serves.
RUN_TIMEOUT = 60.0
#: The page a reader must reach from the site's home page in two clicks.
FASTAPI_PAGE = "tutorials/fastapi/index.html"

ALL_BLOCKS = [block for page in PAGES for block in blocks(page)]
PYTHON = [block for block in ALL_BLOCKS if block.language == "python"]


# Every block is accounted for ---------------------------------------------------------------


def test_the_pages_have_python_blocks() -> None:
    # The pattern must find what it is meant to check: the tutorials alone hold several.
    assert len(PYTHON) >= 20
    assert any(block.marker == "run" for block in PYTHON)
    assert any(block.included for block in PYTHON)


def test_every_python_block_is_run_included_or_a_fragment() -> None:
    unaccounted = [
        block.where for block in PYTHON
        if not block.included and block.marker not in ("run", "client", "same-as", "fragment")
    ]
    assert not unaccounted, f"mark these blocks (see {__name__}'s docstring): {unaccounted}"
    unexplained = [block.where for block in PYTHON
                   if block.marker == "fragment" and not (block.argument or "").strip()]
    assert not unexplained, f"a fragment says why it is one: {unexplained}"


def test_included_files_exist_and_are_examples_the_suite_runs() -> None:
    for block in ALL_BLOCKS:
        path = block.included
        if path is None:
            continue
        assert (ROOT / path).is_file(), f"{block.where} includes a missing {path}"
        if block.language == "python":
            assert path.startswith("examples/"), f"{block.where}: {path} is not an example"


def test_every_example_is_shown_on_a_page() -> None:
    included = {block.included for block in ALL_BLOCKS if block.included}
    examples = {
        str(path.relative_to(ROOT)) for path in (ROOT / "examples").iterdir()
        if path.suffix in (".py", ".yml", ".json")
    }
    assert examples <= included, f"no page shows {sorted(examples - included)}"


@pytest.mark.parametrize(
    "block", [block for block in PYTHON if block.marker == "same-as"],
    ids=lambda block: block.where,
)
def test_same_as_blocks_are_in_their_file(block: Block) -> None:
    assert block.argument
    source = (ROOT / block.argument).read_text("utf-8").splitlines(True)
    shown = block.body.splitlines(True)
    # A part from inside a function is shown dedented.
    windows = (textwrap.dedent("".join(source[i:i + len(shown)])) for i in range(len(source)))
    assert "".join(shown) in windows, f"{block.where} is not a part of {block.argument}"


@pytest.mark.parametrize(
    "block", [block for block in PYTHON if block.marker == "run"], ids=lambda block: block.where
)
def test_run_blocks_run(block: Block, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", block.body], cwd=tmp_path, text=True,
                            capture_output=True, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, f"{block.where} failed:\n{result.stderr}"


@pytest.mark.anyio
@pytest.mark.parametrize(
    "block", [block for block in PYTHON if block.marker == "client"],
    ids=lambda block: block.where,
)
async def test_client_blocks_run_against_their_server(block: Block, tmp_path: Path) -> None:
    port = free_port()
    if block.argument == "demo":
        args = [sys.executable, "-m", "uvicorn", "perspective_asgi.app:app", "--port", str(port)]
        shown = "127.0.0.1:8000"
    else:
        assert block.argument and (ROOT / block.argument).is_file(), block.where
        args, shown = [sys.executable, block.argument], "127.0.0.1:8080"
    assert shown in block.body, f"{block.where} does not connect to {shown}"
    body = block.body.replace(shown, f"127.0.0.1:{port}")
    code = compile(body, block.where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    namespace: dict[str, object] = {"__name__": "__main__"}
    async with server_process(args, tmp_path, port=port):
        with anyio.fail_after(SCENARIO_TIMEOUT):
            if code.co_flags & inspect.CO_COROUTINE:
                await eval(code, namespace)
            else:
                # A program that runs its own loop (asyncio.run), or a synchronous client.
                await in_thread(exec, code, namespace)


def test_python_blocks_pass_ruff(tmp_path: Path) -> None:
    programs, fragments = tmp_path / "programs", tmp_path / "fragments"
    for folder, kinds in ((programs, ("run",)), (fragments, ("client", "same-as", "fragment"))):
        folder.mkdir()
        for number, block in enumerate(b for b in PYTHON if b.marker in kinds):
            body = block.body
            if re.search(r"^(await|async) ", body, re.MULTILINE):
                # A fragment written as the body of a coroutine: check it as one.
                body = "async def fragment():\n" + "".join(
                    f"    {line}" if line.strip() else line for line in body.splitlines(True)
                )
            name = re.sub(r"\W", "_", block.where)
            (folder / f"b{number:03}_{name}.py").write_text(body)
    ruff = [sys.executable, "-m", "ruff", "check", "--no-cache", "--config",
            str(ROOT / "pyproject.toml")]
    checks = [
        [*ruff, str(programs)],
        # Parts of programs: the names they use, and the uses of what they import, are in the
        # program around them.
        [*ruff, "--extend-ignore", "F401,F811,F821,F841,E402,I001", str(fragments)],
    ]
    for command in checks:
        result = subprocess.run(command, text=True, capture_output=True, timeout=RUN_TIMEOUT)
        assert result.returncode == 0, result.stdout + result.stderr


# The site -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
         str(ROOT / "mkdocs.yml"), "--site-dir", str(out)],
        cwd=ROOT, text=True, capture_output=True, timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr
    return out


def page_text(site: Path, page: str) -> str:
    """A built page's article as plain text."""
    found = re.search(r"<article[^>]*>(.*?)</article>", (site / page).read_text("utf-8"),
                      re.DOTALL)
    assert found, f"{page} has no article"
    return html.unescape(re.sub(r"<[^>]+>", "", found.group(1)))


def test_the_settings_reference_lists_every_field(site: Path) -> None:
    built = (site / "reference/settings/index.html").read_text("utf-8")
    text = page_text(site, "reference/settings/index.html")
    for field in dataclasses.fields(Settings):
        assert f'id="{field.name}"' in built, f"Settings.{field.name} has no section"
    assert "64 * MiB (67,108,864)" in text  # the default as written, and its value
    assert "bounding what one client can make us buffer" in text  # the #: comment


def test_the_cli_reference_is_the_parsers_help(site: Path) -> None:
    text = page_text(site, "reference/cli/index.html")
    parser = cli._parser()
    commands = next(action for action in parser._actions
                    if isinstance(action, argparse._SubParsersAction))
    for name, command in commands.choices.items():
        assert f"perspective-asgi {name}" in text
        for action in command._actions:
            for option in action.option_strings:
                assert option in text, f"{name} {option} is missing from the CLI reference"


def test_the_close_codes_and_metrics_references_list_everything(site: Path) -> None:
    codes = page_text(site, "reference/close-codes/index.html")
    for code in CloseCode:
        assert f"{code.value}\n{code.name}" in codes, f"{code!r} is missing"
    names = page_text(site, "reference/metrics/index.html")
    families = list(PrometheusObserver().registry.collect())
    assert len(families) >= 10
    for family in families:
        exported = family.name + ("_total" if family.type == "counter" else "")
        assert f"\n{exported}\n{family.type}\n" in names, f"{exported} is not in the reference"


def test_the_api_reference_documents_the_public_api(site: Path) -> None:
    built = (site / "reference/api/index.html").read_text("utf-8")
    for name in perspective_asgi.__all__:
        assert f'id="perspective_asgi.{name}"' in built, f"{name} is not in the API reference"


def links(site: Path, page: str) -> set[str]:
    """The site pages that ``page`` links to, as paths relative to the site."""
    found = set()
    for href in re.findall(r'href="([^"#]*)(?:#[^"]*)?"', (site / page).read_text("utf-8")):
        parts = urlsplit(href)
        if parts.scheme or parts.netloc or not href:
            continue
        target = urljoin(f"/{page}", parts.path).lstrip("/")
        if target == "" or target.endswith("/"):
            target += "index.html"
        if (site / target).is_file() and target.endswith(".html"):
            found.add(target)
    return found


def test_fastapi_with_authentication_is_two_clicks_from_home(site: Path) -> None:
    clicks = {"index.html": 0}
    queue = deque(["index.html"])
    while queue:
        page = queue.popleft()
        if clicks[page] == 2:
            continue
        for target in links(site, page) - clicks.keys():
            clicks[target] = clicks[page] + 1
            queue.append(target)
    assert clicks.get(FASTAPI_PAGE, 3) <= 2
    # And the page shows the program CI runs, whole.
    text = page_text(site, FASTAPI_PAGE)
    program = (ROOT / "examples" / "fastapi_app.py").read_text("utf-8")
    assert program.strip() in text
    assert "Depends(current_user)" in program


def test_the_changelog_and_security_pages_include_the_files(site: Path) -> None:
    for page, source in (("changelog/index.html", "CHANGELOG.md"),
                         ("explanation/security/index.html", "SECURITY.md")):
        heading = (ROOT / source).read_text("utf-8").splitlines()[0].lstrip("# ")
        assert page_text(site, page).lstrip().startswith(heading)


# Charts ---------------------------------------------------------------------------------------


def test_the_charts_are_drawn_from_the_benchmark_results(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "benchmarks/charts.py", "--out", str(tmp_path)],
                            cwd=ROOT, text=True, capture_output=True, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stderr
    drawn = sorted(path.name for path in tmp_path.glob("*.png"))
    committed = sorted(path.name for path in (ROOT / "docs/assets/performance").glob("*.png"))
    assert drawn == committed and drawn
    performance = (ROOT / "docs/explanation/performance.md").read_text("utf-8")
    for name in drawn:
        assert f"../assets/performance/{name}" in performance, f"no page shows {name}"


# The README -----------------------------------------------------------------------------------


def test_the_readme_is_a_landing_page() -> None:
    lines = (ROOT / "README.md").read_text("utf-8").splitlines()
    assert len(lines) < 120
    first_screen = "\n".join(lines[:30])
    assert "uvicorn perspective_asgi.app:app" in first_screen
    assert "\nscripts/test\n" in first_screen
    for link in re.findall(r"\]\((docs/[^)#]+)", "\n".join(lines)):
        assert (ROOT / link).exists(), f"the README links to a missing {link}"


# The tutorial that is a command line ----------------------------------------------------------


@pytest.mark.anyio
async def test_the_serve_tutorial_commands_serve_the_file(tmp_path: Path) -> None:
    (block,) = blocks_marked(ROOT / "docs" / "tutorials" / "serve.md", "run", "serve")
    make, serve = block.body.strip().splitlines()
    subprocess.run(make, shell=True, cwd=tmp_path, check=True, timeout=RUN_TIMEOUT)
    command = serve.split()
    assert command[0] == "perspective-asgi"
    port = free_port()
    args = [sys.executable, "-m", "perspective_asgi", *command[1:], "--port", str(port)]
    async with server_process(args, tmp_path, port=port, cwd=tmp_path) as process:
        with anyio.fail_after(SCENARIO_TIMEOUT):
            async with connect(process.url) as conn:
                assert await conn.client.get_hosted_table_names() == ["trades"]
                view = await (await conn.client.open_table("trades")).view()
                columns = await view.to_columns()
                assert columns["symbol"] == ["AAPL", "MSFT", "NVDA"]
        await in_thread(process.stop_cleanly)
