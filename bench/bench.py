#!/usr/bin/env python3
"""Throughput and latency of the relay against bare Postfix and Postfix + OpenDKIM, side by side.

Three private Postfix instances (same rendered configuration, same tenants,
same smarthost) differ only in the milter in front of them:

  bare      no milter: the ceiling of Postfix on this machine
  opendkim  Debian's OpenDKIM in verify mode (fail closed: bad/missing signature -> reject),
            keys from a local DNS server
  floor     a minimal C milter (bench/floor/floor_milter.c, libmilter, built with cc at
            start) that receives the whole message and makes exactly the relay's edits
            with no checks: what any milter doing this job costs Postfix at least
  relay     our milter doing the full work: verify, tenant checks, rewrite, route

For every cell (message size x concurrent clients x signature algorithm) the
same pre-signed messages go through each configuration in turn, interleaved, so
machine noise hits all of them alike. Delivery goes to Postfix's `smtp-sink`.

Needs root, postfix, opendkim, dnsmasq, cc and libmilter-dev (deps/apt/). Everything
listens on 127.0.0.1 on free ports; DNS is a dnsmasq on a free port that both
milters use (OpenDKIM's libunbound takes "Nameservers 127.0.0.1@PORT").

Run:  bench/run.sh            (bootstraps, then runs this with the defaults)
      .venv/bin/python bench/bench.py --help
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from relay_milter.core.addresses import encode_recipient
from relay_milter.lab import Lab, TenantSpec, ed25519_key, port_open, rsa_key, sign, stop_process, wait_for
from relay_milter.lab.loadgen import (
    MaillogCounter,
    Outgoing,
    SmtpSinkProcess,
    percentile,
    proc_cpu_seconds,
    proc_memory_kib,
    send_all,
)
from relay_milter.lab import free_port
from relay_milter.core import route
from relay_milter.milter.adapter import load_route_key
from relay_milter.postfix.runner import run_postfix

CONFIGS = ("bare", "opendkim", "floor", "relay")
# The milters that verify signatures: the probe makes sure they refuse a tampered one.
VERIFYING = ("opendkim", "relay")
FLOOR_SOURCE = Path(__file__).resolve().parent / "floor" / "floor_milter.c"
ALGS = {"rsa": "RSA-2048", "ed25519": "ed25519"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- message sets ------------------------------------------------------------------


@dataclass
class BenchTenant:
    alg: str
    spec: TenantSpec


def tenants() -> dict[str, BenchTenant]:
    out = {}
    for alg, key in (("rsa", rsa_key(2048)), ("ed25519", ed25519_key())):
        tid = "rsa" if alg == "rsa" else "ed"
        out[alg] = BenchTenant(
            alg,
            TenantSpec(
                id=f"bench_{tid}",
                relay_domain=f"{tid}.relay.test",
                signing_domain=f"hop-{tid}.bench.example",
                selector="bench",
                key=key,
                sender_domains=[f"{tid}.example"],
                pin_key=False,  # key from DNS, like OpenDKIM
                # Every edit the floor makes, the relay makes too: Reply-To and MAIL FROM included.
                extra={"headers": {"reply_to": f"support@{tid}.example", "envelope_sender": f"bounces@{tid}.example"}},
            ),
        )
    return out


def _sign_one(args) -> bytes:
    raw, key, domain, selector = args
    return sign(raw, key, domain, selector)


def build_messages(t: BenchTenant, size: int, count: int, tag: str) -> list[Outgoing]:
    """``count`` distinct messages of about ``size`` bytes (headers + body), each signed."""
    spec = t.spec
    sender = f"news@{spec.sender_domains[0]}"
    line = ("The quick brown fox jumps over the lazy dog 0123456789 " * 2)[:76] + "\r\n"
    unsigned = []
    for i in range(count):
        to = f"user{i}@example.org"
        date = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime())
        head = (
            f"From: Bench <{sender}>\r\nTo: {to}\r\nSubject: bench {tag} #{i}\r\nDate: {date}\r\n"
            f"Message-ID: <{tag}.{i}.{time.time_ns()}@bench.example>\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
        )
        # ~560 bytes of DKIM-Signature come on top for RSA-2048, ~300 for ed25519.
        room = max(78, size - len(head) - (560 if t.alg == "rsa" else 300))
        body = (line * (room // len(line) + 1))[:room]
        body = body[: body.rfind("\r\n") + 2] or line
        unsigned.append(((head + body).encode(), spec.key, spec.signing_domain, spec.selector))
    # dkimpy signs in pure Python: use every core while nothing is being measured.
    if count > 50:
        with multiprocessing.get_context("fork").Pool(os.cpu_count() or 1) as pool:
            signed = pool.map(_sign_one, unsigned, chunksize=32)
    else:
        signed = [_sign_one(a) for a in unsigned]
    return [
        Outgoing.build(f"{tag}-{i}", sender, [encode_recipient(f"user{i}@example.org", spec.relay_domain)], raw)
        for i, raw in enumerate(signed)
    ]


# -- the three configurations ------------------------------------------------------


class BenchDns:
    """dnsmasq on a free loopback port serving the DKIM keys with a TTL of 300 s.

    Our milter (dnspython) and OpenDKIM (libunbound, "Nameservers 127.0.0.1@PORT")
    both cache the key for that TTL.
    """

    def __init__(self, workdir: Path, records: dict[str, str]):
        self.workdir, self.records = workdir, records
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> "BenchDns":
        exe = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
        args = [
            exe, "--keep-in-foreground", "--no-resolv", "--no-hosts", "--no-poll", "--listen-address=127.0.0.1",
            "--bind-interfaces", f"--port={self.port}", "--user=root", "--local-ttl=300",
            f"--pid-file={self.workdir / 'dnsmasq.pid'}", "--log-facility=-",
        ]
        for name, text in self.records.items():
            chunks = [text[i : i + 250] for i in range(0, len(text), 250)]
            args.append(f"--txt-record={name}," + ",".join(chunks))
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(self.workdir / "dnsmasq.log", "ab"))
        import dns.resolver

        def answers() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dnsmasq exited: {(self.workdir / 'dnsmasq.log').read_text()[-2000:]}")
            r = dns.resolver.Resolver(configure=False)
            r.nameservers, r.port, r.lifetime = ["127.0.0.1"], self.port, 1
            try:
                r.resolve(next(iter(self.records)), "TXT")
                return True
            except Exception:
                return False

        wait_for(answers, 10, what="dnsmasq")
        return self

    def stop(self) -> None:
        stop_process(self.proc)


class OpenDkim:
    def __init__(self, workdir: Path, authserv: str, dns_port: int):
        self.workdir, self.dns_port = workdir, dns_port
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.authserv = authserv

    def start(self) -> "OpenDkim":
        d = self.workdir
        (d / "internal-hosts").write_text("# nothing is internal: verify everything\n192.0.2.254\n")
        # Debian's OpenDKIM resolves through libunbound: "Nameservers" takes
        # unbound's addr@port form, so any loopback port works. Unbound answers
        # NXDOMAIN itself for .test (a default local zone), hence .example keys.
        conf = d / "opendkim.conf"
        conf.write_text(
            "\n".join(
                [
                    "Mode v",
                    f"Socket inet:{self.port}@127.0.0.1",
                    f"Nameservers 127.0.0.1@{self.dns_port}",
                    f"PidFile {d / 'opendkim.pid'}",
                    "UserID opendkim:opendkim",
                    "Syslog no",
                    f"AuthservID {self.authserv}",
                    "AlwaysAddARHeader yes",
                    f"InternalHosts {d / 'internal-hosts'}",
                    "MinimumKeyBits 1024",
                    # Fail closed, as our relay does: unverified mail is not accepted.
                    "On-BadSignature reject",
                    "On-NoSignature reject",
                    "On-KeyNotFound reject",
                    "On-DNSError tempfail",
                    "On-InternalError tempfail",
                    "On-Security tempfail",
                    "On-SignatureError reject",
                ]
            )
            + "\n"
        )
        os.chmod(d, 0o755)
        self.proc = subprocess.Popen(
            ["/usr/sbin/opendkim", "-f", "-x", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=open(d / "opendkim.stderr", "ab"),
        )

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"opendkim exited: {(d / 'opendkim.stderr').read_text()[-2000:]}")
            return port_open(self.port)

        wait_for(up, 15, what="opendkim")
        return self

    def stop(self) -> None:
        stop_process(self.proc)


def build_floor(workdir: Path) -> Path:
    """Compile bench/floor/floor_milter.c against libmilter (cc, libmilter-dev)."""
    exe = workdir / "floor_milter"
    cc = shutil.which("cc") or "cc"
    r = subprocess.run(
        [cc, "-O2", "-Wall", "-o", str(exe), str(FLOOR_SOURCE), "-lmilter", "-lpthread"], capture_output=True, text=True
    )
    if r.returncode != 0:
        raise RuntimeError(f"building {FLOOR_SOURCE} failed:\n{r.stderr}")
    return exe


class FloorMilter:
    """The floor: the C milter on the lab's milter socket, with the tenants' routes and seals."""

    def __init__(self, exe: Path, lab: Lab, ts: dict[str, BenchTenant], authserv: str):
        key = load_route_key(lab.config_dir)
        if key is None:
            raise RuntimeError("relayctl apply wrote no route key")
        self.lab = lab
        self.args = [str(exe), f"unix:{lab.milter_socket}", authserv]
        for t in ts.values():
            extra = t.spec.extra.get("headers", {})
            self.args.append(
                ",".join(
                    [
                        t.spec.relay_domain, t.spec.id, route.tenant_seal(key, t.spec.id), t.spec.signing_domain,
                        extra.get("reply_to", ""), extra.get("envelope_sender", ""),
                    ]
                )
            )
        self.proc: subprocess.Popen | None = None

    def start(self) -> "FloorMilter":
        sock = self.lab.milter_socket
        if sock.exists():
            sock.unlink()
        stderr = self.lab.base / "floor.stderr"
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=open(stderr, "ab"))

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"floor_milter exited: {stderr.read_text()[-2000:]}")
            return sock.exists()

        wait_for(up, 15, what="floor milter socket")
        return self

    def stop(self) -> None:
        stop_process(self.proc)


def postconf_edit(lab: Lab, *assignments: str) -> None:
    r = run_postfix(["postconf", "-c", str(lab.config_dir), "-e", *assignments])
    if r.returncode != 0:
        raise RuntimeError(f"postconf -e failed: {r.stdout}")


@dataclass
class Instance:
    name: str
    lab: Lab
    milter_pid: int | None = None  # the process whose CPU/RSS we report
    extra: list = field(default_factory=list)


def make_instance(
    name: str, ts: dict[str, BenchTenant], sink: SmtpSinkProcess, base: Path, concurrency: int, dns: BenchDns, floor_exe: Path | None
) -> Instance:
    (base / name).mkdir()
    lab = Lab(base / name)
    for t in ts.values():
        lab.add_tenant(t.spec, sink, concurrency=concurrency)
    lab.write_settings(dns={"nameservers": ["127.0.0.1"], "port": dns.port, "timeout": 3})
    lab.relayctl("apply", "--no-reload")
    inst = Instance(name, lab)
    if name == "relay":
        lab.start_milter()
        inst.milter_pid = lab.milter_proc.pid
    elif name == "floor":
        # The relay's own rendered Postfix configuration (milter socket, route table, transports).
        fm = FloorMilter(floor_exe, lab, ts, "relay.lab.test").start()
        inst.extra.append(fm)
        inst.milter_pid = fm.proc.pid
    else:
        transport = lab.config_dir / "relay" / "bench_transport"
        transport.write_text(
            "".join(f"{t.spec.relay_domain}\trelay_{t.spec.id}:[127.0.0.1]:{sink.port}\n" for t in ts.values())
        )
        milters = ""
        if name == "opendkim":
            od = OpenDkim(lab.instance, "relay.lab.test", dns.port).start()  # opendkim runs as its own user: not in the 0700 base
            inst.extra.append(od)
            inst.milter_pid = od.proc.pid
            milters = f"inet:127.0.0.1:{od.port}"
        postconf_edit(lab, f"smtpd_milters={milters}", "milter_header_checks=", f"transport_maps=texthash:{transport}")
    lab.start_postfix()
    return inst


def stop_instance(inst: Instance) -> None:
    inst.lab.stop_postfix()
    inst.lab.stop_milter()
    for x in inst.extra:
        x.stop()


# -- measuring -------------------------------------------------------------------------


@dataclass
class Cell:
    config: str
    size: int
    clients: int
    alg: str
    messages: int
    accepted: int = 0
    refused: int = 0
    failed: int = 0
    delivered: int = 0
    seconds: float = 0.0
    msgs_per_s: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    cpu_s_per_1000: float | None = None
    rss_mib: float | None = None
    peak_rss_mib: float | None = None
    first_error: str = ""


def measure(inst: Instance, msgs: list[Outgoing], clients: int, per_connection: int, drain_timeout: float) -> Cell:
    counter = MaillogCounter(inst.lab.maillog)
    cpu0 = proc_cpu_seconds(inst.milter_pid) if inst.milter_pid else None
    res = send_all(msgs, inst.lab.smtp_port, clients=clients, per_connection=per_connection, timeout=60)
    accepted = len(res.accepted)
    done = counter.wait(accepted, drain_timeout)
    end = done or time.monotonic()
    lat = res.latencies()
    cell = Cell(inst.name, 0, clients, "", len(msgs))
    cell.accepted, cell.refused = accepted, len(res.refused)
    cell.failed = len(res.unfinished)
    cell.delivered = counter.poll()
    cell.seconds = end - res.started
    cell.msgs_per_s = cell.delivered / cell.seconds if cell.seconds > 0 else 0
    cell.p50_ms = percentile(lat, 50) * 1000 if lat else None
    cell.p99_ms = percentile(lat, 99) * 1000 if lat else None
    bad = [o for o in res.outcomes.values() if not o.accepted]
    if bad:
        cell.first_error = f"{bad[0].code} {bad[0].text}"[:160]
    if done is None:
        cell.first_error = (cell.first_error + f"; only {cell.delivered}/{accepted} delivered after {drain_timeout}s").strip("; ")
    if inst.milter_pid:
        cpu1 = proc_cpu_seconds(inst.milter_pid)
        cell.cpu_s_per_1000 = (cpu1 - cpu0) / max(1, len(msgs)) * 1000
        mem = proc_memory_kib(inst.milter_pid)
        cell.rss_mib = mem.get("VmRSS", 0) / 1024
        cell.peak_rss_mib = mem.get("VmHWM", 0) / 1024
    return cell


def probe(inst: Instance, good: Outgoing, bad: Outgoing) -> tuple[bool, bool, str]:
    """Does the configuration accept a good signature and (when it verifies) refuse a broken one?"""
    res = send_all([good, bad], inst.lab.smtp_port, clients=1, per_connection=2, timeout=30)
    g, b = res.outcomes[good.key], res.outcomes[bad.key]
    return g.accepted, b.refused, f"good: {g.code} {g.text} | tampered: {b.code} {b.text}"


def tampered(m: Outgoing) -> Outgoing:
    return Outgoing(m.key + "-tampered", m.mail_from, m.rcpts, m.data.replace(b"quick brown fox", b"quick brown cat", 1))


# -- report ---------------------------------------------------------------------------------


def fmt(v, spec: str = ".0f", none: str = "-") -> str:
    return none if v is None else format(v, spec)


def size_label(n: int) -> str:
    return f"{n // 1024} KB"


def median_cell(cs: list[Cell]) -> Cell:
    """Of repeated runs of one cell, the one with the median throughput (a failed run wins: errors must show)."""
    bad = [c for c in cs if c.first_error]
    if bad:
        return bad[0]
    ordered = sorted(cs, key=lambda c: c.msgs_per_s)
    return ordered[(len(ordered) - 1) // 2]


def table(cells: list[Cell]) -> str:
    groups: dict = {}
    for c in cells:
        groups.setdefault((c.size, c.clients, c.alg), {}).setdefault(c.config, []).append(c)
    rows = {key: {cfg: median_cell(cs) for cfg, cs in by_cfg.items()} for key, by_cfg in groups.items()}
    head = (
        "| size | clients | sig | bare msg/s | bare p50/p99 ms | OpenDKIM msg/s | OpenDKIM p50/p99 ms "
        "| floor msg/s | floor p50/p99 ms | relay msg/s | relay p50/p99 ms | floor/bare | relay/bare | relay/OpenDKIM "
        "| relay/floor | relay CPU s/1000 msg | floor CPU s/1000 msg | OpenDKIM CPU s/1000 msg | relay RSS MiB (peak) |\n"
        "|---|---:|---|" + "---:|" * 17 + "\n"
    )
    lines = []
    for (size, clients, alg), r in rows.items():
        b, o, f, m = r.get("bare"), r.get("opendkim"), r.get("floor"), r.get("relay")

        def rate(c):
            if c is None:
                return "-"
            s = fmt(c.msgs_per_s)
            return s + (" (!)" if c.first_error else "")

        def lat(c):
            return "-" if c is None else f"{fmt(c.p50_ms)} / {fmt(c.p99_ms)}"

        def ratio(a, z):
            if a is None or z is None or not z.msgs_per_s or z.first_error:
                return "-"
            return f"{a.msgs_per_s / z.msgs_per_s:.2f}x"

        lines.append(
            f"| {size_label(size)} | {clients} | {ALGS[alg]} | {rate(b)} | {lat(b)} | {rate(o)} | {lat(o)} "
            f"| {rate(f)} | {lat(f)} | {rate(m)} | {lat(m)} "
            f"| {ratio(f, b)} | {ratio(m, b)} | {ratio(m, o)} | {ratio(m, f)} | {fmt(m.cpu_s_per_1000 if m else None, '.2f')} "
            f"| {fmt(f.cpu_s_per_1000 if f else None, '.2f')} | {fmt(o.cpu_s_per_1000 if o else None, '.2f')} "
            f"| {fmt(m.rss_mib if m else None, '.0f')} ({fmt(m.peak_rss_mib if m else None, '.0f')}) |"
        )
    return head + "\n".join(lines) + "\n"


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def environment() -> dict:
    def version(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
        except Exception:
            return "?"

    import dkim
    import Milter

    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": f"{platform.node()} {platform.system()} {platform.release()}, {os.cpu_count()} CPUs ({cpu})",
        "postfix": version(["postconf", "-d", "-h", "mail_version"]),
        "opendkim": version(["/usr/sbin/opendkim", "-V"]),
        "python": platform.python_version(),
        "dkimpy": getattr(dkim, "__version__", None) or _dist_version("dkimpy"),
        "pymilter": _dist_version("pymilter"),
    }


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2048,102400", help="message sizes in bytes, comma-separated (default: %(default)s)")
    ap.add_argument("--clients", default="10,50", help="concurrent SMTP clients, comma-separated (default: %(default)s)")
    ap.add_argument("--algs", default="rsa,ed25519", help="signature algorithms: rsa,ed25519 (default: %(default)s)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="configurations to run (default: %(default)s)")
    ap.add_argument("--messages", type=int, default=1000, help="messages per cell for small messages (default: %(default)s)")
    ap.add_argument("--large-messages", type=int, default=400, help="messages per cell for messages over 16 KB (default: %(default)s)")
    ap.add_argument("--repeat", type=int, default=1, help="measure every cell this many times (interleaved); the table shows the run with the median msg/s (default: %(default)s)")
    ap.add_argument("--per-connection", type=int, default=10, help="messages each client sends per SMTP connection (default: %(default)s)")
    ap.add_argument("--concurrency", type=int, default=20, help="Postfix delivery concurrency to the smarthost (default: %(default)s)")
    ap.add_argument("--drain-timeout", type=float, default=300, help="seconds to wait for the queue to drain per cell")
    ap.add_argument("--markdown", type=Path, help="also write the results (table, command, environment) to this file")
    ap.add_argument("--json", type=Path, help="also write every measurement as JSON to this file")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs) after the run")
    args = ap.parse_args(argv)

    if os.geteuid() != 0:
        print("bench: run as root (Postfix starts as root)", file=sys.stderr)
        return 2
    for tool in ("postfix", "smtp-sink", "opendkim", "dnsmasq", "cc"):
        if not (shutil.which(tool) or os.path.exists(f"/usr/sbin/{tool}")):
            print(f"bench: {tool} is missing; run scripts/bootstrap.sh (deps/apt/bench.txt)", file=sys.stderr)
            return 2
    if not Path("/usr/include/libmilter/mfapi.h").exists():
        print("bench: libmilter-dev is missing (the floor milter is built against it); run scripts/bootstrap.sh", file=sys.stderr)
        return 2
    sizes = [int(s) for s in args.sizes.split(",")]
    client_counts = [int(c) for c in args.clients.split(",")]
    algs = [a for a in args.algs.split(",") if a]
    configs = [c for c in args.configs.split(",") if c]
    for a in algs:
        if a not in ALGS:
            ap.error(f"unknown algorithm {a}")
    for c in configs:
        if c not in CONFIGS:
            ap.error(f"unknown configuration {c}")

    env = environment()
    load_before = loadavg()
    base = Path(tempfile.mkdtemp(prefix="relay-bench-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    log(f"work directory {base}; load average {load_before}")
    ts = tenants()
    dns = BenchDns(base, {f"{t.spec.selector}._domainkey.{t.spec.signing_domain}": t.spec.key.txt for t in ts.values()})
    sink = SmtpSinkProcess("smarthost", free_port(), base)
    instances: dict[str, Instance] = {}
    cells: list[Cell] = []
    started = time.monotonic()
    try:
        dns.start()
        sink.start()
        floor_exe = build_floor(base) if "floor" in configs else None
        for name in configs:
            log(f"starting {name}")
            instances[name] = make_instance(name, ts, sink, base, args.concurrency, dns, floor_exe)

        # Probe: every configuration delivers a good message; the verifying ones refuse a tampered one.
        unsupported: set[tuple[str, str]] = set()
        for alg in algs:
            [good] = build_messages(ts[alg], 2048, 1, f"probe-{alg}")
            for name, inst in instances.items():
                ok, refused, detail = probe(inst, good, tampered(good))
                log(f"probe {name}/{alg}: {detail}")
                if not ok:
                    unsupported.add((name, alg))
                    log(f"  {name} does not accept valid {ALGS[alg]} mail: left out of the table")
                elif name in VERIFYING and not refused:
                    raise SystemExit(f"bench: {name} accepted a tampered {alg} message; it is not verifying: {detail}")

        for size in sizes:
            count = args.messages if size <= 16384 else args.large_messages
            for alg in algs:
                log(f"signing {count} x {size_label(size)} {ALGS[alg]} messages")
                base_set = build_messages(ts[alg], size, count, f"{alg}-{size}")
                # Warm-up (not measured): processes spawned, DNS key cached.
                for name, inst in instances.items():
                    if (name, alg) not in unsupported:
                        warm = build_messages(ts[alg], size, 20, f"warm-{name}-{alg}-{size}")
                        measure(inst, warm, 5, args.per_connection, args.drain_timeout)
                for clients, rep in [(c, r) for c in client_counts for r in range(args.repeat)]:
                    for name, inst in instances.items():
                        if (name, alg) in unsupported:
                            continue
                        # Same content for every configuration; distinct message keys per run.
                        msgs = [Outgoing(f"{name}-{clients}-{rep}-{m.key}", m.mail_from, m.rcpts, m.data) for m in base_set]
                        cell = measure(inst, msgs, clients, args.per_connection, args.drain_timeout)
                        cell.size, cell.alg = size, alg
                        cells.append(cell)
                        log(
                            f"{size_label(size):>6} {clients:>3} clients {ALGS[alg]:<8} {name:<8} "
                            f"{cell.msgs_per_s:7.1f} msg/s  p50 {fmt(cell.p50_ms)} ms  p99 {fmt(cell.p99_ms)} ms"
                            + (f"  ERROR {cell.first_error}" if cell.first_error else "")
                        )
    finally:
        for inst in instances.values():
            stop_instance(inst)
        sink.stop()
        dns.stop()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            log(f"kept {base}")

    load_after = loadavg()
    elapsed = time.monotonic() - started
    command = "bench/run.sh " + " ".join(argv if argv is not None else sys.argv[1:])
    report = table(cells)
    print(report)
    print(f"load average before: {load_before}  after: {load_after}  wall time: {elapsed:.0f}s")
    errors = [c for c in cells if c.first_error]
    for c in errors:
        print(f"(!) {c.config} {size_label(c.size)} {c.clients} clients {c.alg}: {c.first_error}")
    if args.json:
        args.json.write_text(
            json.dumps({"environment": env, "load_before": load_before, "load_after": load_after, "cells": [c.__dict__ for c in cells]}, indent=2)
        )
    if args.markdown:
        args.markdown.write_text(
            f"# Benchmark results\n\nCommand: `{command.strip()}`\n\n"
            + "".join(f"- {k}: {v}\n" for k, v in env.items())
            + f"- load average (1/5/15 min) before: {load_before}, after: {load_after}\n"
            + f"- wall time: {elapsed:.0f} s; messages per cell: {args.messages} (<=16 KB), {args.large_messages} (larger); "
            + f"{args.per_connection} messages per SMTP connection; smarthost concurrency {args.concurrency}; "
            + f"each cell measured {args.repeat} time(s), interleaved, the run with the median msg/s shown\n\n"
            + report
            + "".join(f"\n(!) {c.config} {size_label(c.size)} {c.clients} clients {c.alg}: {c.first_error}" for c in errors)
            + "\n"
        )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
