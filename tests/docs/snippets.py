"""The code blocks of the user documentation, and which of them a reader can run as is.

The convention, for README.md, clients/*/README.md and docs/*.md: a fenced block whose
info string is a language we run (``python``, ``bash``, ``sh``, ``js``) is **runnable as
pasted** against a server on ``127.0.0.1:8000`` started with ``optserve serve`` (no API
keys), from the repository root, with the Python client installed. A second word in the
info string says otherwise:

- ``fragment``: a piece of a larger program (names defined elsewhere, placeholders such
  as ``$ID``); shown to explain, not to paste;
- ``manual``: complete, but needs what a test does not have (Docker, a PostgreSQL
  cluster, other hosts, minutes of running, a server started with other settings).

Blocks in other languages (``json``, ``http``, ``sql``, bare fences) are data, wire
exchanges or diagrams and are never run. Any other second word is an error, so a typo
cannot silently turn a runnable block into an unchecked one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LANGUAGES = frozenset({"python", "bash", "sh", "js"})
MARKERS = frozenset({"fragment", "manual"})
_FENCE = re.compile(r"^```(.*)$")


@dataclass(frozen=True)
class Snippet:
    path: Path
    line: int
    language: str
    marker: str | None
    code: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"

    @property
    def runnable(self) -> bool:
        return self.language in LANGUAGES and self.marker is None


def documents() -> list[Path]:
    return [
        REPO / "README.md",
        *sorted(REPO.glob("clients/*/README.md")),
        *sorted(REPO.glob("docs/*.md")),
    ]


def snippets(path: Path) -> list[Snippet]:
    found: list[Snippet] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        words = opening.group(1).split()
        end = index + 1
        while not lines[end].startswith("```"):
            end += 1
        language = words[0] if words else ""
        marker = words[1] if len(words) > 1 else None
        code = "\n".join(lines[index + 1 : end]) + "\n"
        found.append(Snippet(path, index + 1, language, marker, code))
        index = end + 1
    return found


def every_snippet() -> list[Snippet]:
    return [snippet for path in documents() for snippet in snippets(path)]


def runnable(language: str) -> list[Snippet]:
    return [s for s in every_snippet() if s.runnable and s.language in _ALIASES[language]]


_ALIASES = {"python": {"python"}, "shell": {"bash", "sh"}, "js": {"js"}}


def against(code: str, url: str) -> str:
    """The snippet pointed at the test's server instead of the default address."""
    host = url.removeprefix("http://")
    return code.replace("http://127.0.0.1:8000", url).replace("localhost:8000", host)
