"""Operator mistakes and day-2 operations on a real Postfix (issue 12): none loses, bounces
or strands mail, and the operator is told.

Its own lab, three tenants: acme (a working smarthost), moved (its smarthost port is wrong
at first) and typo (its smarthost name does not resolve). Tests run in file order.
"""

from __future__ import annotations

import email
import json
import os
import re
import subprocess

import pytest
import yaml

from relay_milter.core.addresses import encode_recipient
from relay_milter.lab import Lab, Sink, TenantSpec, make_message, rsa_key, sign, wait_for
from relay_milter.lab.harness import free_port

pytestmark = pytest.mark.e2e

TYPO_HOST = "smarthost-typo.invalid"  # RFC 6761: .invalid never resolves
TENANTS = {
    "acme": dict(id="acme", relay_domain="acme.relay.test", signing_domain="hop.acme.test", selector="a1", sender_domains=["acme.example"]),
    "moved": dict(id="moved", relay_domain="moved.relay.test", signing_domain="hop.moved.test", selector="m1", sender_domains=["moved.example"]),
    "typo": dict(id="typo", relay_domain="typo.relay.test", signing_domain="hop.typo.test", selector="t1", sender_domains=["typo.example"]),
}


@pytest.fixture(scope="module")
def lab():
    lab = Lab()
    lab.keys = {tid: rsa_key(1024) for tid in TENANTS}
    lab.dead_port = free_port()  # nobody listens here: the "wrong port"
    lab.add_tenant(TenantSpec(**TENANTS["acme"], key=lab.keys["acme"]), Sink("acme"))
    lab.add_tenant(TenantSpec(**TENANTS["moved"], key=lab.keys["moved"]), Sink("moved"), port=lab.dead_port)
    lab.add_tenant(TenantSpec(**TENANTS["typo"], key=lab.keys["typo"]), Sink("typo"), host=TYPO_HOST)
    try:
        yield lab.start()
    finally:
        lab.stop() if os.environ.get("RELAY_KEEP_LAB") else lab.destroy()


def send(lab: Lab, tid: str, subject: str = "hello") -> tuple[int, str, str]:
    t = TENANTS[tid]
    sender = f"news@{t['sender_domains'][0]}"
    mid = f"<{tid}.{subject.replace(' ', '-')}.{os.urandom(4).hex()}@platform.example>"
    raw = sign(make_message(sender, "alice@example.org", subject=subject, message_id=mid), lab.keys[tid], t["signing_domain"], t["selector"])
    code, text, _ = lab.send(raw, sender, [encode_recipient("alice@example.org", t["relay_domain"])])
    return code, text, mid


def tenant_file(lab: Lab, tid: str) -> tuple[dict, str]:
    path = lab.tenants_dir / f"{tid}.yaml"
    text = path.read_text()
    return yaml.safe_load(text), text


def write_tenant(lab: Lab, doc: dict) -> None:
    (lab.tenants_dir / f"{doc['id']}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


def queued(lab: Lab, queue: str = "deferred") -> list[dict]:
    return [m for m in lab.queue() if m["queue_name"] == queue]


def message_ids(sink: Sink) -> list[str]:
    with sink.lock:
        return [email.message_from_bytes(m.content)["Message-ID"] for m in sink.messages]


# -- 1. a smarthost typo never bounces --------------------------------------------------------


def test_check_warns_about_an_unresolvable_smarthost_and_strict_refuses_it(lab):
    r = lab.relayctl("check", check=False)
    assert r.returncode == 0, r.stderr
    assert f"warning: {lab.tenants_dir / 'typo.yaml'}: tenant typo: field smarthost.host: {TYPO_HOST} does not resolve" in r.stderr
    r = lab.relayctl("check", "--strict", check=False)
    assert r.returncode == 4
    assert f"check failed: {lab.tenants_dir / 'typo.yaml'}: tenant typo: field smarthost.host: {TYPO_HOST} does not resolve" in r.stderr


def test_mail_for_an_unresolvable_smarthost_waits_deferred_and_status_says_why(lab):
    code, text, mid = send(lab, "typo", "typo first")
    assert code == 250, text
    qid = wait_for(lambda: re.search(r"(\w+): message-id=" + re.escape(mid), lab.maillog_text()), 30, what="queue id").group(1)
    line = wait_for(lambda: re.search(rf"^.*{qid}: to=<alice@example.org>.*status=\w+.*$", lab.maillog_text(), re.M), 60, what="delivery attempt").group(0)
    assert "status=deferred" in line and "dsn=4.4.4" in line, line
    assert "smarthost name does not resolve" in line and "Host or domain name not found" in line, line
    assert "status=bounced" not in lab.maillog_text()
    assert [m["queue_id"] for m in queued(lab)] == [qid]
    lab.relayctl("track", "--once", "--from-start")  # the event store status reads
    r = lab.relayctl("status", "--json", check=False)
    out = json.loads(r.stdout)
    checks = {c["check"]: c for c in out["checks"]}
    assert checks["smarthosts"]["state"] == "warning" and checks["smarthosts"]["data"]["unresolved"] == {"typo": 1}
    assert r.returncode == 1 and out["state"] == "warning"
    metrics = lab.relayctl("metrics", "--out", "-").stdout
    assert 'relay_smarthost_unresolved_messages{tenant="typo"} 1\n' in metrics
    assert 'relay_smarthost_unresolved_messages{tenant="acme"} 0\n' in metrics


def test_fixing_the_name_delivers_the_waiting_mail_once(lab):
    doc, _ = tenant_file(lab, "typo")
    doc["smarthost"]["host"] = "127.0.0.1"
    doc["smarthost"]["port"] = lab.sinks["typo"].port
    write_tenant(lab, doc)
    r = lab.relayctl("apply")
    assert "still carry the old next hop [smarthost-typo.invalid]" in r.stdout, r.stdout
    assert "re-routed 1 deferred message(s)" in r.stdout, r.stdout
    lab.sinks["typo"].wait(1, timeout=60)
    assert [m.split(".")[1] for m in message_ids(lab.sinks["typo"])] == ["typo-first"]
    wait_for(lambda: not lab.queue(), 30, what="an empty queue")


# -- 2. re-routing after a smarthost change ---------------------------------------------------


def test_wrong_port_then_fix_and_apply_delivers_every_message_exactly_once(lab):
    mids = []
    for i in range(4):
        code, text, mid = send(lab, "moved", f"moved {i}")
        assert code == 250, text
        mids.append(mid)
    wait_for(lambda: len([m for m in queued(lab) if m["recipients"][0].get("delay_reason")]) == 4, 60, what="4 deferred messages")
    assert all(f"127.0.0.1[127.0.0.1]:{lab.dead_port}" in m["recipients"][0]["delay_reason"] for m in queued(lab))

    doc, _ = tenant_file(lab, "moved")
    doc["smarthost"]["port"] = lab.sinks["moved"].port
    write_tenant(lab, doc)
    r = lab.relayctl("apply", "--no-reroute")
    assert f"queued: 4 message(s) of tenant moved (4 deferred) still carry the old next hop [127.0.0.1]:{lab.dead_port}" in r.stdout, r.stdout
    assert "relayctl requeue --reroute --tenant moved --yes" in r.stdout
    r = lab.relayctl("requeue", "--reroute", "--tenant", "moved", "--yes")
    assert r.stdout.strip() == "requeued 4 message(s) of tenant moved", r.stdout + r.stderr
    lab.sinks["moved"].wait(4, timeout=60)
    # A later marker proves nothing else is on its way: sent after, delivered after.
    code, _, marker = send(lab, "moved", "marker")
    assert code == 250
    wait_for(lambda: marker in message_ids(lab.sinks["moved"]), 60, what="the marker")
    wait_for(lambda: not lab.queue(), 30, what="an empty queue")
    got = message_ids(lab.sinks["moved"])
    assert sorted(got) == sorted(mids + [marker]), got  # each exactly once
    assert lab.relayctl("apply").stdout.count("queued:") == 0


def test_check_probe_talks_to_every_smarthost(lab):
    r = lab.relayctl("check", "--probe", check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    for tid in TENANTS:
        sink = lab.sinks[tid]
        assert f"probe {tid} (127.0.0.1:{sink.port}, tls: none):\n  ok: banner: 220 " in r.stdout, r.stdout
    assert not any(m.content for s in lab.sinks.values() for m in s.messages if b"probe" in m.content)
    # A tenant that requires TLS from a smarthost that offers none: the probe says so, check fails.
    doc, good = tenant_file(lab, "acme")
    doc["smarthost"]["tls"] = "encrypt"
    write_tenant(lab, doc)
    try:
        r = lab.relayctl("check", "--probe", check=False)
        assert r.returncode == 4
        assert "error: STARTTLS not offered (tls: encrypt: mail would wait deferred)" in r.stderr
    finally:
        (lab.tenants_dir / "acme.yaml").write_text(good)


# -- 3. check verifies what the configuration points to ---------------------------------------


def test_a_missing_tls_key_file_fails_apply_and_changes_nothing(lab):
    before = (lab.config_dir / "main.cf").read_text()
    lab.write_settings(tls_key_file=str(lab.base / "tls" / "missing.key"))
    try:
        r = lab.relayctl("apply", check=False)
        assert r.returncode == 4, r.stdout + r.stderr
        assert f"check failed: settings tls_key_file: {lab.base / 'tls' / 'missing.key'} does not exist" in r.stderr
        assert "nothing was installed" in r.stderr
        assert (lab.config_dir / "main.cf").read_text() == before
    finally:
        lab.write_settings()


def test_a_key_that_does_not_match_the_certificate_fails_check(lab, tmp_path):
    from relay_milter.postfix.certs import make_cert

    other = make_cert(["other.lab.test"])
    other.write(tmp_path / "c.pem", tmp_path / "k.pem")
    lab.write_settings(tls_key_file=str(tmp_path / "k.pem"))
    try:
        r = lab.relayctl("check", check=False)
        assert r.returncode == 4
        assert f"{tmp_path / 'k.pem'} does not belong to the certificate in {lab.relay_cert}" in r.stderr
    finally:
        lab.write_settings()
    r = lab.relayctl("check")
    assert re.search(r"ok: settings tls_cert_file: valid until \S+ \(\d+ days left\)", r.stdout), r.stdout


def test_a_missing_ca_file_fails_apply(lab):
    doc, good = tenant_file(lab, "acme")
    doc["smarthost"] |= {"tls": "verify", "ca_file": str(lab.base / "tls" / "no-such-ca.pem"), "tls_match": "mx.acme.test"}
    write_tenant(lab, doc)
    try:
        r = lab.relayctl("apply", check=False)
        assert r.returncode == 4
        assert f"check failed: {lab.tenants_dir / 'acme.yaml'}: tenant acme: field smarthost.ca_file: {lab.base / 'tls' / 'no-such-ca.pem'} does not exist" in r.stderr
    finally:
        (lab.tenants_dir / "acme.yaml").write_text(good)


# -- 4. two-phase tenant changes ---------------------------------------------------------------


def test_a_pinned_key_that_is_not_a_key_never_goes_live(lab):
    import base64

    doc, good = tenant_file(lab, "acme")
    doc["public_key"] = "v=DKIM1; k=rsa; p=" + base64.b64encode(b"valid base64, but not a key at all").decode()
    mark = len(lab.milter_log_text())
    write_tenant(lab, doc)
    try:
        r = lab.relayctl("check", check=False)
        assert r.returncode == 3
        assert f"{lab.tenants_dir / 'acme.yaml'}: tenant acme: field public_key: Value error, p= is valid base64 but not a public key" in r.stderr
        wait_for(lambda: "event=reload_failed" in lab.milter_log_text()[mark:], 15, what="the milter refusing the edit")
        code, text, mid = send(lab, "acme", "acme during broken edit")
        assert code == 250, text
        wait_for(lambda: mid in message_ids(lab.sinks["acme"]), 30, what="acme delivery")
    finally:
        (lab.tenants_dir / "acme.yaml").write_text(good)


def test_a_valid_edit_is_not_live_until_apply(lab):
    doc, good = tenant_file(lab, "acme")
    doc["allowed_sender_domains"] = ["elsewhere.example"]
    mark = len(lab.milter_log_text())
    write_tenant(lab, doc)
    try:
        wait_for(lambda: "event=reload_pending" in lab.milter_log_text()[mark:], 15, what="the milter noticing the edit")
        # Not applied: acme.example is still an allowed sender.
        code, text, _ = send(lab, "acme", "before apply")
        assert code == 250, text
        lab.relayctl("apply")
        wait_for(lambda: lab.milter_reloaded(r"tenants=acme,moved,typo source=\S+tenants.applied.json", mark), 15, what="reload")
        code, text, _ = send(lab, "acme", "after apply")
        assert code == 550 and "5.7.1" in text, (code, text)
    finally:
        (lab.tenants_dir / "acme.yaml").write_text(good)
        lab.relayctl("apply")


# -- 6. ops commands survive a broken tenant file ---------------------------------------------


def test_queue_and_status_work_from_the_last_applied_set_while_a_file_is_broken(lab):
    path = lab.tenants_dir / "moved.yaml"
    good = path.read_text()
    path.write_text(good + "smarthost_typo: 1\n")
    try:
        r = lab.relayctl("queue", "--json", check=False)
        assert r.returncode == 0, r.stderr
        assert f"{path}: tenant moved: field smarthost_typo: unknown field" in r.stderr
        assert "using the last applied tenant set instead" in r.stderr
        json.loads(r.stdout)
        r = lab.relayctl("status", "--json", check=False)
        checks = {c["check"]: c for c in json.loads(r.stdout)["checks"]}
        assert checks["tenants"]["state"] == "warning" and "tenant files invalid" in checks["tenants"]["summary"]
        assert checks["milter"]["state"] == "ok"
        r = lab.relayctl("apply", check=False)
        assert r.returncode == 3  # apply never falls back
    finally:
        path.write_text(good)


# -- 8. hop-key rotation with overlap -----------------------------------------------------------


def test_rotating_the_hop_key_while_mail_flows_refuses_nothing(lab, tmp_path):
    import threading
    import time

    from relay_milter.lab.harness import DkimKey

    t = TENANTS["acme"]
    signer = {"key": lab.keys["acme"], "selector": t["selector"]}
    results: list[tuple[str, int, str]] = []
    stop = threading.Event()
    sender = f"news@{t['sender_domains'][0]}"

    def flow() -> None:
        n = 0
        while not stop.is_set() and n < 400:
            n += 1
            key, sel = signer["key"], signer["selector"]
            mid = f"<flow.{n}.{sel}@platform.example>"
            raw = sign(make_message(sender, "alice@example.org", subject=f"flow {n}", message_id=mid), key, t["signing_domain"], sel)
            code, text, _ = lab.send(raw, sender, [encode_recipient("alice@example.org", t["relay_domain"])])
            results.append((mid, code, text))
            time.sleep(0.05)

    _, original = tenant_file(lab, "acme")
    thread = threading.Thread(target=flow)
    thread.start()
    try:
        wait_for(lambda: len(results) >= 3, 60, what="mail flowing")
        out = tmp_path / "a2.key"
        r = lab.relayctl("key", "rotate", "acme", "--selector", "a2", "--overlap", "1h", "--private-key-out", str(out), "--write")
        assert "a2._domainkey.hop.acme.test. IN TXT \"v=DKIM1; k=rsa; p=" in r.stdout, r.stdout
        assert oct(out.stat().st_mode & 0o777) == "0o600"
        mark = len(lab.milter_log_text())
        lab.relayctl("apply")
        wait_for(lambda: lab.milter_reloaded("tenants=", mark), 15, what="milter reload")
        before = len(results)
        wait_for(lambda: len(results) >= before + 3, 60, what="old-key mail after apply")
        new_txt = re.search(r'IN TXT "([^"]+)"', r.stdout).group(1)
        signer.update(key=DkimKey(out.read_bytes(), new_txt, "rsa-sha256"), selector="a2")  # the platform switches
        switched = len(results)
        wait_for(lambda: len(results) >= switched + 5, 60, what="new-key mail")
    finally:
        stop.set()
        thread.join(120)
    refused = [(m, c, tx) for m, c, tx in results if c != 250]
    assert not refused, refused
    assert any(".a1@" in m for m, _, _ in results) and any(".a2@" in m for m, _, _ in results)
    wait_for(lambda: {m for m, _, _ in results} <= set(message_ids(lab.sinks["acme"])), 60, what="every flow message delivered")
    got = [m for m in message_ids(lab.sinks["acme"]) if m.startswith("<flow.")]
    assert sorted(got) == sorted(m for m, _, _ in results)  # exactly once each

    # After the overlap the old key is refused, with the reason.
    doc, _ = tenant_file(lab, "acme")
    assert doc["selector"] == "a2" and doc["keys"][0]["selector"] == "a1"
    doc["keys"][0]["not_after"] = "2020-01-01T00:00:00Z"
    write_tenant(lab, doc)
    mark = len(lab.milter_log_text())
    lab.relayctl("apply")
    wait_for(lambda: lab.milter_reloaded("tenants=", mark), 15, what="milter reload")
    raw = sign(make_message(sender, "alice@example.org"), lab.keys["acme"], t["signing_domain"], "a1")
    code, text, _ = lab.send(raw, sender, [encode_recipient("alice@example.org", t["relay_domain"])])
    assert code == 550 and "5.7.21" in text and "the key of selector s=a1 expired at 2020-01-01T00:00:00Z (not_after)" in text, text
    raw = sign(make_message(sender, "alice@example.org"), signer["key"], t["signing_domain"], "a2")
    assert lab.send(raw, sender, [encode_recipient("alice@example.org", t["relay_domain"])])[0] == 250
    (lab.tenants_dir / "acme.yaml").write_text(original)  # back to a1 for the tests after this one
    lab.relayctl("apply")


# -- 5. postmaster notices, postfix_extra, hand edits -------------------------------------------


def test_postmaster_notices_reach_the_operator_over_the_operator_smarthost(lab):
    ops = Sink("ops").start()
    sink = lab.sinks["acme"]
    notify = {"address": "postmaster@ops.example", "smarthost": {"host": "127.0.0.1", "port": ops.port, "tls": "none"},
              "classes": ["bounce", "2bounce", "resource", "software"]}
    lab.write_settings(notify=notify)
    try:
        lab.relayctl("apply")
        assert "postmaster@ops.example" in (lab.config_dir / "relay" / "bounce_transport").read_text()
        sink.reply = "550 5.1.1 no such user"
        code, text, mid = send(lab, "acme", "bounces")
        assert code == 250, text
        got = ops.wait(1, timeout=60)
        subjects = [m.header("Subject")[0] for m in got]
        assert any("Postmaster" in s or "Undelivered" in s for s in subjects), subjects
        assert all(m.rcpt_tos == ["postmaster@ops.example"] for m in got)
    finally:
        sink.reply = "250 2.0.0 Ok: queued"
        lab.write_settings()
        lab.relayctl("apply")
        ops.stop()
    assert not [m for m in lab.queue() if any(r["address"] == "postmaster@ops.example" for r in m["recipients"])]


def test_postfix_extra_adds_known_parameters_and_refuses_the_rest(lab):
    try:
        lab.write_settings(postfix_extra={"smtp_connect_timeout": "17s"})
        lab.relayctl("apply")
        r = subprocess.run(["postconf", "-c", str(lab.config_dir), "-h", "smtp_connect_timeout"], capture_output=True, text=True)
        assert r.stdout.strip() == "17s"
        lab.write_settings(postfix_extra={"relay_domains": "evil.example"})
        r = lab.relayctl("check", check=False)
        assert r.returncode == 4
        assert "check failed: settings postfix_extra.relay_domains: the relay sets this parameter itself" in r.stderr
        lab.write_settings(postfix_extra={"smtp_conect_timeout": "17s"})
        r = lab.relayctl("apply", check=False)
        assert r.returncode == 4 and "settings postfix_extra.smtp_conect_timeout: not a Postfix parameter" in r.stderr
    finally:
        lab.write_settings()
        lab.relayctl("apply")


def test_apply_shows_and_refuses_to_undo_a_hand_edit_unless_forced(lab):
    r = subprocess.run(["postconf", "-c", str(lab.config_dir), "-e", "smtp_helo_timeout=123s"], capture_output=True, text=True)
    assert r.returncode == 0
    r = lab.relayctl("apply", check=False)
    assert r.returncode == 4
    assert f"refusing: {lab.config_dir / 'main.cf'} was edited by hand since the last apply" in r.stderr
    assert "+smtp_helo_timeout = 123s" in r.stderr
    assert "smtp_helo_timeout = 123s" in (lab.config_dir / "main.cf").read_text()
    r = lab.relayctl("apply", "--force")
    assert "smtp_helo_timeout" not in (lab.config_dir / "main.cf").read_text()
    assert lab.relayctl("apply").returncode == 0


# -- relayctl status ----------------------------------------------------------------------------


def test_status_all_ok_and_a_dead_milter_socket_is_critical(lab, tmp_path):
    lab.relayctl("track", "--once")
    r = lab.relayctl("status", check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("RELAY OK - ")
    names = [ln.split()[1] for ln in lines[1:]]
    assert names == ["postfix", "milter", "fds", "tenants", "event_store", "tracker", "queue", "certificate"]
    assert re.search(r"OK\s+fds\s+master \d+ open of \d+ \(headroom \d+\); master.cf needs about \d+", r.stdout)
    assert re.search(r"OK\s+milter\s+negotiated protocol 6 on unix:", r.stdout)

    # The same relay seen through a socket with no milter behind it.
    settings = yaml.safe_load(lab.settings_file.read_text())
    dead = tmp_path / "dead.sock"
    import socket

    s = socket.socket(socket.AF_UNIX)
    s.bind(str(dead))  # a socket file nobody accepts on
    settings["milter_socket"] = f"unix:{dead}"
    (tmp_path / "relay.yaml").write_text(yaml.safe_dump(settings))
    r = _relayctl(lab, tmp_path / "relay.yaml", "status", "--json")
    s.close()
    out = json.loads(r.stdout)
    checks = {c["check"]: c for c in out["checks"]}
    assert checks["milter"]["state"] == "critical", checks["milter"]
    assert r.returncode == 2 and out["state"] == "critical"


def _relayctl(lab: Lab, settings, *args: str) -> subprocess.CompletedProcess:
    import sys

    cmd = [sys.executable, "-m", "relay_milter.cli", "--tenants", str(lab.tenants_dir), "--settings", str(settings), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)
