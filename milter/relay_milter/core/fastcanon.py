"""Faster, output-identical replacements for two of dkimpy's canonicalization helpers.

Profiling the milter on 100 KB messages (bench/, docs/bench.md) showed most of
its CPU in dkimpy's relaxed body canonicalization: ``re.sub(b"[\\t ]+", b" ", body)``
makes one regex match per space of ordinary text (~3 ms per 100 KB), and
``re.sub(b"[\\t ]+\\r\\n", ...)`` scans the whole body even when no line has
trailing white space (~1.3 ms). The versions here return exactly the same bytes
(tests/test_fastcanon.py checks that against dkimpy's originals with
hypothesis) using bytes.replace / substring checks, which run at memchr speed.

``install()`` swaps them into ``dkim.canonicalization``; it is idempotent.

``rfc822_parse`` is dkimpy's message parser (headers and body for verification) without
its split of the whole body into lines and join back (issue 16: ~2 ms of 100 KB); the
verifier in core/dkimverify.py uses it. Same output, checked with hypothesis too.
"""

from __future__ import annotations

import dkim
import dkim.canonicalization as _canon

original_compress_whitespace = _canon.compress_whitespace
original_strip_trailing_whitespace = _canon.strip_trailing_whitespace


def compress_whitespace(content: bytes) -> bytes:
    """Every run of SP/HTAB becomes one SP (RFC 6376 3.4.4 / 3.4.2)."""
    if b"\t" in content:
        content = content.replace(b"\t", b" ")
    while b"  " in content:
        content = content.replace(b"  ", b" ")
    return content


def strip_trailing_whitespace(content: bytes) -> bytes:
    """SP/HTAB at the end of a line (before CRLF) is removed."""
    if b" \r\n" not in content and b"\t\r\n" not in content:
        return content
    return original_strip_trailing_whitespace(content)


original_rfc822_parse = dkim.rfc822_parse


def rfc822_parse(message: bytes) -> tuple[list[list[bytes]], bytes]:
    """``dkim.rfc822_parse``: (header fields as [name, value] lists, body with CRLF line ends).

    dkimpy splits the whole message at every ``\\r?\\n`` and joins the body's lines again
    with CRLF. Here only the header block goes through dkimpy's own parser; the body is
    taken as it is when that join would give it back unchanged (every LF already has its
    CR), else the whole message goes to dkimpy.
    """
    # The header block ends at the first empty line: a line end right after another one.
    if message.startswith((b"\n", b"\r\n")):
        return original_rfc822_parse(message)
    end = -1
    for sep in (b"\n\n", b"\n\r\n"):
        at = message.find(sep)
        if at != -1 and (end == -1 or at < end):
            end = at
    if end == -1:
        return original_rfc822_parse(message)
    after = end + (2 if message[end + 1 : end + 2] == b"\n" else 3)  # past the empty line
    body = message[after:]
    if body.count(b"\n") != body.count(b"\r\n"):
        return original_rfc822_parse(message)
    headers, _ = original_rfc822_parse(message[:after])
    return headers, body


def install() -> None:
    _canon.compress_whitespace = compress_whitespace
    _canon.strip_trailing_whitespace = strip_trailing_whitespace
