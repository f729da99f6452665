"""MkDocs hook: the reference pages' tables, generated from the code at build time.

A page asks for one with a marker line, ``<!-- generated: NAME -->``, replaced here by
Markdown made from the code itself, so the reference cannot drift from what the package does:

- ``settings``: every ``Settings`` field with its type, default and the ``#:`` comment that
  gives its reason, in the order of the dataclass;
- ``cli``: the help of ``perspective-asgi`` and each of its commands, from the parser;
- ``close-codes``: ``CloseCode``, with the ``#:`` comment of each member;
- ``metrics``: each metric ``PrometheusObserver`` registers, its type, labels and help.

An unknown marker is an error, which fails the build.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MARKER = re.compile(r"^<!-- generated: ([a-z-]+) -->$", re.MULTILINE)


def on_page_markdown(markdown: str, **_: Any) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in GENERATORS:
            raise ValueError(f"no generator for <!-- generated: {name} -->")
        return GENERATORS[name]()

    return MARKER.sub(replace, markdown)


# Comments ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Documented:
    """A name assigned in a class body: its annotation and value as written, and the ``#:``
    comment above it."""

    annotation: str
    written: str
    comment: str


def documented_names(cls: type) -> dict[str, Documented]:
    """Each name assigned in the body of ``cls`` (``name = ...`` or ``name: T = ...``)."""
    source = inspect.getsource(cls)
    lines = source.splitlines()
    body = ast.parse(source).body[0]
    assert isinstance(body, ast.ClassDef)
    found = {}
    for statement in body.body:
        targets: list[ast.expr]
        if isinstance(statement, ast.AnnAssign):
            targets, annotation = [statement.target], statement.annotation
        elif isinstance(statement, ast.Assign):
            targets, annotation = statement.targets, None
        else:
            continue
        [target] = targets
        if not isinstance(target, ast.Name) or statement.value is None:
            continue
        comment: list[str] = []
        row = statement.lineno - 2
        while row >= 0 and lines[row].strip().startswith("#:"):
            comment.insert(0, lines[row].strip()[2:].strip())
            row -= 1
        found[target.id] = Documented(
            annotation="" if annotation is None else ast.get_source_segment(source, annotation)
            or "",
            written=ast.get_source_segment(source, statement.value) or "",
            comment=markdown_text(" ".join(comment)),
        )
    return found


def markdown_text(text: str) -> str:
    # The docstrings and comments write code in reStructuredText's double backticks, which
    # Markdown reads as code too; only table cells need their pipes escaped.
    return text.replace("|", "\\|")


# Settings ---------------------------------------------------------------------------------


def settings() -> str:
    from perspective_asgi import Settings
    from perspective_asgi._core.wire import REQUEST_KIND_NAMES

    documented = documented_names(Settings)
    sections = []
    for field in dataclasses.fields(Settings):
        entry = documented[field.name]
        if not entry.comment:
            raise ValueError(f"Settings.{field.name} has no #: comment")
        written = entry.written
        value: Any = (
            field.default_factory()
            if field.default_factory is not dataclasses.MISSING
            else field.default
        )
        if field.name == "inline_request_kinds":
            default = ", ".join(f"`{REQUEST_KIND_NAMES[kind]}`" for kind in sorted(value))
        elif written.startswith("field("):
            default = f"`{value!r}`" if value else "empty"
        elif written == repr(value):
            default = f"`{written}`"
        else:
            default = f"`{written}` ({value:,})" if isinstance(value, int) else f"`{written}`"
        sections.append(
            f"### `{field.name}`\n\n"
            f"- Type: `{entry.annotation}`\n- Default: {default}\n\n{entry.comment}\n"
        )
    return "\n".join(sections)


# The command line ---------------------------------------------------------------------------


def cli() -> str:
    from perspective_asgi import cli as module

    parser = module._parser()
    commands = next(action for action in parser._actions
                    if isinstance(action, argparse._SubParsersAction))
    sections = []
    for name, command in [(parser.prog, parser), *commands.choices.items()]:
        # argparse wraps help to the terminal's width: a fixed one makes the page the same
        # wherever it is built.
        command.formatter_class = functools.partial(argparse.HelpFormatter, width=96)
        title = name if command is parser else f"{parser.prog} {name}"
        sections.append(f"## `{title}`\n\n```text\n{command.format_help()}```\n")
    return "\n".join(sections)


# Close codes ------------------------------------------------------------------------------


def close_codes() -> str:
    from perspective_asgi import CloseCode

    documented = documented_names(CloseCode)
    rows = ["| Code | Name | When |", "| --- | --- | --- |"]
    for code in CloseCode:
        comment = documented[code.name].comment
        if not comment:
            raise ValueError(f"CloseCode.{code.name} has no #: comment")
        rows.append(f"| {code.value} | `{code.name}` | {comment} |")
    return "\n".join(rows) + "\n"


# Metrics ----------------------------------------------------------------------------------


def metrics() -> str:
    from prometheus_client.metrics import MetricWrapperBase

    from perspective_asgi.metrics import PrometheusObserver

    observer = PrometheusObserver()
    rows = ["| Metric | Type | Labels | Meaning |", "| --- | --- | --- | --- |"]
    for metric in vars(observer).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        # prometheus_client names counters without their "_total" suffix and keeps the label
        # names on the metric; what a scrape shows is the name below.
        kind = metric._type
        name = metric._name + ("_total" if kind == "counter" else "")
        labels = ", ".join(f"`{label}`" for label in metric._labelnames) or "none"
        help_text = markdown_text(metric._documentation)
        rows.append(f"| `{name}` | {kind} | {labels} | {help_text} |")
    return "\n".join(rows) + "\n"


GENERATORS: dict[str, Callable[[], str]] = {
    "settings": settings,
    "cli": cli,
    "close-codes": close_codes,
    "metrics": metrics,
}
