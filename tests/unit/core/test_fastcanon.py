"""The faster canonicalization helpers return exactly what dkimpy's originals return."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from relay_milter.core import fastcanon
from relay_milter.lab import ed25519_key, sign
from relay_milter.core.policy import Message

# Bytes built from the characters that matter to these functions, plus a letter.
chunks = st.lists(st.sampled_from([b" ", b"\t", b"\r", b"\n", b"\r\n", b"a", b"  ", b" \r\n", b"\t\r\n"]), max_size=60).map(b"".join)


@settings(max_examples=2000)
@given(chunks)
def test_compress_whitespace_matches_dkimpy(data):
    assert fastcanon.compress_whitespace(data) == fastcanon.original_compress_whitespace(data)


@settings(max_examples=2000)
@given(chunks)
def test_strip_trailing_whitespace_matches_dkimpy(data):
    assert fastcanon.strip_trailing_whitespace(data) == fastcanon.original_strip_trailing_whitespace(data)


@settings(max_examples=2000)
@given(st.binary(max_size=80))
def test_any_bytes(data):
    assert fastcanon.compress_whitespace(data) == fastcanon.original_compress_whitespace(data)
    assert fastcanon.strip_trailing_whitespace(data) == fastcanon.original_strip_trailing_whitespace(data)


@settings(max_examples=300)
@given(chunks)
def test_message_raw_normalises_line_ends_like_the_regex(body):
    import re

    msg = Message((("From", " a@b.example"),), body)
    expected_body = re.sub(rb"(?<!\r)\n", b"\r\n", body)
    assert msg.raw() == b"From: a@b.example\r\n\r\n" + expected_body


def test_installed_and_signatures_still_verify():
    import dkim
    import dkim.canonicalization as canon

    from relay_milter.core import dkimverify  # noqa: F401  installs the fast helpers

    assert canon.compress_whitespace is fastcanon.compress_whitespace
    key = ed25519_key()
    msg = b"From: a@b.example\r\nTo: c@d.example\r\nSubject: x\r\n\r\nSome  text\twith \t runs  \r\nand trailing \t\r\n\r\n\r\n"
    signed = sign(msg, key, "b.example", "s", headers=("from", "to", "subject"))
    txt = key.txt.encode()
    assert dkim.verify(signed, dnsfunc=lambda name, timeout=5: txt)
    assert not dkim.verify(signed.replace(b"Some  text", b"Some  test"), dnsfunc=lambda name, timeout=5: txt)
