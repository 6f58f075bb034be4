"""One place that builds test tenants, messages and prerequisites.

Every test that needs a tenant document, a typed Tenant or a TenantSet builds it here,
so a new required field is added once."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NoReturn

import pytest
import yaml

from relay_milter.config import Tenant, TenantSet
from relay_milter.core.policy import Message


def tenant_doc(tid: str, key: Any = None, **extra: Any) -> dict:
    """A minimal valid tenant document for ``tid`` (relay domain ``<tid>.relay.test``,
    signing domain ``hop.<tid>.test``, selector ``s1``, sender domain ``<tid>.example``).
    ``key`` (a lab DkimKey) pins the public key; ``extra`` overrides or adds fields."""
    doc: dict[str, Any] = {
        "id": tid,
        "relay_domain": f"{tid}.relay.test",
        "signing_domain": f"hop.{tid}.test",
        "selector": "s1",
        "allowed_sender_domains": [f"{tid}.example"],
        "smarthost": {"host": "127.0.0.1", "port": 2525, "tls": "none"},
    }
    if key is not None:
        doc["public_key"] = key.txt
    doc.update(extra)
    return doc


def tenant(tid: str, key: Any = None, **extra: Any) -> Tenant:
    """The same document, validated into a typed Tenant."""
    return Tenant.model_validate(tenant_doc(tid, key, **extra))


def tenant_set(*tenants: Tenant) -> TenantSet:
    return TenantSet(tenants=tuple(tenants), sources={t.id: Path(f"/etc/tenant-relay/tenants/{t.id}.yaml") for t in tenants})


def write_tenants(directory: Path, docs: list[dict]) -> Path:
    """Write each document as ``<id>.yaml`` into ``directory`` (created); returns it."""
    directory.mkdir(parents=True, exist_ok=True)
    for doc in docs:
        (directory / f"{doc['id']}.yaml").write_text(yaml.safe_dump(doc))
    return directory


def to_message(raw: bytes) -> Message:
    """Split a message the way Postfix hands it to a milter (values keep leading space and folding)."""
    head, _, body = raw.partition(b"\r\n\r\n")
    headers: list[list[str]] = []
    for line in head.decode("utf-8", "surrogateescape").split("\r\n"):
        if line[:1] in (" ", "\t") and headers:
            headers[-1][1] += "\r\n" + line
        else:
            name, _, value = line.partition(":")
            headers.append([name, value])
    return Message(tuple((n, v) for n, v in headers), body)


def nested(depth: int, kind: str = "multipart") -> tuple[str, bytes]:
    """(Content-Type value, body) of a message body ``depth`` containers deep
    (multipart or message/rfc822 chains)."""
    if kind == "rfc822":
        return " message/rfc822", b"Content-Type: message/rfc822\r\n\r\n" * (depth - 1) + b"Subject: x\r\n\r\nhi\r\n"
    opens = b"".join(b'--b%d\r\nContent-Type: multipart/mixed; boundary="b%d"\r\n\r\n' % (i, i + 1) for i in range(depth - 1))
    closes = b"".join(b"--b%d--\r\n" % i for i in reversed(range(depth)))
    return ' multipart/mixed; boundary="b0"', opens + b"--b%d\r\nContent-Type: text/plain\r\n\r\nhi\r\n" % (depth - 1) + closes


def wide(parts: int) -> tuple[str, bytes]:
    """(Content-Type value, body) of a multipart body with ``parts`` sibling parts."""
    return ' multipart/mixed; boundary="w"', b"--w\r\nContent-Type: text/plain\r\n\r\nx\r\n" * parts + b"--w--\r\n"


def unavailable(reason: str) -> NoReturn:
    """A prerequisite is missing: skip on a developer's machine, fail under CI (CI=true),
    where scripts/bootstrap.sh must have installed everything."""
    if os.environ.get("CI"):
        pytest.fail(f"CI: {reason}")
    pytest.skip(reason)
