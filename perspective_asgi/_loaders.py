"""Data files read for serving: tables as Arrow IPC stream bytes, databases as a server.

Every table format is read with pyarrow and handed to Perspective as Arrow IPC stream bytes, the
one input every supported perspective-python accepts. A DuckDB file and a PostgreSQL URL are
served through Perspective's virtual servers. A failure raises ``LoadError`` with a one-line
message naming the file (or the URL, without its password).
"""

from __future__ import annotations

import json
import os
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import pyarrow as pa
import pyarrow.csv
import pyarrow.ipc
import pyarrow.json
import pyarrow.parquet

from ._exceptions import LoadError
from ._types import SessionFactory

__all__ = [
    "DATABASE_SUFFIXES",
    "DATABASE_URL_SCHEMES",
    "POSTGRES_SESSION_THREADS",
    "TABLE_SUFFIXES",
    "LoadError",
    "LoadedTable",
    "PostgresServer",
    "Sources",
    "is_database_url",
    "load_sources",
    "load_table",
    "open_duckdb",
    "open_postgres",
    "postgres_server",
    "read_table",
    "redacted_url",
]

StrPath: TypeAlias = "str | os.PathLike[str]"

#: How many column names an unknown ``index`` error lists before eliding the rest.
LISTED_COLUMNS = 20


@dataclass(frozen=True)
class LoadedTable:
    """One file read for ``client.table(data, name=name, index=index)``."""

    name: str
    #: The file's rows as Arrow IPC stream bytes.
    data: bytes
    index: str | None
    num_rows: int


@dataclass(frozen=True)
class Sources:
    """What a list of files serves: tables for a ``perspective.Server``, or a virtual server."""

    #: Table name to (Arrow IPC stream bytes, index column), as ``create_app(tables=...)`` takes.
    tables: Mapping[str, tuple[bytes, str | None]]
    #: A database's server (DuckDB, PostgreSQL); when set, ``tables`` is empty.
    virtual_server: SessionFactory | None = None
    #: Worker threads the server's sessions may use at once (``Settings.virtual_server_threads``):
    #: 1 for DuckDB, whose one connection is not thread-safe; more for PostgreSQL, where each
    #: session has a connection of its own.
    virtual_server_threads: int = 1


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _read_csv(path: Path) -> pa.Table:
    return pyarrow.csv.read_csv(path)


def _read_parquet(path: Path) -> pa.Table:
    return pyarrow.parquet.read_table(path)


def _read_ipc(path: Path) -> pa.Table:
    # .arrow/.feather/.ipc name both IPC formats in the wild: the file format (Feather v2) has a
    # footer and magic bytes, the stream format has neither, so try the stricter one first.
    with pa.OSFile(str(path)) as source:
        try:
            return pyarrow.ipc.open_file(source).read_all()
        except pa.ArrowInvalid as file_error:
            source.seek(0)
            try:
                return pyarrow.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid as stream_error:
                raise pa.ArrowInvalid(
                    f"neither an IPC file ({_first_line(file_error)}) nor an IPC stream "
                    f"({_first_line(stream_error)})"
                ) from None


def _read_ndjson(path: Path) -> pa.Table:
    return pyarrow.json.read_json(path)


def _column(name: str, values: Any) -> pa.Array:
    if not isinstance(values, list):
        raise ValueError(f"column {name!r} is a {type(values).__name__}, not an array")
    try:
        return pa.array(values)
    except (pa.ArrowException, ValueError, TypeError) as exc:
        raise ValueError(f"column {name!r}: {_first_line(exc)}") from None


def _read_json(path: Path) -> pa.Table:
    try:
        document = json.loads(path.read_bytes())
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":
            # One object after another: newline-delimited JSON under a .json name.
            return _read_ndjson(path)
        raise
    if isinstance(document, dict):
        return pa.table({name: _column(name, values) for name, values in document.items()})
    if isinstance(document, list) and all(isinstance(record, dict) for record in document):
        # Columns in order of first appearance; a record missing a key gets a null there.
        names = list(dict.fromkeys(key for record in document for key in record))
        return pa.table(
            {name: _column(name, [record.get(name) for record in document]) for name in names}
        )
    raise ValueError("expected an array of records or an object of columns")


#: File suffix (lowercase) to (format name, reader).
TABLE_SUFFIXES: Mapping[str, tuple[str, Callable[[Path], pa.Table]]] = {
    ".csv": ("CSV", _read_csv),
    ".parquet": ("Parquet", _read_parquet),
    ".arrow": ("Arrow IPC", _read_ipc),
    ".feather": ("Feather", _read_ipc),
    ".ipc": ("Arrow IPC", _read_ipc),
    ".json": ("JSON", _read_json),
    ".ndjson": ("NDJSON", _read_ndjson),
    ".jsonl": ("NDJSON", _read_ndjson),
}

#: Suffixes served through a virtual server rather than loaded into a table.
DATABASE_SUFFIXES = frozenset({".duckdb"})
#: URL schemes (lowercase) of databases served through Perspective's PostgreSQL virtual server.
DATABASE_URL_SCHEMES = ("postgresql://", "postgres://")
#: Worker threads for a PostgreSQL database's sessions, as many as ``Settings`` gives other
#: requests: each session queries on its own connection, so one slow query need not hold up
#: every other client of the process.
POSTGRES_SESSION_THREADS = 8
#: Seconds allowed for the connection that checks a database URL when serving starts, unless
#: the URL sets ``connect_timeout`` itself.
CONNECT_TIMEOUT = 10


def _suffix(path: Path) -> str:
    return path.suffix.lower()


def _existing_file(path: StrPath) -> Path:
    file = Path(path)
    if not file.exists():
        raise LoadError(f"{path}: no such file")
    if not file.is_file():
        raise LoadError(f"{path}: not a file")
    return file


def _unknown_suffix(path: StrPath) -> LoadError:
    known = ", ".join(sorted({*TABLE_SUFFIXES, *DATABASE_SUFFIXES}))
    suffix = _suffix(Path(path)) or "no extension"
    return LoadError(f"{path}: unknown file type ({suffix}); expected one of {known}")


def _viewable(table: pa.Table) -> pa.Table:
    # Perspective cannot load Arrow's view layouts, which polars writes to IPC files; the
    # classic layouts hold the same values.
    replacements = {"string_view": pa.large_string(), "binary_view": pa.binary()}
    for position, field in enumerate(table.schema):
        target = replacements.get(str(field.type))
        if target is not None:
            column = table.column(position).cast(target)
            table = table.set_column(position, field.with_type(target), column)
    return table


def _ipc_stream(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pyarrow.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def read_table(path: StrPath) -> pa.Table:
    """Read a CSV, Parquet, Arrow IPC, Feather, JSON or NDJSON file into an Arrow table."""
    file = _existing_file(path)
    if _suffix(file) not in TABLE_SUFFIXES:
        raise _unknown_suffix(path)
    format_name, reader = TABLE_SUFFIXES[_suffix(file)]
    try:
        table = reader(file)
    except (pa.ArrowException, ValueError, UnicodeDecodeError) as exc:
        raise LoadError(f"{path}: not a readable {format_name} file: {_first_line(exc)}") from None
    except OSError as exc:
        raise LoadError(f"{path}: {exc.strerror or _first_line(exc)}") from None
    if table.num_columns == 0:
        raise LoadError(f"{path}: no columns")
    return _viewable(table)


def load_table(path: StrPath, *, name: str | None = None, index: str | None = None) -> LoadedTable:
    """Read a table file as Arrow IPC stream bytes, named after the file's stem by default."""
    table = read_table(path)
    if index is not None and index not in table.column_names:
        columns = ", ".join(table.column_names[:LISTED_COLUMNS])
        if table.num_columns > LISTED_COLUMNS:
            columns += ", ..."
        raise LoadError(f"{path}: no column {index!r} to index by; its columns are {columns}")
    name = Path(path).stem if name is None else name
    if not name:
        raise LoadError(f"{path}: the table name must not be empty")
    return LoadedTable(name=name, data=_ipc_stream(table), index=index, num_rows=table.num_rows)


def open_duckdb(path: StrPath) -> SessionFactory:
    """Return a virtual server for a DuckDB database's tables, opened read-only.

    Its tables are named ``<file stem>.<table>``, as the virtual server qualifies them.
    """
    file = _existing_file(path)
    try:
        import duckdb
        from perspective.virtual_servers.duckdb import DuckDBVirtualServer
    except ImportError:
        raise LoadError(
            f"{path}: serving a DuckDB database needs the duckdb package (pip install duckdb)"
        ) from None
    # The virtual server materialises every view as a table in the connection's default catalog,
    # which a read-only connection refuses; so the file is attached read-only, named after its
    # stem, beside a writable in-memory default catalog (DuckDB's "memory").
    catalog = file.stem
    if catalog.lower() == "memory":
        raise LoadError(f"{path}: DuckDB reserves the name 'memory'; rename the file")
    connection = duckdb.connect(":memory:")
    location = str(file).replace("'", "''")
    alias = catalog.replace('"', '""')
    try:
        connection.execute(f"ATTACH '{location}' AS \"{alias}\" (READ_ONLY)")
    except duckdb.Error as exc:
        connection.close()
        raise LoadError(f"{path}: cannot open as a DuckDB database: {_first_line(exc)}") from None
    server: SessionFactory = DuckDBVirtualServer(connection)
    return server


def is_database_url(source: StrPath) -> bool:
    """Whether ``source`` is a PostgreSQL URL (``postgresql://`` or ``postgres://``)."""
    return isinstance(source, str) and source.lower().startswith(DATABASE_URL_SCHEMES)


def redacted_url(url: str) -> str:
    """``url`` with its password, in the user part or the query, replaced by ``***``."""
    try:
        parts = urllib.parse.urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            user, _, host = netloc.rpartition("@")
            netloc = f"{user.partition(':')[0]}:***@{host}"
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        if any(key == "password" for key, _ in query):
            hidden = [(key, "***" if key == "password" else value) for key, value in query]
            parts = parts._replace(query=urllib.parse.urlencode(hidden, safe="*"))
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    except ValueError:  # not parseable as a URL: show only its scheme
        return url.partition("://")[0] + "://***"


def _postgres_module(label: str) -> Any:
    try:
        from perspective.virtual_servers import postgres
    except ImportError as exc:
        if exc.name == "psycopg" or "psycopg" in str(exc):
            raise LoadError(
                f"{label}: serving a PostgreSQL database needs psycopg "
                f"(pip install 'perspective-asgi[postgres]'): {_first_line(exc)}"
            ) from None
        import perspective

        version = getattr(perspective, "__version__", "?")
        raise LoadError(
            f"{label}: perspective-python {version} ships no PostgreSQL virtual server "
            "(perspective.virtual_servers.postgres, in 5.6.1)"
        ) from None
    _repair_run_query(postgres)
    return postgres


class _Probed(Exception):
    pass


class _ProbeConnection:
    def __getattr__(self, name: str) -> Any:
        raise _Probed(name)


def _repair_run_query(module: Any) -> None:
    """Replace ``module.run_query`` if it fails before it queries, as 5.6.1's does.

    That one starts with ``datetime.now(datetime.UTC)``, where ``datetime`` is the class, which
    has no ``UTC``: every query of the PostgreSQL virtual server raises ``AttributeError``. A
    connection that raises on any use tells a working version (it reaches the connection)
    from that one; the replacement runs the same query the same way.
    """
    try:
        module.run_query(_ProbeConnection(), "SELECT 1")
    except _Probed:
        return
    except AttributeError as exc:
        if "UTC" not in str(exc):
            raise
    else:
        return
    log = module.logger
    errors = module.psycopg.Error

    def run_query(db: Any, query: str, execute: bool = False, cursor: bool = False) -> Any:
        query = " ".join(query.split())
        start = time.perf_counter()
        try:
            result = db.execute(query)
        except errors as exc:
            log.error(exc)
            log.error(query)
            raise
        log.debug("%.6f s %s", time.perf_counter() - start, query)
        if cursor:
            return result
        return None if execute else result.fetchall()

    module.run_query = run_query


class _PostgresSession:
    """One client's session of Perspective's PostgreSQL virtual server, made on the first
    request: Perspective's connects to the database when it is made, and requests run in a
    worker thread while ``new_session`` runs on the event loop."""

    def __init__(self, server: PostgresServer, callback: Callable[[bytes], Any]) -> None:
        self._server = server
        self._callback = callback
        self._session: Any = None

    def handle_request(self, request: bytes) -> None:
        if self._session is None:
            self._session = self._server.open_session(self._callback)
        self._session.handle_request(request)

    def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            session.close()  # closes the connection: PostgreSQL drops its temporary views


class PostgresServer:
    """A session factory for Perspective's PostgreSQL virtual server: one database connection
    per client session, named ``perspective-asgi/<pid>`` in ``pg_stat_activity``."""

    def __init__(self, conninfo: str, module: Any) -> None:
        self.conninfo = conninfo
        self._module = module

    def new_session(self, callback: Callable[[bytes], Any]) -> _PostgresSession:
        return _PostgresSession(self, callback)

    def open_session(self, callback: Callable[[bytes], Any]) -> Any:
        """Connect a session of Perspective's own; blocks until the database answers."""
        conninfo = self.conninfo
        conninfo_module = self._module.psycopg.conninfo
        if "application_name" not in conninfo_module.conninfo_to_dict(conninfo):
            # Which worker process holds a connection, for whoever reads pg_stat_activity.
            conninfo = conninfo_module.make_conninfo(
                conninfo, application_name=f"perspective-asgi/{os.getpid()}"
            )
        return self._module.PostgresVirtualSession(callback, conninfo)


def open_postgres(url: str) -> PostgresServer:
    """Return a virtual server for the tables of the PostgreSQL database at ``url``.

    Its tables are named ``<schema>.<table>``. The database is connected to once, to report a
    bad URL now rather than to every client; each client session then has its own connection.
    """
    label = redacted_url(url)
    module = _postgres_module(label)
    psycopg = module.psycopg
    try:
        options = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error as exc:
        raise LoadError(f"{label}: not a PostgreSQL URL: {_first_line(exc)}") from None
    timeout = {} if "connect_timeout" in options else {"connect_timeout": CONNECT_TIMEOUT}
    try:
        with psycopg.connect(url, autocommit=True, **timeout) as connection:
            connection.execute("SELECT 1")
    except psycopg.Error as exc:
        raise LoadError(f"{label}: cannot connect: {_first_line(exc)}") from None
    return PostgresServer(url, module)


def postgres_server(url: str) -> SessionFactory:
    """Return a session factory for the PostgreSQL database at ``url``, read through
    Perspective's virtual server (perspective-python 5.6.1 or later, with psycopg).

    Each client session gets a connection of its own, named ``perspective-asgi/<pid>`` in
    ``pg_stat_activity`` unless ``url`` names one; its views are temporary views, which the
    database drops with the connection. Tables are named ``<schema>.<table>``. Connects once
    now, so a bad URL raises ``LoadError`` (a ``PerspectiveASGIError``) here rather than in
    every session, as does a perspective-python without the virtual server.
    """
    return open_postgres(url)


def _open_database(source: StrPath) -> Sources:
    if is_database_url(source):
        return Sources(
            tables={}, virtual_server=open_postgres(str(source)),
            virtual_server_threads=POSTGRES_SESSION_THREADS,
        )
    return Sources(tables={}, virtual_server=open_duckdb(source))


def _database_label(source: StrPath) -> tuple[str, str]:
    """How errors name a database source, and its kind."""
    if is_database_url(source):
        return redacted_url(str(source)), "PostgreSQL"
    return str(source), "DuckDB"


def load_sources(
    paths: Sequence[StrPath], *, name: str | None = None, index: str | None = None
) -> Sources:
    """Load ``paths`` for serving; a database (a DuckDB file, a PostgreSQL URL) must come alone.

    ``name`` renames the table of a single file; ``index`` applies to every table file.
    """
    databases = [
        path for path in paths
        if is_database_url(path) or _suffix(Path(path)) in DATABASE_SUFFIXES
    ]
    if databases:
        label, kind = _database_label(databases[0])
        if len(paths) > 1:
            what = "file" if kind == "DuckDB" else "source"
            raise LoadError(f"{label}: a {kind} database must be the only {what} served")
        if name is not None or index is not None:
            raise LoadError(f"{label}: a table name or index does not apply to a {kind} database")
        return _open_database(databases[0])
    if name is not None and len(paths) != 1:
        raise LoadError(f"a table name applies to exactly one file, not {len(paths)}")
    for path in paths:
        # Refuse every unknown suffix up front, before spending time loading the others.
        if _suffix(Path(path)) not in TABLE_SUFFIXES:
            _existing_file(path)
            raise _unknown_suffix(path)
    tables: dict[str, tuple[bytes, str | None]] = {}
    origins: dict[str, StrPath] = {}
    for path in paths:
        loaded = load_table(path, name=name, index=index)
        if loaded.name in tables:
            raise LoadError(
                f"{path}: table {loaded.name!r} is already loaded from {origins[loaded.name]}"
            )
        tables[loaded.name] = (loaded.data, loaded.index)
        origins[loaded.name] = path
    return Sources(tables=tables)
