"""Structural limits on a message, checked before anything parses it.

Pure functions, no pymilter, no recursion: hostile input (huge or endless
header blocks, raw 8-bit header bytes, MIME nested thousands deep) is measured
with flat loops and refused with a precise reply.

Why the milter must check what Postfix already limits: Postfix truncates a
header field longer than ``header_size_limit`` (102400) and passes the rest on
silently, and ``mime_nesting_limit`` only stops Postfix's own MIME processing;
neither refuses the message. Every limit here is below Postfix's, so a field
Postfix truncated is always over our limit too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, NamedTuple


class Refusal(NamedTuple):
    code: str
    dsn: str
    reason: str


@dataclass(frozen=True)
class Limits:
    max_header_fields: int = 1000
    max_line_octets: int = 998  # RFC 5322 section 2.1.1, without the CRLF
    # One field, folded or not. Postfix cuts a field it finds too long (seen at ~58 KiB
    # for a folded one) and passes the rest on: a cut field is always over this.
    max_field_octets: int = 32 * 1024
    max_header_octets: int = 64 * 1024  # whole header block; Postfix's header_size_limit is 102400
    max_mime_depth: int = 20  # containers around the innermost part; the top level is 0


DEFAULT = Limits()

_BOUNDARY = re.compile(rb'boundary\s*=\s*(?:"([^"\r\n]{1,200})"|([^\s;"]{1,200}))', re.I)
_TYPE = re.compile(rb"^\s*([a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+)", re.I)


def _octets(text: str) -> bytes:
    """The bytes as they were on the wire (the adapter keeps undecodable bytes as surrogates)."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def check_headers(headers: Iterable[tuple[str, str]], limits: Limits = DEFAULT) -> Refusal | None:
    fields = list(headers)
    if len(fields) > limits.max_header_fields:
        return Refusal(
            "552", "5.3.4", f"message has {len(fields)} header fields, more than the {limits.max_header_fields} accepted"
        )
    total = 0
    for name, value in fields:
        raw = _octets(f"{name}:{value}")
        total += len(raw) + 2
        longest = max(len(line.rstrip(b"\r")) for line in raw.split(b"\n"))
        if longest > limits.max_line_octets:
            return Refusal(
                "550", "5.6.0",
                f"header field {name[:40]} has a line of {longest} octets, more than {limits.max_line_octets} (RFC 5322 2.1.1)",
            )
        if len(raw) > limits.max_field_octets:
            return Refusal(
                "552", "5.3.4", f"header field {name[:40]} has {len(raw)} octets, more than {limits.max_field_octets}"
            )
        if not raw.isascii():
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return Refusal("550", "5.6.0", f"header field {name[:40]} contains bytes that are not valid UTF-8")
            return Refusal(
                "550", "5.6.0",
                f"header field {name[:40]} contains raw non-ASCII text; encode it as RFC 2047 encoded-words",
            )
        if "\x00" in value:
            return Refusal("550", "5.6.0", f"header field {name[:40]} contains a NUL character")
        if total > limits.max_header_octets:
            return Refusal(
                "552", "5.3.4", f"message header is larger than {limits.max_header_octets} octets"
            )
    return None


def _content_type(header_lines: list[bytes]) -> tuple[bytes, bytes | None]:
    """(media type, boundary) from one entity's raw header lines; unfolds, never recurses."""
    value = b""
    collecting = False
    for line in header_lines:
        if line[:1] in (b" ", b"\t"):
            if collecting:
                value += line
            continue
        collecting = line.lower().startswith(b"content-type:")
        if collecting:
            value = line[13:]
    return _media(value)


def _media(value: bytes) -> tuple[bytes, bytes | None]:
    m = _TYPE.match(value)
    media = m.group(1).lower() if m else b"text/plain"
    b = _BOUNDARY.search(value) if media.startswith(b"multipart/") else None
    return media, (b.group(1) or b.group(2)) if b else None


def mime_depth(content_type: str, body: bytes, limit: int) -> int:
    """Nesting depth of the MIME tree (0 for a single-part message), counted
    with one pass over the body lines and an explicit stack. Stops as soon as
    the depth passes ``limit`` and returns that depth."""
    open_parts: list[tuple[bytes, int]] = []  # (boundary, depth of the multipart entity)

    def enter(media: bytes, boundary: bytes | None, depth: int) -> int | None:
        """Start an entity's content; returns the depth of a message/rfc822 header block that follows."""
        if media.startswith(b"multipart/") and boundary:
            open_parts.append((boundary, depth))
        elif media in (b"message/rfc822", b"message/global"):
            return depth + 1
        return None

    header_depth = enter(*_media(_octets(content_type)), 0)
    deepest = header_depth or 0
    header_lines: list[bytes] = []
    for line in body.split(b"\n"):
        line = line.rstrip(b"\r")
        if line.startswith(b"--") and open_parts:
            hit = next((i for i in range(len(open_parts) - 1, -1, -1) if line.startswith(b"--" + open_parts[i][0])), None)
            if hit is not None:
                boundary, depth = open_parts[hit]
                rest = line[2 + len(boundary):].rstrip(b" \t")
                if rest == b"--":
                    del open_parts[hit:]
                    header_depth = None
                    continue
                if rest == b"":
                    del open_parts[hit + 1:]
                    header_depth, header_lines = depth + 1, []
                    deepest = max(deepest, header_depth)
                    if deepest > limit:
                        return deepest
                    continue
        if header_depth is None:
            continue
        if line:
            header_lines.append(line)
            continue
        depth = header_depth
        header_depth, header_lines = enter(*_content_type(header_lines), depth), []
        if header_depth is not None:
            deepest = max(deepest, header_depth)
            if deepest > limit:
                return deepest
    return deepest


def check_message(headers: tuple[tuple[str, str], ...], body: bytes, limits: Limits = DEFAULT) -> Refusal | None:
    """The first structural limit the message breaks, or None."""
    refusal = check_headers(headers, limits)
    if refusal:
        return refusal
    content_type = next((v for n, v in headers if n.lower() == "content-type"), "text/plain")
    depth = mime_depth(content_type, body, limits.max_mime_depth)
    if depth > limits.max_mime_depth:
        return Refusal(
            "550", "5.6.0", f"MIME parts are nested more than {limits.max_mime_depth} deep"
        )
    return None
