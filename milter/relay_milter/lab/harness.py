"""A relay on loopback, built from real parts: the demo and the end-to-end tests use it.

- a private Postfix instance (own config, queue and data directories; the
  system Postfix, if any, is not touched), rendered by our own templates;
- the real milter, as a separate process (``relayctl milter``);
- dnsmasq on port 53 of a loopback address of its own, serving DKIM keys: the relay's
  own lookups (settings ``dns``) and the lab Postfix's (a private /etc/resolv.conf, see
  ``Lab.start_postfix``) go there, so no DNS query leaves loopback;
- aiosmtpd sinks standing in for the customers' smarthosts.

Everything listens on loopback only (127.0.0.1; the DNS server on 127.x.y.z). Needs root
(Postfix starts as root, and its private resolv.conf needs a mount namespace).
"""

from __future__ import annotations

import atexit
import base64
import json
import os
import random
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import dkim
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from relay_milter.milter.negotiate import NegotiationError, negotiate
from relay_milter.postfix.certs import CertPair, make_ca, make_cert
from relay_milter.postfix.runner import run_postfix


_ISSUED_PORTS: set[int] = set()
_ISSUED_ADDRESSES: set[str] = set()
_PORTS_LOCK = threading.Lock()


def lab_slot() -> tuple[int, int]:
    """(index, count) from ``RELAY_LAB_SLOT=i/n``: labs in n processes at once (pytest-xdist
    workers) each take only the ports and DNS addresses of their own residue class mod n,
    so two processes never hand out the same one. Unset: (0, 1), everything is ours."""
    raw = os.environ.get("RELAY_LAB_SLOT", "")
    try:
        index, count = (int(x) for x in raw.split("/"))
    except ValueError:
        return 0, 1
    return (index, count) if 0 <= index < count else (0, 1)


# Lab ports come from below Linux's ephemeral range (32768-60999 by default), where the
# kernel never hands out ports for outgoing connections or bind(port 0).
LAB_PORTS = range(10000, 32768)


def free_port() -> int:
    """A loopback port nobody listens on (TCP or UDP), never the same twice in this process,
    and in a multi-process run (RELAY_LAB_SLOT) never one another process may hand out.

    Ports are handed out before their owner binds them (a sink starts after dnsmasq, which
    asks for its port later): without the memory, the same still-unbound port could be
    offered twice and the later owner would fail with "address already in use". The port is
    chosen here, not by the kernel: bind(port 0) prefers even ports, so a residue class of
    the kernel's choices can be empty.
    """
    index, count = lab_slot()
    rng = random.SystemRandom()
    candidates = range(LAB_PORTS.start + (index - LAB_PORTS.start) % count, LAB_PORTS.stop, count)
    with _PORTS_LOCK:
        for _ in range(10_000):
            port = rng.choice(candidates)
            if port in _ISSUED_PORTS:
                continue
            try:
                for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                    with socket.socket(socket.AF_INET, kind) as s:
                        s.bind(("127.0.0.1", port))
            except OSError:
                continue
            _ISSUED_PORTS.add(port)
            return port
    raise RuntimeError(f"no free loopback port in slot {index}/{count}")


def free_loopback_address(port: int = 53) -> str:
    """A 127.x.y.z address (never 127.0.0.1) on which nobody uses ``port``, UDP or TCP.

    /etc/resolv.conf cannot name a port, so a resolver for a Postfix instance must listen on
    port 53; a random address of 127.0.0.0/8 (all of it is loopback on Linux) gives each lab
    its own without touching the host's network configuration.
    """
    rng = random.SystemRandom()
    index, count = lab_slot()
    with _PORTS_LOCK:
        for _ in range(200 * count):
            addr = f"127.{rng.randrange(1, 255)}.{rng.randrange(0, 256)}.{rng.randrange(1, 255)}"
            if addr in _ISSUED_ADDRESSES or int(addr.split(".")[2]) % count != index:
                continue
            try:
                for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                    with socket.socket(socket.AF_INET, kind) as s:
                        s.bind((addr, port))
            except OSError:
                continue
            _ISSUED_ADDRESSES.add(addr)
            return addr
    raise RuntimeError(f"no free loopback address for port {port}")


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def stop_process(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 10) -> None:
    """Signal a child we started, wait for it, and kill it if it does not go."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def _remove_orphan(base: Path, instance: Path) -> None:
    """At exit: a caller that removed the lab's base directory itself (not ``destroy``)
    leaves the Postfix instance next to it; remove that too."""
    if not base.exists() and instance.exists():
        shutil.rmtree(instance, ignore_errors=True)


# -- keys ----------------------------------------------------------------------


@dataclass(frozen=True)
class DkimKey:
    private_pem: bytes
    txt: str  # the DKIM TXT record (v=DKIM1; k=...; p=...)
    algorithm: str  # rsa-sha256 | ed25519-sha256

    @property
    def public_b64(self) -> str:
        return self.txt.split("p=", 1)[1]


def rsa_key(bits: int = 2048) -> DkimKey:
    if bits < 1024:  # cryptography refuses to generate weak keys; tests need one to refuse it
        out = subprocess.run(
            ["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", f"rsa_keygen_bits:{bits}"],
            capture_output=True, check=True,
        ).stdout
        key = serialization.load_pem_private_key(out, password=None)
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return DkimKey(pem, f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}", "rsa-sha256")


def ed25519_key() -> DkimKey:
    key = ed25519.Ed25519PrivateKey.generate()
    raw_priv = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    raw_pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    # dkimpy takes the base64 of the 32-byte seed as the ed25519 private key.
    return DkimKey(base64.b64encode(raw_priv), f"v=DKIM1; k=ed25519; p={base64.b64encode(raw_pub).decode()}", "ed25519-sha256")


# What the lab signs, as docs/security.md recommends: every header the relay requires
# whenever present, each listed twice (oversigned), so a field added after signing, or a
# second instance of one, breaks the signature.
SIGNED_HEADERS = ("from", "to", "cc", "subject", "date", "message-id", "reply-to", "mime-version", "content-type")
OVERSIGNED = SIGNED_HEADERS * 2


def sign(
    message: bytes,
    key: DkimKey,
    domain: str,
    selector: str,
    headers: tuple[str, ...] = OVERSIGNED,
    canonicalize: tuple[bytes, bytes] = (b"relaxed", b"relaxed"),
    **kwargs,
) -> bytes:
    """Prepend a DKIM-Signature made with dkimpy (the same library a platform would use)."""
    sig = dkim.sign(
        message,
        selector.encode(),
        domain.encode(),
        key.private_pem,
        include_headers=[h.encode() for h in headers],
        canonicalize=canonicalize,
        signature_algorithm=key.algorithm.encode(),
        **kwargs,
    )
    return sig + message


def make_message(
    sender: str,
    to: str,
    subject: str = "Test message",
    body: str = "Hello from the platform.\r\n",
    extra_headers: tuple[tuple[str, str], ...] = (),
    message_id: str | None = None,
) -> bytes:
    mid = message_id or f"<{time.time_ns()}.{os.getpid()}@platform.example>"
    lines = [
        f"From: Platform Sender <{sender}>",
        f"To: {to}",
        f"Subject: {subject}",
        f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}",
        f"Message-ID: {mid}",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
    ]
    lines += [f"{n}: {v}" for n, v in extra_headers]
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


# -- sinks -----------------------------------------------------------------------


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    peer: str
    tls: tuple | None = None  # (cipher, protocol, bits) when the session was under STARTTLS
    login: str | None = None  # the SMTP AUTH user the relay logged in as
    helo: str | None = None  # the name the relay gave in EHLO/HELO
    at: float = field(default_factory=time.monotonic)  # when the sink took the message

    def header(self, name: str) -> list[str]:
        import email

        msg = email.message_from_bytes(self.content)
        return [str(v) for v in msg.get_all(name, [])]


class SinkHandler:
    def __init__(self, sink: "Sink"):
        self.sink = sink

    async def handle_DATA(self, server, session, envelope):
        reply = self.sink.reply
        if reply.startswith("250"):
            with self.sink.lock:
                self.sink.messages.append(
                    Received(
                        envelope.mail_from,
                        list(envelope.rcpt_tos),
                        envelope.original_content or envelope.content,
                        str(session.peer),
                        tls=(session.ssl or {}).get("cipher"),
                        login=session.auth_data if session.authenticated else None,
                        helo=session.host_name,
                    )
                )
        return reply


def _authenticator(users: dict[str, str]):
    from aiosmtpd.smtp import AuthResult, LoginPassword

    def check(server, session, envelope, mechanism, auth_data):
        user = auth_data.login.decode() if isinstance(auth_data, LoginPassword) else None
        ok = user in users and auth_data.password.decode() == users[user]
        return AuthResult(success=ok, handled=False, auth_data=user if ok else None)

    return check


class Sink:
    """An aiosmtpd server standing in for a customer's smarthost.

    ``tls``: offer STARTTLS with this certificate (plaintext stays possible, so a
    relay that skipped TLS would be caught delivering in clear). ``auth``:
    (user, password) the relay must log in with, or {user: password} for a smarthost
    several tenants log in to (each message records its session's login); AUTH is offered
    only under TLS.
    """

    def __init__(
        self, name: str, port: int | None = None, tls: CertPair | None = None,
        auth: tuple[str, str] | dict[str, str] | None = None,
    ):
        self.name = name
        self.port = port or free_port()
        self.tls = tls
        self.auth = auth
        self.messages: list[Received] = []
        self.lock = threading.Lock()
        self.reply = "250 2.0.0 Ok: queued"
        self._controller = None

    def start(self) -> "Sink":
        from aiosmtpd.controller import Controller

        kwargs: dict = {}
        if self.tls:
            import ssl

            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            with tempfile.TemporaryDirectory() as tmp:
                cert, key = Path(tmp) / "c.pem", Path(tmp) / "k.pem"
                self.tls.write(cert, key)
                ctx.load_cert_chain(cert, key)
            kwargs |= {"tls_context": ctx, "require_starttls": False}
        if self.auth:
            import logging

            logging.getLogger("mail.log").setLevel(logging.ERROR)  # aiosmtpd's login_data deprecation noise
            users = dict([self.auth]) if isinstance(self.auth, tuple) else dict(self.auth)
            kwargs |= {"authenticator": _authenticator(users), "auth_required": True, "auth_require_tls": True}
        self._controller = Controller(SinkHandler(self), hostname="127.0.0.1", port=self.port, ready_timeout=10, **kwargs)
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller:
            self._controller.stop()
            self._controller = None

    def wait(self, count: int = 1, timeout: float = 30) -> list[Received]:
        wait_for(lambda: len(self.messages) >= count, timeout, what=f"{count} message(s) at sink {self.name}")
        return list(self.messages)


def _exchange(smtp: smtplib.SMTP, message: bytes, mail_from: str, rcpts: list[str], before=None) -> tuple[int, str, dict]:
    """One transaction; returns (code, text, refused recipients) of the deciding reply."""
    try:
        if before:
            before(smtp)
        refused = smtp.sendmail(mail_from, rcpts, message)
    except smtplib.SMTPRecipientsRefused as exc:
        code, text = next(iter(exc.recipients.values()))
        return code, text.decode(errors="replace"), exc.recipients
    except smtplib.SMTPResponseException as exc:
        return exc.smtp_code, exc.smtp_error.decode(errors="replace"), {}
    except smtplib.SMTPNotSupportedError as exc:  # e.g. AUTH not offered
        return 0, str(exc), {}
    return 250, "ok", refused


# -- DNS -------------------------------------------------------------------------


class DnsServer:
    """dnsmasq on loopback, answering only from what we give it: TXT ``records``, address
    records ``hosts`` (name -> IP). It never forwards a query (--no-resolv, --no-hosts).
    Names under the ``local`` domains it does not know get NXDOMAIN (``"#"``: every name);
    other unknown names get REFUSED, which resolvers treat as a temporary failure.
    RFC 6761's ``invalid`` is local by default: such a name never exists, as in the world."""

    def __init__(
        self,
        workdir: Path,
        records: dict[str, str],
        port: int | None = None,
        address: str = "127.0.0.1",
        hosts: dict[str, str] | None = None,
        local: tuple[str, ...] = ("invalid",),
        extra_args: tuple[str, ...] = (),
    ):
        self.port = port or free_port()
        self.address = address
        self.workdir = workdir
        self.records = records
        self.hosts = hosts or {}
        self.local = local
        self.extra_args = tuple(extra_args)  # more dnsmasq options: --host-record, --address, --local
        self.proc: subprocess.Popen | None = None

    def start(self) -> "DnsServer":
        exe = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
        args = [
            exe, "--keep-in-foreground", "--no-resolv", "--no-hosts", "--no-poll",
            f"--listen-address={self.address}", "--bind-interfaces", f"--port={self.port}",
            "--user=root", f"--pid-file={self.workdir / 'dnsmasq.pid'}", "--log-facility=-",
        ]
        args += [f"--local=/{domain}/" for domain in self.local]
        args += [f"--host-record={name},{ip}" for name, ip in self.hosts.items()]
        for name, text in self.records.items():
            chunks = [text[i : i + 250] for i in range(0, len(text), 250)]
            args.append(f"--txt-record={name}," + ",".join(f'"{c}"' if "," in c else c for c in chunks))
        args += self.extra_args
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(self.workdir / "dnsmasq.log", "ab"))
        wait_for(self._answers, 10, what="dnsmasq")
        return self

    def _answers(self) -> bool:
        import dns.message
        import dns.query

        if self.proc and self.proc.poll() is not None:
            raise RuntimeError(f"dnsmasq exited: {(self.workdir / 'dnsmasq.log').read_text()}")
        try:
            dns.query.udp(dns.message.make_query("probe.invalid.", "TXT"), self.address, port=self.port, timeout=0.5)
            return True
        except Exception:
            return False

    def stop(self) -> None:
        stop_process(self.proc)


# -- the relay --------------------------------------------------------------------


@dataclass
class TenantSpec:
    id: str
    relay_domain: str
    signing_domain: str
    selector: str
    key: DkimKey
    sender_domains: list[str]
    pin_key: bool = True
    extra: dict = field(default_factory=dict)
    # The tenant file's allow_bcc; None leaves it out (the product default, false: every
    # decoded recipient must be in the signed To/Cc). Lab tenants allow Bcc-style sending
    # unless told otherwise, because older end-to-end tests send one signed message to
    # many envelope recipients; tests of the binding and the demo use None or False.
    allow_bcc: bool | None = True


class Lab:
    """A private relay: Postfix + milter + DNS + sinks, all under one /var/tmp directory."""

    def __init__(self, base: Path | None = None):
        # Under /var so maillog_file is accepted (maillog_file_prefixes). Root only (0700):
        # the event store, the logs, the settings, the secrets and the TLS key are in here.
        self.base = Path(base or tempfile.mkdtemp(prefix="relay-lab-", dir="/var/tmp"))
        self.base.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base, 0o700)
        # The Postfix instance lives next to it, laid out like /etc/postfix, /var/spool/postfix
        # and /var/lib/postfix on a host: Postfix's unprivileged daemons must reach their data
        # directory, the sasldb and the milter socket, which a 0700 base would hide.
        self.instance = self.base.with_name(self.base.name + ".postfix")
        self.instance.mkdir(mode=0o755, exist_ok=True)
        os.chmod(self.instance, 0o755)
        atexit.register(_remove_orphan, self.base, self.instance)
        self.config_dir = self.instance / "postfix"
        self.queue_dir = self.instance / "queue"
        self.data_dir = self.instance / "data"
        self.tenants_dir = self.base / "tenants"
        self.settings_file = self.base / "relay.yaml"
        self.maillog = self.base / "maillog"
        self.milter_log = self.base / "milter.log"
        self.milter_socket = self.instance / "run" / "milter.sock"
        self.smtp_port = free_port()
        self.submission_port = free_port()
        self.sasl_db = self.config_dir / "sasl" / "sasldb2"  # the default location
        self.secrets_file = self.base / "secrets.yaml"
        self.secrets: dict[str, dict] = {}
        self.overrides: dict = {}  # settings that differ from the lab's defaults
        # Seconds a relayctl command or postfix start may take; labs with thousands of tenants
        # raise it (Postfix's own postconf takes seconds per run there: docs/scale.md).
        self.relayctl_timeout: float = 180
        # A throwaway CA for the customer smarthosts, and the relay's own self-signed certificate.
        self.ca = make_ca("Relay Lab Smarthost CA")
        self.ca_file = self.base / "tls" / "smarthost-ca.pem"
        self.relay_cert = self.base / "tls" / "relay.pem"
        self.relay_key = self.base / "tls" / "relay.key"
        self.sinks: dict[str, Sink] = {}
        self.tenants: dict[str, TenantSpec] = {}
        self.dns: DnsServer | None = None
        self.milter_proc: subprocess.Popen | None = None
        self.tracker_proc: subprocess.Popen | None = None
        self.tracker_log = self.base / "tracker.log"
        self.events_dsn = f"sqlite:///{self.base / 'events.db'}"
        self.postfix_started = False
        # The lab Postfix's /etc/resolv.conf (start_postfix); next to the instance, which is
        # readable by Postfix's unprivileged daemons.
        self.resolv_conf = self.instance / "resolv.conf"
        for d in (self.config_dir, self.queue_dir, self.tenants_dir, self.milter_socket.parent):
            d.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        shutil.chown(self.data_dir, "postfix", "postfix")
        make_cert(["relay.lab.test"]).write(self.relay_cert, self.relay_key)
        self.ca_file.write_bytes(self.ca.cert_pem)

    def smarthost_cert(self, name: str, ca: CertPair | None = None) -> CertPair:
        """A certificate for a customer smarthost, signed by the lab CA (or ``ca``)."""
        return make_cert([name], ca or self.ca)

    # configuration --------------------------------------------------------------

    def add_tenant(self, spec: TenantSpec, sink: Sink, **smarthost) -> None:
        self.tenants[spec.id] = spec
        self.sinks[spec.id] = sink
        doc = {
            "id": spec.id,
            "relay_domain": spec.relay_domain,
            "signing_domain": spec.signing_domain,
            "selector": spec.selector,
            "allowed_sender_domains": spec.sender_domains,
            "smarthost": {"host": "127.0.0.1", "port": sink.port, "tls": "none", **smarthost},
        }
        if spec.pin_key:
            doc["public_key"] = spec.key.txt
        if spec.allow_bcc is not None:
            doc["allow_bcc"] = spec.allow_bcc
        doc.update(spec.extra)
        (self.tenants_dir / f"{spec.id}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))

    def settings(self) -> dict:
        return {
            "myhostname": "relay.lab.test",
            "config_directory": str(self.config_dir),
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "smtpd_listen": [f"127.0.0.1:{self.smtp_port}"],
            "submission_listen": [f"127.0.0.1:{self.submission_port}"],
            "tls_cert_file": str(self.relay_cert),
            "tls_key_file": str(self.relay_key),
            "secrets_file": str(self.secrets_file),
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "maillog_file": str(self.maillog),
            "milter_socket": f"unix:{self.milter_socket}",
            "milter_command_timeout": "10s",
            "milter_content_timeout": "15s",
            "dns": {"nameservers": [self.dns.address if self.dns else "127.0.0.1"], "port": self.dns.port if self.dns else 53, "timeout": 3},
            # The tracker writes the backpressure queue summary here (when it runs: start_tracker),
            # and copies operator events from the lab's own reputation state file.
            "reputation": {"queue_summary_file": str(self.base / "queue-summary.json"),
                           "state_file": str(self.base / "reputation.json")},
            "tracking": {
                "events_dsn": self.events_dsn,
                "milter_log_file": str(self.milter_log),
                "poll_interval": 0.2,
                "record_wait": 5,
                "webhook_backoff_base": 1,
                "webhook_backoff_max": 4,
                # The lab's webhook receivers listen on loopback, which webhooks reach only when allowed.
                "webhook_allow_networks": ["127.0.0.0/8"],
            },
        }

    def write_settings(self, **overrides) -> None:
        settings = self.settings() | self.overrides | overrides
        # reputation is merged, so a lab that sets a pool keeps the lab's queue summary file.
        settings["reputation"] = self.settings()["reputation"] | self.overrides.get("reputation", {}) | overrides.get("reputation", {})
        self.settings_file.write_text(yaml.safe_dump(settings, sort_keys=False))
        fd = os.open(self.secrets_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(self.secrets, f)

    def add_user(self, user: str, password: str) -> None:
        """Give a tenant's submission user a password (relayctl user add --password-stdin)."""
        cmd = [sys.executable, "-m", "relay_milter.cli", "--tenants", str(self.tenants_dir), "--settings", str(self.settings_file)]
        r = subprocess.run([*cmd, "user", "add", user, "--password-stdin"], input=password + "\n", capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"relayctl user add {user} failed ({r.returncode}): {r.stderr}")

    def relayctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "relay_milter.cli", "--tenants", str(self.tenants_dir), "--settings", str(self.settings_file), *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=self.relayctl_timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"relayctl {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        return r

    # processes -----------------------------------------------------------------

    def dns_args(self) -> tuple[str, ...]:
        """More dnsmasq options (``--host-record``, ``--address``, ``--local``) for a lab that
        serves more than the tenants' DKIM keys; a subclass overrides this."""
        return ()

    def start_dns(self) -> None:
        """The lab's one DNS server, on port 53 of its own loopback address: settings ``dns``
        (relayctl, the milter) and the lab Postfix's resolv.conf both name it. Started again
        (after ``self.dns.stop()``), it keeps its address, so both stay right."""
        records = {f"{t.selector}._domainkey.{t.signing_domain}": t.key.txt for t in self.tenants.values()}
        address = self.dns.address if self.dns is not None else free_loopback_address(53)
        self.dns = DnsServer(self.base, records, port=53, address=address, extra_args=self.dns_args()).start()
        self.resolv_conf.write_text(f"nameserver {self.dns.address}\noptions attempts:1 timeout:2\n")
        os.chmod(self.resolv_conf, 0o644)

    def start_milter(self, *args: str) -> None:
        """``relayctl milter`` (its supervisor and its workers, in a process group of their
        own); back once a worker answers a milter negotiation."""
        if self.milter_socket.exists():
            self.milter_socket.unlink()
        cmd = [sys.executable, "-m", "relay_milter.cli", "--tenants", str(self.tenants_dir), "--settings", str(self.settings_file), "milter", "--log-file", str(self.milter_log), *args]
        self.milter_proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(self.base / "milter.stderr", "ab"), start_new_session=True)
        wait_for(lambda: self._milter_up(), 20, what="milter socket")

    def _milter_up(self) -> bool:
        if self.milter_proc and self.milter_proc.poll() is not None:
            raise RuntimeError(f"milter exited: {(self.base / 'milter.stderr').read_text()[-2000:]}")
        if not self.milter_socket.exists():
            return False
        try:
            negotiate(f"unix:{self.milter_socket}", timeout=2)
        except NegotiationError:
            return False
        return True

    def milter_workers(self) -> list[int]:
        """The pids of the milter's worker processes (the supervisor's children)."""
        if self.milter_proc is None:
            return []
        pid = self.milter_proc.pid
        try:
            return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except OSError:
            return []

    def milter_reloaded(self, pattern: str, mark: int = 0) -> bool:
        """Whether every milter worker has logged ``event=reload`` followed by ``pattern``
        (a regex, e.g. ``tenants=acme,initech``) after offset ``mark`` of the milter log:
        each worker watches the applied set on its own, within a second of the others."""
        workers = self.milter_workers()
        text = self.milter_log_text()[mark:]
        seen = {int(m.group(1)) for m in re.finditer(rf"relay\.milter\[(\d+)\]: \w+ NOQUEUE: event=reload {pattern}", text)}
        return bool(workers) and set(workers) <= seen

    def signal_milter(self, sig: int) -> None:
        """Signal the supervisor and every worker (SIGSTOP/SIGCONT: the whole milter hangs)."""
        if self.milter_proc is not None and self.milter_proc.poll() is None:
            os.killpg(self.milter_proc.pid, sig)

    def stop_milter(self, sig: int = signal.SIGTERM) -> None:
        proc, self.milter_proc = self.milter_proc, None
        stop_process(proc, sig)
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # a worker left behind, if any
            except ProcessLookupError:
                pass

    def start_tracker(self, *args: str) -> None:
        """``relayctl track`` as a separate process, like the systemd unit runs it."""
        cmd = [sys.executable, "-m", "relay_milter.cli", "--tenants", str(self.tenants_dir), "--settings", str(self.settings_file), "track", "--log-file", str(self.tracker_log), *args]
        self.tracker_proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(self.base / "tracker.stderr", "ab"))
        wait_for(self._tracker_up, 20, what="tracker start")

    def _tracker_up(self) -> bool:
        if self.tracker_proc and self.tracker_proc.poll() is not None:
            raise RuntimeError(f"tracker exited {self.tracker_proc.returncode}: {(self.base / 'tracker.stderr').read_text()[-2000:]}")
        pid = f"[{self.tracker_proc.pid}]:" if self.tracker_proc else None
        return any(pid in ln and "event=track_start" in ln for ln in self.tracker_log_text().splitlines())

    def stop_tracker(self, sig: int = signal.SIGTERM) -> int | None:
        proc, self.tracker_proc = self.tracker_proc, None
        stop_process(proc, sig)
        return proc.returncode if proc else None

    def tracker_log_text(self) -> str:
        try:
            return self.tracker_log.read_text(errors="replace")
        except OSError:
            return ""

    def postfix_start_command(self) -> list[str]:
        """``postfix start``, in a mount namespace of its own where /etc/resolv.conf names
        the lab's DNS server only.

        Postfix's smtp client resolves a smarthost name with the system resolver
        (/etc/resolv.conf); a test with a name that does not resolve must not send that
        query off this machine. The master and every daemon it forks stay in the namespace
        (reload, stop and the queue tools reach it through its pid and its queue directory,
        unchanged), and the rest of the host keeps its own resolv.conf. Without a system
        resolv.conf there is nothing to replace: the C library then asks 127.0.0.1.
        """
        argv = ["postfix", "-c", str(self.config_dir), "start"]
        if self.dns is None or not Path("/etc/resolv.conf").exists():
            return argv
        mount = 'mount --bind "$0" /etc/resolv.conf && exec "$@"'
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount, str(self.resolv_conf), *argv]

    def start_postfix(self) -> None:
        r = run_postfix(self.postfix_start_command(), timeout=self.relayctl_timeout)
        if r.returncode != 0:
            raise RuntimeError(f"postfix start failed: {r.stdout}\n{self.maillog_text()[-3000:]}")
        self.postfix_started = True
        wait_for(self._smtp_up, 20, what="postfix smtpd")

    def _smtp_up(self) -> bool:
        return port_open(self.smtp_port)

    def stop_postfix(self) -> None:
        if self.postfix_started:
            run_postfix(["postfix", "-c", str(self.config_dir), "stop"])
            self.postfix_started = False

    def start(self) -> "Lab":
        """DNS, settings, rendered+checked+installed config, sinks, milter, Postfix."""
        self.start_dns()
        self.write_settings()
        self.relayctl("apply", "--no-reload")
        for sink in self.sinks.values():
            if sink._controller is None:
                sink.start()
        self.start_milter()
        self.start_postfix()
        return self

    def stop(self) -> None:
        self.stop_tracker()
        self.stop_postfix()
        self.stop_milter()
        for sink in self.sinks.values():
            sink.stop()
        if self.dns:
            self.dns.stop()

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)
        shutil.rmtree(self.instance, ignore_errors=True)

    # mail ------------------------------------------------------------------------

    def send(self, message: bytes, mail_from: str, rcpts: list[str]) -> tuple[int, str, dict]:
        """Send over SMTP. Returns (code, text, refused recipients) of the final reply."""
        with smtplib.SMTP("127.0.0.1", self.smtp_port, local_hostname="platform.lab.test", timeout=60) as smtp:
            return _exchange(smtp, message, mail_from, rcpts)

    def submit(
        self, message: bytes, mail_from: str, rcpts: list[str], user: str, password: str, starttls: bool = True
    ) -> tuple[int, str, dict]:
        """Authenticated submission on the submission port (STARTTLS, then AUTH PLAIN)."""
        import ssl

        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the lab's relay certificate is self-signed
        with smtplib.SMTP("127.0.0.1", self.submission_port, local_hostname="app.lab.test", timeout=60) as smtp:

            def login(smtp: smtplib.SMTP) -> None:
                if starttls:
                    smtp.starttls(context=ctx)
                smtp.login(user, password)

            return _exchange(smtp, message, mail_from, rcpts, login)

    def queue(self) -> list[dict]:
        r = subprocess.run(["postqueue", "-c", str(self.config_dir), "-j"], capture_output=True, text=True, timeout=30)
        return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]

    def flush(self) -> None:
        subprocess.run(["postqueue", "-c", str(self.config_dir), "-f"], capture_output=True, timeout=30)

    def maillog_text(self) -> str:
        try:
            return self.maillog.read_text(errors="replace")
        except OSError:
            return ""

    def milter_log_text(self) -> str:
        try:
            return self.milter_log.read_text(errors="replace")
        except OSError:
            return ""
