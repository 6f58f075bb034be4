"""The Ansible role applied to this machine, for real: two relay nodes fed by one play.

Each "host" of the generated inventory is a private relay on this machine
(``ansible_connection=local``, its own Postfix config/queue/data directories
under /var/tmp, smtpd on a free loopback port, its own venv and milter), so the
play never touches the system's /etc/postfix. ``relay_service_manager=direct``
because PID 1 is not systemd here; the tracker runs too (each node with its own SQLite store,
until the fleet moves to one PostgreSQL store: a private cluster on loopback, the inventory's
"PostgreSQL host", on which the role creates the database and its role).

One converged deployment is shared by the tests below, in file order. Before
it exists, ``--check --diff`` runs on the fresh hosts and changes nothing; the
first real run is made with -vvv (no secret may appear in its output or in the
process table). Then: mail flows through both nodes -> the deployed layout,
inspected as the service accounts themselves -> logrotate -> a duplicate node name
is refused -> both nodes move to one vaulted PostgreSQL DSN, the role provisions the
database, and mail through each node is recorded there -> a second run is
changed=0 -> --check --diff
shows a tenant change without applying it -> a bad tenant fails the play
before anything live changes -> one tenant is added and another removed on
the running relays while mail for an existing tenant keeps flowing.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
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
from support.classes import class_of
from support.factories import unavailable
from support.pgcluster import PgCluster, find_bindir
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
        # umbrella logs in to its smarthost (a password map) and has a webhook secret;
        # no mail is sent for it.
        self.secrets = {
            "acme": {"smarthost_password": os.urandom(8).hex()},
            "umbrella": {"smarthost_password": os.urandom(12).hex(), "webhook_secret": os.urandom(16).hex()},
        }
        # The tracker's vaulted environment; the marker must never reach a command line.
        # (With the characters the environment file must escape.)
        self.env_marker = "marker-" + os.urandom(12).hex() + ' "q" $HOME `t` \\b'
        self.users = {"acme-app": os.urandom(12).hex()}  # submission logins, from the vault
        self.sinks = {name: Sink(name).start() for name in ("acme", "globex", "initech")}
        self.tenants = {name: Tenant(name, sink) for name, sink in self.sinks.items()}
        # relayctl check/apply compare the pinned keys with DNS through settings dns: a
        # loopback dnsmasq that publishes them (and knows no other name), never the
        # system resolver.
        records = {f"{t.selector}._domainkey.{t.signing_domain}": t.key.txt for t in self.tenants.values()}
        self.dns = DnsServer(self.base, records, local=("#",)).start()
        self.active = ["acme", "globex"]
        self.umbrella_port = free_port()
        # The fleet's PostgreSQL store (use_postgresql): the cluster and its relays' DSN.
        self.pg: PgCluster | None = None
        self.pg_dsn = ""
        self.db_password = ""
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
                "log": root / "log",
            }
        self._write_inventory()
        self._write_vault()

    # inventory ---------------------------------------------------------------

    def host_vars(self, h: str, **tracking) -> dict:
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
                # the store: the role's default, in the tracker's directory (until use_postgresql)
                "tracking": {"poll_interval": 0.2, **tracking},
                "dns": {"nameservers": [self.dns.address], "port": self.dns.port, "timeout": 2},
            },
            "relay_logrotate_file": str(root / "logrotate.conf"),
            "relay_bin_link": str(root / "bin" / "relayctl"),
            "relay_bash_completion_file": str(root / "bash_completion.d" / "relayctl"),
        }

    def write_hosts(self, tracking: dict[str, dict] | None = None) -> None:
        """The relays, and the PostgreSQL host (this machine again: psql runs there as the
        postgres account, through su since root needs no password for it)."""
        relays = {h: self.host_vars(h, **(tracking or {}).get(h, {})) for h in HOSTS}
        pg_host = {"ansible_connection": "local", "ansible_python_interpreter": "/usr/bin/python3",
                   "ansible_become_method": "ansible.builtin.su"}
        inv = {"all": {"children": {"relays": {"hosts": relays}, "eventstore": {"hosts": {"pg1": pg_host}}}}}
        (self.inventory / "hosts.yml").write_text(yaml.safe_dump(inv, sort_keys=False))

    def _write_inventory(self) -> None:
        self.write_hosts()
        self.write_tenants()
        main = {
            "relay_service_manager": "direct",
            "relay_tracker_enabled": True,
            "relay_firewall_enabled": False,
            "relay_build_dir": str(self.base / "build"),
            "relay_tenant_secrets": "{{ vault_relay_tenant_secrets }}",
            "relay_submission_users": "{{ vault_relay_submission_users }}",
            "relay_tracker_environment": "{{ vault_relay_tracker_environment }}",
        }
        (self.group_vars / "main.yml").write_text(yaml.safe_dump(main, sort_keys=False))

    def umbrella(self) -> dict:
        """A tenant that logs in to its smarthost over verified TLS (never sent to here)."""
        t = self.tenants["acme"].definition()
        return t | {
            "id": "umbrella", "description": "umbrella (CI, smarthost login)",
            "relay_domain": "umbrella.relay.test", "signing_domain": "hop.umbrella.test",
            "allowed_sender_domains": ["umbrella.example"], "submission_users": [],
            "smarthost": {"host": "127.0.0.1", "port": self.umbrella_port, "tls": "verify",
                          "tls_match": "smtp.umbrella.test", "auth": {"username": "relay@umbrella.test"}},
        }

    def write_tenants(self, override: dict | None = None) -> None:
        tenants = [self.tenants[t].definition() for t in self.active] + [self.umbrella()]
        for i, t in enumerate(tenants):
            if override and t["id"] in override:
                tenants[i] = override[t["id"]]
        (self.group_vars / "tenants.yml").write_text(yaml.safe_dump({"relay_tenants": tenants}, sort_keys=False))

    def _write_vault(self) -> None:
        plain = self.base / "vault-plain.yml"
        plain.write_text(yaml.safe_dump({
            "vault_relay_tenant_secrets": self.secrets,
            "vault_relay_submission_users": self.users,
            "vault_relay_tracker_environment": {"RELAY_TEST_MARKER": self.env_marker},
            **({"vault_relay_events_dsn": self.pg_dsn} if self.pg_dsn else {}),
        }))
        r = subprocess.run(
            [_tool("ansible-vault"), "encrypt", "--vault-password-file", str(self.vault_password),
             "--output", str(self.group_vars / "vault.yml"), str(plain)],
            capture_output=True, text=True, cwd=self.base, timeout=60,
        )
        plain.unlink()
        assert r.returncode == 0, r.stderr

    def use_postgresql(self) -> None:
        """Start the PostgreSQL host: a private cluster on loopback that, like a real one,
        wants the relays' password (scram-sha-256 over TCP; its superuser keeps trust on the
        local socket the role's psql uses). Then point the inventory at it: one DSN in the
        vault, the role to create its database and role there."""
        if find_bindir() is None:
            unavailable("no PostgreSQL server installed (deps/apt; run scripts/bootstrap.sh)")
        self.pg = PgCluster().start()
        (self.pg.data / "pg_hba.conf").write_text(
            "local all all trust\n"
            "host all postgres 127.0.0.1/32 trust\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
        )
        self.pg.proc.send_signal(signal.SIGHUP)  # reload pg_hba.conf
        self.db_password = os.urandom(12).hex()
        self.pg_dsn = f"postgresql://relay:{self.db_password}@127.0.0.1:{self.pg.port}/relay_events"  # pragma: allowlist secret
        self._write_vault()
        main = yaml.safe_load((self.group_vars / "main.yml").read_text())
        main |= {
            "relay_events_dsn": "{{ vault_relay_events_dsn }}",
            "relay_events_db_create": True,
            "relay_events_db_host": "pg1",
            "relay_events_db_admin_socket": str(self.pg.sockets),
        }
        (self.group_vars / "main.yml").write_text(yaml.safe_dump(main, sort_keys=False))

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

    def tracker_pid(self, h: str) -> int:
        return int((self.hosts[h]["run"] / "relay-tracker.pid").read_text())

    def events_dsn(self, h: str) -> str:
        return self.pg_dsn or f"sqlite:///{self.hosts[h]['state']}/tracker/events.db"

    def secret_values(self) -> list[str]:
        values = [v for s in self.secrets.values() for v in s.values()] + list(self.users.values())
        values += [self.db_password] if self.db_password else []
        return values + [self.env_marker, self.env_marker.split()[0]]  # raw, and its unique part

    def live_snapshot(self, h: str) -> dict[str, bytes]:
        d = self.hosts[h]
        files = [d["config"] / "main.cf", d["config"] / "master.cf", d["config"] / "relay" / "route", d["etc"] / "relay.yaml"]
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
        if self.pg is not None:
            self.pg.destroy()
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
        # --check --diff on hosts that have nothing yet: it must work and change nothing.
        r = d.play("--check", "--diff")
        assert r.returncode == 0, _fail(r)
        d.fresh_check_run = r
        d.fresh_check_left = {h: sorted(str(p) for p in d.hosts[h]["root"].rglob("*")) for h in HOSTS}
        # The first real run, with -vvv, while the process table is watched for secrets.
        watcher = CmdlineWatcher(d.secret_values())
        watcher.start()
        try:
            r = d.play("-vvv")
        finally:
            watcher.stop.set()
            watcher.join(30)
        assert r.returncode == 0, _fail(r)
        d.first_run, d.first_run_seen = r, watcher
        yield d
    finally:
        d.teardown()


class CmdlineWatcher(threading.Thread):
    """Reads every process's command line while a play runs, looking for secrets."""

    def __init__(self, secrets: list[str]):
        super().__init__(daemon=True)
        self.secrets = secrets
        self.stop = threading.Event()
        self.scans = 0
        self.leaks: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            for p in Path("/proc").glob("[0-9]*/cmdline"):
                try:
                    text = p.read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                self.leaks += [f"{p}: {text[:200]}" for s in self.secrets if s in text]
            self.scans += 1
            time.sleep(0.05)


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
        store = open_store(d.events_dsn(h))
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


def test_check_diff_on_a_fresh_host_works_and_changes_nothing(deployment):
    d = deployment
    r = d.fresh_check_run
    recap = d.recap(r.stdout)
    assert set(recap) == set(HOSTS), r.stdout[-3000:]
    assert "no attribute 'checksum'" not in r.stdout + r.stderr
    assert "relayctl is not installed yet" in r.stdout
    for h in HOSTS:
        assert recap[h]["failed"] == 0 and recap[h]["changed"] > 0
        assert d.fresh_check_left[h] == [], d.fresh_check_left[h]  # nothing written on the host


def test_no_secret_in_verbose_output_or_in_the_process_table(deployment):
    d = deployment
    out = d.first_run.stdout + d.first_run.stderr
    assert "<127.0.0.1> EXEC" in out or "ESTABLISH LOCAL CONNECTION" in out  # it really was -vvv
    for secret in d.secret_values():
        assert secret not in out
    w = d.first_run_seen
    assert w.scans > 0 and w.leaks == []
    for h in HOSTS:
        # The vaulted environment did reach the tracker (from its root-only file).
        environ = Path(f"/proc/{d.tracker_pid(h)}/environ").read_bytes().split(b"\0")
        assert f"RELAY_TEST_MARKER={d.env_marker}".encode() in environ
        env_file = d.hosts[h]["etc"] / "tracker.env"
        st = env_file.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)


def _identity(pid: int) -> tuple[int, int, list[int]]:
    """uid, gid and supplementary groups of a running process."""
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
    )
    return int(status["Uid"].split()[0]), int(status["Gid"].split()[0]), [int(g) for g in status["Groups"].split()]


def _as(identity: tuple[int, int, list[int]], *argv: str) -> subprocess.CompletedProcess:
    """Run argv with exactly this identity (setpriv, no capabilities)."""
    uid, gid, groups = identity
    cmd = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--inh-caps=-all", "--bounding-set=-all",
           f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def _can_read(identity, path: Path) -> bool:
    r = _as(identity, sys.executable, "-c", "import sys; open(sys.argv[1], 'rb').read(1)", str(path))
    assert r.returncode == 0 or "PermissionError" in r.stderr, r.stderr  # denied, not missing
    return r.returncode == 0


def _can_write(identity, path: Path) -> bool:
    r = _as(identity, sys.executable, "-c", "import sys; open(sys.argv[1], 'ab').close()", str(path))
    assert r.returncode == 0 or "PermissionError" in r.stderr, r.stderr
    return r.returncode == 0


def test_the_service_accounts_reach_only_what_they_need(deployment):
    """Run as the milter's and the tracker's own identities (taken from the running
    processes): what each may read and write, and every secret it must not open."""
    import grp
    import pwd

    d = deployment
    for name, hd in d.hosts.items():
        milter, tracker = _identity(d.milter_pid(name)), _identity(d.tracker_pid(name))
        assert pwd.getpwuid(milter[0]).pw_name == "relay-milter"
        assert pwd.getpwuid(tracker[0]).pw_name == "relay-tracker"
        postfix_gid = grp.getgrnam("postfix").gr_gid
        assert postfix_gid not in [milter[1], *milter[2]] and postfix_gid not in [tracker[1], *tracker[2]]
        assert 0 not in (milter[0], milter[1], tracker[0], tracker[1])
        assert "relay-milter" not in grp.getgrnam("postfix").gr_mem  # also for a systemd start (initgroups)
        config, etc, state, log = hd["config"], hd["etc"], hd["state"], hd["log"]
        secrets = {
            "sasldb": config / "sasl" / "sasldb2",
            "secrets.yaml": etc / "secrets.yaml",
            "smarthost password map": config / "relay" / "smtp_auth" / class_of((config / "relay" / "route").read_text(), "umbrella"),
            "tracker.env": etc / "tracker.env",
            "TLS key": etc / "tls" / "relay.key",
        }
        for what, path in secrets.items():
            assert path.exists(), what
            assert not _can_read(milter, path), f"{name}: the milter can read the {what}"
            assert not _can_read(tracker, path), f"{name}: the tracker can read the {what}"
        store = state / "tracker" / "events.db"
        tracker_secrets = etc / "tracker-secrets.yaml"
        for what, path in {"event store": store, "tracker's webhook secrets": tracker_secrets}.items():
            assert not _can_read(milter, path), f"{name}: the milter can read the {what}"
        # What each one needs.
        milter_log = log / "milter" / "milter.log"
        for path in (etc / "tenants" / "acme.yaml", etc / "relay.yaml"):
            assert _can_read(milter, path) and _can_read(tracker, path)
        assert _can_write(milter, milter_log) and not _can_write(tracker, milter_log)
        assert _can_read(tracker, milter_log) and _can_read(tracker, hd["maillog"])
        assert not _can_read(milter, hd["maillog"])
        assert _can_read(tracker, tracker_secrets) and _can_write(tracker, store)
        assert yaml.safe_load(tracker_secrets.read_text()) == {
            "umbrella": {"webhook_secret": d.secrets["umbrella"]["webhook_secret"]}
        }
        # Neither can change the configuration or the other's files.
        for ident in (milter, tracker):
            assert not _can_write(ident, etc / "relay.yaml")
            assert not _can_write(ident, etc / "tenants" / "acme.yaml")
            assert not _can_write(ident, config / "main.cf")
        assert not _can_write(milter, store)
        # Postfix (its account, with its groups from /etc/group as its daemons get them)
        # reaches the milter socket; the socket's group holds no service account.
        sock = hd["root"] / "milter" / "milter.sock"
        st = sock.stat()
        sock_group = grp.getgrgid(st.st_gid)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
        assert sock_group.gr_name == "relay-milter-sock" and "postfix" in sock_group.gr_mem
        assert st.st_gid not in [milter[1], *milter[2]]
        # The mail log: root:adm 0640.
        st = hd["maillog"].stat()
        assert (st.st_uid, grp.getgrgid(st.st_gid).gr_name, stat.S_IMODE(st.st_mode)) == (0, "adm", 0o640)


def test_root_never_writes_where_a_service_account_can(deployment):
    """Every directory a service account can write holds only that account's files
    (in direct mode the services open their own output files), and the secrets and
    stamps root writes are in root-only places."""
    import pwd

    d = deployment
    for name, hd in d.hosts.items():
        root = hd["root"]
        writable = {
            "relay-milter": [hd["log"] / "milter", root / "milter"],
            "relay-tracker": [hd["log"] / "tracker", hd["state"] / "tracker"],
        }
        for account, dirs in writable.items():
            for directory in dirs:
                assert pwd.getpwuid(directory.stat().st_uid).pw_name == account
                owners = {p.name: pwd.getpwuid(p.lstat().st_uid).pw_name for p in directory.iterdir()}
                assert owners and set(owners.values()) == {account}, f"{name}: {directory}: {owners}"
        assert (hd["log"] / "milter" / "relay-milter.out").exists()
        assert (hd["log"] / "tracker" / "relay-tracker.out").exists()
        # Directories root writes in are root's alone.
        for directory in (hd["log"], hd["state"], hd["run"], hd["etc"], hd["etc"] / "tenants", hd["config"]):
            st = directory.stat()
            assert st.st_uid == 0 and not st.st_mode & 0o022, directory
        # The stamps hold fingerprints over the secrets: root only.
        for stamp in ("milter", "tracker", "postfix"):
            st = (hd["state"] / f"{stamp}.applied").stat()
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)


def test_installed_files_have_the_right_owners_and_modes(deployment):
    import grp

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
    assert grp.getgrgid(tenant_file.stat().st_gid).gr_name == "tenant-relay"
    assert yaml.safe_load(tenant_file.read_text())["relay_domain"] == "acme.relay.test"
    # relayctl on PATH (relay_bin_link) and its bash completion.
    assert (h["root"] / "bin" / "relayctl").resolve() == (h["root"] / "venv" / "bin" / "relayctl").resolve()
    completion = (h["root"] / "bash_completion.d" / "relayctl").read_text()
    assert "_relayctl_completion()" in completion and "_RELAYCTL_COMPLETE=bash_complete" in completion
    # The systemd units are rendered (installed under /etc/systemd/system with systemd).
    units = h["root"] / "share" / "systemd"
    milter_unit = (units / "relay-milter.service").read_text()
    tracker_unit = (units / "relay-tracker.service").read_text()
    web_unit = (units / "relay-web.service").read_text()  # installed even while relay_web_enabled is false
    exec_start = re.search(r"^ExecStart=(\S+)", milter_unit, re.M).group(1)
    assert os.access(exec_start, os.X_OK), exec_start
    assert "User=relay-milter\nGroup=relay-milter\n" in milter_unit and "postfix" not in re.findall(r"^(?:Group|SupplementaryGroups)=.*", milter_unit, re.M)[0]
    assert "User=relay-tracker\nGroup=relay-tracker\n" in tracker_unit
    assert "User=relay-tracker\nGroup=relay-tracker\n" in web_unit and re.search(r"^ExecStart=\S+ .* web$", web_unit, re.M)
    key = h["etc"] / "engagement.key"  # made on the host by relayctl web --create-key, read by the milter and web
    assert stat.S_IMODE(key.stat().st_mode) == 0o640 and grp.getgrgid(key.stat().st_gid).gr_name == "tenant-relay"
    assert re.search(r"^InaccessiblePaths=.*" + re.escape(str(h["config"] / "sasl")) + r"\b", milter_unit, re.M)
    for unit in (milter_unit, tracker_unit, web_unit):
        for line in ("CapabilityBoundingSet=", "SystemCallFilter=@system-service", "ProtectSystem=strict",
                     "PrivateDevices=yes", "MemoryDenyWriteExecute=yes", "NoNewPrivileges=yes"):
            assert f"\n{line}\n" in unit, line
        assert re.search(r"^RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6$", unit, re.M)


def test_units_score_2_or_better_in_systemd_analyze_security(deployment, tmp_path):
    """systemd-analyze security works offline on unit files (no systemd as PID 1 here).
    The units are rendered for a standard systemd host (the ones of the direct-mode
    deployment name paths under the test's directory)."""
    analyze = shutil.which("systemd-analyze")
    if not analyze:
        pytest.skip("systemd-analyze not installed")
    units = deployment.hosts["relay1"]["root"] / "share" / "systemd"
    scores = {}
    for unit in ("relay-milter.service", "relay-tracker.service", "relay-web.service"):
        shutil.copy(units / unit, tmp_path / unit)
        r = subprocess.run([analyze, "security", "--offline=true", "--no-pager", str(tmp_path / unit)],
                           capture_output=True, text=True, timeout=120)
        m = re.search(r"Overall exposure level for \S+: (\d+\.\d)", r.stdout)
        assert m, r.stdout[-2000:] + r.stderr
        scores[unit] = float(m.group(1))
    print(f"systemd-analyze security: {scores}")
    assert all(score <= 2.0 for score in scores.values()), scores


UNIT_PLAY = """
- hosts: localhost
  connection: local
  gather_facts: false
  vars_files: [{role}/defaults/main.yml, {role}/vars/main.yml]  # hygiene: not a path (under the repository's role)
  tasks:
    - name: Render the units as the role does
      ansible.builtin.template:
        src: "{role}/templates/{{{{ item }}}}.j2"  # hygiene: not a path (the repository's role)
        dest: "{out}/{{{{ item }}}}"
        mode: "0644"
      loop: [relay-milter.service, relay-tracker.service, relay-reputation.service, relay-pool-addresses.service]
"""


def test_reputation_and_pool_units_render_with_the_pool_and_score(tmp_path):
    """The reputation monitor's and the pool's units, rendered from the role's templates
    with its defaults and vars (no converge), for a systemd host with a pool: the monitor
    runs `reputation watch` as root in a sandbox, the pool unit adds each address, and
    the tracker may write the queue summary the milter reads."""
    playbook = _tool("ansible-playbook")
    ip = "/usr/sbin/ip"  # as the unit names it (systemd wants an absolute ExecStart)
    out = tmp_path / "units"
    out.mkdir()
    h = tmp_path / "host"  # the paths the units name (nothing is created there)
    extra = {
        "ansible_python_interpreter": sys.executable,
        "relay_service_manager": "systemd", "relay_pool_interface": "eth1", "relay_configure_pool_addresses": True,
        "relay_venv": str(h / "venv"), "relay_etc_dir": str(h / "etc"), "relay_state_dir": str(h / "state"),
        "relay_log_dir": str(h / "log"),
        "relay_settings": {
            "config_directory": str(h / "postfix"), "queue_directory": str(h / "spool"), "data_directory": str(h / "data"),
            "reputation": {
                "pool": [{"address": "192.0.2.10", "helo": "out1.relay.example.net"},
                         {"address": "2001:db8::25", "helo": "out6.relay.example.net", "role": "standby"}],
                "dnsbls": [{"zone": "zen.spamhaus.org"}], "metrics_file": str(h / "textfile" / "relay_reputation.prom"),
                "milter_metrics_file": str(h / "textfile" / "relay_milter.prom")}},
    }
    (tmp_path / "extra.yml").write_text(yaml.safe_dump(extra))
    (tmp_path / "play.yml").write_text(UNIT_PLAY.format(role=ANSIBLE_DIR / "roles" / "relay", out=out))
    env = os.environ | {"ANSIBLE_NOCOLOR": "1", "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
                        "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp"), "ANSIBLE_LOCALHOST_WARNING": "0"}
    r = subprocess.run([playbook, "-i", "localhost,", str(tmp_path / "play.yml"), "-e", f"@{tmp_path / 'extra.yml'}"],
                       capture_output=True, text=True, cwd=ANSIBLE_DIR, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    reputation = (out / "relay-reputation.service").read_text()
    assert f"\nExecStart={h}/venv/bin/relayctl --tenants {h}/etc/tenants --settings {h}/etc/relay.yaml reputation watch " \
           f"--log-file {h}/log/reputation/reputation.log\n" in reputation
    assert "Enabled:\n# true." in reputation
    assert f"\nReadWritePaths={h}/postfix {h}/spool {h}/data {h}/state {h}/log/reputation {h}/textfile\n" in reputation
    for line in ("ProtectSystem=strict", "PrivateDevices=yes", "MemoryDenyWriteExecute=yes", "SystemCallFilter=@system-service"):
        assert f"\n{line}\n" in reputation, line
    pool = (out / "relay-pool-addresses.service").read_text()
    assert re.findall(r"^ExecStart=(.*)$", pool, re.M) == [
        f"{ip} addr replace 192.0.2.10/32 dev eth1", f"{ip} addr replace 2001:db8::25/128 dev eth1"]
    assert re.findall(r"^CapabilityBoundingSet=(.*)$", pool, re.M) == ["CAP_NET_ADMIN"]
    tracker = (out / "relay-tracker.service").read_text()
    assert f"\nReadWritePaths={h}/state/tracker {h}/state/queue\n" in tracker
    milter = (out / "relay-milter.service").read_text()
    assert f"\nReadWritePaths={h}/log/milter {h}/textfile\n" in milter
    assert "postdrop" not in re.findall(r"^SupplementaryGroups=.*$", milter, re.M)[0]

    analyze = shutil.which("systemd-analyze")
    if not analyze:
        pytest.skip("systemd-analyze not installed")
    scores = {}
    for unit in ("relay-reputation.service", "relay-pool-addresses.service"):
        r = subprocess.run([analyze, "security", "--offline=true", "--no-pager", str(out / unit)], capture_output=True, text=True, timeout=120)
        m = re.search(r"Overall exposure level for \S+: (\d+\.\d)", r.stdout)
        assert m, r.stdout[-2000:] + r.stderr
        scores[unit] = float(m.group(1))
    print(f"systemd-analyze security: {scores}")
    # The pool unit is as tight as the milter's; the monitor runs as root (it installs the
    # Postfix configuration and reloads Postfix), docs/deploy.md gives its score.
    assert scores["relay-pool-addresses.service"] <= 2.0, scores
    assert scores["relay-reputation.service"] <= 3.5, scores


def test_logrotate_rotates_as_the_owners_and_the_tracker_follows(deployment):
    """A forced rotation (logrotate with the role's configuration): the new logs get
    the right owners and modes, and mail relayed after it is still tracked."""
    import grp
    import pwd

    d = deployment
    h = "relay1"
    hd = d.hosts[h]
    conf = hd["root"] / "logrotate.conf"
    r = subprocess.run(["logrotate", "-f", "-v", "-s", str(hd["root"] / "logrotate.state"), str(conf)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "error:" not in r.stdout + r.stderr, r.stdout[-3000:] + r.stderr[-3000:]
    milter_log = hd["log"] / "milter" / "milter.log"
    assert (hd["log"] / "milter" / "milter.log.1").exists() and hd["maillog"].with_name("maillog.1").exists()
    for path, owner, group in ((milter_log, "relay-milter", "adm"), (hd["maillog"], "root", "adm")):
        st = path.stat()
        assert (pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name, stat.S_IMODE(st.st_mode)) == (owner, group, 0o640)
    got = _send_and_expect(d, h, "acme", "after-rotation")
    [mid] = got.header("Message-ID")
    mid = mid.strip().strip("<>")
    # The milter reopened its log: its record of the message is in the new file.
    wait_for(lambda: mid in milter_log.read_text() or None, 30, what="the milter's record in the new milter.log")
    store = open_store(d.events_dsn(h))
    try:
        wait_for(
            lambda: [e for e in store.events(kinds=[Kind.RELAYED]) if mid in (e.message_id or "")] or None,
            30, what="the tracker's RELAYED event for the message sent after the rotation",
        )
    finally:
        store.close()


def test_a_duplicate_node_name_is_refused_before_anything_changes(deployment):
    """Two relays with one node name would share checkpoints in a shared store: the play
    stops at its first check, naming the name and both hosts."""
    d = deployment
    before = {h: d.live_snapshot(h) for h in HOSTS}
    pids = {h: d.milter_pid(h) for h in HOSTS}
    d.write_hosts(tracking={"relay2": {"node": "relay1.relay.test"}})  # relay1's myhostname
    try:
        r = d.play()
    finally:
        d.write_hosts()
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "node names must be unique across the inventory group relays" in out, out[-4000:]
    assert "relay1.relay.test is the node name of relay1 and relay2" in out, out[-4000:]
    assert "TASK [relay : Install the relay package" not in out  # stopped before anything else
    for h in HOSTS:
        assert d.recap(out)[h]["changed"] == 0
        assert d.live_snapshot(h) == before[h]
        assert d.milter_pid(h) == pids[h]


def test_the_fleet_moves_to_one_postgresql_store_the_role_provisions(deployment):
    """One vaulted DSN for every node. The role creates the database and its role on the
    PostgreSQL host (psql as postgres, the password only ever on standard input), both
    trackers restart onto it, and mail sent through each node is recorded in the one
    database under the name of the node that relayed it."""
    import psycopg

    d = deployment
    d.use_postgresql()
    watcher = CmdlineWatcher(d.secret_values())
    watcher.start()
    try:
        r = d.play("-vvv")
    finally:
        watcher.stop.set()
        watcher.join(30)
    assert r.returncode == 0, _fail(r)
    out = r.stdout + r.stderr
    assert d.db_password not in out and watcher.scans > 0 and watcher.leaks == []
    assert re.search(r"changed: \[relay1 -> pg1\].*\n", out)  # delegated to the PostgreSQL host, once
    assert "relay2 -> pg1" not in out
    # What the role made: a login role whose stored SCRAM verifier is of the vault's password
    # (the cluster checks it: loopback TCP wants a password), owning the database.
    with psycopg.connect(d.pg.dsn) as conn:
        [(verifier, owner)] = conn.execute(
            "SELECT a.rolpassword, pg_get_userbyid(db.datdba) FROM pg_authid a, pg_database db"
            " WHERE a.rolname = 'relay' AND a.rolcanlogin AND db.datname = 'relay_events'"
        ).fetchall()
    assert verifier.startswith("SCRAM-SHA-256$4096:") and owner == "relay"
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(d.pg_dsn.replace(d.db_password, "not-" + d.db_password), connect_timeout=10)
    for h in HOSTS:
        environ = Path(f"/proc/{d.tracker_pid(h)}/environ").read_bytes().split(b"\0")
        assert f"RELAY_EVENTS_DSN={d.pg_dsn}".encode() in environ
    store = open_store(d.pg_dsn)
    try:
        # Each restarted tracker positions itself at the end of its logs first (a new store).
        def positioned():
            with psycopg.connect(d.pg.dsn, dbname="relay_events") as conn:
                nodes = {row[0] for row in conn.execute("SELECT node FROM checkpoints")}
            return nodes >= {f"{h}.relay.test" for h in HOSTS} or None

        wait_for(positioned, 30, what="both trackers' checkpoints in PostgreSQL")
        sent = {}
        for h in HOSTS:
            got = _send_and_expect(d, h, "acme", "fleet")
            [mid] = got.header("Message-ID")
            sent[mid.strip().strip("<>")] = f"{h}.relay.test"
        relayed = wait_for(
            lambda: (lambda evs: evs if set(evs) >= set(sent) else None)(
                {mid: e.node for e in store.events(kinds=[Kind.RELAYED]) if (mid := (e.message_id or "").strip("<>")) in sent}
            ),
            30, what="RELAYED events of both nodes in the one PostgreSQL store",
        )
    finally:
        store.close()
    assert relayed == sent
    print(f"PostgreSQL store: {len(sent)} messages relayed through {len(HOSTS)} nodes, recorded under {sorted(set(relayed.values()))}")


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
    # globex moves to a transport class of its own (concurrency is a class setting).
    # (The role shows the Postfix diff as a debug list: each line an item, "    - +rc_...".)
    assert re.search(r"^\s+- \+rc_\w+_destination_concurrency_limit = 7$", out, re.M), out[-4000:]
    assert re.search(r"^\s+- \+rc_\w+ unix\s+-\s+-\s+n\s+-\s+100\s+smtp", out, re.M), out[-4000:]
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
    # The error names the inventory's tenant, not the staging copy of it.
    assert "relay_tenants[globex]: tenant globex: field relay_domain" in out, out[-4000:]
    assert "relay-staging-" not in out
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


def test_tags_select_steps_and_keep_the_facts_they_need(deployment):
    r = deployment.play("--list-tasks", "--tags", "config,services")
    assert r.returncode == 0, _fail(r)
    out = r.stdout
    for task in ("Check the staged configuration (relayctl check)", "Render the systemd units",
                 "Checksum the package", "Check whether relayctl is installed"):  # the last two: tagged always
        assert task in out, task
    for task in ("Install Postfix and the build dependencies", "Install the firewall ruleset", "Set submission user passwords"):
        assert task not in out, task
    assert re.search(r"TAGS: \[.*\bconfig\b", out) and re.search(r"TAGS: \[.*\bservices\b", out)


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
