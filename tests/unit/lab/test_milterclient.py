"""bench/milterclient.py, the MTA side of the milter protocol used by the microbench,
against the real milter (``relayctl milter``, two workers) on a unix socket."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from relay_milter.core.addresses import encode_recipient
from relay_milter.defaults import ROUTE_HEADER
from relay_milter.lab import Lab, Sink, TenantSpec, make_message, rsa_key, sign
from support.paths import REPO


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


mc = _load("milterclient")


@pytest.fixture(scope="module")
def milter():
    lab = Lab()
    key = rsa_key(2048)
    lab.add_tenant(TenantSpec("acme", "acme.relay.test", "hop.acme.test", "m1", key, ["acme.example"]), Sink("acme"))
    lab.write_settings()
    lab.start_milter("--workers", "2")
    lab.key = key
    try:
        yield lab
    finally:
        lab.destroy()


def envelope(lab, subject="hello", rcpt="alice@example.org", tamper=False) -> "mc.Envelope":
    raw = sign(make_message("news@acme.example", rcpt, subject=subject), lab.key, "hop.acme.test", "m1")
    if tamper:
        raw = raw.replace(subject.encode(), b"changed")
    return mc.Envelope("news@acme.example", [encode_recipient(rcpt, "acme.relay.test")], raw)


def test_split_message_keeps_folded_values_and_the_body():
    fields, body = mc.split_message(b"A: 1\r\nB: x\r\n\ty\r\nC:z\r\n\r\nbody\r\n")
    assert fields == [("A", " 1"), ("B", " x\r\n\ty"), ("C", "z")] and body == b"body\r\n"


def test_a_session_of_messages_as_postfix_sends_them(milter):
    c = mc.MilterClient.connect(str(milter.milter_socket))
    try:
        c.open()
        assert c.protocol & mc.HDR_LEADSPC  # the relay asks for headers exactly as received
        for i in range(3):  # several transactions on one session, as Postfix does
            r = c.message(envelope(milter, subject=f"hello {i}"))
            assert r.accepted, (r.stage, r.reply, r.text)
            added = r.added_headers()
            assert added[ROUTE_HEADER].strip() == "acme"
            assert "Authentication-Results" in added
            cmds = [cmd for cmd, _ in r.edits]
            assert "-" in cmds and ("+" in cmds or "2" in cmds)  # the recipient decoded

        bad = c.message(envelope(milter, subject="original", tamper=True))
        assert (bad.stage, bad.reply) == ("eom", "replycode") and bad.text.startswith("550 5.7")
        stranger = mc.Envelope("news@acme.example", ["bob@elsewhere.example"], envelope(milter).raw)
        refused = c.message(stranger)
        assert refused.stage == "rcpt" and refused.reply in ("replycode", "reject")
        assert c.message(envelope(milter, subject="after refusals")).accepted  # the session goes on
    finally:
        c.close()
