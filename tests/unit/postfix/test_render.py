"""Rendering and checking the Postfix configuration, and relayctl's contract (output, exit codes)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from relay_milter.config import Settings, load_tenants
from relay_milter.postfix.render import render_files
from support.classes import class_of, entry
from support.paths import EXAMPLES, TEMPLATES

EXAMPLES = EXAMPLES


def relayctl(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "relay_milter.cli", *args], capture_output=True, text=True, timeout=120, cwd=cwd)


@pytest.fixture(scope="module")
def files():
    return render_files(load_tenants(EXAMPLES), Settings())


def test_main_cf_is_closed_and_fails_safe(files):
    main = files["main.cf"]
    assert "relay_domains = hash:/etc/postfix/relay/relay_domains\n" in main
    assert files["relay/relay_domains"].endswith("acme.relay.example.net\tacme\nglobex.relay.example.net\tglobex\n")
    assert "smtpd_relay_restrictions = reject_unauth_destination\n" in main
    assert "mydestination =\n" in main
    assert "milter_default_action = tempfail\n" in main
    assert "default_transport = unrouted\n" in main and "relay_transport = unrouted\n" in main
    assert "defer_transports = unrouted\n" in main
    assert "maximal_queue_lifetime = 48h\n" in main
    acme = class_of(files["relay/route"], "acme")
    assert f"{acme}_destination_concurrency_limit = 10\n" in main


def test_master_cf_has_one_transport_per_class_with_its_tls_policy(files):
    master = files["master.cf"]
    acme, globex = class_of(files["relay/route"], "acme"), class_of(files["relay/route"], "globex")
    assert acme != globex and acme.startswith("rc_") and globex.startswith("rc_")  # tls and concurrency differ
    assert f"{acme} unix -       -       n       -       100       smtp\n" in master
    assert f"{globex} unix -       -       n       -       100       smtp\n" in master
    a = entry(master, acme)
    assert "-o smtp_tls_security_level=verify" in a
    assert f"-o smtp_tls_policy_maps=hash:/etc/postfix/relay/tls/{acme}.policy" in a
    assert f"# Transport class {acme}: tls=verify concurrency=10 (its tenants: relay/route)\n" in master
    assert files[f"relay/tls/{acme}.policy"].endswith(
        "[acme-example.mail.protection.outlook.com]:25\tverify match=acme-example.mail.protection.outlook.com\n"
    )
    assert files[f"relay/tls/{globex}.policy"].endswith("[smtp.globex.example]:587\tencrypt\n")
    assert "smtp_sasl_auth_enable=yes" not in master  # no tenant logs in to its smarthost here
    assert "-o smtp_tls_security_level=encrypt" in entry(master, globex)
    assert "unrouted  unix" in master


def test_route_table_maps_the_marker_to_the_smarthost_only(files):
    route = files["relay/route"]
    acme, globex = class_of(route, "acme"), class_of(route, "globex")
    assert f"\nX-Relay-Route:acme\tFILTER {acme}:[acme-example.mail.protection.outlook.com]:25\n" in route
    assert f"FILTER {globex}:[smtp.globex.example]:587" in route
    bounce = files["relay/bounce_transport"]
    assert f"acme.example\t{acme}:[acme-example.mail.protection.outlook.com]:25" in bounce
    assert f"globex.example\t{globex}:[smtp.globex.example]:587" in bounce


def test_render_command_writes_the_files(tmp_path):
    r = relayctl("--tenants", str(EXAMPLES), "render", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "main.cf").is_file() and (tmp_path / "relay" / "route").is_file()


def test_invalid_tenant_exits_3_naming_file_tenant_field(tmp_path):
    shutil.copytree(EXAMPLES, tmp_path / "t")
    bad = tmp_path / "t" / "globex.yaml"
    bad.write_text(bad.read_text().replace("tls: encrypt", "tls: always"))
    r = relayctl("--tenants", str(tmp_path / "t"), "check")
    assert r.returncode == 3
    assert f"{bad}: tenant globex: field smarthost.tls:" in r.stderr


@pytest.mark.e2e
def test_check_passes_on_the_examples(tmp_path, loopback_dns):
    # A private queue directory, so `postfix check` inspects (and repairs) nothing of the system's.
    (tmp_path / "q").mkdir()
    (tmp_path / "d").mkdir()
    shutil.chown(tmp_path / "d", "postfix", "postfix")
    settings = tmp_path / "relay.yaml"
    settings.write_text(f"config_directory: {tmp_path / 'etc'}\nqueue_directory: {tmp_path / 'q'}\ndata_directory: {tmp_path / 'd'}\n"
                        + loopback_dns.yaml())
    r = relayctl("--tenants", str(EXAMPLES), "--settings", str(settings), "check")
    assert r.returncode == 0, r.stdout + r.stderr
    # The example smarthosts are looked up on the loopback DNS server, which knows none.
    assert "tenant acme: field smarthost.host: acme-example.mail.protection.outlook.com does not resolve" in r.stderr
    assert "staged configuration passed postconf, route lookups and postfix check" in r.stdout
    assert (tmp_path / "q" / "deferred").is_dir()  # postfix check really ran against that queue


@pytest.mark.e2e
def test_apply_refuses_a_config_postfix_rejects_and_installs_nothing(tmp_path, loopback_dns):
    live = tmp_path / "live"
    live.mkdir()
    settings = tmp_path / "relay.yaml"
    settings.write_text(f"config_directory: {live}\nqueue_directory: {tmp_path / 'q'}\ndata_directory: {tmp_path / 'd'}\n"
                        + loopback_dns.yaml())
    templates = tmp_path / "tpl"
    shutil.copytree(TEMPLATES, templates)
    main = templates / "main.cf.j2"
    main.write_text(main.read_text() + "\nmilter_defualt_action = accept\n")  # a typo postconf warns about
    r = relayctl("--tenants", str(EXAMPLES), "--settings", str(settings), "apply", "--templates", str(templates))
    assert r.returncode == 4, r.stdout + r.stderr
    assert "milter_defualt_action" in r.stderr and "nothing was installed" in r.stderr
    assert list(live.iterdir()) == []
    # The good templates install, and a second apply changes nothing.
    r = relayctl("--tenants", str(EXAMPLES), "--settings", str(settings), "apply", "--no-reload")
    assert r.returncode == 0, r.stderr
    assert (live / "main.cf").is_file()
    r = relayctl("--tenants", str(EXAMPLES), "--settings", str(settings), "apply", "--no-reload")
    assert r.returncode == 0 and "configuration unchanged" in r.stdout


def test_submission_listener_requires_tls_and_auth(tmp_path):
    settings = Settings(submission_listen=("587", "127.0.0.1:2525"), tls_cert_file="/etc/ssl/relay.pem", tls_key_file="/etc/ssl/relay.key")
    files = render_files(load_tenants(EXAMPLES), settings)
    master, main = files["master.cf"], files["main.cf"]
    for listen in ("587", "127.0.0.1:2525"):
        block = master.split(f"\n{listen}      inet", 1)[1].split("\n", 9)
        opts = "\n".join(block[1:8])
        assert "-o smtpd_tls_security_level=encrypt" in opts
        assert "-o smtpd_sasl_auth_enable=yes" in opts and "-o smtpd_tls_auth_only=yes" in opts
        assert "-o smtpd_relay_restrictions=permit_sasl_authenticated,reject" in opts
    assert "smtpd_sasl_auth_enable = no\n" in main  # never on port 25
    assert "smtpd_tls_cert_file = /etc/ssl/relay.pem\n" in main
    assert "sasldb_path: /etc/postfix/sasl/sasldb2\n" in files["sasl/smtpd.conf"]


def test_smarthost_password_only_in_a_root_only_table(tmp_path):
    tenants = tmp_path / "tenants"
    shutil.copytree(EXAMPLES, tenants)
    g = tenants / "globex.yaml"
    g.write_text(g.read_text().replace("  tls: encrypt\n", "  tls: verify\n  auth: {username: relay@globex.example}\n"))
    secrets = tmp_path / "secrets.yaml"
    secrets.write_text("globex: {smarthost_password: 'Pa55-word-for-globex'}\n")
    secrets.chmod(0o600)
    settings = tmp_path / "relay.yaml"
    settings.write_text(f"secrets_file: {secrets}\n")
    out = tmp_path / "out"
    r = relayctl("--tenants", str(tenants), "--settings", str(settings), "render", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "Pa55" not in r.stdout + r.stderr
    globex = class_of((out / "relay" / "route").read_text(), "globex")
    table = out / "relay" / "smtp_auth" / globex
    assert table.read_text().endswith("[smtp.globex.example]:587\trelay@globex.example:Pa55-word-for-globex\n")
    db = table.with_name(table.name + ".db")  # postmap's hash: file: as private as its source
    assert table.stat().st_mode & 0o777 == 0o600 and table.parent.stat().st_mode & 0o777 == 0o700
    assert db.stat().st_mode & 0o777 == 0o600
    leaked = [p for p in out.rglob("*") if p.is_file() and p not in (table, db) and b"Pa55" in p.read_bytes()]
    assert leaked == []
    master = entry((out / "master.cf").read_text(), globex)
    assert f"-o smtp_sasl_password_maps=hash:/etc/postfix/relay/smtp_auth/{globex}" in master
    assert "-o smtp_connection_cache_on_demand=no" in master
    # Without the secret the configuration is refused, naming the tenant and the field.
    secrets.write_text("{}\n")
    r = relayctl("--tenants", str(tenants), "--settings", str(settings), "render", "--out", str(out))
    assert r.returncode == 3
    assert "tenant globex: field smarthost_password: required by the tenant's smarthost.auth" in r.stderr


def test_help_lists_the_commands_and_exit_codes():
    r = relayctl("--help")
    assert r.returncode == 0
    for word in ("check", "apply", "render", "milter", "demo", "tenants", "user", "cert", "Exit codes"):
        assert word in r.stdout


def test_source_address_and_rate_render_per_tenant(tmp_path):
    """A tenant bound to a pool address gets its bind address and HELO name on its own
    transport; smarthost.rate becomes the transport's destination_rate_delay; a failover in
    the reputation state moves the tenant to the standby."""
    from relay_milter.config import ReputationSettings, TenantSet
    from support.factories import tenant

    ts = TenantSet(
        (tenant("acme", source_address="127.0.0.2", smarthost={"host": "127.0.0.1", "rate": "20/m"}), tenant("globex"),
         tenant("hooli", source_address="2001:db8::25")),
        {},
    )
    rep = ReputationSettings.model_validate({"state_file": str(tmp_path / "state.json"), "pool": [
        {"address": "127.0.0.2", "helo": "out-a.relay.test"},
        {"address": "127.0.0.4", "helo": "out-c.relay.test", "role": "standby"},
        {"address": "2001:db8::25", "helo": "out6.relay.test"},
    ]})
    settings = Settings(reputation=rep, secrets_file=tmp_path / "none.yaml")
    files = render_files(ts, settings)
    master, route = files["master.cf"], files["relay/route"]
    names = {t: class_of(route, t) for t in ("acme", "globex", "hooli")}
    assert len(set(names.values())) == 3  # different source addresses and rates: different classes
    acme = entry(master, names["acme"])
    assert "-o smtp_bind_address=127.0.0.2\n" in acme and "-o smtp_helo_name=out-a.relay.test\n" in acme
    globex = entry(master, names["globex"])
    assert "smtp_bind_address" not in globex and "smtp_helo_name" not in globex
    hooli = entry(master, names["hooli"])
    assert "-o smtp_bind_address6=2001:db8::25\n" in hooli and "smtp_bind_address=" not in hooli
    assert f"\n{names['acme']}_destination_rate_delay = 3s\n" in files["main.cf"]
    assert f"{names['globex']}_destination_rate_delay" not in files["main.cf"]
    failed_over = render_files(ts, settings, reputation_state={"failovers": {"127.0.0.2": {"to": "127.0.0.4"}}})
    moved = class_of(failed_over["relay/route"], "acme")
    assert moved == names["acme"]  # named after the configured address: queued mail keeps its transport
    acme = entry(failed_over["master.cf"], moved)
    assert "-o smtp_bind_address=127.0.0.4\n" in acme and "-o smtp_helo_name=out-c.relay.test\n" in acme
