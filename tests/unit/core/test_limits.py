"""Structural limits: a golden table of header blocks and MIME trees, and the flat scanner's properties."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay_milter.core.limits import DEFAULT, Limits, check_message, mime_scan
from support.factories import nested, wide

OK_HEADERS = ((("From", " a@acme.example"), ("Subject", " =?utf-8?q?Caf=C3=A9?=")))


def hdrs(*extra: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    return OK_HEADERS + extra


GOLDEN = [
    # id, headers, body, expected (code, dsn, reason fragment) or None
    ("plain", hdrs(), b"hello\r\n", None),
    ("folded-998-lines", hdrs(("X-Long", " " + "a" * 990 + "\r\n\t" + "b" * 997)), b"", None),
    ("1000-fields", tuple(("X-H", " v") for _ in range(1000)), b"", None),
    ("1001-fields", tuple(("X-H", " v") for _ in range(1001)), b"", ("552", "5.3.4", "1001 header fields")),
    ("999-octet-line", hdrs(("X-Long", " " + "a" * 991)), b"", ("550", "5.6.0", "line of 999 octets")),
    ("truncated-by-postfix", hdrs(("X-Long", " " + "a" * 102399)), b"", ("550", "5.6.0", "X-Long has a line of 102407")),
    ("folded-field-32k", hdrs(("X-F", ("\r\n\t" + "a" * 900) * 35)), b"", None),
    ("folded-field-too-big", hdrs(("X-F", ("\r\n\t" + "a" * 900) * 37)), b"", ("552", "5.3.4", "X-F has 33415 octets, more than 32768")),
    ("folded-block-too-big", hdrs(*[("X-F", " " + "a" * 900 + "\n\t" + "b" * 900)] * 40), b"", ("552", "5.3.4", "larger than 65536")),
    ("utf8-raw", hdrs(("Subject", " Café")), b"", ("550", "5.6.0", "Subject contains raw non-ASCII")),
    ("invalid-utf8", hdrs(("Subject", b" Caf\xe9".decode("utf-8", "surrogateescape"))), b"", ("550", "5.6.0", "not valid UTF-8")),
    ("lone-surrogate", hdrs(("Subject", " \ud800")), b"", ("550", "5.6.0", "not valid UTF-8")),
    ("nul", hdrs(("Subject", " a\x00b")), b"", ("550", "5.6.0", "NUL")),
    ("mime-20", hdrs(("Content-Type", nested(20)[0])), nested(20)[1], None),
    ("mime-21", hdrs(("Content-Type", nested(21)[0])), nested(21)[1], ("550", "5.6.0", "nested more than 20")),
    ("rfc822-21", hdrs(("Content-Type", nested(21, "rfc822")[0])), nested(21, "rfc822")[1], ("550", "5.6.0", "nested")),
    ("1000-parts", hdrs(("Content-Type", wide(1000)[0])), wide(1000)[1], None),
    ("1001-parts", hdrs(("Content-Type", wide(1001)[0])), wide(1001)[1], ("552", "5.3.4", "more than 1000 MIME parts")),
    ("part-without-blank-line", hdrs(("Content-Type", wide(1)[0])), b"--w\r\n--w\r\n" * 5000, None),
    ("mime-5000", hdrs(("Content-Type", nested(5000)[0])), nested(5000)[1], ("550", "5.6.0", "nested")),
]


@pytest.mark.parametrize("headers, body, expected", [g[1:] for g in GOLDEN], ids=[g[0] for g in GOLDEN])
def test_golden(headers, body, expected):
    refusal = check_message(headers, body)
    if expected is None:
        assert refusal is None
    else:
        assert refusal is not None and (refusal.code, refusal.dsn) == expected[:2]
        assert expected[2] in refusal.reason


@pytest.mark.parametrize("depth", [0, 1, 2, 7, 20])
def test_depth_is_counted_exactly(depth):
    if depth == 0:
        assert mime_scan(" text/plain", b"--b0\r\n", 20, 1000) == (0, 0)
        return
    ct, body = nested(depth)
    assert mime_scan(ct, body, 100, 1000) == (depth, depth)
    ct, body = nested(depth, "rfc822")
    assert mime_scan(ct, body, 100, 1000) == (depth, 0)


def test_siblings_do_not_add_depth():
    ct = ' multipart/mixed; boundary="o"'
    part = b'--o\r\nContent-Type: multipart/alternative; boundary="i"\r\n\r\n--i\r\n\r\na\r\n--i--\r\n'
    assert mime_scan(ct, part * 50 + b"--o--\r\n", 20, 1000) == (2, 100)


def test_limits_are_below_postfix_truncation():
    assert DEFAULT.max_header_octets < 102400 and DEFAULT.max_line_octets == 998
    assert check_message(hdrs(), b"", Limits(max_header_fields=1)) is not None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000), st.sampled_from([" text/plain", ' multipart/mixed; boundary="a"', " message/rfc822"]))
def test_any_body_is_scanned_without_error(body, ct):
    assert mime_scan(ct, body, DEFAULT.max_mime_depth, DEFAULT.max_mime_parts) >= (0, 0)
