"""The test suite reads nothing outside the repository or a temporary directory it created.

The rule, checked over every file under tests/ (except tests/data/, which holds
recorded logs and queue listings, i.e. data, not code that opens anything):

* An *absolute path* is a ``/`` followed by a name character, not preceded by a
  word character or one of ``. : / ~ $ -`` (so ``text/plain``,
  ``http://host/x``, ``a/b`` and ``~/x`` are not), and not followed by ``=``
  (DKIM tag lists such as ``d=/s=``). In an f-string, a piece
  directly after a ``{placeholder}`` continues a path built from a value
  (``f"{tmp_path}/events.db"``) and is not an absolute path either.
* In a Python file every string literal (including f-string pieces and
  docstrings) is searched; in any other file the whole text is.
* Every absolute path found must start with one of ``ALLOWED`` below. Each
  entry says why the tests may name it.
* This file is not scanned: its examples of bad paths are bad on purpose.
* A line that names something that only looks like a path (a substring of a
  log line, a fake config value) may say so with the comment
  ``# hygiene: not a path``; the reason goes next to it.

So ``open("/work/samples/maillog")`` fails, listing file:line, and so does
``Path("/home/me") / "x"``: a test must read tests/data (support.paths.DATA)
or a temporary directory.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from support.paths import REPO

TESTS = REPO / "tests"
PRAGMA = "# hygiene: not a path"

# (prefix, why the tests may name it)
ALLOWED: tuple[tuple[str, str], ...] = (
    ("/usr/", "system programs and libraries the tests run (/usr/sbin/postfix, /usr/lib/postgresql)"),
    ("/bin", "system programs"),
    ("/sbin", "system programs"),
    ("/etc/", "fake configuration values inside tenant data and rendered config, never read"),
    ("/var/tmp/", "the lab creates its private directories there (Postfix only accepts a maillog_file under /var)"),
    ("/var/log/", "fake log source names inside events, never read"),
    ("/dev/null", "the null device"),
    ("/proc/", "the kernel's view of processes the tests started"),
    ("/nonexistent", "a path chosen not to exist, to test the error for it"),
    ("/hooks/", "URL paths on the loopback webhook receiver, not files"),
)

# A token directly followed by "=" is a tag list such as DKIM's "d=/s=", not a path.
_PATH = re.compile(r"(?<![\w.:/~$-])/[A-Za-z0-9_.-][A-Za-z0-9_.*/-]*+(?!=)")


def _paths(text: str, glued_to_value: bool = False):
    """(offset in text, path) of every absolute path in ``text``."""
    for m in _PATH.finditer(text):
        if glued_to_value and m.start() == 0:
            continue
        yield m.start(), m.group()


def _literals(tree: ast.AST):
    """(line, text, glued_to_value) of every string constant, f-string pieces included."""
    pieces_after_value: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            for before, piece in zip(node.values, node.values[1:]):
                if isinstance(before, ast.FormattedValue) and isinstance(piece, ast.Constant):
                    pieces_after_value.add(id(piece))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            # A one-line literal may hold escaped newlines ("a\\nb"): those do not move the line.
            multiline = node.end_lineno is not None and node.end_lineno > node.lineno
            yield node.lineno, node.value, id(node) in pieces_after_value, multiline


def allowed(path: str) -> bool:
    return any(path == prefix.rstrip("/") or path.startswith(prefix) for prefix, _ in ALLOWED)


def offending(source: str, name: str = "<source>") -> list[str]:
    """``name:line: path`` for every absolute path in ``source`` that is not allowed."""
    lines = source.splitlines()
    found: list[tuple[int, str]] = []

    def check(lineno: int, text: str, glued: bool, multiline: bool) -> None:
        for offset, path in _paths(text, glued):
            line = lineno + text.count("\n", 0, offset) if multiline else lineno
            if allowed(path) or (0 < line <= len(lines) and PRAGMA in lines[line - 1]):
                continue
            found.append((line, f"{name}:{line}: {path}"))

    if name.endswith(".py"):
        for lineno, text, glued, multiline in _literals(ast.parse(source, name)):
            check(lineno, text, glued, multiline)
    else:
        check(1, source, False, True)
    return [text for _, text in sorted(found, key=lambda f: f[0])]


def _suite_files() -> list[Path]:
    """Every file under tests/ but tests/data/ and this file (whose examples below are bad on purpose)."""
    return sorted(
        p for p in TESTS.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and (TESTS / "data") not in p.parents and p != Path(__file__)
    )


# -- the scanner itself ------------------------------------------------------------------


def test_scanner_flags_a_sample_log_outside_the_repository():
    source = 'import json\n\nLOG = open("/work/samples/maillog").read()\n'
    assert offending(source, "t.py") == ["t.py:3: /work/samples/maillog"]


def test_scanner_flags_home_root_opt_and_paths_built_from_them():
    source = (
        'from pathlib import Path\n'
        'a = Path("/home/dev/keys") / "k.pem"\n'
        'b = f"/root/{name}.yaml"\n'
        'c = "cat /opt/relay/x.log"\n'
        '"""Reads\n  /srv/data/x."""\n'
    )
    assert offending(source, "t.py") == ["t.py:2: /home/dev/keys", "t.py:3: /root/", "t.py:4: /opt/relay/x.log", "t.py:6: /srv/data/x."]


def test_scanner_allows_system_paths_temporary_paths_and_things_that_are_not_paths():
    source = (
        'import shutil\n'
        'a = "/usr/sbin/postfix"\n'
        'b = f"sqlite:///{tmp_path}/events.db"\n'
        'c = "Content-Type: text/plain; see https://example.org/x/y"\n'
        'd = {"source": "/var/log/mail.log", "cert": "/etc/ssl/certs/x.pem"}\n'
        'e = tmp_path / "maillog"\n'
        'f = "/relay_" in line  # hygiene: not a path (a transport name in a log line)\n'
        'g = open("/dev/null")\n'
    )
    assert offending(source, "t.py") == []


def test_scanner_reads_other_files_as_plain_text():
    assert offending("key: /home/me/.ssh/id\nother: /etc/x\n", "conf.yaml") == ["conf.yaml:1: /home/me/.ssh/id"]


# -- the suite -----------------------------------------------------------------------------


def test_no_test_names_a_path_outside_the_repository():
    files = _suite_files()
    assert TESTS / "conftest.py" in files and len(files) > 20
    problems: list[str] = []
    for path in files:
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue  # binary, nothing to read a path from
        problems += offending(text, str(path.relative_to(REPO)))
    assert not problems, (
        "absolute paths outside the repository (read tests/data via support.paths.DATA, "
        f"or a temporary directory; see {Path(__file__).name} for the rule):\n" + "\n".join(problems)
    )
