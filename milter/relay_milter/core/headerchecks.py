"""Header policy beyond From: author-like fields, and the envelope bound to the signed To/Cc.

Pure functions on header fields (name, value as on the wire) and typed tenants.
"""

from __future__ import annotations

import email.utils
import inspect
import re
from typing import Iterable, NamedTuple

from relay_milter import defaults
from relay_milter.config import Tenant
from relay_milter.core.addresses import AddressError, decode_local

_GETADDRESSES_STRICT = "strict" in inspect.signature(email.utils.getaddresses).parameters
_DOMAIN = re.compile(r"^[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?$")
_EMPTY_GROUP = re.compile(r"\s*[^:;<>@,\"]*:\s*;\s*")


class Refusal(NamedTuple):
    code: str
    dsn: str
    reason: str


def mailboxes(value: str) -> list[str] | None:
    """The addresses in a mailbox or address list (lower-case domain, no trailing dot),
    or None when the value is not one (control characters, a part without local@domain)."""
    flat = re.sub(r"\r?\n[ \t]*", " ", value)
    if any(ord(c) < 32 and c != "\t" for c in flat):
        return None
    pairs = email.utils.getaddresses([flat], strict=True) if _GETADDRESSES_STRICT else email.utils.getaddresses([flat])
    out = []
    for _name, addr in pairs:
        if not addr:
            if pairs == [("", "")] and not _EMPTY_GROUP.fullmatch(flat):
                return None  # nothing parsed at all
            continue  # an empty group ("undisclosed-recipients:;")
        local, sep, domain = addr.rpartition("@")
        domain = domain.lower().rstrip(".")
        if not sep or not local or not _DOMAIN.match(domain):
            return None
        out.append(f"{local}@{domain}")
    return out


def sender_fields(headers: Iterable[tuple[str, str]], tenant: Tenant, who: str) -> Refusal | None:
    """Sender, Resent-From and Resent-Sender name the message's author or agent as much
    as From does: every address in them must be an allowed sender of the tenant."""
    for name, value in headers:
        if name.lower() not in defaults.SENDER_HEADERS:
            continue
        addrs = mailboxes(value)
        if not addrs:
            return Refusal("550", "5.6.0", f"{name} header field must hold valid mailboxes")
        for addr in addrs:
            if not tenant.sender_allowed(addr):
                return Refusal("550", "5.7.1", f"{name} address {addr} is not allowed for {who}")
    return None


def _listed(headers: Iterable[tuple[str, str]], signed: frozenset[str], relay_domain: str) -> set[str]:
    """Addresses in the signed To and Cc fields, lower case; relay-domain addresses decoded."""
    out: set[str] = set()
    suffix = "@" + relay_domain
    for name, value in headers:
        lname = name.lower()
        if lname not in ("to", "cc") or lname not in signed:
            continue
        for addr in mailboxes(value) or ():
            if addr.lower().endswith(suffix):
                try:
                    addr = decode_local(addr[: -len(suffix)])
                except AddressError:
                    continue
            out.add(addr.lower())
    return out


def unbound_recipients(
    headers: Iterable[tuple[str, str]], recipients: Iterable[str], signed: frozenset[str], relay_domain: str
) -> list[str]:
    """Decoded envelope recipients that the signed To/Cc do not name (compared without case)."""
    listed = _listed(headers, signed, relay_domain)
    return [r for r in recipients if r.lower() not in listed]


def recipient_binding(
    headers: Iterable[tuple[str, str]], recipients: list[str], signed: frozenset[str], tenant: Tenant
) -> Refusal | None:
    """Finding 7: a captured signed message must not reach anyone it was not addressed to."""
    if tenant.allow_bcc:
        return None
    missing = unbound_recipients(headers, recipients, signed, tenant.relay_domain)
    if not missing:
        return None
    shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    return Refusal(
        "550", "5.7.1",
        f"recipient(s) {shown} not in the signed To/Cc (this tenant does not allow Bcc-style sending: allow_bcc)",
    )
