"""relayctl's one exit-code table (cli.errors.ExitCode): every documented code is what a
real invocation returns, errors come as one `relayctl: ...` line on stderr, and the table
shown by `relayctl --help` and the README is the one in the code."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from relay_milter.cli import main
from relay_milter.cli.errors import ExitCode
from relay_milter.tracking import store as eventstore
from support.factories import tenant_doc, write_tenants
from support.paths import REPO, TEMPLATES


@pytest.fixture
def relay(tmp_path: Path, loopback_dns):
    """A tenants directory and a settings file that point only into tmp_path."""
    tenants = write_tenants(tmp_path / "tenants", [tenant_doc("acme"), tenant_doc("globex")])
    settings = tmp_path / "relay.yaml"
    settings.write_text(yaml.safe_dump({
        "config_directory": str(tmp_path / "no-postfix"),
        "secrets_file": str(tmp_path / "secrets.yaml"),
        "tls_cert_file": str(tmp_path / "tls" / "relay.pem"),
        "tls_key_file": str(tmp_path / "tls" / "relay.key"),
        "tracking": {"events_dsn": f"sqlite:///{tmp_path / 'events.db'}", "node": "relay1"},
        "dns": loopback_dns.settings,  # check: smarthost names are looked up on loopback only
    }))

    def run(*args: str, tenants_dir: Path = tenants):
        return CliRunner().invoke(main, ["--tenants", str(tenants_dir), "--settings", str(settings), *args])

    run.tmp = tmp_path
    return run


def test_the_table_has_one_meaning_per_code():
    assert [int(c) for c in ExitCode] == [0, 1, 2, 3, 4, 5]
    assert ExitCode.UNAVAILABLE is ExitCode.CHECK_FAILED  # one code, two names for readability


def test_0_success(relay):
    r = relay("tenants", "--json")
    assert r.exit_code == ExitCode.OK == 0, r.output
    assert [t["id"] for t in json.loads(r.stdout)] == ["acme", "globex"]
    assert r.stderr == ""


def test_1_nothing_found(relay):
    eventstore.open_store(f"sqlite:///{relay.tmp / 'events.db'}").close()  # an empty store
    r = relay("trace", "<nothing@example>")
    assert r.exit_code == ExitCode.FAILED == 1, r.output
    assert r.stderr == "relayctl: nothing recorded for <nothing@example>\n"


def test_1_request_refused(relay):
    r = relay("cert", "selfsigned", "--name", "relay.test")
    assert r.exit_code == 0, r.output
    r = relay("cert", "selfsigned", "--name", "relay.test")
    assert r.exit_code == ExitCode.FAILED == 1
    assert r.stderr.startswith("relayctl: ") and "exists (use --force to replace it)" in r.stderr


@pytest.mark.parametrize(
    "args, text",
    [
        (["tenants", "--nope"], "--nope"),
        (["stats", "--since", "yesterday"], "duration like 15m"),
        (["user", "add", "app1", "--password-stdin", "--generate"], "exclude each other"),
    ],
)
def test_2_usage_error(relay, args, text):
    r = relay(*args)
    assert r.exit_code == ExitCode.USAGE == 2, r.output
    assert text in r.stderr


def test_3_invalid_configuration(relay, tmp_path):
    bad = write_tenants(tmp_path / "bad", [tenant_doc("acme", smarthost={"host": "127.0.0.1", "tls": "sometimes"})])
    r = relay("check", tenants_dir=bad)
    assert r.exit_code == ExitCode.CONFIG == 3, r.output
    assert r.stderr.startswith("relayctl: invalid configuration:")
    assert f"{bad / 'acme.yaml'}: tenant acme: field smarthost.tls:" in r.stderr
    r = relay("stats", "--tenant", "initech")
    assert r.exit_code == 3 and r.stderr.startswith("relayctl: unknown tenant 'initech'")


def test_key_rotate_uses_the_table(relay, tmp_path):
    r = relay("key", "rotate", "initech")
    assert r.exit_code == ExitCode.CONFIG == 3, r.output
    assert r.stderr.startswith("relayctl: unknown tenant 'initech' (configured: acme, globex)")
    existing = tmp_path / "acme.key"
    existing.write_text("keep me\n")
    r = relay("key", "rotate", "acme", "--private-key-out", str(existing))
    assert r.exit_code == ExitCode.FAILED == 1, r.output
    assert r.stderr == f"relayctl: {existing} exists; choose another --private-key-out\n"
    assert existing.read_text() == "keep me\n"


def test_status_alone_exits_with_nagios_codes(relay):
    """No Postfix runs for these settings: CRITICAL is 2 (the table's 2 would be a usage error)."""
    r = relay("status", "--json")
    out = json.loads(r.stdout)
    checks = {c["check"]: c["state"] for c in out["checks"]}
    assert checks["postfix"] == "critical"
    assert r.exit_code == out["exit_code"] == 2 and out["state"] == "critical", r.output
    r = relay("status")
    assert r.exit_code == 2 and r.stdout.startswith("RELAY CRITICAL - postfix: not running")


def test_operator_commands_fall_back_to_the_applied_tenant_set(relay, tmp_path):
    from relay_milter.config import dump_tenant_set, load_tenants

    good = relay.tmp / "tenants"
    applied = relay.tmp / "no-postfix" / "relay" / "tenants.applied.json"
    applied.parent.mkdir(parents=True)
    applied.write_text(dump_tenant_set(load_tenants(good)))
    bad = write_tenants(tmp_path / "bad", [tenant_doc("acme", smarthost={"host": "127.0.0.1", "tls": "sometimes"})])
    eventstore.open_store(f"sqlite:///{relay.tmp / 'events.db'}").close()
    r = relay("trace", "<nothing@example>", tenants_dir=bad)
    assert r.exit_code == ExitCode.FAILED == 1, r.output  # it ran: nothing recorded
    assert "relayctl: warning: the tenant files are invalid:" in r.stderr
    assert f"relayctl: warning: using the last applied tenant set instead ({applied}, applied " in r.stderr
    # check never falls back: it exists to show the error.
    r = relay("check", tenants_dir=bad)
    assert r.exit_code == ExitCode.CONFIG == 3 and "last applied" not in r.stderr


def test_3_a_config_error_raised_deep_inside_a_command(relay):
    # render_files reads the secrets file and raises ConfigError; cli.errors.reported maps it.
    secrets = relay.tmp / "secrets.yaml"
    secrets.write_text(yaml.safe_dump({"initech": {}}))
    secrets.chmod(0o600)
    r = relay("render", "--out", str(relay.tmp / "out"), "--templates", str(TEMPLATES))
    assert r.exit_code == 3, r.output
    assert r.stderr.startswith("relayctl: invalid configuration:")
    assert f"{secrets}: tenant initech: no such tenant" in r.stderr


def test_4_event_store_unavailable(relay):
    r = relay("trace", "x")
    assert r.exit_code == ExitCode.UNAVAILABLE == 4, r.output
    assert f"relayctl: event store {relay.tmp / 'events.db'} does not exist" in r.stderr
    assert not (relay.tmp / "events.db").exists()


@pytest.mark.skipif(shutil.which("postqueue") is None, reason="needs Postfix's postqueue")
def test_4_postfix_unavailable(relay):
    r = relay("queue")
    assert r.exit_code == ExitCode.UNAVAILABLE == 4, r.output
    assert r.stderr.startswith(f"relayctl: postqueue -c {relay.tmp / 'no-postfix'} -j failed (exit ")


def test_4_output_cannot_be_written(relay):
    plain = relay.tmp / "plain"
    plain.write_text("a file, not a directory\n")
    r = relay("render", "--out", str(plain / "out"), "--templates", str(TEMPLATES))
    assert r.exit_code == ExitCode.UNAVAILABLE == 4, r.output
    assert r.stderr.startswith(f"relayctl: cannot write into {plain / 'out'}: ")
    assert "Traceback" not in r.stderr


def test_5_unexpected_error_prints_the_traceback(relay):
    templates = relay.tmp / "templates"
    shutil.copytree(TEMPLATES, templates)
    (templates / "main.cf.j2").write_text("{% if %}\n")  # not a template any more
    r = relay("render", "--out", str(relay.tmp / "out"), "--templates", str(templates))
    assert r.exit_code == ExitCode.INTERNAL == 5, r.output
    assert "Traceback (most recent call last)" in r.stderr
    assert r.stderr.rstrip().splitlines()[-1].startswith("relayctl: unexpected error: TemplateSyntaxError: ")


def _help_table(text: str) -> dict[int, str]:
    """The 'Exit codes' table of relayctl --help, one entry per code, wrapped lines joined
    (it ends at the first blank line: the status command's note and the environment follow)."""
    table: dict[int, str] = {}
    code = None
    for line in text.split("Exit codes (stable, for scripts):", 1)[1].splitlines():
        m = re.match(r"^\s+(\d)  (.*)$", line)
        if m:
            code = int(m.group(1))
            table[code] = m.group(2)
        elif not line.strip() and code is not None:
            break
        elif code is not None:
            table[code] += " " + line.strip()
    return table


@pytest.mark.parametrize("argv", [[sys.executable, "-m", "relay_milter.cli"], [str(Path(sys.executable).parent / "relayctl")]])
def test_help_shows_the_table_through_both_entry_points(argv):
    r = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert _help_table(r.stdout) == {int(c): c.meaning for c in ExitCode}
    # The one exception, next to the table: status exits with the Nagios plugin codes.
    assert "`relayctl status` alone exits with the Nagios plugin codes instead:" in r.stdout
    assert "0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN" in r.stdout
    assert "RELAY_SETTINGS    settings file (as --settings)" in r.stdout


def test_readme_documents_the_same_table():
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## relayctl\n", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `(\d)` \| (.+?) \|$", section, re.M))
    assert {int(k): v for k, v in rows.items()} == {int(c): c.meaning for c in ExitCode}
