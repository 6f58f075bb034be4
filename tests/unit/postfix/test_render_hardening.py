"""Issue 19: where relayctl writes as root, and what it leaves behind.

- ``render --out DIR`` writes only into a new or empty directory that root owns and only
  root can write to; files are created under fresh names (O_EXCL|O_NOFOLLOW), so a
  planted symlink never makes root overwrite its target (also on install);
- a ``check`` killed with SIGTERM or SIGINT removes its staging directory (which holds
  the smarthost password tables);
- main.cf: only root lists or flushes the queue, AUTH is rate limited.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from relay_milter.config import Settings, load_tenants
from relay_milter.lab import wait_for
from relay_milter.postfix.render import UnsafeDirectory, install, render_files, write_files
from support.classes import class_of
from support.factories import tenant_doc, write_tenants

PASSWORD = "Pa55-word-for-acme-0815"  # pragma: allowlist secret (a fake password the test plants)
NOBODY = 65534

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="relayctl writes Postfix configuration as root")


def relayctl(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relay_milter.cli", *args], capture_output=True, text=True, timeout=120, **kw)


@pytest.fixture
def relay(tmp_path, loopback_dns):
    """Tenant files with a smarthost login, a root-only secrets file, settings."""
    tenants = write_tenants(tmp_path / "tenants", [tenant_doc(
        "acme", smarthost={"host": "smtp.acme.example", "port": 587, "tls": "verify", "auth": {"username": "relay-acme"}})])
    secrets = tmp_path / "secrets.yaml"
    secrets.write_text(f"acme: {{smarthost_password: '{PASSWORD}'}}\n")
    secrets.chmod(0o600)
    config = tmp_path / "postfix"
    config.mkdir()
    settings = tmp_path / "relay.yaml"
    settings.write_text(f"config_directory: {config}\nsecrets_file: {secrets}\nmaillog_file: ''\n" + loopback_dns.yaml())
    return tenants, settings, config


def render(relay, out: Path) -> subprocess.CompletedProcess:
    tenants, settings, _ = relay
    return relayctl("--tenants", str(tenants), "--settings", str(settings), "render", "--out", str(out))


def test_render_into_a_new_directory(relay, tmp_path):
    out = tmp_path / "new"
    r = render(relay, out)
    assert r.returncode == 0, r.stderr
    table = out / "relay" / "smtp_auth" / class_of((out / "relay" / "route").read_text(), "acme")
    assert PASSWORD in table.read_text()
    assert table.stat().st_mode & 0o777 == 0o600 and table.parent.stat().st_mode & 0o777 == 0o700
    assert table.with_name(table.name + ".db").stat().st_mode & 0o777 == 0o600
    assert (out / "main.cf").stat().st_mode & 0o777 == 0o644
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # no temporary file left
    # An existing, empty, root-owned directory is fine too.
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o755)
    assert render(relay, empty).returncode == 0


@needs_root
def test_render_refuses_a_directory_another_user_owns(relay, tmp_path):
    out = tmp_path / "planted"
    out.mkdir(mode=0o755)
    os.chown(out, NOBODY, NOBODY)  # pre-created by another user, who could read what root writes
    r = render(relay, out)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Invalid value for --out" in r.stderr and f"{out}: owned by uid {NOBODY}" in r.stderr
    assert list(out.iterdir()) == []
    assert PASSWORD not in r.stdout + r.stderr


@needs_root
@pytest.mark.parametrize("mode", [0o775, 0o757, 0o1777])
def test_render_refuses_a_directory_others_can_write(relay, tmp_path, mode):
    out = tmp_path / "shared"
    out.mkdir()
    out.chmod(mode)
    r = render(relay, out)
    assert r.returncode == 2
    assert f"{out}: mode {mode & 0o777:04o}: group or others can write there" in r.stderr
    assert list(out.iterdir()) == []


def test_render_refuses_a_non_empty_directory_with_a_planted_tmp_symlink(relay, tmp_path):
    target = tmp_path / "root-only.conf"
    target.write_text("precious\n")
    target.chmod(0o600)
    out = tmp_path / "out"
    (out / "relay" / "smtp_auth").mkdir(parents=True)
    (out / "relay" / "smtp_auth" / "acme.tmp").symlink_to(target)
    (out / "main.cf.tmp").symlink_to(target)
    r = render(relay, out)
    assert r.returncode == 2 and f"{out}: not empty" in r.stderr
    assert target.read_text() == "precious\n" and target.stat().st_mode & 0o777 == 0o600


def test_render_refuses_a_symlinked_output_directory(relay, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    r = render(relay, link)
    assert r.returncode == 2 and "a symlink is not followed" in r.stderr
    assert list(real.iterdir()) == []


def test_install_never_writes_through_a_planted_symlink(relay, tmp_path):
    """The live config directory keeps tables from earlier installs: a symlink at any old or
    new temporary name (or at the table itself) is replaced, its target left alone."""
    tenants, settings_file, config = relay
    target = tmp_path / "shadow"
    target.write_text("root:x:0:0\n")
    target.chmod(0o600)
    auth = config / "relay" / "smtp_auth"
    auth.mkdir(parents=True, mode=0o700)
    (auth / "acme.tmp").symlink_to(target)  # the name the old code wrote through
    (config / "main.cf").symlink_to(target)
    settings = Settings(config_directory=config, secrets_file=tmp_path / "secrets.yaml")
    files = render_files(load_tenants(tenants), settings)
    acme = class_of(files["relay/route"], "acme")
    (auth / f"{acme}.db").symlink_to(target)  # at the table's .db, which postmap builds
    changed = install(files, settings)
    assert f"relay/smtp_auth/{acme}" in changed and "main.cf" in changed
    assert "relay/smtp_auth/acme.tmp (removed)" in changed  # a stale entry: the link is removed
    assert target.read_text() == "root:x:0:0\n"
    assert not (config / "main.cf").is_symlink() and (config / "main.cf").read_text() == files["main.cf"]
    assert (auth / acme).read_text() == files[f"relay/smtp_auth/{acme}"]
    assert (auth / acme).stat().st_mode & 0o777 == 0o600
    assert not (auth / f"{acme}.db").is_symlink() and (auth / f"{acme}.db").stat().st_mode & 0o777 == 0o600
    assert not (auth / "acme.tmp").exists() and not (auth / "acme.tmp").is_symlink()


@needs_root
def test_install_refuses_a_config_subdirectory_another_user_owns(relay, tmp_path):
    tenants, _, config = relay
    (config / "relay").mkdir()
    os.chown(config / "relay", NOBODY, NOBODY)
    settings = Settings(config_directory=config, secrets_file=tmp_path / "secrets.yaml")
    with pytest.raises(UnsafeDirectory, match=f"{config / 'relay'}: owned by uid {NOBODY}"):
        install(render_files(load_tenants(tenants), settings), settings)
    assert not (config / "relay" / "smtp_auth").exists()


def test_write_files_require_empty(tmp_path):
    out = tmp_path / "o"
    write_files({"a/b.txt": "x\n"}, out, require_empty=True)
    with pytest.raises(UnsafeDirectory, match="not empty"):
        write_files({"a/b.txt": "y\n"}, out, require_empty=True)
    write_files({"a/b.txt": "y\n"}, out)  # install semantics: replace in place
    assert (out / "a" / "b.txt").read_text() == "y\n"


# -- a killed check cleans up ----------------------------------------------------------------


@needs_root
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_killed_check_removes_its_staging_directory(relay, tmp_path, sig):
    """``check`` is held at its first Postfix tool by a ``script`` earlier on PATH that
    notes its pid and waits; the test signals relayctl only once the staging directory
    (with the password table in it) exists, so the kill lands mid-run every time."""
    tenants, settings, _ = relay
    shim = tmp_path / "bin"
    shim.mkdir()
    marker = tmp_path / "reached"
    (shim / "script").write_text(textwrap.dedent(f"""\
        #!/bin/sh
        echo $$ > {marker}.part && mv {marker}.part {marker}
        exec sleep 300
        """))
    (shim / "script").chmod(0o755)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir(mode=0o700)
    env = os.environ | {"PATH": f"{shim}:{os.environ['PATH']}", "TMPDIR": str(tmpdir)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay_milter.cli", "--tenants", str(tenants), "--settings", str(settings), "check"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for(lambda: marker.exists() or proc.poll() is not None, 60, what="check to reach postconf")
        assert proc.poll() is None, proc.communicate()
        [staging] = list(tmpdir.iterdir())
        assert staging.name.startswith("relay-staging-")
        [table] = [p for p in (staging / "relay" / "smtp_auth").iterdir() if not p.name.endswith(".db")]
        assert PASSWORD in table.read_text()
        tool_pid = int(marker.read_text())
        proc.send_signal(sig)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -sig  # died of the signal, as a caller expects
    assert list(tmpdir.iterdir()) == []  # the staging directory and the password table are gone
    # The Postfix tool was stopped too. It was relayctl's child: once relayctl is gone it may
    # linger a moment as a zombie until its new parent reaps it, which counts as stopped.
    wait_for(lambda: _stopped(tool_pid), 30, what=f"the Postfix tool (pid {tool_pid}) to stop")


def _stopped(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


# -- main.cf ---------------------------------------------------------------------------------


def test_main_cf_restricts_queue_access_and_limits_auth(relay, tmp_path):
    tenants, _, config = relay
    settings = Settings(config_directory=config, secrets_file=tmp_path / "secrets.yaml")
    main = render_files(load_tenants(tenants), settings)["main.cf"]
    assert "\nauthorized_submit_users = root\n" in main
    assert "\nauthorized_mailq_users = root\n" in main
    assert "\nauthorized_flush_users = root\n" in main
    assert "\nsmtpd_client_auth_rate_limit = 30\n" in main
    s2 = Settings(config_directory=config, secrets_file=tmp_path / "secrets.yaml", queue_readers=("relay-tracker",),
                  smtpd_client_auth_rate_limit=5)
    main2 = render_files(load_tenants(tenants), s2)["main.cf"]
    assert "\nauthorized_mailq_users = root, relay-tracker\n" in main2 and "\nauthorized_flush_users = root\n" in main2
    assert "\nsmtpd_client_auth_rate_limit = 5\n" in main2


@needs_root
def test_apply_refuses_a_config_directory_others_can_write(relay):
    tenants, settings, config = relay
    config.chmod(0o777)
    r = relayctl("--tenants", str(tenants), "--settings", str(settings), "apply", "--no-reload")
    assert r.returncode == 3, r.stdout + r.stderr
    assert f"relayctl: invalid configuration: {config}: mode 0777: group or others can write there" in r.stderr
    assert list(config.iterdir()) == []


def test_render_needs_an_existing_parent(relay, tmp_path):
    r = render(relay, tmp_path / "missing" / "out")
    # I/O, not a refused directory: exit 4 (cli.errors.ExitCode.UNAVAILABLE) with the OS's reason
    assert r.returncode == 4 and f"cannot write into {tmp_path / 'missing' / 'out'}" in r.stderr and "No such file" in r.stderr
    assert not (tmp_path / "missing").exists()
