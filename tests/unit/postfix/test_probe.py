"""`relayctl check --probe` against real SMTP servers on loopback (aiosmtpd sinks with real
TLS certificates from a test CA, and SMTP AUTH)."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay_milter.lab import Sink
from relay_milter.lab.harness import free_port
from relay_milter.postfix.certs import make_ca, make_cert
from relay_milter.postfix.probe import probe
from support.factories import tenant


@pytest.fixture(scope="module")
def ca():
    return make_ca("Probe Test CA")


@pytest.fixture(scope="module")
def tls_sink(ca):
    sink = Sink("tls", tls=make_cert(["mx.acme.test"], ca)).start()
    yield sink
    sink.stop()


@pytest.fixture(scope="module")
def auth_sink(ca):
    sink = Sink("auth", tls=make_cert(["mx.acme.test"], ca), auth=("relay", "s3cret-pass")).start()
    yield sink
    sink.stop()


@pytest.fixture(scope="module")
def plain_sink():
    sink = Sink("plain").start()
    yield sink
    sink.stop()


def ca_file(tmp_path: Path, ca) -> Path:
    path = tmp_path / "ca.pem"
    path.write_bytes(ca.cert_pem)
    return path


def levels(res) -> list[str]:
    return [lv for lv, _ in res.findings]


def test_verify_under_the_tenants_ca_passes(tls_sink, ca, tmp_path):
    t = tenant("acme", smarthost={"host": "127.0.0.1", "port": tls_sink.port, "tls": "verify",
                                  "ca_file": str(ca_file(tmp_path, ca)), "tls_match": "mx.acme.test"})
    res = probe(t)
    assert res.ok, res.findings
    texts = [tx for _, tx in res.findings]
    assert texts[0].startswith("banner: 220 ")
    assert any(tx.startswith("STARTTLS: TLSv1.") and tx.endswith("certificate verified for mx.acme.test") for tx in texts), texts
    assert tls_sink.messages == []  # nothing was sent


def test_verify_against_another_ca_or_name_is_an_error(tls_sink, tmp_path):
    other = ca_file(tmp_path, make_ca("Another CA"))
    t = tenant("acme", smarthost={"host": "127.0.0.1", "port": tls_sink.port, "tls": "verify", "ca_file": str(other), "tls_match": "mx.acme.test"})
    res = probe(t)
    assert not res.ok
    assert "certificate does not verify for mx.acme.test" in res.findings[-1][1] and "mail would wait deferred" in res.findings[-1][1]


def test_a_wrong_name_under_encrypt_is_only_a_warning(tls_sink):
    t = tenant("acme", smarthost={"host": "127.0.0.1", "port": tls_sink.port, "tls": "encrypt"})
    res = probe(t)
    assert res.ok and levels(res)[-1] == "warning"
    assert "accepted under tls: encrypt" in res.findings[-1][1]


def test_encrypt_without_starttls_is_an_error(plain_sink):
    res = probe(tenant("acme", smarthost={"host": "127.0.0.1", "port": plain_sink.port, "tls": "encrypt"}))
    assert not res.ok and "STARTTLS not offered (tls: encrypt: mail would wait deferred)" in res.findings[-1][1]
    res = probe(tenant("acme", smarthost={"host": "127.0.0.1", "port": plain_sink.port, "tls": "none"}))
    assert res.ok and levels(res) == ["ok", "ok"]


def test_auth_offered_and_the_login_tried(auth_sink, ca, tmp_path):
    sh = {"host": "127.0.0.1", "port": auth_sink.port, "tls": "verify", "ca_file": str(ca_file(tmp_path, ca)),
          "tls_match": "mx.acme.test", "auth": {"username": "relay"}}
    res = probe(tenant("acme", smarthost=sh), password="s3cret-pass")
    assert res.ok, res.findings
    assert res.findings[-1] == ("ok", "AUTH as relay: accepted")
    res = probe(tenant("acme", smarthost=sh), password="wrong")
    assert not res.ok and res.findings[-1][1].startswith("AUTH as relay: refused (535)")


def test_nobody_listening(tmp_path):
    res = probe(tenant("acme", smarthost={"host": "127.0.0.1", "port": free_port(), "tls": "none"}), timeout=5)
    assert not res.ok and res.findings[0][1].startswith("cannot connect to 127.0.0.1:")


def test_a_smarthost_name_is_resolved_with_the_settings_resolver(tls_sink, ca, tmp_path, loopback_dns):
    """mx.acme.test is known only to the loopback DNS server of settings ``dns``: the probe
    finds the sink through it and verifies the certificate for the name, not the address."""
    from relay_milter.config import DnsSettings

    dns = DnsSettings(**loopback_dns.settings)
    t = tenant("acme", smarthost={"host": "mx.acme.test", "port": tls_sink.port, "tls": "verify",
                                  "ca_file": str(ca_file(tmp_path, ca))})
    res = probe(t, dns=dns)
    assert res.ok, res.findings
    assert any(tx.endswith("certificate verified for mx.acme.test") for _, tx in res.findings), res.findings
    res = probe(tenant("acme", smarthost={"host": "smtp.nowhere.test", "port": tls_sink.port, "tls": "none"}), dns=dns)
    assert not res.ok
    assert res.findings == [("error", f"cannot connect to smtp.nowhere.test:{tls_sink.port}: smtp.nowhere.test does not "
                                      "resolve: the name does not exist (NXDOMAIN) (mail for acme waits deferred)")]
