"""The route marker and its seal: which tenant's smarthost a queued message goes to.

The milter adds two top-level header fields to every message it accepts::

    X-Relay-Route:acme
    X-Relay-Route-Seal:acme.<40 hex digits>

with no space after the colon: Postfix looks the whole header line up as one key in
the exact-match (``texthash:``) route tables, and a table key ends at the first
whitespace. One hash lookup per header, whatever the number of tenants
(docs/scale.md).

Postfix routes new mail on the first, with ``milter_header_checks``: only header
fields a milter added are matched, never the client's. Mail an operator requeues
with ``postsuper -r`` comes back through pickup, where Postfix runs no milter
(pickup.c clears the milter flag for requeued files, as postsuper(1) documents);
master.cf's ``cleanup_requeue`` routes it with ``header_checks`` on the seal instead,
and on top-level header fields only (``mime_header_checks`` and
``nested_header_checks`` are empty, so a marker hidden in a MIME part or an attached
message is never matched).

The seal is an HMAC of the tenant id under a key only this relay holds
(``<config_directory>/relay/requeue/route.key``, created by ``relayctl apply``). Postfix can
only compare a header with a fixed string, so the seal is per tenant, not per
message: without the key nobody can write a seal that routes, and the milter
deletes every seal and marker a client sends. The seal never leaves the relay
(``smtp_header_checks`` on the tenant transports remove it).

Pure functions, no pymilter, no I/O.
"""

from __future__ import annotations

import hashlib
import hmac

SEAL_CONTEXT = b"tenant-relay route seal v1\0"


def tenant_seal(key: bytes, tenant_id: str) -> str:
    """The seal value for mail routed to ``tenant_id``: ``<tenant>.<hex HMAC-SHA256, 160 bits>``.

    Hex, because Postfix regexp tables compare without regard to case.
    """
    mac = hmac.new(key, SEAL_CONTEXT + tenant_id.encode("ascii"), hashlib.sha256).hexdigest()
    return f"{tenant_id}.{mac[:40]}"


def marker_value(tenant_id: str) -> str:
    """The value of the route marker the milter adds, exactly as Postfix stores it."""
    return tenant_id


def table_key(header: str, value: str) -> str:
    """The header line Postfix looks up in an exact-match table (``Name:value``)."""
    return f"{header}:{value}"


def new_route_key() -> str:
    """A fresh key in its file format: 64 hex digits (256 bits) and a newline."""
    import secrets

    return secrets.token_hex(32) + "\n"


def parse_route_key(text: str) -> bytes | None:
    """The key from its file's text; None if it is not 64 or more hex digits."""
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        return None
    return key if len(key) >= 32 else None
