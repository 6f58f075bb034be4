"""Issue 19: secrets never in error messages, the secrets file's owner and mode, a smarthost
login only over verified TLS, no inet: milter socket unless allowed.

The error-message tests run the real ``relayctl`` (check, apply, render, track) on files
holding a password and assert that the password appears nowhere in its output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from relay_milter.config import ConfigError, Settings, load_secrets, load_settings, load_tenants
from support.factories import tenant_doc, write_tenants

PASSWORD = "Zq7-hunter2-PASSWORD-4711"


def relayctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relay_milter.cli", *args], capture_output=True, text=True, timeout=120)


def relay_setup(tmp_path: Path, secrets_text: str, settings_extra: str = "") -> tuple[Path, Path, Path]:
    """A tenant that logs in to its smarthost and has a webhook, settings pointing at a
    private config directory, and a root-only secrets file with ``secrets_text``."""
    tenants = write_tenants(tmp_path / "tenants", [tenant_doc(
        "acme",
        smarthost={"host": "smtp.acme.example", "port": 587, "tls": "verify", "auth": {"username": "relay-acme"}},
        webhook={"url": "https://hooks.acme.example/relay"},
    )])
    secrets = tmp_path / "secrets.yaml"
    secrets.write_text(secrets_text)
    secrets.chmod(0o600)
    config = tmp_path / "postfix"
    config.mkdir()
    settings = tmp_path / "relay.yaml"
    settings.write_text(
        f"config_directory: {config}\nqueue_directory: {tmp_path / 'queue'}\nsecrets_file: {secrets}\n"
        f"tracking: {{events_dsn: 'sqlite:///{tmp_path}/events.db', milter_log_file: {tmp_path / 'milter.log'}}}\n"
        f"maillog_file: ''\n" + settings_extra
    )
    return tenants, settings, secrets


# Broken in ways whose PyYAML message quotes the line holding the password (the snippet),
# or names the password itself (an undefined alias, a tag).
MALFORMED_SECRETS = {
    "snippet": f"acme:\n  smarthost_password: {PASSWORD}: oops\n  webhook_secret: 'webhook-secret-0123456789'\n",
    "unclosed quote": f"acme:\n  smarthost_password: '{PASSWORD}\n",
    "tab indent": f"acme:\n\tsmarthost_password: {PASSWORD}\n",
    "alias": f"acme: {{smarthost_password: *{PASSWORD}, webhook_secret: 'webhook-secret-0123456789'}}\n",
    "tag": f"acme: {{smarthost_password: !{PASSWORD} x}}\n",
    "flow": f"acme: [{PASSWORD}\n",
}


@pytest.mark.parametrize("case", sorted(MALFORMED_SECRETS))
@pytest.mark.parametrize("command", [["check"], ["apply", "--no-reload"], ["render", "--out", "OUT"], ["track", "--once"]])
def test_malformed_secrets_file_never_shows_the_password(tmp_path, case, command):
    tenants, settings, secrets = relay_setup(tmp_path, MALFORMED_SECRETS[case])
    command = [str(tmp_path / "out") if a == "OUT" else a for a in command]
    r = relayctl("--tenants", str(tenants), "--settings", str(settings), *command)
    output = r.stdout + r.stderr
    assert r.returncode == 3, output
    assert PASSWORD not in output
    assert PASSWORD[:8] not in output and PASSWORD[-8:] not in output
    assert f"{secrets}: not valid YAML (secrets file): " in r.stderr
    assert "at line " in r.stderr and ", column " in r.stderr
    assert not (tmp_path / "postfix" / "main.cf").exists()  # nothing installed


def test_malformed_settings_never_show_the_database_password(tmp_path):
    tenants, settings, _ = relay_setup(tmp_path, "{}\n")
    settings.write_text(f"tracking:\n  events_dsn: postgresql://relay:{PASSWORD}@db.example.net/events: x\n")
    for command in (["check"], ["tenants"], ["track", "--once"], ["render", "--out", str(tmp_path / "out")]):
        r = relayctl("--tenants", str(tenants), "--settings", str(settings), *command)
        assert r.returncode == 3, r.stderr
        assert PASSWORD not in r.stdout + r.stderr
        assert f"{settings}: not valid YAML (settings): mapping values are not allowed here at line 2, column " in r.stderr


def test_malformed_tenant_file_shows_position_not_content(tmp_path):
    d = tmp_path / "tenants"
    d.mkdir()
    (d / "acme.yaml").write_text(f"id: acme\ndescription: {PASSWORD}: x\n")
    with pytest.raises(ConfigError) as exc:
        load_tenants(d)
    assert str(exc.value) == f"{d / 'acme.yaml'}: not valid YAML (tenant file): mapping values are not allowed here at line 2, column 39"


def test_unreadable_secrets_bytes_are_not_echoed(tmp_path):
    tenants, _, secrets = relay_setup(tmp_path, "")
    secrets.write_bytes(b"acme: {smarthost_password: '" + PASSWORD.encode() + b"\xff'}\n")
    with pytest.raises(ConfigError) as exc:
        load_secrets(secrets, load_tenants(tenants))
    assert PASSWORD not in str(exc.value) and "not UTF-8" in str(exc.value)


# -- the secrets file's owner and mode ----------------------------------------------------

NOBODY = 65534


@pytest.mark.parametrize("uid,mode,problem", [
    (0, 0o600, None),
    (0, 0o400, None),
    (0, 0o640, "mode 0640: secrets must not be readable by others"),
    (0, 0o604, "mode 0604: secrets must not be readable by others"),
    (0, 0o610, "mode 0610: secrets must not be readable by others"),
    (NOBODY, 0o600, f"owned by uid {NOBODY}: secrets must belong to root"),
    (NOBODY, 0o644, f"owned by uid {NOBODY}: secrets must belong to root"),
])
def test_secrets_file_must_be_root_only(tmp_path, uid, mode, problem):
    if os.geteuid() != 0:
        pytest.skip("needs root to chown the file")
    tenants, _, secrets = relay_setup(
        tmp_path, f"acme: {{smarthost_password: '{PASSWORD}', webhook_secret: 'webhook-secret-0123456789'}}\n")
    os.chown(secrets, uid, 0)
    secrets.chmod(mode)
    ts = load_tenants(tenants)
    if problem is None:
        assert load_secrets(secrets, ts)["acme"].smarthost_password == PASSWORD
        return
    with pytest.raises(ConfigError) as exc:
        load_secrets(secrets, ts)
    assert str(exc.value).startswith(f"{secrets}: ") and problem in str(exc.value)
    assert PASSWORD not in str(exc.value)


# -- a smarthost login needs verified TLS -------------------------------------------------


@pytest.mark.parametrize("tls", ["none", "may", "encrypt"])
def test_smarthost_login_without_verified_tls_is_refused(tmp_path, tls):
    d = write_tenants(tmp_path / "tenants", [tenant_doc(
        "acme", smarthost={"host": "smtp.acme.example", "port": 587, "tls": tls, "auth": {"username": "relay-acme"}})])
    with pytest.raises(ConfigError) as exc:
        load_tenants(d)
    assert str(exc.value) == (
        f"{d / 'acme.yaml'}: tenant acme: field smarthost: Value error, auth needs tls: verify, not {tls} "
        "(without a verified certificate an active attacker between relay and smarthost collects the password)"
    )


def test_check_refuses_login_over_encrypt_with_exit_3(tmp_path):
    tenants, settings, _ = relay_setup(tmp_path, f"acme: {{smarthost_password: '{PASSWORD}'}}\n")
    doc = yaml.safe_load((tenants / "acme.yaml").read_text())
    doc["smarthost"]["tls"] = "encrypt"
    (tenants / "acme.yaml").write_text(yaml.safe_dump(doc))
    r = relayctl("--tenants", str(tenants), "--settings", str(settings), "check")
    assert r.returncode == 3
    assert f"{tenants / 'acme.yaml'}: tenant acme: field smarthost: Value error, auth needs tls: verify, not encrypt" in r.stderr


# -- inet: milter sockets ------------------------------------------------------------------


def test_inet_milter_socket_is_refused_unless_allowed(tmp_path):
    p = tmp_path / "relay.yaml"
    p.write_text("milter_socket: inet:127.0.0.1:8891\n")
    with pytest.raises(ConfigError) as exc:
        load_settings(p)
    assert str(exc.value).startswith(f"{p}: settings: field milter_socket: Value error, an inet: socket lets any local user")
    p.write_text("milter_socket: inet:127.0.0.1:8891\nmilter_socket_allow_inet: true\n")
    assert load_settings(p).libmilter_socket() == "inet:8891@127.0.0.1"
    assert Settings().milter_socket.startswith("unix:/")
    assert Settings(milter_socket="unix:/run/m.sock").milter_socket_allow_inet is False
