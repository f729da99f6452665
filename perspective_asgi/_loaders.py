"""Data files read for serving: tables as Arrow IPC stream bytes, DuckDB databases as a server.

Every table format is read with pyarrow and handed to Perspective as Arrow IPC stream bytes, the
one input every supported perspective-python accepts. A failure raises ``LoadError`` with a
one-line message naming the file.
"""

from __future__ import annotations

import json
import os
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
    "TABLE_SUFFIXES",
    "LoadError",
    "LoadedTable",
    "Sources",
    "load_sources",
    "load_table",
    "open_duckdb",
    "read_table",
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
    #: A DuckDB database's server; when set, ``tables`` is empty.
    virtual_server: SessionFactory | None = None


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


def load_sources(
    paths: Sequence[StrPath], *, name: str | None = None, index: str | None = None
) -> Sources:
    """Load ``paths`` for serving; a DuckDB database must come alone.

    ``name`` renames the table of a single file; ``index`` applies to every table file.
    """
    databases = [path for path in paths if _suffix(Path(path)) in DATABASE_SUFFIXES]
    if databases:
        if len(paths) > 1:
            raise LoadError(f"{databases[0]}: a DuckDB database must be the only file served")
        if name is not None or index is not None:
            raise LoadError(
                f"{databases[0]}: a table name or index does not apply to a DuckDB database"
            )
        return Sources(tables={}, virtual_server=open_duckdb(databases[0]))
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
