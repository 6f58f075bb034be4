"""What a lab's private Postfix and milter logged that no test may leave behind.

A Postfix ``fatal:`` or ``panic:`` line means a Postfix daemon gave up (the master
restarts it, so the mail may still flow and a test may pass without it); a
Python traceback in the milter's log or stderr means the milter hit an error it
did not expect, and a milter worker that died (``event=worker_died``) crashed unless a
test killed it. ``LogWatch`` remembers where each log ended, and ``problems``
lists what was appended since that breaks the rule.

tests/conftest.py applies this to every e2e test; a test that provokes such a
line on purpose says which with ``@pytest.mark.allow_log("regex")``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

from relay_milter.lab import Lab

POSTFIX_FATAL = re.compile(r"\b(?:fatal|panic): ")
TRACEBACK = "Traceback (most recent call last)"
# The milter's supervisor replaced a worker that died (a crash, unless a test killed it).
WORKER_DIED = "event=worker_died"


def labs_in(value: Any) -> list[Lab]:
    """The labs a fixture value is or holds (a Lab, an object with a ``lab`` attribute, or
    one with a ``labs`` list: the nodes of a fleet)."""
    if isinstance(value, Lab):
        return [value]
    inner = getattr(value, "lab", None)
    if isinstance(inner, Lab):
        return [inner]
    return [lab for lab in getattr(value, "labs", None) or () if isinstance(lab, Lab)]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as fh:
            if fh.seek(0, 2) < offset:  # truncated or replaced since: read it all
                offset = 0
            fh.seek(offset)
            return fh.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def _tracebacks(text: str) -> list[str]:
    """Each traceback block: the 'Traceback' line, its indented lines and the exception line."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if TRACEBACK in lines[i]:
            start = i
            i += 1
            while i < len(lines) and lines[i][:1] in (" ", "\t"):
                i += 1
            blocks.append("\n".join(lines[start : i + 1]))
        i += 1
    return blocks


class LogWatch:
    """Offsets of one lab's maillog, milter log and milter stderr; ``fresh`` starts at 0."""

    def __init__(self, lab: Lab, fresh: bool = False):
        self.lab = lab
        self.offsets = {path: 0 if fresh else _size(path) for path in self.paths()}

    def paths(self) -> tuple[Path, Path, Path]:
        return self.lab.maillog, self.lab.milter_log, self.lab.base / "milter.stderr"

    def problems(self, allowed: Iterable[str] = ()) -> list[str]:
        """Lines appended since the offsets that are a Postfix fatal/panic or a milter traceback,
        less those matching one of the ``allowed`` regexes."""
        allow = [re.compile(a) for a in allowed]
        maillog, *milter = self.paths()
        found = [
            f"{maillog.name}: {line}"
            for line in _read_from(maillog, self.offsets[maillog]).splitlines()
            if POSTFIX_FATAL.search(line)
        ]
        for path in milter:
            text = _read_from(path, self.offsets[path])
            found += [f"{path.name}: {block}" for block in _tracebacks(text)]
            found += [f"{path.name}: {line}" for line in text.splitlines() if WORKER_DIED in line]
        return [f for f in found if not any(a.search(f) for a in allow)]
