"""Recipient encoding: ``local=domain@relay_domain`` <-> ``local@domain``.

Pure functions, no I/O. Everything that is not a plain ASCII dot-atom mailbox is
refused: the relay must never be talked into routing somewhere it was not told
to (percent hack, bang paths, source routes, quoted local parts, IP literals,
header injection through CR/LF/NUL).
"""

from __future__ import annotations

import email.utils
import re
from dataclasses import dataclass

from relay_milter.syntax import DOMAIN_RE, LOCAL_RE


@dataclass(frozen=True)
class Decoded:
    relay_domain: str  # the tenant's relay domain the address was encoded under
    address: str  # the original recipient, local@domain


class AddressError(ValueError):
    """A recipient the relay refuses. ``reason`` is safe to show to the client."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


_PRINTABLE = re.compile(r"^[\x21-\x7e]+$")
_FORBIDDEN = set('"\\()<>[],;:%!')
_UNSAFE_IN_HEADER = re.compile("[\x00-\x08\x0a-\x1f\x7f\ud800-\udfff]")


def strip_brackets(raw: str) -> str:
    raw = raw.strip()
    if raw.startswith("<") and raw.endswith(">"):
        raw = raw[1:-1]
    return raw


def split_relay_address(raw: str) -> tuple[str, str]:
    """Return (encoded local part, relay domain) of an envelope recipient, or raise."""
    addr = strip_brackets(raw)
    if not addr:
        raise AddressError("empty recipient")
    if len(addr) > 512:
        raise AddressError("recipient too long")
    if not _PRINTABLE.match(addr):
        raise AddressError("recipient contains whitespace, control or non-ASCII characters")
    bad = _FORBIDDEN.intersection(addr)
    if bad:
        raise AddressError(f"recipient contains forbidden character {''.join(sorted(bad))!r}")
    if addr.count("@") != 1:
        raise AddressError("recipient must contain exactly one '@'")
    local, _, domain = addr.partition("@")
    domain = _without_root_dot(domain.lower())
    if not local or not DOMAIN_RE.match(domain):
        raise AddressError("recipient domain is not a valid domain name")
    return local, domain


def decode_local(encoded_local: str) -> str:
    """``alice=example.org`` -> ``alice@example.org`` (split at the last ``=``)."""
    local, sep, domain = encoded_local.rpartition("=")
    if not sep:
        raise AddressError("recipient is not encoded as local=domain@relay-domain")
    return _check_mailbox(local, _without_root_dot(domain.lower()), "encoded recipient")


def _without_root_dot(domain: str) -> str:
    """``example.org.`` (the fully qualified form) -> ``example.org``. One dot only: a name
    ending in ``..`` has an empty label and stays invalid."""
    return domain[:-1] if domain.endswith(".") else domain


def _check_mailbox(local: str, domain: str, what: str) -> str:
    if not local or len(local) > 64 or not LOCAL_RE.match(local) or ".." in local or local[0] == "." or local[-1] == ".":
        raise AddressError(f"{what} has an invalid local part")
    if not DOMAIN_RE.match(domain) or len(domain) > 253:
        raise AddressError(f"{what} has an invalid domain")
    if domain.rsplit(".", 1)[1].isdigit():
        raise AddressError(f"{what} domain looks like an IP address")
    return f"{local}@{domain}"


def plain_recipient(raw: str) -> str:
    """An authenticated submission's recipient: a plain ASCII dot-atom mailbox, as is."""
    local, domain = split_relay_address(raw)
    return _check_mailbox(local, domain, "recipient")


def decode_recipient(raw: str) -> Decoded:
    encoded_local, relay_domain = split_relay_address(raw)
    address = decode_local(encoded_local)
    if len(address) > 254:
        raise AddressError("decoded recipient too long")
    return Decoded(relay_domain, address)


def encode_recipient(address: str, relay_domain: str) -> str:
    """The inverse, for platforms and tests: ``alice@example.org`` -> ``alice=example.org@relay``."""
    local, _, domain = address.rpartition("@")
    return f"{local}={domain}@{relay_domain}"


def decode_header_address(addr: str, relay_domain: str) -> str | None:
    """``alice=example.org@relay_domain`` (any case, with or without the trailing dot of a
    fully qualified domain) -> ``alice@example.org``; None for any other address."""
    bare = addr[:-1] if addr.endswith(".") else addr
    suffix = "@" + relay_domain
    if not bare.lower().endswith(suffix):
        return None
    try:
        return decode_local(bare[: -len(suffix)])
    except AddressError:
        return None


def rewrite_address_header(value: str, relay_domain: str) -> str | None:
    """Decode addresses under ``relay_domain`` in a To/Cc header value.

    Returns the new value, or None when nothing needs to change. Addresses that
    do not decode are left as they are (the envelope is authoritative).
    """
    flat = re.sub(r"\r?\n[ \t]*", " ", value).strip()
    suffix = "@" + relay_domain
    if suffix not in flat.lower() or _UNSAFE_IN_HEADER.search(flat):
        return None  # control characters or undecodable bytes: never re-serialised
    pairs = email.utils.getaddresses([flat])
    changed = False
    out = []
    for name, addr in pairs:
        if not addr.isascii() or not _PRINTABLE.match(addr or "x"):
            return None  # not something we can re-serialise faithfully: leave the header alone
        decoded = decode_header_address(addr, relay_domain)
        if decoded is not None:
            addr, changed = decoded, True
        out.append(email.utils.formataddr((name, addr)) if name else addr)
    if not changed:
        return None
    result = ", ".join(out)
    return None if "\r" in result or "\n" in result else result


_NOTIFY = re.compile(r"^(NEVER|(SUCCESS|FAILURE|DELAY)(,(SUCCESS|FAILURE|DELAY))*)$", re.I)


def xtext(text: str) -> str:
    """RFC 3461 section 4: '+', '=' and characters outside '!'..'~' as +XX."""
    return "".join(c if "!" <= c <= "~" and c not in "+=" else f"+{ord(c):02X}" for c in text)


def dsn_params(esmtp_args: list[str] | tuple[str, ...], decoded_address: str) -> str:
    """The ESMTP parameters for a decoded recipient that replaces an encoded one.

    NOTIFY= is carried over as the client gave it (when it is valid RFC 3461 syntax);
    ORCPT= is the decoded address, so a delivery status notification names the
    recipient the platform meant, not the relay's encoding of it.
    """
    params = []
    for arg in esmtp_args:
        name, _, value = str(arg).partition("=")
        if name.upper() == "NOTIFY" and _NOTIFY.match(value):
            params.append(f"NOTIFY={value.upper()}")
    params.append(f"ORCPT=rfc822;{xtext(decoded_address)}")
    return " ".join(params)
