"""File loading, ``create_app``'s extra tables, the environment, and ``perspective-asgi serve``.

Every format is written for real to ``tmp_path`` and read back through ``_loaders``, then hosted
on a ``perspective.Server`` to see what Perspective makes of it. The command runs as its own
process (``python -m perspective_asgi``), checked with the stock Python client.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import perspective
import pyarrow as pa
import pyarrow.feather
import pyarrow.ipc
import pyarrow.parquet
import pytest

from perspective_asgi import PerspectiveASGIError, Settings
from perspective_asgi._exceptions import LoadError
from perspective_asgi._loaders import (
    DATABASE_SUFFIXES,
    TABLE_SUFFIXES,
    load_sources,
    load_table,
    open_duckdb,
    read_table,
)
from perspective_asgi.cli import COMPRESSION_DEFAULT, main

from ._helpers import (
    ROOT,
    SCENARIO_TIMEOUT,
    START_TIMEOUT,
    ServerProcess,
    command,
    connect,
    environment,
    free_port,
    in_thread,
    resolve,
    server_process,
)

pytestmark = pytest.mark.anyio

ROWS: dict[str, list[Any]] = {
    "id": [1, 2, 3],
    "name": ["alpha", "beta", "gamma"],
    "value": [1.5, 2.5, None],
}
SCHEMA = {"id": "integer", "name": "string", "value": "float"}


# Writers: one real file per format ------------------------------------------------------------


def arrow_rows() -> pa.Table:
    return pa.table(ROWS)


def write_csv(path: Path) -> None:
    path.write_text("id,name,value\n1,alpha,1.5\n2,beta,2.5\n3,gamma,\n")


def write_parquet(path: Path) -> None:
    pyarrow.parquet.write_table(arrow_rows(), path)


def write_arrow_file(path: Path) -> None:
    table = arrow_rows()
    with pa.OSFile(str(path), "wb") as sink, pyarrow.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def write_arrow_stream(path: Path) -> None:
    table = arrow_rows()
    with pa.OSFile(str(path), "wb") as sink, pyarrow.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def write_feather(path: Path) -> None:
    pyarrow.feather.write_feather(arrow_rows(), str(path))


def write_json_records(path: Path) -> None:
    records = [dict(zip(ROWS, values, strict=True)) for values in zip(*ROWS.values(), strict=True)]
    # The last record leaves "value" out: a missing key reads as null.
    del records[-1]["value"]
    path.write_text(json.dumps(records))


def write_json_columns(path: Path) -> None:
    path.write_text(json.dumps(ROWS))


def write_ndjson(path: Path) -> None:
    records = [dict(zip(ROWS, values, strict=True)) for values in zip(*ROWS.values(), strict=True)]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def write_duckdb(path: Path, table: str = "readings") -> None:
    duckdb = pytest.importorskip("duckdb")
    with duckdb.connect(str(path)) as db:
        db.execute(f'CREATE TABLE {table} (id INTEGER, name VARCHAR, "value" DOUBLE)')
        db.executemany(
            f"INSERT INTO {table} VALUES (?, ?, ?)", list(zip(*ROWS.values(), strict=True))
        )


FORMATS: dict[str, tuple[str, Callable[[Path], None]]] = {
    "csv": ("readings.csv", write_csv),
    "parquet": ("readings.parquet", write_parquet),
    "arrow-file": ("readings.arrow", write_arrow_file),
    "arrow-stream": ("readings.arrow", write_arrow_stream),
    "ipc-stream": ("readings.ipc", write_arrow_stream),
    "feather": ("readings.feather", write_feather),
    "json-records": ("readings.json", write_json_records),
    "json-columns": ("readings.json", write_json_columns),
    "ndjson-as-json": ("readings.json", write_ndjson),
    "ndjson": ("readings.ndjson", write_ndjson),
    "jsonl": ("readings.jsonl", write_ndjson),
    "upper-case-suffix": ("READINGS.CSV", write_csv),
}


def write(tmp_path: Path, fmt: str) -> Path:
    filename, writer = FORMATS[fmt]
    path = tmp_path / filename
    writer(path)
    return path


def host(data: bytes, name: str = "t", index: str | None = None) -> Any:
    return perspective.Server().new_local_client().table(data, name=name, index=index)


# Loading each format --------------------------------------------------------------------------


def test_every_table_suffix_is_covered() -> None:
    written = {Path(filename).suffix.lower() for filename, _ in FORMATS.values()}
    assert written == set(TABLE_SUFFIXES)
    assert set(DATABASE_SUFFIXES) == {".duckdb"}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_load_table_reads_each_format(fmt: str, tmp_path: Path) -> None:
    path = write(tmp_path, fmt)
    loaded = load_table(path)
    assert loaded.name == path.stem
    assert loaded.index is None
    assert loaded.num_rows == 3

    # The bytes are an Arrow IPC stream holding exactly the rows written.
    decoded = pyarrow.ipc.open_stream(loaded.data).read_all()
    assert decoded.column_names == ["id", "name", "value"]
    assert pa.types.is_integer(decoded.schema.field("id").type)
    assert pa.types.is_floating(decoded.schema.field("value").type)
    assert decoded.to_pydict() == ROWS

    # ... and Perspective takes them as they are.
    table = host(loaded.data, name=loaded.name)
    assert table.schema() == SCHEMA
    assert table.size() == 3
    assert table.view().to_columns() == ROWS


def test_load_table_name_and_index(tmp_path: Path) -> None:
    loaded = load_table(write(tmp_path, "parquet"), name="sensors", index="name")
    assert (loaded.name, loaded.index) == ("sensors", "name")
    table = host(loaded.data, name=loaded.name, index=loaded.index)
    assert table.get_index() == "name"
    table.update([{"name": "beta", "value": 9.0}])
    assert table.size() == 3  # an update on the index replaces the row
    assert table.view().to_columns()["value"] == [1.5, 9.0, None]


def test_view_layouts_are_converted(tmp_path: Path) -> None:
    # polars writes strings as Arrow's string_view, which Perspective cannot load.
    if not hasattr(pa, "string_view"):
        pytest.skip("pyarrow without view types")
    table = pa.table({
        "name": pa.array(["a", "b"], pa.string_view()),
        "raw": pa.array([b"x", b"y"], pa.binary_view()),
    })
    path = tmp_path / "views.arrow"
    with pa.OSFile(str(path), "wb") as sink, pyarrow.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    loaded = host(load_table(path).data)
    assert loaded.schema() == {"name": "string", "raw": "string"}
    assert loaded.view().to_columns() == {"name": ["a", "b"], "raw": ["x", "y"]}


def test_read_table_returns_the_arrow_table(tmp_path: Path) -> None:
    assert read_table(write(tmp_path, "csv")).to_pydict() == ROWS


# Errors: one line naming the file -------------------------------------------------------------


def truncated_parquet(path: Path) -> None:
    write_parquet(path)
    path.write_bytes(path.read_bytes()[:-20])


BROKEN: dict[str, tuple[str, Callable[[Path], None], str]] = {
    # id: (file name, writer, words the message must contain)
    "truncated-parquet": ("broken.parquet", truncated_parquet, "not a readable Parquet file"),
    "garbage-csv": (
        "broken.csv", lambda path: path.write_text("a,b\n1,2,3\n"), "not a readable CSV file"
    ),
    "binary-csv": (
        "broken.csv", lambda path: path.write_bytes(b"\xff\xfe\x00\x01"), "not a readable CSV"
    ),
    "garbage-arrow": (
        "broken.arrow", lambda path: path.write_bytes(b"not arrow at all"), "neither an IPC file"
    ),
    "truncated-feather": (
        "broken.feather",
        lambda path: (write_feather(path), path.write_bytes(path.read_bytes()[:50])),
        "not a readable Feather file",
    ),
    "bad-json": ("broken.json", lambda path: path.write_text("[1, 2"), "not a readable JSON"),
    "json-scalar": ("broken.json", lambda path: path.write_text("42"), "array of records"),
    "json-mixed-column": (
        "broken.json", lambda path: path.write_text('{"a": [1, "x"]}'), "column 'a'"
    ),
    "json-no-columns": ("broken.json", lambda path: path.write_text("[]"), "no columns"),
    "bad-ndjson": (
        "broken.ndjson", lambda path: path.write_text('{"a": 1}\n{"a": "x"}\n'), "NDJSON"
    ),
    "unknown-extension": (
        "readings.txt", lambda path: path.write_text("a\n1\n"), "unknown file type (.txt)"
    ),
    "no-extension": ("readings", lambda path: path.write_text("a\n1\n"), "no extension"),
}


def assert_one_line_naming(exc: BaseException, path: Path | str, *words: str) -> None:
    message = str(exc)
    assert "\n" not in message, message
    assert message.startswith(f"{path}: "), message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_files_raise_one_line(case: str, tmp_path: Path) -> None:
    filename, writer, words = BROKEN[case]
    path = tmp_path / filename
    writer(path)
    with pytest.raises(LoadError) as caught:
        load_table(path)
    assert_one_line_naming(caught.value, path, words)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(LoadError) as caught:
        load_table(tmp_path / "absent.csv")
    assert_one_line_naming(caught.value, tmp_path / "absent.csv", "no such file")
    (tmp_path / "folder.csv").mkdir()
    with pytest.raises(LoadError) as caught:
        load_table(tmp_path / "folder.csv")
    assert_one_line_naming(caught.value, tmp_path / "folder.csv", "not a file")


def test_unknown_index_column_lists_the_columns(tmp_path: Path) -> None:
    path = write(tmp_path, "csv")
    with pytest.raises(LoadError) as caught:
        load_table(path, index="sensor")
    assert_one_line_naming(caught.value, path, "'sensor'", "id, name, value")


def test_load_error_is_a_value_error_in_the_tree() -> None:
    assert issubclass(LoadError, PerspectiveASGIError)
    assert issubclass(LoadError, ValueError)


# Several files --------------------------------------------------------------------------------


def test_load_sources_index_applies_to_every_file(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = write(tmp_path / "a", "csv")
    second = tmp_path / "b" / "other.parquet"
    write_parquet(second)
    sources = load_sources([first, second], index="id")
    assert sources.virtual_server is None
    assert {name: index for name, (_, index) in sources.tables.items()} == {
        "readings": "id", "other": "id",
    }


def test_load_sources_refuses_clashes_and_misuse(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    first = write(tmp_path, "csv")
    second = tmp_path / "a" / "readings.parquet"
    write_parquet(second)
    with pytest.raises(LoadError, match=r"table 'readings' is already loaded from"):
        load_sources([first, second])
    with pytest.raises(LoadError, match="exactly one file"):
        load_sources([first, second], name="x")
    database = tmp_path / "db.duckdb"
    write_duckdb(database)
    with pytest.raises(LoadError, match="must be the only file"):
        load_sources([first, database])
    with pytest.raises(LoadError, match="does not apply to a DuckDB database"):
        load_sources([database], index="id")
    # An unknown suffix is reported before any file is loaded.
    notes = tmp_path / "notes.txt"
    notes.write_text("id\n1\n")
    with pytest.raises(LoadError, match=r"notes\.txt: unknown file type"):
        load_sources([tmp_path / "absent.csv", notes])


# DuckDB ---------------------------------------------------------------------------------------


def local_client(server: Any) -> Any:
    """A synchronous ``perspective.Client`` wired straight to a session of ``server``."""
    client: Any = None
    session = server.new_session(lambda response: client.handle_response(response))
    client = perspective.Client(lambda request: session.handle_request(request))
    return client


# perspective-python 4.4's DuckDB virtual server calls a method newer duckdb deprecates.
@pytest.mark.filterwarnings("ignore:fetch_arrow_table:DeprecationWarning")
def test_open_duckdb_serves_the_file_read_only(tmp_path: Path) -> None:
    path = tmp_path / "plant.duckdb"
    write_duckdb(path)
    before = path.read_bytes()
    client = local_client(open_duckdb(path))
    assert client.get_hosted_table_names() == ["plant.readings"]
    table = client.open_table("plant.readings")
    assert table.size() == 3
    assert set(table.schema()) == set(SCHEMA)
    # The virtual server materialises each view as a table: in memory, not in the file.
    view = table.view(columns=["id", "name", "value"], sort=[["id", "desc"]])
    assert view.to_columns() == {key: values[::-1] for key, values in ROWS.items()}
    view.delete()
    assert path.read_bytes() == before


def test_open_duckdb_errors(tmp_path: Path) -> None:
    pytest.importorskip("duckdb")
    junk = tmp_path / "junk.duckdb"
    junk.write_bytes(b"not a database" * 100)
    with pytest.raises(LoadError) as caught:
        open_duckdb(junk)
    assert_one_line_naming(caught.value, junk, "cannot open as a DuckDB database")
    with pytest.raises(LoadError) as caught:
        open_duckdb(tmp_path / "absent.duckdb")
    assert_one_line_naming(caught.value, tmp_path / "absent.duckdb", "no such file")
    memory = tmp_path / "memory.duckdb"
    write_duckdb(memory)
    with pytest.raises(LoadError, match="reserves the name 'memory'"):
        open_duckdb(memory)


# create_app's extra tables and the environment ------------------------------------------------


def test_create_app_hosts_tables_beside_the_demo(tmp_path: Path) -> None:
    from perspective_asgi.app import create_app

    loaded = load_table(write(tmp_path, "csv"), index="id")
    app = create_app(tables={loaded.name: (loaded.data, loaded.index)})
    client = app.state.perspective_server.new_local_client()
    assert sorted(client.get_hosted_table_names()) == ["orders", "prices", "readings"]
    table = client.open_table("readings")
    assert (table.get_index(), table.size(), table.schema()) == ("id", 3, SCHEMA)


def test_create_app_refuses_what_it_cannot_host(tmp_path: Path) -> None:
    from perspective_asgi.app import create_app

    data = load_table(write(tmp_path, "csv")).data
    with pytest.raises(ValueError, match="'orders': the name of a demo table"):
        create_app(tables={"orders": (data, None)})
    create_app(demo=False, tables={"orders": (data, None)})  # no demo, no clash

    # Arrow types the engine refuses surface as a ValueError naming the table.
    times = pa.table({"at": pa.array([1, 2], pa.time64("us"))})
    sink = pa.BufferOutputStream()
    with pyarrow.ipc.new_stream(sink, times.schema) as writer:
        writer.write_table(times)
    with pytest.raises(ValueError, match=r"^table 'times': ") as caught:
        create_app(demo=False, tables={"times": (sink.getvalue().to_pybytes(), None)})
    assert "\n" not in str(caught.value)

    database = tmp_path / "plant.duckdb"
    write_duckdb(database)
    with pytest.raises(ValueError, match="virtual_server hosts its own tables"):
        create_app(virtual_server=open_duckdb(database))
    app = create_app(demo=False, virtual_server=open_duckdb(database))
    assert local_client(app.state.perspective_server).get_hosted_table_names() == [
        "plant.readings"
    ]


def test_settings_from_env(tmp_path: Path) -> None:
    from perspective_asgi.app import DEMO_ENV, FILES_ENV, READ_ONLY_ENV, settings_from_env

    assert settings_from_env({}) == {
        "demo": True, "tables": {}, "virtual_server": None, "settings": Settings()
    }
    assert settings_from_env({READ_ONLY_ENV: "1"})["settings"].read_only is True
    assert settings_from_env({READ_ONLY_ENV: "off"})["settings"].read_only is False
    with pytest.raises(ValueError, match=f"^{READ_ONLY_ENV} must be 1 or 0.*got 'x'$"):
        settings_from_env({READ_ONLY_ENV: "x"})
    for off in ("0", "false", "No", " off "):
        assert settings_from_env({DEMO_ENV: off})["demo"] is False
    for on in ("", "1", "TRUE", "yes", "on"):
        assert settings_from_env({DEMO_ENV: on})["demo"] is True
    with pytest.raises(ValueError, match=f"^{DEMO_ENV} must be 1 or 0.*got 'maybe'$"):
        settings_from_env({DEMO_ENV: "maybe"})

    csv = write(tmp_path, "csv")
    (tmp_path / "b").mkdir()
    parquet = tmp_path / "b" / "more.parquet"
    write_parquet(parquet)
    files = os.pathsep.join([str(csv), "", str(parquet)])  # empty entries are skipped
    options = settings_from_env({FILES_ENV: files, DEMO_ENV: "0"})
    assert options["demo"] is False
    assert sorted(options["tables"]) == ["more", "readings"]

    with pytest.raises(LoadError) as caught:
        settings_from_env({FILES_ENV: str(tmp_path / "absent.csv")})
    assert str(caught.value) == f"{FILES_ENV}: {tmp_path / 'absent.csv'}: no such file"

    # A DuckDB database replaces the demo tables, and cannot be asked to serve beside them.
    database = tmp_path / "plant.duckdb"
    write_duckdb(database)
    options = settings_from_env({FILES_ENV: str(database)})
    assert options["demo"] is False
    assert options["virtual_server"] is not None
    with pytest.raises(ValueError, match="cannot be served beside a DuckDB database"):
        settings_from_env({FILES_ENV: str(database), DEMO_ENV: "1"})


def test_importing_the_app_module_reads_no_environment(tmp_path: Path) -> None:
    # The command line imports create_app; only an ASGI server's access to ``app`` builds it,
    # so a stale PERSPECTIVE_ASGI_FILES cannot break ``perspective-asgi serve``.
    script = (
        "import perspective_asgi.app as dashboard\n"
        "assert 'app' not in vars(dashboard)\n"
        "assert not hasattr(dashboard, 'not_an_attribute')\n"
    )
    env = environment(PERSPECTIVE_ASGI_FILES=str(tmp_path / "absent.csv"))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=START_TIMEOUT)
    assert result.returncode == 0, result.stderr


# The command line, in process -----------------------------------------------------------------


def one_error_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("perspective-asgi: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        ([], "COMMAND"),
        (["frobnicate"], "invalid choice"),
        (["serve", "--port", "http"], "not a port number"),
        (["serve", "--port", "70000"], "out of range"),
        (["serve", "--log-level", "loud"], "--log-level"),
        (["serve", "--reed-only"], "unrecognized arguments: --reed-only"),
        (["serve", "--name", "x"], "--name applies to exactly one FILE, got 0"),
        (["serve", "--index", "id"], "--index applies to FILEs"),
    ],
)
def test_bad_options_print_one_line(
    argv: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert words in one_error_line(captured.err)


def test_option_errors_about_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = str(write(tmp_path, "csv"))
    parquet = str(tmp_path / "other.parquet")
    write_parquet(Path(parquet))
    database = tmp_path / "plant.duckdb"
    write_duckdb(database)
    cases = [
        (["serve", csv, parquet, "--name", "x"], "--name applies to exactly one FILE, got 2"),
        (["serve", csv, "--name", "orders"], "'orders' is also a demo table"),
        (["serve", str(database), csv], "must be the only file"),
        (["serve", str(database), "--name", "x"], "does not apply to a DuckDB database"),
        (["serve", csv, "--index", "nope"], "no column 'nope'"),
    ]
    for argv, words in cases:
        assert main(argv) == 2, argv
        assert words in one_error_line(capsys.readouterr().err), argv


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--host", "--port", "--index", "--name", "--no-demo", "--compression",
                   "--log-level", ".duckdb"):
        assert option in out


def test_console_script_entry_point() -> None:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["perspective-asgi"] == "perspective_asgi.cli:main"


# The command line, as its own process ---------------------------------------------------------


@contextlib.asynccontextmanager
async def serving(args: list[str], tmp_path: Path, **env: str) -> AsyncIterator[ServerProcess]:
    """Run ``args`` plus ``--port`` and a free port in ``tmp_path``, with ``env`` added to the
    environment; yield once it listens, and stop it cleanly (SIGTERM, no traceback) after."""
    port = free_port()
    async with server_process(
        [*args, "--port", str(port)], tmp_path, port=port, env=environment(**env), cwd=tmp_path
    ) as server:
        yield server
        await in_thread(server.stop_cleanly)


async def test_serve_a_file(tmp_path: Path) -> None:
    path = write(tmp_path, "parquet")
    args = command("serve", str(path), "--no-demo", "--index", "id")
    async with serving(args, tmp_path) as server:
        with anyio.fail_after(SCENARIO_TIMEOUT):
            async with connect(server.url) as conn:
                client = conn.client
                assert await client.get_hosted_table_names() == ["readings"]
                table = await client.open_table("readings")
                assert await resolve(table.get_index()) == "id"
                assert await table.schema() == SCHEMA
                assert await table.size() == 3
                view = await table.view()
                assert await view.to_columns() == ROWS
                await view.delete()


async def test_serve_files_beside_the_demo_with_a_name(tmp_path: Path) -> None:
    path = write(tmp_path, "ndjson")
    async with serving(command("serve", str(path), "--name", "sensors"), tmp_path) as server:
        with anyio.fail_after(SCENARIO_TIMEOUT):
            async with connect(server.url) as conn:
                client = conn.client
                assert sorted(await client.get_hosted_table_names()) == [
                    "orders", "prices", "sensors",
                ]
                table = await client.open_table("sensors")
                assert await table.size() == 3


async def test_serve_a_duckdb_database(tmp_path: Path) -> None:
    path = tmp_path / "plant.duckdb"
    write_duckdb(path)
    before = path.read_bytes()
    async with serving(command("serve", str(path)), tmp_path) as server:
        with anyio.fail_after(SCENARIO_TIMEOUT):
            async with connect(server.url) as conn:
                client = conn.client
                # No demo tables: a database replaces them.
                assert await client.get_hosted_table_names() == ["plant.readings"]
                table = await client.open_table("plant.readings")
                assert await table.size() == 3
                view = await table.view(columns=["id", "name", "value"], sort=[["id", "asc"]])
                assert await view.to_columns() == ROWS
                await view.delete()
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    "options", [[], ["--compression"], ["--no-compression"]],
    ids=["default", "compression", "no-compression"],
)
async def test_compression(options: list[str], tmp_path: Path) -> None:
    path = write(tmp_path, "csv")
    expected = options == ["--compression"] or (COMPRESSION_DEFAULT and not options)
    async with serving(command("serve", str(path), "--no-demo", *options), tmp_path) as server:
        with anyio.fail_after(SCENARIO_TIMEOUT):
            async with connect(server.url, compression="deflate") as conn:
                assert await conn.client.get_hosted_table_names() == ["readings"]
                assert conn.ws.response is not None
                extensions = conn.ws.response.headers.get("Sec-WebSocket-Extensions", "")
                assert ("permessage-deflate" in extensions) is expected


async def test_uvicorn_app_reads_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "json-columns")
    args = [sys.executable, "-m", "uvicorn", "perspective_asgi.app:app"]
    env = {"PERSPECTIVE_ASGI_DEMO": "0", "PERSPECTIVE_ASGI_FILES": str(path)}
    async with serving(args, tmp_path, **env) as server:
        with anyio.fail_after(SCENARIO_TIMEOUT):
            async with connect(server.url) as conn:
                client = conn.client
                assert await client.get_hosted_table_names() == ["readings"]
                table = await client.open_table("readings")
                assert await table.size() == 3


def test_uvicorn_app_with_a_bad_environment_says_so_in_one_line(tmp_path: Path) -> None:
    args = [sys.executable, "-m", "uvicorn", "perspective_asgi.app:app", "--port", "0"]
    env = environment(PERSPECTIVE_ASGI_FILES=str(tmp_path / "absent.csv"))
    result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=START_TIMEOUT)
    assert result.returncode != 0
    line = one_error_line(result.stderr)
    assert line.endswith(f"PERSPECTIVE_ASGI_FILES: {tmp_path / 'absent.csv'}: no such file")


SUBPROCESS_BROKEN = {
    "truncated-parquet": (BROKEN["truncated-parquet"], ()),
    "garbage-csv": (BROKEN["garbage-csv"], ()),
    "unknown-extension": (BROKEN["unknown-extension"], ()),
    "missing-file": (("absent.csv", lambda path: None, "no such file"), ()),
    "unknown-index": (("readings.csv", write_csv, "no column 'sensor'"), ("--index", "sensor")),
}


@pytest.mark.parametrize("case", sorted(SUBPROCESS_BROKEN))
def test_serve_broken_files_exits_2_with_one_line(case: str, tmp_path: Path) -> None:
    (filename, writer, words), options = SUBPROCESS_BROKEN[case]
    path = tmp_path / filename
    writer(path)
    args = command("serve", str(path), "--port", str(free_port()), *options)
    result = subprocess.run(args, cwd=tmp_path, env=environment(), capture_output=True,
                            text=True, timeout=START_TIMEOUT)
    assert result.returncode == 2, result.stderr
    line = one_error_line(result.stderr)
    assert line.startswith(f"perspective-asgi: error: {path}: "), line
    assert words in line


async def test_read_only_switch(tmp_path: Path) -> None:
    path = write(tmp_path, "csv")
    async with serving(command("serve", str(path), "--no-demo", "--read-only"), tmp_path) as server:
        with anyio.fail_after(SCENARIO_TIMEOUT):
            async with connect(server.url) as conn:
                client = conn.client
                table = await client.open_table("readings")
                with pytest.raises(perspective.PerspectiveError, match="read-only"):
                    await table.update([{"id": 99}])
                assert await table.size() == 3


async def test_table_allow_list_and_expressions_switches(tmp_path: Path) -> None:
    path = write(tmp_path, "csv")
    args = command("serve", str(path), "--tables", "readings", "--no-expressions",
                   "--max-connections", "5", "--max-requests-per-second", "1000")
    async with serving(args, tmp_path) as server:
        with anyio.fail_after(SCENARIO_TIMEOUT):
            async with connect(server.url) as conn:
                client = conn.client
                # The demo tables are served, but not to clients.
                assert await client.get_hosted_table_names() == ["readings"]
                with pytest.raises(perspective.PerspectiveError):
                    await client.open_table("orders")
                table = await client.open_table("readings")
                with pytest.raises(perspective.PerspectiveError, match="expressions"):
                    await table.view(expressions={"twice": '"id" * 2'})
                assert await table.size() == 3


@pytest.mark.parametrize(
    ("option", "value", "words"),
    [("--max-connections", "0", "must be at least 1"),
     ("--max-requests-per-second", "-1", "must be a positive number"),
     ("--max-requests-per-second", "fast", "not a number"),
     ("--tables", " , ", "no table names given")],
)
def test_limit_switches_are_checked(
    option: str, value: str, words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", option, value]) == 2
    assert words in capsys.readouterr().err


async def test_shutdown_closes_websockets_with_1001(tmp_path: Path) -> None:
    path = write(tmp_path, "csv")
    async with serving(command("serve", str(path), "--no-demo"), tmp_path) as server:
        with anyio.fail_after(SCENARIO_TIMEOUT):
            async with connect(server.url) as conn:
                table = await conn.client.open_table("readings")
                view = await table.view()
                await view.on_update(lambda *_: None)
                assert await table.size() == 3
                await in_thread(server.stop_cleanly)
                with anyio.fail_after(10):
                    await conn.ws.wait_closed()
            assert conn.ws.close_code == 1001
    assert "Traceback" not in server.stderr
