"""The Ansible role applied to this machine, for real: two relay nodes fed by one play.

Each "host" of the generated inventory is a private relay on this machine
(``ansible_connection=local``, its own Postfix config/queue/data directories
under /var/tmp, smtpd on a free loopback port, its own venv and milter), so the
play never touches the system's /etc/postfix. ``relay_service_manager=direct``
because PID 1 is not systemd here; the tracker runs too (each node with its own SQLite store).

One converged deployment is shared by the tests below, in file order:
mail flows through both nodes -> a second run is changed=0 -> --check --diff
shows a tenant change without applying it -> a bad tenant fails the play
before anything live changes -> one tenant is added and another removed on
the running relays while mail for an existing tenant keeps flowing.
"""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml

from relay_milter.core.addresses import encode_recipient
from relay_milter.tracking.events import Kind
from relay_milter.tracking.store import open_store
from relay_milter.lab import DnsServer, Sink, free_port, make_message, rsa_key, sign, wait_for
from support.factories import unavailable
from support.paths import REPO

pytestmark = pytest.mark.e2e


ANSIBLE_DIR = REPO / "ansible"
BIN = Path(sys.executable).parent
HOSTS = ("relay1", "relay2")
PLAY_TIMEOUT = 600


def _tool(name: str) -> str:
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found:
        return found
    unavailable(f"{name} not installed (deps/pip/ansible.txt; run scripts/bootstrap.sh)")


class Tenant:
    def __init__(self, tid: str, sink: Sink):
        self.id = tid
        self.key = rsa_key(2048)
        self.sink = sink
        self.relay_domain = f"{tid}.relay.test"
        self.signing_domain = f"hop.{tid}.test"
        self.selector = "s1"
        self.sender_domain = f"{tid}.example"

    def definition(self, **extra) -> dict:
        return {
            "id": self.id,
            "description": f"{self.id} (CI)",
            "relay_domain": self.relay_domain,
            "signing_domain": self.signing_domain,
            "selector": self.selector,
            "public_key": self.key.txt,
            "allowed_sender_domains": [self.sender_domain],
            "smarthost": {"host": "127.0.0.1", "port": self.sink.port, "tls": "none"},
            **({"submission_users": [f"{self.id}-app"]} if self.id == "acme" else {}),
            **extra,
        }

    def signed(self, to: str, subject: str) -> bytes:
        msg = make_message(f"news@{self.sender_domain}", encode_recipient(to, self.relay_domain), subject=subject)
        return sign(msg, self.key, self.signing_domain, self.selector)


class Deployment:
    """A generated inventory (two local hosts), its vault, and helpers to run the play."""

    def __init__(self):
        self.base = Path(tempfile.mkdtemp(prefix="relay-ansible-", dir="/var/tmp"))
        os.chmod(self.base, 0o755)
        self.inventory = self.base / "inventory"
        self.group_vars = self.inventory / "group_vars" / "relays"
        self.group_vars.mkdir(parents=True)
        self.vault_password = self.base / "vault-password"
        self.vault_password.write_text(os.urandom(16).hex() + "\n")
        os.chmod(self.vault_password, 0o600)
        self.secrets = {"acme": {"smarthost_password": os.urandom(8).hex()}}
        self.users = {"acme-app": os.urandom(12).hex()}  # submission logins, from the vault
        self.sinks = {name: Sink(name).start() for name in ("acme", "globex", "initech")}
        self.tenants = {name: Tenant(name, sink) for name, sink in self.sinks.items()}
        # relayctl check/apply compare the pinned keys with DNS through settings dns: a
        # loopback dnsmasq that publishes them (and knows no other name), never the
        # system resolver.
        records = {f"{t.selector}._domainkey.{t.signing_domain}": t.key.txt for t in self.tenants.values()}
        self.dns = DnsServer(self.base, records, local=("#",)).start()
        self.active = ["acme", "globex"]
        self.hosts = {}
        for h in HOSTS:
            root = self.base / h
            root.mkdir(mode=0o755)  # the "machine": its own /etc, /var, /opt below this
            os.chmod(root, 0o755)
            self.hosts[h] = {
                "root": root,
                "port": free_port(),
                "submission_port": free_port(),
                "config": root / "postfix",
                "etc": root / "etc",
                "run": root / "run",
                "state": root / "state",
                "maillog": root / "maillog",
            }
        self._write_inventory()
        self._write_vault()

    # inventory ---------------------------------------------------------------

    def host_vars(self, h: str) -> dict:
        d = self.hosts[h]
        root = d["root"]
        return {
            "ansible_connection": "local",
            "ansible_python_interpreter": "/usr/bin/python3",
            "relay_venv": str(root / "venv"),
            "relay_etc_dir": str(d["etc"]),
            "relay_share_dir": str(root / "share"),
            "relay_state_dir": str(d["state"]),
            "relay_log_dir": str(root / "log"),
            "relay_run_dir": str(d["run"]),
            "relay_settings": {
                "myhostname": f"{h}.relay.test",
                "config_directory": str(d["config"]),
                "queue_directory": str(root / "queue"),
                "data_directory": str(root / "data"),
                "smtpd_listen": [f"127.0.0.1:{d['port']}"],
                "submission_listen": [f"127.0.0.1:{d['submission_port']}"],
                "inet_interfaces": "127.0.0.1",
                "inet_protocols": "ipv4",
                "maillog_file": str(d["maillog"]),
                "milter_socket": f"unix:{root}/milter/milter.sock",
                "milter_command_timeout": "10s",
                "milter_content_timeout": "15s",
                "tracking": {"events_dsn": f"sqlite:///{d['state']}/events.db", "poll_interval": 0.2},
                "dns": {"nameservers": [self.dns.address], "port": self.dns.port, "timeout": 2},
            },
            "relay_logrotate_file": str(root / "logrotate.conf"),
        }

    def _write_inventory(self) -> None:
        inv = {"all": {"children": {"relays": {"hosts": {h: self.host_vars(h) for h in HOSTS}}}}}
        (self.inventory / "hosts.yml").write_text(yaml.safe_dump(inv, sort_keys=False))
        self.write_tenants()
        main = {
            "relay_service_manager": "direct",
            "relay_tracker_enabled": True,
            "relay_firewall_enabled": False,
            "relay_build_dir": str(self.base / "build"),
            "relay_tenant_secrets": "{{ vault_relay_tenant_secrets }}",
            "relay_submission_users": "{{ vault_relay_submission_users }}",
        }
        (self.group_vars / "main.yml").write_text(yaml.safe_dump(main, sort_keys=False))

    def write_tenants(self, override: dict | None = None) -> None:
        tenants = [self.tenants[t].definition() for t in self.active]
        for i, t in enumerate(tenants):
            if override and t["id"] in override:
                tenants[i] = override[t["id"]]
        (self.group_vars / "tenants.yml").write_text(yaml.safe_dump({"relay_tenants": tenants}, sort_keys=False))

    def _write_vault(self) -> None:
        plain = self.base / "vault-plain.yml"
        plain.write_text(yaml.safe_dump({"vault_relay_tenant_secrets": self.secrets, "vault_relay_submission_users": self.users}))
        r = subprocess.run(
            [_tool("ansible-vault"), "encrypt", "--vault-password-file", str(self.vault_password),
             "--output", str(self.group_vars / "vault.yml"), str(plain)],
            capture_output=True, text=True, cwd=self.base, timeout=60,
        )
        plain.unlink()
        assert r.returncode == 0, r.stderr

    # running -----------------------------------------------------------------

    def play(self, *extra: str) -> subprocess.CompletedProcess:
        env = os.environ | {
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
            "ANSIBLE_LOCAL_TEMP": str(self.base / "ansible-tmp"),
            "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}:/usr/sbin:/sbin",
        }
        cmd = [
            _tool("ansible-playbook"), "-i", str(self.inventory), "--vault-password-file", str(self.vault_password),
            str(ANSIBLE_DIR / "site.yml"), *extra,
        ]
        started = time.monotonic()
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ANSIBLE_DIR, env=env, timeout=PLAY_TIMEOUT)
        (self.base / f"play-{int(time.time() * 1000)}.log").write_text(r.stdout + r.stderr)
        print(f"ansible-playbook {' '.join(extra)}: rc={r.returncode} in {time.monotonic() - started:.1f}s")
        return r

    @staticmethod
    def recap(output: str) -> dict[str, dict[str, int]]:
        recap = {}
        for m in re.finditer(r"^(\S+)\s+:\s+((?:\w+=\d+\s*)+)$", output, re.M):
            recap[m.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
        return recap

    def send(self, h: str, tenant: str, to: str, subject: str) -> tuple[int, str]:
        t = self.tenants[tenant]
        rcpt = encode_recipient(to, t.relay_domain)
        with smtplib.SMTP("127.0.0.1", self.hosts[h]["port"], local_hostname="platform.ci.test", timeout=60) as smtp:
            try:
                smtp.sendmail(f"news@{t.sender_domain}", [rcpt], t.signed(to, subject))
            except smtplib.SMTPRecipientsRefused as exc:
                code, text = next(iter(exc.recipients.values()))
                return code, text.decode(errors="replace")
            except smtplib.SMTPResponseException as exc:
                return exc.smtp_code, exc.smtp_error.decode(errors="replace")
        return 250, "ok"

    def submit(self, h: str, user: str, to: str, subject: str) -> tuple[int, str]:
        """Authenticated submission (STARTTLS, AUTH) on the host's submission port."""
        import ssl

        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # the role's self-signed certificate
        msg = make_message(f"news@{self.tenants['acme'].sender_domain}", to, subject=subject)
        with smtplib.SMTP("127.0.0.1", self.hosts[h]["submission_port"], local_hostname="app.ci.test", timeout=60) as smtp:
            smtp.starttls(context=ctx)
            try:
                smtp.login(user, self.users[user])
                smtp.sendmail(f"news@{self.tenants['acme'].sender_domain}", [to], msg)
            except smtplib.SMTPResponseException as exc:
                return exc.smtp_code, exc.smtp_error.decode(errors="replace")
        return 250, "ok"

    def arrived(self, tenant: str, subject: str):
        for m in list(self.sinks[tenant].messages):
            if f"Subject: {subject}".encode() in m.content:
                return m
        return None

    def milter_pid(self, h: str) -> int:
        return int((self.hosts[h]["run"] / "relay-milter.pid").read_text())

    def live_snapshot(self, h: str) -> dict[str, bytes]:
        d = self.hosts[h]
        files = [d["config"] / "main.cf", d["config"] / "master.cf", d["config"] / "relay" / "route.regexp", d["etc"] / "relay.yaml"]
        files += sorted((d["etc"] / "tenants").glob("*.yaml"))
        return {str(p): p.read_bytes() for p in files}

    def teardown(self) -> None:
        for h, d in self.hosts.items():
            subprocess.run(["postfix", "-c", str(d["config"]), "stop"], capture_output=True, timeout=60)
            for service in ("relay-milter", "relay-tracker"):
                pid = d["run"] / f"{service}.pid"
                if pid.exists():
                    subprocess.run(
                        ["start-stop-daemon", "--stop", "--quiet", "--oknodo", "--retry", "TERM/10/KILL/5", "--pidfile", str(pid)],
                        capture_output=True, timeout=60,
                    )
        for s in self.sinks.values():
            s.stop()
        self.dns.stop()
        if os.environ.get("RELAY_KEEP_LAB"):
            print(f"\ndeployment kept at {self.base}")
        else:
            shutil.rmtree(self.base, ignore_errors=True)


def _fail(r: subprocess.CompletedProcess) -> str:
    return f"rc={r.returncode}\n{r.stdout[-6000:]}\n{r.stderr[-3000:]}"


@pytest.fixture(scope="module")
def deployment():
    for tool in ("ansible-playbook", "ansible-vault"):
        _tool(tool)
    d = Deployment()
    try:
        r = d.play()
        assert r.returncode == 0, _fail(r)
        d.first_run = r
        yield d
    finally:
        d.teardown()


def _send_and_expect(d: Deployment, h: str, tenant: str, tag: str):
    subject = f"{tag} via {h} for {tenant} {time.time_ns()}"
    code, text = d.send(h, tenant, "alice@example.org", subject)
    assert code == 250, f"{h}/{tenant}: {code} {text}"
    got = wait_for(lambda: d.arrived(tenant, subject), 30, what=f"{subject!r} at sink {tenant}")
    return got


# -- tests, in order ------------------------------------------------------------------


def test_first_run_provisions_both_nodes_and_mail_flows_through_each(deployment):
    d = deployment
    recap = d.recap(d.first_run.stdout)
    assert set(recap) == set(HOSTS), d.first_run.stdout[-3000:]
    for h in HOSTS:
        assert recap[h]["failed"] == 0 and recap[h]["changed"] > 0
        for tenant in d.active:
            got = _send_and_expect(d, h, tenant, "first")
            assert got.rcpt_tos == ["alice@example.org"]
            [ar] = got.header("Authentication-Results")
            assert ar.startswith(f"{h}.relay.test;") and "dkim=pass" in ar
            assert got.header("DKIM-Signature") == [] and got.header("X-Relay-Route") == []
        # Authenticated submission with the vaulted password, over the role's certificate.
        subject = f"submitted via {h} {time.time_ns()}"
        assert d.submit(h, "acme-app", "erin@example.org", subject) == (250, "ok")
        got = wait_for(lambda s=subject: d.arrived("acme", s), 30, what=f"{subject!r} at sink acme")
        assert got.header("Authentication-Results") == [f"{h}.relay.test; auth=pass smtp.auth=acme-app@{h}.relay.test"]
        # The tracker the role started recorded every delivery in this node's event store.
        store = open_store(f"sqlite:///{d.hosts[h]['state']}/events.db")
        try:
            relayed = wait_for(
                lambda: (lambda evs: evs if {e.tenant for e in evs} >= set(d.active) and len(evs) >= 3 else None)(
                    store.events(kinds=[Kind.RELAYED])
                ),
                30, what=f"RELAYED events on {h}",
            )
        finally:
            store.close()
        assert {e.node for e in relayed} == {f"{h}.relay.test"}
        assert {e.recipient for e in relayed} == {"alice@example.org", "erin@example.org"}


def test_installed_files_have_the_right_owners_and_modes(deployment):
    d = deployment
    h = d.hosts["relay1"]
    secrets = h["etc"] / "secrets.yaml"
    st = secrets.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0 and st.st_gid == 0
    assert yaml.safe_load(secrets.read_text()) == d.secrets  # carried through from the vault
    key = h["etc"] / "tls" / "relay.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and key.stat().st_uid == 0
    sasldb = h["config"] / "sasl" / "sasldb2"
    assert stat.S_IMODE(sasldb.stat().st_mode) == 0o640
    assert all(d.users["acme-app"] not in p.read_text() for p in (h["state"] / "users").iterdir())
    tenant_file = h["etc"] / "tenants" / "acme.yaml"
    assert stat.S_IMODE(tenant_file.stat().st_mode) == 0o640
    assert yaml.safe_load(tenant_file.read_text())["relay_domain"] == "acme.relay.test"
    sock = h["root"] / "milter" / "milter.sock"
    st = sock.stat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    import grp
    import pwd

    assert grp.getgrgid(st.st_gid).gr_name == "postfix"
    milter_user = pwd.getpwuid(Path(f"/proc/{d.milter_pid('relay1')}").stat().st_uid).pw_name
    assert milter_user == "relay-milter"  # the milter does not run as root
    # The systemd units are rendered (installed under /etc/systemd/system with systemd).
    unit = (h["root"] / "share" / "systemd" / "relay-milter.service").read_text()
    exec_start = re.search(r"^ExecStart=(\S+)", unit, re.M).group(1)
    assert os.access(exec_start, os.X_OK), exec_start
    assert "User=relay-milter" in unit and "Group=postfix" in unit


def test_second_run_changes_nothing(deployment):
    d = deployment
    pids = {h: d.milter_pid(h) for h in HOSTS}
    before = {h: d.live_snapshot(h) for h in HOSTS}
    r = d.play()
    assert r.returncode == 0, _fail(r)
    recap = d.recap(r.stdout)
    for h in HOSTS:
        assert recap[h]["changed"] == 0, f"{h}: {recap[h]}\n" + "\n".join(
            line for line in r.stdout.splitlines() if line.startswith("changed:")
        )
        assert recap[h]["failed"] == 0
        # Real state, not only the count: same milter process, same files, and
        # every service's stamp matches the configuration it was started with.
        assert d.milter_pid(h) == pids[h]
        assert d.live_snapshot(h) == before[h]
        assert (d.hosts[h]["state"] / "postfix.applied").read_text().strip()
        assert (d.hosts[h]["state"] / "milter.applied").read_text().strip()


def test_check_diff_shows_a_tenant_change_without_applying_it(deployment):
    d = deployment
    before = {h: d.live_snapshot(h) for h in HOSTS}
    pids = {h: d.milter_pid(h) for h in HOSTS}
    changed = d.tenants["globex"].definition()
    changed["smarthost"]["concurrency"] = 7
    d.write_tenants(override={"globex": changed})
    try:
        r = d.play("--check", "--diff")
    finally:
        d.write_tenants()
    assert r.returncode == 0, _fail(r)
    out = r.stdout
    # The tenant file diff and the resulting Postfix master.cf/main.cf diff.
    assert re.search(r"^\+\s+concurrency: 7$", out, re.M), out[-4000:]  # tenant file (default 5 was implicit)
    assert "+relay_globex_destination_concurrency_limit = 7" in out
    assert re.search(r"relay_globex unix\s+-\s+-\s+n\s+-\s+7\s+smtp", out)
    for h in HOSTS:
        assert d.recap(out)[h]["changed"] > 0
        assert d.live_snapshot(h) == before[h]  # check mode changed nothing
        assert d.milter_pid(h) == pids[h]


def test_bad_tenant_fails_the_play_before_anything_live_changes(deployment):
    d = deployment
    before = {h: d.live_snapshot(h) for h in HOSTS}
    pids = {h: d.milter_pid(h) for h in HOSTS}
    bad = d.tenants["globex"].definition()
    bad["relay_domain"] = "not a domain"
    bad["smarthost"]["port"] = 70000
    d.write_tenants(override={"globex": bad})
    try:
        r = d.play()
    finally:
        d.write_tenants()
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "tenant globex: field relay_domain" in out and "field smarthost.port" in out, out[-4000:]
    assert "Check the staged configuration" in out
    for h in HOSTS:
        assert d.live_snapshot(h) == before[h]
        assert d.milter_pid(h) == pids[h]
    # Still relaying with the old configuration.
    _send_and_expect(d, "relay2", "globex", "after-bad-tenant")


class Traffic(threading.Thread):
    """Keeps sending signed mail for one tenant, retrying 4xx like an MTA would."""

    def __init__(self, d: Deployment, h: str, tenant: str):
        super().__init__(daemon=True)
        self.d, self.h, self.tenant = d, h, tenant
        self.stop = threading.Event()
        self.sent: list[str] = []
        self.tempfails = 0
        self.failures: list[str] = []

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            subject = f"steady {self.tenant} {n} {time.time_ns()}"
            for _attempt in range(60):
                try:
                    code, text = self.d.send(self.h, self.tenant, "carol@example.org", subject)
                except (OSError, smtplib.SMTPException) as exc:
                    code, text = 421, str(exc)
                if code == 250:
                    self.sent.append(subject)
                    break
                if 400 <= code < 500:
                    self.tempfails += 1
                    time.sleep(0.5)
                    continue
                self.failures.append(f"{subject}: {code} {text}")
                break
            time.sleep(0.2)


def test_adding_and_removing_tenants_on_running_relays_keeps_mail_flowing(deployment):
    """One edit (initech in, globex out) and one play, while acme mail keeps flowing."""
    d = deployment
    traffic = {h: Traffic(d, h, "acme") for h in HOSTS}
    for t in traffic.values():
        t.start()
    d.active = ["acme", "initech"]
    d.write_tenants()
    try:
        r = d.play()
    finally:
        time.sleep(1)
        for t in traffic.values():
            t.stop.set()
        for t in traffic.values():
            t.join(90)
    assert r.returncode == 0, _fail(r)
    for h in HOSTS:
        assert d.recap(r.stdout)[h]["changed"] > 0
        # The new tenant relays through every node.
        _send_and_expect(d, h, "initech", "new-tenant")
        # The removed tenant is gone from the tenant files and from Postfix.
        assert not (d.hosts[h]["etc"] / "tenants" / "globex.yaml").exists()
        assert "globex" not in (d.hosts[h]["config"] / "main.cf").read_text()
        code, text = d.send(h, "globex", "dave@example.org", "removed tenant")
        assert code in (550, 554), (code, text)  # no longer a relay domain
        # Existing tenant: nothing refused, nothing lost while the play ran.
        t = traffic[h]
        assert t.failures == []
        assert len(t.sent) >= 3, f"{h}: only {len(t.sent)} messages sent during the play"
        for subject in t.sent:
            wait_for(lambda s=subject: d.arrived("acme", s), 30, what=f"{subject!r} at sink acme")
        print(f"{h}: {len(t.sent)} acme messages during the play, all delivered; {t.tempfails} 4xx retried")


def test_ansible_lint_production_profile_is_clean():
    lint = _tool("ansible-lint")
    env = os.environ | {"ANSIBLE_NOCOLOR": "1", "NO_COLOR": "1", "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    r = subprocess.run(
        # ansible/.ansible-lint: profile production, offline; lints the role, playbooks and inventories.
        [lint, "--profile", "production", "--offline", "--nocolor"],
        capture_output=True, text=True, cwd=ANSIBLE_DIR, env=env, timeout=300,
    )
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-3000:]
    assert "Profile 'production' was required, and it passed" in r.stdout + r.stderr


def test_vagrantfile_is_valid_ruby():
    ruby = shutil.which("ruby")
    if not ruby:
        unavailable("ruby not installed (deps/apt/ansible.txt)")
    r = subprocess.run([ruby, "-c", str(REPO / "Vagrantfile")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "Syntax OK" in r.stdout, r.stdout + r.stderr
    text = (REPO / "Vagrantfile").read_text()
    assert "debian/bookworm64" in text and "ansible/site.yml" in text
    assert re.search(r"guest:\s*25\b", text) and re.search(r"guest:\s*587\b", text)
