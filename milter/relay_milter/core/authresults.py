"""Authentication-Results (RFC 8601): find the fields that claim our authserv-id, and
write our own field from values that are known to be well-formed.

Finding the authserv-id: it is a ``value`` (RFC 2045: a token or a quoted-string),
after optional comments and white space. Every spelling a reader would take for
ours is ours: ``(trusted) relay.example;``, ``relay.example(x);``,
``"relay.example";``, ``RELAY.EXAMPLE.;``. A field that does not parse at all but
names our id anywhere is treated as a claim too (a lenient reader might accept it):
the relay deletes more rather than pass a forgery on.

Writing: values copied from a signature (``i=`` above all) are attacker text. Each
value is emitted as a token or an ``[local-part]@domain`` when it is one, as a
quoted-string when it is printable ASCII, and left out otherwise (also when it is
too long to keep our field on one line). The authres package writes ``value@...``
unquoted whatever it holds, and cannot read a quoted or dotted authserv-id, so this
module does both itself.
"""

from __future__ import annotations

import re

# RFC 2045 token: any CHAR except SPACE, CTLs and tspecials ()<>@,;:\"/[]?=
_TOKEN = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+")
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_ADDRESS = re.compile(rf"(?:{_ATEXT}(?:\.{_ATEXT})*)?@{_LABEL}(?:\.{_LABEL})*\.?")
_PRINTABLE = re.compile(r"[\x20-\x7e]*")
MAX_VALUE = 200  # longer values are left out: the field must stay under 998 octets a line


def _skip_cfws(text: str, i: int) -> int | None:
    """Index after white space and (nested) comments from ``i``; None if a comment never ends."""
    depth = 0
    while i < len(text):
        c = text[i]
        if depth:
            if c == "\\":
                i += 1
            elif c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
        elif c == "(":
            depth = 1
        elif c not in " \t\r\n":
            return i
        i += 1
    return None if depth else i


def authserv_id(value: str) -> str | None:
    """The authserv-id of an Authentication-Results value, normalised (lower case,
    no trailing dot), or None when the value does not start with one."""
    i = _skip_cfws(value, 0)
    if i is None or i >= len(value):
        return None
    if value[i] == '"':
        out, i = [], i + 1
        while i < len(value) and value[i] != '"':
            if value[i] == "\\" and i + 1 < len(value):
                i += 1
            out.append(value[i])
            i += 1
        if i >= len(value):
            return None  # the quoted-string never ends
        ident = "".join(out)
    else:
        m = _TOKEN.match(value, i)
        if not m:
            return None
        ident = m.group(0)
    ident = re.sub(r"\s+", "", ident).lower().rstrip(".")
    return ident or None


def claims(value: str, our_id: str) -> bool:
    """Does this Authentication-Results value claim to come from ``our_id``?"""
    ours = our_id.strip().lower().rstrip(".")
    found = authserv_id(value)
    if found is not None:
        return found == ours
    return ours in value.lower()  # unreadable: a lenient reader might still find our id in it


def pvalue(text: str) -> str | None:
    """``text`` as an RFC 8601 pvalue (quoted where needed), or None if it cannot be one."""
    if not text or len(text) > MAX_VALUE:
        return None
    if _TOKEN.fullmatch(text) or _ADDRESS.fullmatch(text):
        return text
    if _PRINTABLE.fullmatch(text):
        return '"' + re.sub(r'(["\\])', r"\\\1", text) + '"'
    return None


def header_value(our_id: str, method: str, result: str, properties: list[tuple[str, str]]) -> str:
    """``our_id; method=result ptype.property=value ...``; properties whose value is not
    a valid pvalue are left out."""
    parts = [f"{pvalue(our_id) or our_id};", f"{method}={result}"]
    for name, raw in properties:
        value = pvalue(raw)
        if value is not None:
            parts.append(f"{name}={value}")
    return " ".join(parts)
