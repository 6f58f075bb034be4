"""Client text in the milter log: every control character is escaped, and the tracker's
parser reads every line the milter writes, whatever the client put in a header.

The round trip is the real one: ``logs.event`` through the handler format the milter's
log file uses (``logs.formatter``) into ``tracking.logparse.parse_milter``.
"""

from __future__ import annotations

import io
import logging
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay_milter import logs
from relay_milter.tracking.logparse import parse_milter

RAW_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
RCPTS = "<alice@example.org>,<bob@example.org>,<carol@example.org>"
ORIG = "<alice=example.org@acme.relay.test>,<bob=example.org@acme.relay.test>,<carol=example.org@acme.relay.test>"

HOSTILE = [
    "<\x1b]0;owned\x07\x1b[2J\x1b[31mred@platform.example>",  # set the title, clear the screen, colour
    "job\x01-42",
    "tab\there",
    "del\x7fete",
    "c1\x9b31m csi",
    "nul\x00byte",
    "forged\r\nevent=accepted rcpts=<evil@example.org>",
    "bare\rcr",
    'quote " and backslash \\ and \\" both',
    "non-ascii é ü 中",
    "lone surrogate \udcff",
    "trailing space ",
    "=",
    "",
]


def _line(**fields) -> str:
    """One line exactly as the milter writes it to its log file."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(logs.formatter())
    logger = logging.getLogger("relay.milter.escaping-test")
    logger.propagate = False
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    try:
        logs.event(logger, logging.INFO, "4Xyz1bCd9Lm", "accepted", tenant="acme", **fields)
    finally:
        logger.handlers[:] = []
    text = buf.getvalue()
    assert text.endswith("\n") and text.count("\n") == 1, repr(text)
    return text


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_message_id_and_upstream_id_keep_every_recipient(value):
    line = _line(message_id=value, upstream_id=value, rcpts=RCPTS, orig_rcpts=ORIG)
    assert not RAW_CONTROL.search(line[:-1]), repr(line)
    rec = parse_milter(line)
    assert rec is not None, repr(line)
    assert (rec.queue_id, rec.event, rec.get("tenant")) == ("4Xyz1bCd9Lm", "accepted", "acme")
    assert rec.rcpts == ["alice@example.org", "bob@example.org", "carol@example.org"]
    assert len(rec.orig_rcpts) == 3
    assert "evil@example.org" not in rec.rcpts
    if value:
        assert rec.fields["message_id"] == logs.escape_controls(value)
        assert rec.fields["upstream_id"] == logs.escape_controls(value)


def test_escapes_are_readable():
    assert logs.escape_controls("\x1b[2J") == "\\x1b[2J"
    assert logs.escape_controls("a\tb\r\nc\x00d\x7f") == "a\\tb\\r\\nc\\0d\\x7f"
    assert logs.escape_controls("\x9b") == "\\x9b"  # C1 CSI
    assert logs.escape_controls("é") == "\\xe9"
    assert logs.escape_controls("plain <id@example.org>") == "plain <id@example.org>"


def test_text_logged_outside_event_is_escaped_too():
    """An exception text quoting client input goes through the same formatter."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(logs.formatter())
    logger = logging.getLogger("relay.milter.escaping-test2")
    logger.propagate = False
    logger.handlers[:] = [handler]
    try:
        try:
            raise ValueError("bad header \x1b[2J\x07")
        except ValueError:
            logger.exception("NOQUEUE: event=error text=%s", "x\x1b]0;t\x07")
    finally:
        logger.handlers[:] = []
    out = buf.getvalue()
    assert "\x1b" not in out and "\x07" not in out
    assert "\\x1b[2J" in out and "\\x1b]0;t\\x07" in out
    assert "Traceback" in out and out.count("\n") > 2  # a traceback keeps its lines


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF), max_size=200))
def test_any_text_round_trips_escaped(value):
    line = _line(message_id=value, upstream_id=value, rcpts=RCPTS)
    assert not RAW_CONTROL.search(line[:-1])
    rec = parse_milter(line)
    assert rec is not None, repr(line)
    assert rec.rcpts == ["alice@example.org", "bob@example.org", "carol@example.org"]
    if value:
        assert rec.fields["message_id"] == logs.escape_controls(value)
