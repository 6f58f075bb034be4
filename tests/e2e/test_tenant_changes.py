"""Changing tenants on a running relay: one file edit and `relayctl apply`, no restart, no lost mail."""

from __future__ import annotations

import os

import pytest

from relay_milter.core.addresses import encode_recipient
from relay_milter.lab import Lab, Sink, TenantSpec, make_message, rsa_key, sign, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def lab():
    lab = Lab()
    key = rsa_key(2048)
    lab.add_tenant(TenantSpec("acme", "acme.relay.test", "hop.acme.test", "s1", key, ["acme.example"]), Sink("acme"))
    lab.acme_key = key
    try:
        yield lab.start()
    finally:
        lab.stop() if os.environ.get("RELAY_KEEP_LAB") else lab.destroy()


def send(lab, tid, key, relay, sender, to="alice@example.org"):
    raw = sign(make_message(sender, to), key, f"hop.{tid}.test", "s1")
    return lab.send(raw, sender, [encode_recipient(to, relay)])


def test_add_a_tenant_to_a_running_relay(lab):
    milter_pid = lab.milter_proc.pid
    assert send(lab, "acme", lab.acme_key, "acme.relay.test", "news@acme.example")[0] == 250
    lab.sinks["acme"].wait(1)

    # Before the change the new relay domain is refused by Postfix itself.
    key = rsa_key(2048)
    code, text, _ = send(lab, "initech", key, "initech.relay.test", "hello@initech.example")
    assert code == 554 and "Relay access denied" in text

    sink = Sink("initech").start()
    lab.add_tenant(TenantSpec("initech", "initech.relay.test", "hop.initech.test", "s1", key, ["initech.example"]), sink)
    out = lab.relayctl("apply")
    assert "postfix reloaded" in out.stdout, out.stdout
    wait_for(lambda: lab.milter_reloaded("tenants=acme,initech "), 10, what="every milter worker reloading")

    code, text, _ = send(lab, "initech", key, "initech.relay.test", "hello@initech.example", to="bob@example.net")
    assert code == 250, text
    [got] = sink.wait(1)
    assert got.rcpt_tos == ["bob@example.net"]
    # The existing tenant's mail still flows, through the same milter process.
    assert send(lab, "acme", lab.acme_key, "acme.relay.test", "news@acme.example")[0] == 250
    lab.sinks["acme"].wait(2)
    assert lab.milter_proc.pid == milter_pid and lab.milter_proc.poll() is None


def test_a_broken_tenant_edit_changes_nothing_live(lab):
    before = (lab.config_dir / "main.cf").read_text()
    path = lab.tenants_dir / "acme.yaml"
    good = path.read_text()
    path.write_text(good.replace("allowed_sender_domains:", "allowed_sender_domainz:"))
    try:
        r = lab.relayctl("apply", check=False)
        assert r.returncode == 3
        assert f"{path}: tenant acme: field allowed_sender_domainz: unknown field" in r.stderr
        assert (lab.config_dir / "main.cf").read_text() == before
        wait_for(lambda: "event=reload_failed" in lab.milter_log_text(), 10, what="milter refusing the bad edit")
        # The milter kept the last good tenant set: acme mail still flows.
        code, text, _ = send(lab, "acme", lab.acme_key, "acme.relay.test", "news@acme.example")
        assert code == 250, text
    finally:
        path.write_text(good)
