"""Rendering and checking the Postfix configuration, and relayctl's contract (output, exit codes)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from relay_milter.config import Settings, load_tenants
from relay_milter.render import render_files

EXAMPLES = Path(__file__).parents[1] / "examples" / "tenants"


def relayctl(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "relay_milter.cli", *args], capture_output=True, text=True, timeout=120, cwd=cwd)


@pytest.fixture(scope="module")
def files():
    return render_files(load_tenants(EXAMPLES), Settings())


def test_main_cf_is_closed_and_fails_safe(files):
    main = files["main.cf"]
    assert "relay_domains = acme.relay.example.net globex.relay.example.net\n" in main
    assert "smtpd_relay_restrictions = reject_unauth_destination\n" in main
    assert "mydestination =\n" in main
    assert "milter_default_action = tempfail\n" in main
    assert "default_transport = unrouted\n" in main and "relay_transport = unrouted\n" in main
    assert "defer_transports = unrouted\n" in main
    assert "maximal_queue_lifetime = 48h\n" in main
    assert "relay_acme_destination_concurrency_limit = 10\n" in main


def test_master_cf_has_one_transport_per_tenant_with_its_tls_policy(files):
    master = files["master.cf"]
    assert "relay_acme unix -       -       n       -       10       smtp\n" in master
    assert "relay_globex unix -       -       n       -       4       smtp\n" in master
    acme = master.split("relay_acme unix", 1)[1].split("# Tenant", 1)[0]
    assert "-o smtp_tls_security_level=verify" in acme
    globex = master.split("relay_globex unix", 1)[1]
    assert "-o smtp_tls_security_level=encrypt" in globex
    assert "unrouted  unix" in master


def test_route_table_maps_the_marker_to_the_smarthost_only(files):
    route = files["relay/route.regexp"]
    assert "/^X-Relay-Route:[[:space:]]*acme[[:space:]]*$/ FILTER relay_acme:[acme-example.mail.protection.outlook.com]:25\n" in route
    assert "FILTER relay_globex:[smtp.globex.example]:587" in route
    bounce = files["relay/bounce_transport"]
    assert "acme.example\trelay_acme:[acme-example.mail.protection.outlook.com]:25" in bounce
    assert "globex.example\trelay_globex:[smtp.globex.example]:587" in bounce


def test_render_command_writes_the_files(tmp_path):
    r = relayctl("--tenants", str(EXAMPLES), "render", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "main.cf").is_file() and (tmp_path / "relay" / "route.regexp").is_file()


def test_invalid_tenant_exits_3_naming_file_tenant_field(tmp_path):
    shutil.copytree(EXAMPLES, tmp_path / "t")
    bad = tmp_path / "t" / "globex.yaml"
    bad.write_text(bad.read_text().replace("tls: encrypt", "tls: always"))
    r = relayctl("--tenants", str(tmp_path / "t"), "check")
    assert r.returncode == 3
    assert f"{bad}: tenant globex: field smarthost.tls:" in r.stderr


@pytest.mark.e2e
def test_check_passes_on_the_examples(tmp_path):
    # A private queue directory, so `postfix check` inspects (and repairs) nothing of the system's.
    (tmp_path / "q").mkdir()
    (tmp_path / "d").mkdir()
    shutil.chown(tmp_path / "d", "postfix", "postfix")
    settings = tmp_path / "relay.yaml"
    settings.write_text(f"config_directory: {tmp_path / 'etc'}\nqueue_directory: {tmp_path / 'q'}\ndata_directory: {tmp_path / 'd'}\n")
    r = relayctl("--tenants", str(EXAMPLES), "--settings", str(settings), "check")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "staged configuration passed postconf, route lookups and postfix check" in r.stdout
    assert (tmp_path / "q" / "deferred").is_dir()  # postfix check really ran against that queue


@pytest.mark.e2e
def test_apply_refuses_a_config_postfix_rejects_and_installs_nothing(tmp_path):
    live = tmp_path / "live"
    live.mkdir()
    settings = tmp_path / "relay.yaml"
    settings.write_text(f"config_directory: {live}\nqueue_directory: {tmp_path / 'q'}\ndata_directory: {tmp_path / 'd'}\n")
    templates = tmp_path / "tpl"
    shutil.copytree(Path(__file__).parents[1] / "postfix-templates", templates)
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


def test_help_lists_the_commands_and_exit_codes():
    r = relayctl("--help")
    assert r.returncode == 0
    for word in ("check", "apply", "render", "milter", "demo", "tenants", "Exit codes"):
        assert word in r.stdout
