#!/usr/bin/env python3
"""Issue 17: what the tenant count costs. One private relay per tenant count, side by side.

For each count N (default 10, 1,000 and 10,000): N tenants with one pinned ed25519 key
(generated here), each with a smarthost name of its own (<id>.sink.test, which the lab's
DNS answers with 127.0.0.1), all served by one Postfix ``smtp-sink``. With the same
settings they share one transport class (postfix/classes.py). Measured, in this order:

  apply          ``relayctl apply --no-reload`` of the whole set, the first time (validation,
                 preflight with every tenant's DNS lookups, render, the staged checks:
                 postconf, one postmap -q - per table, postfix check; install)
  transports     tenant transports (transport classes) in the rendered master.cf
  start          ``postfix start`` until it returns
  fds            descriptors the Postfix master holds after start (/proc/PID/fd)
  msg/s, p99     2 KB signed mail over ``--clients`` clients to the *last* tenant: deliveries
                 logged by Postfix / time; acceptance latency as the client sees it
  milter CPU     milter CPU milliseconds per message in that run (supervisor and workers)
  add one        a new tenant file, ``relayctl apply`` (it reloads Postfix only if it must:
                 the column says whether it did), until the first message for the new
                 tenant is accepted (250)
  reload         ``postfix reload`` until it returns
  milter reload  the milter's own figure for loading the applied set (event=reload seconds=)
  milter RSS     the milter's resident memory after that reload (supervisor and workers
                 summed: pages shared after fork are counted in each)

Needs root, postfix (smtp-sink) and dnsmasq. Work files in /var/tmp/relay-bench-tenants-*,
removed at the end unless --keep. Progress on stderr, the table on stdout.

    .venv/bin/python bench/tenants.py                       # 10, 1000, 10000
    .venv/bin/python bench/tenants.py --counts 10,1000 --markdown bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from relay_milter.core.addresses import encode_recipient
from relay_milter.lab import Lab, ed25519_key, free_port, make_message, sign, wait_for
from relay_milter.lab.loadgen import MaillogCounter, Outgoing, SmtpSinkProcess, percentile, proc_cpu_seconds, proc_memory_kib, send_all
from relay_milter.postfix import fds
from relay_milter.postfix.runner import run_postfix

RESULTS_MARK = "<!-- bench/tenants.py -->"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def tenant_doc(tid: str, key, port: int) -> dict:
    return {
        "id": tid,
        "relay_domain": f"{tid}.relay.test",
        "signing_domain": f"hop.{tid}.test",
        "selector": "s1",
        "allowed_sender_domains": [f"{tid}.example"],
        "allow_bcc": True,
        "public_key": key.txt,
        # A smarthost name of its own per tenant (the lab's DNS answers every name under
        # sink.test with 127.0.0.1): tenants share a transport class, each with its own next hop.
        "smarthost": {"host": f"{tid}.sink.test", "port": port, "tls": "none"},
    }


class BenchLab(Lab):
    def dns_args(self) -> tuple[str, ...]:
        # NXDOMAIN at once for names without a record, as a real zone; sink.test is loopback.
        return ("--local=/test/", "--address=/sink.test/127.0.0.1")


@dataclass
class Row:
    tenants: int
    apply_s: float | None = None
    start_s: float | None = None
    master_fds: int | None = None
    services: int | None = None
    add_reloaded: bool | None = None
    msgs_per_s: float | None = None
    p99_ms: float | None = None
    milter_cpu_ms: float | None = None
    add_one_s: float | None = None
    reload_s: float | None = None
    milter_reload_s: float | None = None
    milter_rss_mib: float | None = None
    note: str = ""


def timed(what: str, fn):
    t0 = time.monotonic()
    out = fn()
    dt = time.monotonic() - t0
    log(f"  {what}: {dt:.2f} s")
    return dt, out


def milter_reload_seconds(lab: Lab, count: int, mark: int) -> float | None:
    m = None
    for m in re.finditer(rf"event=reload tenants=\S+ source=\S+ count={count} seconds=([\d.]+)", lab.milter_log_text()[mark:]):
        pass
    return float(m.group(1)) if m else None


def messages(key, tid: str, n: int) -> list[Outgoing]:
    body = ("The quick brown fox jumps over the lazy dog. " * 40 + "\r\n")  # about 2 KB in all
    out = []
    for i in range(n):
        raw = sign(make_message(f"news@{tid}.example", f"user{i}@example.org", subject=f"bench {i}", body=body), key, f"hop.{tid}.test", "s1")
        out.append(Outgoing.build(f"{tid}-{i}", f"news@{tid}.example", [encode_recipient(f"user{i}@example.org", f"{tid}.relay.test")], raw))
    return out


def run_count(n: int, base: Path, key, args) -> Row:
    row = Row(n)
    log(f"{n} tenants")
    lab = BenchLab(base / f"n{n}")
    lab.relayctl_timeout = args.timeout
    sink = SmtpSinkProcess("sink", free_port(), lab.base)
    lab.sinks["sink"] = sink
    ids = [f"t{i:05d}" for i in range(n)]
    for tid in ids:
        (lab.tenants_dir / f"{tid}.yaml").write_text(yaml.safe_dump(tenant_doc(tid, key, sink.port), sort_keys=False))
    try:
        lab.start_dns()
        lab.write_settings(milter_content_timeout="60s")
        row.apply_s, _ = timed("apply --no-reload", lambda: lab.relayctl("apply", "--no-reload"))
        master_cf = (lab.config_dir / "master.cf").read_text()
        row.services = len(re.findall(r"^rc_\w+ +unix ", master_cf, re.M))
        log(f"  tenant transports (classes) in master.cf: {row.services}")
        need = fds.needed(master_cf)
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if need > limit:
            row.note += f"not started: the master needs about {need} file descriptors, the limit here is {limit}; "
            log(f"  {row.note}")
            return row
        sink.start()
        lab.start_milter()
        row.start_s, _ = timed("postfix start", lab.start_postfix)
        pid = fds.master_pid(lab.queue_dir)
        row.master_fds = fds.open_fds(pid) if pid else None
        log(f"  master fds: {row.master_fds}")
        # Throughput to the last tenant.
        last = ids[-1]
        warm = messages(key, last, 20)
        send_all(warm, lab.smtp_port, clients=args.clients, per_connection=10, timeout=120)
        msgs = messages(key, last, args.messages)
        counter = MaillogCounter(lab.maillog)
        counter.poll()
        before = counter.poll()
        cpu0 = proc_cpu_seconds(lab.milter_proc.pid)
        res = send_all(msgs, lab.smtp_port, clients=args.clients, per_connection=10, timeout=120)
        accepted = len(res.accepted)
        done = counter.wait(before + accepted, 300)
        end = done or time.monotonic()
        delivered = counter.poll() - before
        row.msgs_per_s = delivered / (end - res.started)
        lat = res.latencies()
        row.p99_ms = percentile(lat, 99) * 1000 if lat else None
        row.milter_cpu_ms = (proc_cpu_seconds(lab.milter_proc.pid) - cpu0) / max(1, len(msgs)) * 1000
        if accepted < len(msgs) or delivered < accepted:
            row.note += f"{len(msgs) - accepted} refused, {accepted - delivered} undelivered; "
        log(f"  last tenant: {row.msgs_per_s:.0f} msg/s, p99 {row.p99_ms:.0f} ms, milter {row.milter_cpu_ms:.2f} ms/msg")
        # Add one tenant, end to end: file, apply (reload), milter switch, mail accepted.
        new = "tnew"
        mark = len(lab.milter_log_text())
        t0 = time.monotonic()
        (lab.tenants_dir / f"{new}.yaml").write_text(yaml.safe_dump(tenant_doc(new, key, sink.port), sort_keys=False))
        out = lab.relayctl("apply").stdout
        row.add_reloaded = "postfix reloaded" in out
        [probe] = messages(key, new, 1)

        def accepted_now() -> bool:
            r = send_all([probe], lab.smtp_port, clients=1, per_connection=1, timeout=60)
            return bool(r.accepted)

        wait_for(accepted_now, args.timeout, interval=0.2, what="mail for the new tenant accepted")
        row.add_one_s = time.monotonic() - t0
        log(f"  add one tenant until its mail is accepted: {row.add_one_s:.2f} s (postfix reloaded: {row.add_reloaded})")
        row.milter_reload_s = wait_for(lambda: milter_reload_seconds(lab, n + 1, mark), 60, what="milter reload line")
        row.milter_rss_mib = proc_memory_kib(lab.milter_proc.pid).get("VmRSS", 0) / 1024
        log(f"  milter reload {row.milter_reload_s:.2f} s, RSS {row.milter_rss_mib:.1f} MiB")
        row.reload_s, r = timed("postfix reload", lambda: run_postfix(["postfix", "-c", str(lab.config_dir), "reload"], timeout=args.timeout))
        if r.returncode != 0:
            row.note += f"reload exit {r.returncode}; "
    except Exception as exc:  # a count that fails still reports what it measured
        row.note += f"{exc.__class__.__name__}: {' '.join(str(exc).split())[:300]}"
        log(f"  failed: {row.note}")
    finally:
        if args.keep:
            lab.stop()
        else:
            lab.destroy()
    return row


def fmt(v, spec: str = ".1f") -> str:
    return "–" if v is None else format(v, spec)


def table(rows: list[Row]) -> str:
    head = (
        "| tenants | `apply` s | tenant transports | Postfix start s | master fds | msg/s to the last tenant | p99 ms "
        "| milter CPU ms/msg | add one tenant s | … with a reload | `postfix reload` s | milter reload s | milter RSS MiB |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|---:|---:|---:|\n"
    )
    lines = [
        f"| {r.tenants:,} | {fmt(r.apply_s)} | {fmt(r.services, 'd')} | {fmt(r.start_s)} | {fmt(r.master_fds, 'd')} "
        f"| {fmt(r.msgs_per_s, '.0f')} | {fmt(r.p99_ms, '.0f')} | {fmt(r.milter_cpu_ms, '.2f')} | {fmt(r.add_one_s)} "
        f"| {'–' if r.add_reloaded is None else ('yes' if r.add_reloaded else 'no')} | {fmt(r.reload_s)} "
        f"| {fmt(r.milter_reload_s, '.2f')} | {fmt(r.milter_rss_mib)} |"
        for r in rows
    ]
    out = head + "\n".join(lines) + "\n"
    base = rows[0]
    ratios = []
    for r in rows[1:]:
        if base.msgs_per_s and r.msgs_per_s:
            ratios.append(f"throughput {r.tenants:,}/{base.tenants:,} tenants: {r.msgs_per_s / base.msgs_per_s:.2f}×")
        if base.milter_rss_mib and r.milter_rss_mib and r.tenants > base.tenants:
            per = (r.milter_rss_mib - base.milter_rss_mib) * 1024 / (r.tenants - base.tenants)
            ratios.append(f"milter memory per tenant ({base.tenants:,}→{r.tenants:,}): {per:.1f} KiB")
    if ratios:
        out += "\nSame run: " + "; ".join(ratios) + ".\n"
    notes = [f"- {r.tenants:,} tenants: {r.note.strip('; ')}" for r in rows if r.note]
    if notes:
        out += "\n" + "\n".join(notes) + "\n"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", default="10,1000,10000", help="tenant counts, comma-separated (default %(default)s)")
    ap.add_argument("--messages", type=int, default=1000, help="messages to the last tenant per count (default %(default)s)")
    ap.add_argument("--clients", type=int, default=10, help="concurrent SMTP clients (default %(default)s)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds any one step may take (default %(default)s)")
    ap.add_argument("--markdown", type=Path, help="also write the table into this file (replacing an earlier one)")
    ap.add_argument("--keep", action="store_true", help="keep the work directories")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/tenants.py: run as root (private Postfix instances)", file=sys.stderr)
        return 2
    counts = [int(c) for c in args.counts.split(",")]
    # The master needs about 3 descriptors per tenant; postfix start inherits this limit.
    # Raise the soft limit to the hard one (raising the hard limit needs CAP_SYS_RESOURCE).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(65536, fds.FDS_PER_SERVICE * max(counts) + 4096)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    log(f"file descriptor limit for postfix start: {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}")
    base = Path(tempfile.mkdtemp(prefix="relay-bench-tenants-", dir="/var/tmp"))
    os.chmod(base, 0o755)  # each lab's Postfix instance lies under it; its own directory is 0700
    key = ed25519_key()
    load0 = os.getloadavg()
    rows = [run_count(n, base, key, args) for n in counts]
    load1 = os.getloadavg()
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    text = table(rows)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    env = (
        f"{stamp}, {os.cpu_count()} CPUs, load average {load0[0]:.1f} at the start and {load1[0]:.1f} at the end "
        f"(1 min), {args.messages} messages of about 2 KB over {args.clients} clients per count, ed25519 signatures, "
        f"`{' '.join(['bench/tenants.py', *(argv if argv is not None else sys.argv[1:])])}`"
    )
    print(text)
    print(env)
    if args.markdown:
        section = f"{RESULTS_MARK}\n## Tenant count (issue 17, `bench/tenants.py`)\n\n{env}\n\n{text}{RESULTS_MARK}\n"
        old = args.markdown.read_text() if args.markdown.exists() else ""
        if old.count(RESULTS_MARK) == 2:
            before, _, rest = old.partition(RESULTS_MARK)
            _, _, after = rest.partition(RESULTS_MARK)
            new = before + section + after.lstrip("\n")
        else:
            new = old.rstrip("\n") + "\n\n" + section
        args.markdown.write_text(new)
    return 0 if all(not r.note for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
