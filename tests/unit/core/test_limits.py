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
    # Postfix cuts a header field at header_size_limit (102400) and passes the rest on:
    # a block that large must already be refused here, and so must one just over our limit.
    assert DEFAULT.max_line_octets == 998
    field = ("X-F", ("\r\n\t" + "a" * 900) * 30)  # folded lines of 900 octets, ~27 KiB each
    under = hdrs(*[field] * (DEFAULT.max_header_octets // (27 * 1024 + 200)))
    assert check_message(under, b"") is None
    over = under + (field,)
    refusal = check_message(over, b"")
    assert refusal is not None and (refusal.code, refusal.dsn) == ("552", "5.3.4")
    assert f"larger than {DEFAULT.max_header_octets} octets" in refusal.reason
    assert sum(len(n) + len(v) + 3 for n, v in over) < 102400  # refused before Postfix would cut it
    refusal = check_message(hdrs(), b"", Limits(max_header_fields=1))
    assert refusal == ("552", "5.3.4", "message has 2 header fields, more than the 1 accepted")


CONTENT_TYPES = [" text/plain", ' multipart/mixed; boundary="a"', " message/rfc822"]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000), st.sampled_from(CONTENT_TYPES))
def test_any_body_is_scanned_within_its_bounds(body, ct):
    depth, parts = mime_scan(ct, body, DEFAULT.max_mime_depth, DEFAULT.max_mime_parts)
    assert 0 <= depth <= DEFAULT.max_mime_depth + 1 and 0 <= parts <= DEFAULT.max_mime_parts + 1
    assert parts <= body.count(b"--")  # every part starts at a delimiter line
    if ct == " text/plain":
        assert (depth, parts) == (0, 0)  # a single part, whatever its body looks like


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from([b"--a\r\n", b"--a--\r\n", b"\r\n", b"x\r\n", b"Content-Type: message/rfc822\r\n",
                              b'Content-Type: multipart/mixed; boundary="a"\r\n', b"--b\r\n"]), max_size=60).map(b"".join),
    st.sampled_from(CONTENT_TYPES[1:]),
)
def test_the_scan_stops_exactly_where_a_limit_is_passed(body, ct):
    depth, parts = mime_scan(ct, body, 10**6, 10**6)
    # At the limits it found, nothing is passed and the answer is the same ...
    assert mime_scan(ct, body, depth, parts) == (depth, parts)
    # ... and one below, it stops at the first container or part past the limit.
    if depth > 0:
        assert mime_scan(ct, body, depth - 1, 10**6)[0] == depth
    if parts > 0:
        assert mime_scan(ct, body, 10**6, parts - 1)[1] == parts
