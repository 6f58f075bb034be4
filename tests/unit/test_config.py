"""Tenant and settings validation: every error names the file, the tenant and the field."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from relay_milter.config import ConfigError, Settings, load_settings, load_tenants
from relay_milter.lab import ed25519_key, rsa_key
from support.paths import EXAMPLES

GOOD = """
id: acme
relay_domain: acme.relay.example.net
signing_domain: hop.acme.example
selector: r2026
allowed_sender_domains: [acme.example]
smarthost: {host: smtp.acme.example, port: 587, tls: encrypt, concurrency: 3}
"""


def write(d: Path, name: str, text: str) -> Path:
    p = d / name
    p.write_text(textwrap.dedent(text))
    return p


def test_good_tenant_loads_with_defaults(tmp_path):
    write(tmp_path, "acme.yaml", GOOD)
    ts = load_tenants(tmp_path)
    [t] = ts.tenants
    assert t.id == "acme"
    assert t.smarthost.nexthop == "[smtp.acme.example]:587"
    assert t.required_signed_headers == ("from", "to", "subject")
    assert ts.by_relay_domain("ACME.relay.example.net.") is t
    assert ts.sources["acme"] == tmp_path / "acme.yaml"


def test_examples_shipped_with_the_repo_are_valid():
    ts = load_tenants(EXAMPLES)
    assert len(ts) == 2


@pytest.mark.parametrize(
    "patch, field, message",
    [
        ("colour: blue\n", "colour", "unknown field"),
        ("smarthost: {host: smtp.acme.example, port: 70000}\n", "smarthost.port", "less than or equal to 65535"),
        ("smarthost: {host: smtp.acme.example, tls: sometimes}\n", "smarthost.tls", "'none', 'may', 'encrypt' or 'verify'"),
        ("smarthost: {host: smtp.acme.example, tlsx: may}\n", "smarthost.tlsx", "unknown field"),
        ("relay_domain: not_a_domain\n", "relay_domain", "not a valid DNS domain name"),
        ("allowed_sender_domains: []\n", "allowed_sender_domains", "at least 1 item"),
        ("allowed_senders: [ceo@other.example]\n", "(tenant)", "not in allowed_sender_domains"),
        ("allowed_client_ips: [10.0.0.0/33, 10.0.0.1/8]\n", "allowed_client_ips.0", "not a CIDR network"),
        ("allowed_client_ips: [10.0.0.1/8]\n", "allowed_client_ips.0", "has host bits set"),
        ("public_key: '-----BEGIN PUBLIC KEY-----\\n!!!\\n-----END PUBLIC KEY-----'\n", "public_key", "not valid base64"),
        ("headers: {reply_to: 'not an address'}\n", "headers.reply_to", "not a plain mailbox"),
        ("headers: {strip: ['Bad Header']}\n", "headers.strip.0", "not a valid header field name"),
        ("smarthost: {host: smtp.acme.example, tls: may, auth: {username: u}}\n", "smarthost", "auth needs tls: verify, not may"),
        ("smarthost: {host: smtp.acme.example, tls: encrypt, auth: {username: u}}\n", "smarthost", "auth needs tls: verify, not encrypt"),
        ("smarthost: {host: smtp.acme.example, tls: verify, auth: {username: 'a b'}}\n", "smarthost.auth.username", "printable ASCII"),
        ("smarthost: {host: smtp.acme.example, tls: verify, auth: {username: u, password: p}}\n", "smarthost.auth.password", "unknown field"),
        ("smarthost: {host: 127.0.0.1, tls: encrypt, tls_match: mx.acme.example}\n", "smarthost", "tls_match is only used with tls: verify"),
        ("submission_users: [app1, app1]\n", "submission_users", "listed twice"),
        ("submission_users: ['app1@acme.example']\n", "submission_users", "not a valid submission user name"),
        ("webhook: {url: 'ftp://hooks.acme.example/x'}\n", "webhook.url", "not an http(s) URL"),
        ("webhook: {url: 'https://hooks.acme.example/x', secret: s}\n", "webhook.secret", "unknown field"),
        ("webhook: {url: 'https://hooks.acme.example/x', timeout: 0}\n", "webhook.timeout", "greater than 0"),
    ],
)
def test_bad_values_name_file_tenant_and_field(tmp_path, patch, field, message):
    path = write(tmp_path, "acme.yaml", GOOD + patch)
    with pytest.raises(ConfigError) as exc:
        load_tenants(tmp_path)
    text = str(exc.value)
    assert f"{path}: tenant acme: field {field}:" in text
    assert message in text


def test_bad_id_is_reported(tmp_path):
    write(tmp_path, "x.yaml", GOOD.replace("id: acme", "id: Acme-Corp"))
    with pytest.raises(ConfigError, match=r"tenant Acme-Corp: field id: .*names a Postfix transport"):
        load_tenants(tmp_path)


@pytest.mark.parametrize(
    "other, field",
    [
        ({"relay_domain": "acme.relay.example.net"}, "relay_domain"),
        ({"signing_domain": "hop.acme.example"}, "signing_domain"),
        ({"allowed_sender_domains": "[acme.example]"}, "allowed_sender_domains"),
        ({"submission_users": "[app1]"}, "submission_users"),
    ],
)
def test_tenants_cannot_share_identities(tmp_path, other, field):
    write(tmp_path, "a.yaml", GOOD + "submission_users: [app1]\n")
    second = {
        "id": "globex",
        "relay_domain": "globex.relay.example.net",
        "signing_domain": "hop.globex.example",
        "allowed_sender_domains": "[globex.example]",
    } | other
    write(
        tmp_path,
        "b.yaml",
        "\n".join(f"{k}: {v}" for k, v in second.items()) + "\nselector: s\nsmarthost: {host: mx.globex.example}\n",
    )
    with pytest.raises(ConfigError, match=rf"b.yaml: tenant globex: field {field}: .* already used by tenant acme"):
        load_tenants(tmp_path)


def test_duplicate_id_and_yaml_errors_are_all_reported(tmp_path):
    write(tmp_path, "a.yaml", GOOD)
    write(tmp_path, "b.yaml", GOOD)
    write(tmp_path, "c.yaml", "id: [unclosed\n")
    with pytest.raises(ConfigError) as exc:
        load_tenants(tmp_path)
    assert "b.yaml: tenant acme: field id: duplicate, already defined in" in str(exc.value)
    assert "c.yaml: not valid YAML" in str(exc.value)


def test_list_file_and_empty_directory(tmp_path):
    write(tmp_path, "all.yaml", "tenants:\n" + textwrap.indent(textwrap.dedent(GOOD).replace("id:", "- id:", 1).replace("\nrelay", "\n  relay").replace("\nsigning", "\n  signing").replace("\nselector", "\n  selector").replace("\nallowed", "\n  allowed").replace("\nsmarthost", "\n  smarthost"), "  "))
    assert [t.id for t in load_tenants(tmp_path)] == ["acme"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no tenants defined"):
        load_tenants(empty)


@pytest.mark.parametrize("keyfn", [rsa_key, ed25519_key])
def test_pinned_key_forms_normalise_to_a_txt_record(tmp_path, keyfn):
    key = keyfn() if keyfn is ed25519_key else keyfn(1024)
    write(tmp_path, "a.yaml", GOOD + f"public_key: '{key.txt}'\n")
    assert load_tenants(tmp_path).tenants[0].public_key == key.txt


def test_pem_key_becomes_rsa_record(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    pub = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    pem = pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    write(tmp_path, "a.yaml", GOOD + "public_key: |\n" + textwrap.indent(pem, "  "))
    rec = load_tenants(tmp_path).tenants[0].public_key
    assert rec.startswith("v=DKIM1; k=rsa; p=MI")


def test_client_allowlist_matches_v4_v6_and_mapped(tmp_path):
    write(tmp_path, "a.yaml", GOOD + "allowed_client_ips: [192.0.2.0/24, '2001:db8::/32']\n")
    t = load_tenants(tmp_path).tenants[0]
    assert t.client_allowed("192.0.2.7")
    assert t.client_allowed("::ffff:192.0.2.7")
    assert t.client_allowed("2001:db8::1")
    assert not t.client_allowed("198.51.100.1")
    assert not t.client_allowed(None)
    assert not t.client_allowed("garbage")


def test_settings_defaults_and_errors(tmp_path):
    s = Settings()
    assert s.maximal_queue_lifetime == "48h" and s.authserv == "relay.localdomain"
    assert Settings(milter_socket="inet:127.0.0.1:8891", milter_socket_allow_inet=True).libmilter_socket() == "inet:8891@127.0.0.1"
    p = write(tmp_path, "relay.yaml", "maximal_queue_lifetime: two days\nmilter_sockett: x\n")
    with pytest.raises(ConfigError) as exc:
        load_settings(p)
    assert "field maximal_queue_lifetime: Value error, not a Postfix time value" in str(exc.value)
    assert "field milter_sockett: unknown field" in str(exc.value)


def test_settings_tls_and_submission_go_together(tmp_path):
    p = write(tmp_path, "relay.yaml", "submission_listen: ['587']\n")
    with pytest.raises(ConfigError, match="submission_listen needs tls_cert_file"):
        load_settings(p)
    p = write(tmp_path, "relay.yaml", "tls_cert_file: /etc/ssl/relay.pem\n")
    with pytest.raises(ConfigError, match="tls_cert_file and tls_key_file go together"):
        load_settings(p)
    p = write(tmp_path, "relay.yaml", "smtpd_listen: ['587']\nsubmission_listen: ['587']\ntls_cert_file: /c\ntls_key_file: /k\n")  # hygiene: not a path (never read)
    with pytest.raises(ConfigError, match="587 in both smtpd_listen and submission_listen"):
        load_settings(p)


SMARTHOST_AUTH = "smarthost: {host: smtp.acme.example, port: 587, tls: verify, auth: {username: relay@acme.example}}\n"


def test_secrets_file_errors_name_the_tenant_and_never_the_secret(tmp_path):
    import os

    from relay_milter.config import load_secrets

    d = tmp_path / "tenants"
    d.mkdir()
    write(d, "acme.yaml", GOOD + SMARTHOST_AUTH)
    ts = load_tenants(d)
    secrets = tmp_path / "secrets.yaml"
    with pytest.raises(ConfigError, match=r"secrets.yaml: missing; tenant acme: field smarthost.auth"):
        load_secrets(secrets, ts)
    secrets.write_text("acme: {smarthost_password: 'hunter2-hunter2'}\n")
    os.chmod(secrets, 0o644)
    with pytest.raises(ConfigError, match="mode 0644: secrets must not be readable by others"):
        load_secrets(secrets, ts)
    os.chmod(secrets, 0o600)
    assert load_secrets(secrets, ts)["acme"].smarthost_password == "hunter2-hunter2"
    secrets.write_text("acme: {smarthost_pasword: 'hunter2-hunter2'}\nglobex: {smarthost_password: x}\n")
    with pytest.raises(ConfigError) as exc:
        load_secrets(secrets, ts)
    text = str(exc.value)
    assert "tenant acme: field smarthost_pasword: unknown field" in text
    assert "tenant globex: no such tenant" in text
    assert "hunter2" not in text
    secrets.write_text("acme: {smarthost_password: \"two\\nlines\"}\n")
    with pytest.raises(ConfigError, match="field smarthost_password: Value error, must be a non-empty single line") as exc:
        load_secrets(secrets, ts)
    assert "lines" not in str(exc.value)


def test_tracking_settings_and_the_dsn_override(tmp_path, monkeypatch):
    s = Settings(myhostname="relay1.example.net")
    assert s.tracking.events_dsn == "sqlite:////var/lib/tenant-relay/events.db" and s.node == "relay1.example.net"
    monkeypatch.setenv("RELAY_EVENTS_DSN", "postgresql://relay@db.example.net/relay_events")
    assert s.tracking.dsn() == "postgresql://relay@db.example.net/relay_events"
    p = write(tmp_path, "relay.yaml", "tracking: {events_dsn: 'mysql://x/y', record_wait: -1, colour: blue}\n")
    with pytest.raises(ConfigError) as exc:
        load_settings(p)
    text = str(exc.value)
    assert "field tracking.events_dsn: Value error, use sqlite:////absolute/path.db or postgresql://" in text
    assert "field tracking.record_wait: Input should be greater than or equal to 0" in text
    assert "field tracking.colour: unknown field" in text


def test_a_webhook_needs_its_secret_in_the_secrets_file(tmp_path):
    import os

    from relay_milter.config import load_secrets

    d = tmp_path / "tenants"
    d.mkdir()
    write(d, "acme.yaml", GOOD + "webhook: {url: 'https://hooks.acme.example/relay'}\n")
    ts = load_tenants(d)
    secrets = tmp_path / "secrets.yaml"
    with pytest.raises(ConfigError, match="missing; tenant acme: field webhook needs its webhook_secret there"):
        load_secrets(secrets, ts)
    secrets.write_text("acme: {}\n")
    os.chmod(secrets, 0o600)
    with pytest.raises(ConfigError, match="tenant acme: field webhook_secret: required by the tenant's webhook"):
        load_secrets(secrets, ts)
    secrets.write_text("acme: {webhook_secret: short}\n")
    with pytest.raises(ConfigError, match="field webhook_secret: String should have at least 16 characters") as exc:
        load_secrets(secrets, ts)
    assert "short" not in str(exc.value)
    secrets.write_text("acme: {webhook_secret: 'a-long-enough-secret'}\n")
    assert load_secrets(secrets, ts)["acme"].webhook_secret == "a-long-enough-secret"


def test_the_trackers_secrets_file_needs_only_the_webhook_secrets(tmp_path):
    """The tracker (its own account) reads a file holding the webhook secrets and no
    smarthost password; a tenant with smarthost.auth does not make it invalid."""
    import os

    from relay_milter.config import load_secrets

    d = tmp_path / "tenants"
    d.mkdir()
    write(d, "acme.yaml", GOOD + SMARTHOST_AUTH + "webhook: {url: 'https://hooks.acme.example/relay'}\n")
    ts = load_tenants(d)
    secrets = tmp_path / "tracker-secrets.yaml"
    secrets.write_text("acme: {webhook_secret: 'a-long-enough-secret'}\n")
    os.chmod(secrets, 0o600)
    with pytest.raises(ConfigError, match="tenant acme: field smarthost_password: required by the tenant's smarthost.auth"):
        load_secrets(secrets, ts)
    assert load_secrets(secrets, ts, webhooks_only=True)["acme"].smarthost_password is None
    secrets.unlink()
    with pytest.raises(ConfigError, match="missing; tenant acme: field webhook needs its webhook_secret there"):
        load_secrets(secrets, ts, webhooks_only=True)
