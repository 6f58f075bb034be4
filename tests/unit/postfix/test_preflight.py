"""What `relayctl check` verifies beyond the tenant files: the relay's certificate and key,
CA files, pinned keys, smarthost names (postfix/preflight.py), with real files and keys."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from relay_milter.config import DnsSettings, Settings
from relay_milter.lab import rsa_key
from relay_milter.postfix import preflight
from relay_milter.postfix.certs import make_ca, make_cert
from support.factories import tenant


def settings(tmp_path: Path, cert: Path, key: Path) -> Settings:
    return Settings(tls_cert_file=cert, tls_key_file=key, config_directory=tmp_path)


def relay_tls(tmp_path: Path, days: int = 365) -> tuple[Path, Path]:
    cert, key = tmp_path / "relay.pem", tmp_path / "relay.key"
    make_cert(["relay.test"], days=days).write(cert, key)
    return cert, key


def findings(pf: preflight.Preflight, level: str) -> list[str]:
    return [str(f) for f in pf.findings if f.level == level]


def test_a_good_certificate_reports_its_days_left(tmp_path):
    cert, key = relay_tls(tmp_path, days=90)
    pf = preflight.Preflight()
    preflight.check_relay_tls(settings(tmp_path, cert, key), pf)
    assert not pf.errors and not pf.warnings
    assert pf.cert_days_left in (89, 90)
    assert findings(pf, "ok")[0].startswith("ok: settings tls_cert_file: valid until ")


def test_a_missing_key_file_is_an_error_naming_it(tmp_path):
    cert, _ = relay_tls(tmp_path)
    pf = preflight.Preflight()
    preflight.check_relay_tls(settings(tmp_path, cert, tmp_path / "gone.key"), pf)
    assert findings(pf, "error") == [
        f"error: settings tls_key_file: {tmp_path / 'gone.key'} does not exist (Postfix would offer no STARTTLS: 454 4.7.0 TLS not available)"
    ]


def test_a_key_of_another_certificate_is_an_error(tmp_path):
    cert, _ = relay_tls(tmp_path)
    other_cert, other_key = tmp_path / "o.pem", tmp_path / "o.key"
    make_cert(["other.test"]).write(other_cert, other_key)
    pf = preflight.Preflight()
    preflight.check_relay_tls(settings(tmp_path, cert, other_key), pf)
    assert findings(pf, "error") == [f"error: settings tls_key_file: {other_key} does not belong to the certificate in {cert}"]


def test_an_expired_and_an_expiring_certificate(tmp_path):
    cert, key = relay_tls(tmp_path, days=10)
    s = settings(tmp_path, cert, key)
    pf = preflight.Preflight()
    preflight.check_relay_tls(s, pf)
    assert [f.level for f in pf.findings] == ["warning"] and "expires in" in pf.findings[0].text
    pf = preflight.Preflight()
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=11)
    preflight.check_relay_tls(s, pf, now=later)
    assert [f.level for f in pf.findings] == ["error"] and "expired at" in pf.findings[0].text


def test_garbage_instead_of_a_certificate(tmp_path):
    _, key = relay_tls(tmp_path)
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    pf = preflight.Preflight()
    preflight.check_relay_tls(settings(tmp_path, bad, key), pf)
    assert len(pf.errors) == 1 and "not a PEM certificate" in pf.errors[0].text


def test_ca_file_missing_or_without_certificates(tmp_path):
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    good = tmp_path / "ca.pem"
    good.write_bytes(make_ca("Test CA").cert_pem)
    for path, want in ((tmp_path / "none.pem", "does not exist"), (empty, "holds no PEM certificate"), (good, None)):
        t = tenant("acme", smarthost={"host": "127.0.0.1", "tls": "verify", "ca_file": str(path), "tls_match": "mx.acme.test"})
        pf = preflight.Preflight()
        preflight.check_ca_file(t, Path("acme.yaml"), pf)
        if want is None:
            assert pf.findings == []
        else:
            assert [f.subject for f in pf.errors] == ["acme.yaml: tenant acme: field smarthost.ca_file"] and want in pf.errors[0].text


def test_a_weak_pinned_key_is_named(tmp_path):
    pf = preflight.Preflight()
    preflight.check_pinned_key(tenant("weak", rsa_key(512)), Path("weak.yaml"), pf)
    assert [str(f) for f in pf.warnings] == [
        "warning: weak.yaml: tenant weak: field public_key: RSA key of 512 bits: the milter refuses signatures by keys under 1024 bits"
    ]
    pf = preflight.Preflight()
    preflight.check_pinned_key(tenant("ok", rsa_key(2048)), Path("ok.yaml"), pf)
    assert pf.findings == []


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "mx.acme.test"])
def test_smarthost_names_that_resolve_pass(host, loopback_dns):
    """Addresses pass as they are; a name is asked of the resolver in settings ``dns`` (here
    a dnsmasq on loopback that knows mx.acme.test), never of the system resolver."""
    dns = DnsSettings(**loopback_dns.settings)
    assert preflight.resolve_host(host, dns) is None
    pf = preflight.Preflight()
    preflight.check_smarthost_name(tenant("acme", smarthost={"host": host, "tls": "none"}), Path("acme.yaml"), Settings(dns=dns), True, pf)
    assert pf.findings == []


@pytest.mark.parametrize("strict,level", [(False, "warning"), (True, "error")])
def test_a_smarthost_name_that_does_not_resolve_is_named(strict, level, loopback_dns):
    dns = DnsSettings(**loopback_dns.settings)
    assert preflight.lookup_addresses("mx.acme.test", dns) == (["127.0.0.1"], None)
    pf = preflight.Preflight()
    t = tenant("acme", smarthost={"host": "smtp.nowhere.test", "tls": "none"})
    preflight.check_smarthost_name(t, Path("acme.yaml"), Settings(dns=dns), strict, pf)
    assert [str(f) for f in pf.findings] == [
        f"{level}: acme.yaml: tenant acme: field smarthost.host: smtp.nowhere.test does not resolve: the name does not "
        "exist (NXDOMAIN) (mail for this tenant would wait in the deferred queue)"
    ]
