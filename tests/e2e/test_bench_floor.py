"""The benchmark's floor (bench/floor/floor_milter.c, issue 16) makes exactly the relay's edits.

The same signed messages go through one lab Postfix twice: with the real relay milter, then
with the floor milter on the same socket (the relay's own rendered configuration: route
table, transports). Both copies must reach the tenant's sink with the same envelope and the
same header fields, in the same order, bar Postfix's Received line. Otherwise relay/floor in
bench/RESULTS.md would compare unequal work.
"""

from __future__ import annotations

import email
import importlib.util
import sys
import tempfile
from pathlib import Path

import pytest

from relay_milter.core.addresses import encode_recipient
from relay_milter.lab import Lab, Sink, TenantSpec, make_message, rsa_key, sign
from support.paths import REPO

pytestmark = pytest.mark.e2e

SPEC = dict(id="floorco", relay_domain="floorco.relay.test", signing_domain="hop.floorco.test", selector="f1", sender_domains=["floorco.example"])
HEADERS = {"reply_to": "support@floorco.example", "envelope_sender": "bounces@floorco.example"}


def _bench_module():
    spec = importlib.util.spec_from_file_location("relay_bench", REPO / "bench" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def floorlab():
    key = rsa_key(2048)
    spec = TenantSpec(**SPEC, key=key, extra={"headers": HEADERS})
    sink = Sink("floorco")
    lab = Lab()
    lab.add_tenant(spec, sink)
    lab.start()
    try:
        yield lab, spec, sink
    finally:
        lab.destroy()


def _messages(spec: TenantSpec) -> list[tuple[bytes, str]]:
    out = []
    for i, (to, extra) in enumerate(
        [
            ("alice@example.org", ()),
            ("bob@example.net", (("Reply-To", "old@floorco.example"), ("X-Relay-Route", "evil"))),
        ]
    ):
        raw = make_message(f"news@{spec.sender_domains[0]}", to, subject=f"floor {i}", extra_headers=extra)
        out.append((sign(raw, spec.key, spec.signing_domain, spec.selector), encode_recipient(to, spec.relay_domain)))
    return out


def _fields(content: bytes) -> list[tuple[str, str]]:
    msg = email.message_from_bytes(content)
    return [(n, " ".join(str(v).split())) for n, v in msg.items() if n.lower() != "received"]


def test_the_floor_makes_the_relays_edits(floorlab):
    lab, spec, sink = floorlab
    bench = _bench_module()
    messages = _messages(spec)
    for raw, rcpt in messages:
        code, text, _ = lab.send(raw, f"news@{spec.sender_domains[0]}", [rcpt])
        assert code == 250, text
    relayed = sink.wait(len(messages))

    lab.stop_milter()
    with tempfile.TemporaryDirectory(prefix="relay-floor-") as tmp:
        exe = bench.build_floor(Path(tmp))
        floor = bench.FloorMilter(exe, lab, {"rsa": bench.BenchTenant("rsa", spec)}, "relay.lab.test").start()
        try:
            for raw, rcpt in messages:
                code, text, _ = lab.send(raw, f"news@{spec.sender_domains[0]}", [rcpt])
                assert code == 250, text
            floored = sink.wait(2 * len(messages))[len(messages):]
        finally:
            floor.stop()
            lab.start_milter()

    by_subject = lambda ms: {m.header("Subject")[0]: m for m in ms}  # noqa: E731 - delivery order may differ
    relayed, floored = by_subject(relayed), by_subject(floored)
    assert relayed.keys() == floored.keys() == {"floor 0", "floor 1"}
    for subject, r in relayed.items():
        f = floored[subject]
        assert (f.mail_from, f.rcpt_tos) == (r.mail_from, r.rcpt_tos) == ("bounces@floorco.example", r.rcpt_tos)
        assert _fields(f.content) == _fields(r.content)
        assert r.header("Reply-To") == ["support@floorco.example"]
        assert "dkim=pass" in r.header("Authentication-Results")[0]
