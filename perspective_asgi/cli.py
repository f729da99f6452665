"""``perspective-asgi serve``: the dashboard of ``perspective_asgi.app``, with files, on uvicorn.

Each table file (CSV, Parquet, Arrow IPC/Feather, JSON, NDJSON) becomes a table named after the
file's stem, hosted beside the demo tables unless ``--no-demo``. ``--index`` applies to every
file, ``--name`` to a single one. A DuckDB database (``.duckdb``) or a PostgreSQL URL
(``postgresql://user@host:port/db``) is served read-only through Perspective's virtual server
for it; it must be the only source, and replaces the demo tables. ``--workers N`` runs N
processes, each building the same app from the same arguments (``worker_app``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from ._auth import parse_header
from ._config import Settings
from ._core.policy import Policy

__all__ = ["COMPRESSION_DEFAULT", "main"]

PROG = "perspective-asgi"
#: Whether websockets negotiate permessage-deflate unless --compression is given. Off: uvicorn
#: compresses on the event loop, which stalled every client ~220 ms per 100k-row load and cost
#: 3-5x the CPU in benchmarks/compression.py; it pays off only below ~70-100 Mbit/s links.
COMPRESSION_DEFAULT = False
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
#: Exit status for bad arguments or files, as argparse uses.
USAGE_ERROR = 2


class UsageError(Exception):
    """Bad arguments or files: reported as one line, with exit status 2."""


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, like every other error of this command, instead of argparse's usage block.
        raise UsageError(f"{message} (see {self.prog} --help)")


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {number}")
    return number


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not number > 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number: {value}")
    return number


def _names(value: str) -> frozenset[str]:
    names = frozenset(name.strip() for name in value.split(",") if name.strip())
    if not names:
        raise argparse.ArgumentTypeError("no table names given")
    return names


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {value!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range 0-65535: {port}")
    return port


def _parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog=PROG, description="Serve Perspective tables over websockets.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="serve files (and the demo tables) on a dashboard",
        description=(
            "Serve the dashboard at http://HOST:PORT/ and Perspective at /websocket. Each FILE "
            "(.csv, .parquet, .arrow, .feather, .ipc, .json, .ndjson, .jsonl) becomes a table "
            "named after its stem. A .duckdb database, or a PostgreSQL database given by its URL "
            "(postgresql://user@host:port/db), is served read-only through Perspective's "
            "virtual server for it; it must be the only FILE and replaces the demo tables."
        ),
    )
    serve.add_argument("files", nargs="*", metavar="FILE",
                       help="data files to serve, or one database URL")
    serve.add_argument("--index", metavar="COL", help="index every table by column COL")
    serve.add_argument("--name", help="table name for the single FILE (default: its stem)")
    serve.add_argument("--no-demo", action="store_true", help="leave out the demo tables")
    serve.add_argument(
        "--read-only",
        action="store_true",
        help="refuse every request that creates, changes or deletes a table",
    )
    serve.add_argument(
        "--tables",
        metavar="NAME,...",
        type=_names,
        help="serve only these tables to clients: the others are neither listed nor usable",
    )
    serve.add_argument(
        "--no-expressions",
        action="store_true",
        help="refuse views with expression columns",
    )
    serve.add_argument(
        "--max-connections",
        metavar="N",
        type=_positive_int,
        default=Settings.max_connections,
        help="open websocket connections allowed at once (default: %(default)s)",
    )
    serve.add_argument(
        "--max-requests-per-second",
        metavar="R",
        type=_positive_float,
        help="requests each connection may send per second on average (default: no limit)",
    )
    serve.add_argument(
        "--compression",
        action=argparse.BooleanOptionalAction,
        default=COMPRESSION_DEFAULT,
        help="accept permessage-deflate on websockets: less bandwidth, more server CPU "
        "(default: off)",
    )
    serve.add_argument("--workers", type=_positive_int, default=1,
                       help="worker processes, each loading the same FILEs or connecting to the "
                       "same database (default: %(default)s)")
    edge = commands.add_parser(
        "edge",
        help="replicate an upstream Perspective server's tables and serve them",
        description=(
            "Replicate the tables of the Perspective server at UPSTREAM (a ws:// URL) and serve "
            "them with the dashboard. Each worker is an independent replica that follows the "
            "upstream's updates and resynchronises after losing it; /readyz answers 503 "
            "meanwhile."
        ),
    )
    edge.add_argument("upstream", metavar="UPSTREAM", help="e.g. ws://10.0.0.5:8000/websocket")
    edge.add_argument(
        "--tables",
        metavar="NAME,...",
        type=_names,
        help="tables to replicate (default: all, following the upstream's list)",
    )
    edge.add_argument("--workers", type=_positive_int, default=1,
                      help="worker processes, each its own replica (default: %(default)s)")
    edge.add_argument("--read-only", action="store_true",
                      help="refuse changes from the edge's clients (by default their writes to "
                      "replicated tables are carried to the upstream)")
    edge.add_argument("-H", "--header", action="append", type=parse_header, default=[],
                      metavar="NAME:VALUE",
                      help="a handshake header for the upstream, e.g. 'Authorization: Bearer "
                      "...'; repeatable")
    edge.add_argument("--header-file", metavar="PATH",
                      help="a file of 'Name: value' header lines for the upstream, read again "
                      "before every connection (a rotated credential is used at the next one; "
                      "unlike --header, not shown by ps)")
    for command in (serve, edge):
        _add_server_arguments(command)
    return parser


def _add_server_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--host", default="127.0.0.1",
                         help="address to bind (default: %(default)s)")
    command.add_argument("--port", type=_port, default=8000, help="port (default: %(default)s)")
    command.add_argument(
        "--log-level", choices=LOG_LEVELS, default="info", help="log level (default: info)"
    )


def _edge(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from . import edge
        from .app import READ_ONLY_ENV
    except ImportError as exc:
        raise UsageError(
            f"edge needs {exc.name}; pip install 'perspective-asgi[starlette,uvicorn,client]'"
        ) from None
    if not args.upstream.startswith(("ws://", "wss://")):
        raise UsageError(f"UPSTREAM must be a ws:// or wss:// URL, got {args.upstream!r}")
    # Every worker process builds its app from the environment (see perspective_asgi.edge).
    os.environ[edge.UPSTREAM_ENV] = args.upstream
    os.environ[edge.EDGE_TABLES_ENV] = ",".join(sorted(args.tables or ()))
    os.environ[READ_ONLY_ENV] = "1" if args.read_only else "0"
    os.environ[edge.HEADERS_ENV] = json.dumps(dict(args.header))
    os.environ[edge.HEADER_FILE_ENV] = args.header_file or ""
    try:
        edge.edge_options_from_env()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.workers > 1:
        # uvicorn's supervisor runs its own server class in each worker: at shutdown the
        # websockets get uvicorn's 1012 (service restart), which clients reconnect after.
        uvicorn.run("perspective_asgi.edge:app", workers=args.workers,
                    **_uvicorn_options(args, compression=False))
        return 0
    return _run("perspective_asgi.edge:app", args, compression=False)


def _build_app(args: argparse.Namespace) -> Any:
    try:
        from . import app as dashboard
    except ImportError as exc:
        raise UsageError(
            f"serve needs starlette ({exc}); pip install 'perspective-asgi[starlette,uvicorn]'"
        ) from None
    from ._loaders import load_sources

    if args.name is not None and len(args.files) != 1:
        raise UsageError(f"--name applies to exactly one FILE, got {len(args.files)}")
    if args.index is not None and not args.files:
        raise UsageError("--index applies to FILEs, and none was given")
    # LoadError is a ValueError, and create_app raises ValueError for a table the engine refuses.
    try:
        sources = load_sources(args.files, name=args.name, index=args.index)
        demo = not args.no_demo and sources.virtual_server is None
        if demo and set(sources.tables) & set(dashboard.DEMO_TABLES):
            taken = sorted(set(sources.tables) & set(dashboard.DEMO_TABLES))[0]
            raise UsageError(f"table {taken!r} is also a demo table: use --name or --no-demo")
        return dashboard.create_app(
            demo=demo,
            tables=sources.tables,
            virtual_server=sources.virtual_server,
            settings=Settings(
                read_only=args.read_only,
                policy=Policy(tables=args.tables, allow_expressions=not args.no_expressions),
                max_connections=args.max_connections,
                max_requests_per_second=args.max_requests_per_second,
                virtual_server_threads=sources.virtual_server_threads,
            ),
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _server_class() -> type[Any]:
    import uvicorn

    from ._core.registry import close_all_connections

    class Server(uvicorn.Server):
        """uvicorn, but websockets are closed with 1001 (going away) before it shuts down."""

        async def shutdown(self, sockets: Any = None) -> None:
            # uvicorn's own shutdown sends 1012 (service restart) to every websocket.
            await close_all_connections()
            await super().shutdown(sockets)

    return Server


def _uvicorn_options(args: argparse.Namespace, compression: bool) -> dict[str, Any]:
    return {"host": args.host, "port": args.port, "log_level": args.log_level,
            "ws_per_message_deflate": compression}


def _run(app: Any, args: argparse.Namespace, compression: bool) -> int:
    """Serve ``app`` (or its import string) with uvicorn in this process until stopped."""
    import uvicorn

    server = _server_class()(uvicorn.Config(app, **_uvicorn_options(args, compression)))
    server.run()
    # uvicorn exits the process itself when it cannot bind; a clean shutdown lands here.
    return 0 if server.started else 1


#: The ``serve`` command line, as JSON, from which each ``--workers`` process builds its app.
SERVE_ARGS_ENV = "PERSPECTIVE_ASGI_SERVE_ARGS"


def worker_app() -> Any:
    """Build the app of one ``serve --workers N`` process from the command's arguments."""
    try:
        argv = json.loads(os.environ[SERVE_ARGS_ENV])
        return _build_app(_parser().parse_args(argv))
    except (KeyError, ValueError, UsageError) as exc:
        if isinstance(exc, KeyError):
            exc = UsageError(f"{SERVE_ARGS_ENV} is not set: run perspective-asgi serve --workers")
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        from uvicorn.config import STARTUP_FAILURE

        # uvicorn's supervisor stops, rather than restarting a worker that cannot start.
        sys.exit(STARTUP_FAILURE)


def _serve(args: argparse.Namespace, argv: Sequence[str]) -> int:
    try:
        import uvicorn
    except ImportError:
        raise UsageError(
            "serve needs uvicorn; pip install 'perspective-asgi[starlette,uvicorn]'"
        ) from None
    # Built here even for workers: a bad file, option or database URL is one error line now,
    # not one per worker. Workers are fresh processes (uvicorn spawns them), each of which
    # builds its own app from the same arguments, with its own database connections.
    app = _build_app(args)
    if args.workers == 1:
        return _run(app, args, compression=args.compression)
    del app
    os.environ[SERVE_ARGS_ENV] = json.dumps(list(argv))
    # As with edge: uvicorn's supervisor runs its own server class in each worker.
    uvicorn.run(f"{__name__}:worker_app", factory=True, workers=args.workers,
                **_uvicorn_options(args, compression=args.compression))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``perspective-asgi`` with ``argv`` (``sys.argv[1:]`` if omitted); return its status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        try:
            args = _parser().parse_args(argv)
        except SystemExit as exc:  # --help
            return exc.code if isinstance(exc.code, int) else 0
        return _edge(args) if args.command == "edge" else _serve(args, argv)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        # Ctrl-C while files load, before uvicorn handles signals itself.
        return 130
