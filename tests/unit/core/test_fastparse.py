"""fastcanon.rfc822_parse returns exactly what dkimpy's rfc822_parse returns (or raises alike)."""

from __future__ import annotations

import dkim
from hypothesis import given, settings
from hypothesis import strategies as st

from relay_milter.core import fastcanon

# Pieces that matter to the parser: line ends of both kinds, lone CR, folding, colons, "From ".
pieces = st.sampled_from(
    [b"\r\n", b"\n", b"\r", b" ", b"\t", b"a", b"Subject:", b"X:", b" v", b"From ", b"\r\n\r\n", b"\n\n", b"\xff", b":"]
)
messages = st.lists(pieces, max_size=40).map(b"".join)


def outcome(parse, message):
    try:
        return parse(message)
    except Exception as exc:  # noqa: BLE001 - the same exception, or the same result
        return (type(exc), str(exc))


@settings(max_examples=3000)
@given(messages)
def test_same_headers_and_body_as_dkimpy(message):
    assert outcome(fastcanon.rfc822_parse, message) == outcome(fastcanon.original_rfc822_parse, message)


@settings(max_examples=300)
@given(st.lists(st.sampled_from([b"line of text", b" ", b"\r\n", b"\t"]), max_size=60).map(b"".join))
def test_a_crlf_message_takes_the_fast_path_and_matches(body):
    message = b"From: a@b.example\r\nSubject: x\r\n folded\r\n\r\n" + body
    headers, parsed_body = fastcanon.rfc822_parse(message)
    assert (headers, parsed_body) == fastcanon.original_rfc822_parse(message)
    assert parsed_body is not None and parsed_body == body


def test_the_verifier_parses_with_it():
    from relay_milter.core.dkimverify import _HopVerifier

    message = b"From: a@b.example\r\nTo: c@d.example\r\n\r\nbody\r\n"
    v = _HopVerifier(message)
    assert (v.headers, v.body) == dkim.rfc822_parse(message)
