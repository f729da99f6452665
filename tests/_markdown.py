"""Fenced code blocks of the Markdown pages, with the marker comment before each (the kinds are
described in tests/test_docs.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ._helpers import ROOT

FENCE = re.compile(
    r"^(?:<!-- (?P<marker>[a-z-]+)(?::\s*(?P<argument>.*?))? -->\n)?"
    r"(?P<indent>[ ]*)```(?P<language>\w*)[^\n]*\n(?P<body>.*?)^(?P=indent)```$",
    re.DOTALL | re.MULTILINE,
)
INCLUDE = re.compile(r'^\s*--8<-- "(?P<path>[^"]+)"\s*$', re.MULTILINE)


@dataclass(frozen=True)
class Block:
    """One fenced code block of a Markdown file."""

    page: Path
    line: int
    language: str
    marker: str | None
    argument: str | None
    body: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def included(self) -> str | None:
        found = INCLUDE.fullmatch(self.body.strip())
        return found.group("path") if found else None


def blocks(page: Path) -> list[Block]:
    """Every fenced block of ``page``, dedented when the fence is (as inside an admonition)."""
    text = page.read_text("utf-8")
    found = []
    for match in FENCE.finditer(text):
        indent = len(match.group("indent"))
        body = "".join(line[indent:] for line in match.group("body").splitlines(True))
        line = text.count("\n", 0, match.start()) + 1
        found.append(Block(page, line, match.group("language"), match.group("marker"),
                           match.group("argument"), body))
    return found


def blocks_marked(page: Path, marker: str, argument: str) -> list[Block]:
    """The blocks of ``page`` marked ``<!-- marker: argument -->``."""
    return [block for block in blocks(page)
            if (block.marker, block.argument) == (marker, argument)]
