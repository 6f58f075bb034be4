#!/usr/bin/env python3
"""Soak: the relay under a steady load for a long time (default 10 minutes); reports milter memory growth.

One private Postfix instance with the real milter (same setup as bench.py's
"relay" configuration, RSA-2048 and ed25519 tenants, keys from DNS) and
smtp-sink as the smarthost. Clients send at a steady rate; about 5 % of the
messages are tampered and must be refused with a 5xx. Every 30 s the milter's
RSS, CPU time and thread count are sampled and printed.

At the end it checks that every accepted message was delivered (Postfix's
`status=sent` count equals the number of 250 replies), that every tampered
message was refused and every good one accepted, and prints the RSS growth
from the first sample after warm-up to the last. Exit code 0 when nothing was
lost and growth stayed under --max-growth-mib, 1 otherwise, 2 on usage errors.

Not run in CI (it takes --minutes). Run:  bench/soak.sh [--minutes 10 --rate 40]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench import BenchDns, build_messages, log, make_instance, stop_instance, tampered, tenants
from relay_milter.lab import free_port
from relay_milter.lab.loadgen import MaillogCounter, Outgoing, SmtpSinkProcess, percentile, proc_cpu_seconds, proc_memory_kib, send_all


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="how long to send (default: %(default)s)")
    ap.add_argument("--rate", type=float, default=40.0, help="target messages per second (default: %(default)s)")
    ap.add_argument("--clients", type=int, default=5, help="concurrent SMTP clients (default: %(default)s)")
    ap.add_argument("--size", type=int, default=4096, help="message size in bytes (default: %(default)s)")
    ap.add_argument("--distinct", type=int, default=400, help="distinct pre-signed messages per algorithm, sent in rotation (default: %(default)s)")
    ap.add_argument("--sample", type=float, default=30.0, help="seconds between memory samples (default: %(default)s)")
    ap.add_argument("--max-growth-mib", type=float, default=20.0, help="fail if RSS grows more than this after warm-up (default: %(default)s)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("soak: run as root (Postfix starts as root)", file=sys.stderr)
        return 2

    base = Path(tempfile.mkdtemp(prefix="relay-soak-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    ts = tenants()
    dns = BenchDns(base, {f"{t.spec.selector}._domainkey.{t.spec.signing_domain}": t.spec.key.txt for t in ts.values()})
    sink = SmtpSinkProcess("smarthost", free_port(), base)
    inst = None
    total = int(args.rate * args.minutes * 60)
    try:
        dns.start()
        sink.start()
        inst = make_instance("relay", ts, sink, base, concurrency=10, dns=dns)
        pid = inst.milter_pid
        log(f"work directory {base}; milter pid {pid}; {total} messages at {args.rate}/s for {args.minutes} min")
        pool: list[tuple[Outgoing, bool]] = []
        for t in ts.values():
            good = build_messages(t, args.size, args.distinct, f"soak-{t.alg}")
            pool += [(m, True) for m in good]
            pool += [(tampered(m), False) for m in good[: max(1, args.distinct // 20)]]
        msgs, expect_ok = [], {}
        for i in range(total):
            m, ok = pool[(i * 7919) % len(pool)]  # a fixed shuffle of the pool
            key = f"{i}"
            msgs.append(Outgoing(key, m.mail_from, m.rcpts, m.data))
            expect_ok[key] = ok

        counter = MaillogCounter(inst.lab.maillog)
        samples: list[tuple[float, dict, float, int]] = []
        done = threading.Event()
        result = {}

        def load():
            result["r"] = send_all(
                msgs, inst.lab.smtp_port, clients=args.clients, per_connection=20,
                pace=args.clients / args.rate, deadline=args.minutes * 60 * 1.5 + 60, timeout=60,
            )
            done.set()

        t0 = time.monotonic()
        threading.Thread(target=load, daemon=True).start()
        print(f"{'elapsed':>8} {'delivered':>9} {'RSS MiB':>8} {'peak MiB':>8} {'CPU s':>7} {'threads':>7}")
        while True:
            finished = done.wait(args.sample)
            mem = proc_memory_kib(pid)
            cpu = proc_cpu_seconds(pid)
            samples.append((time.monotonic() - t0, mem, cpu, threads(pid)))
            print(
                f"{samples[-1][0]:8.0f} {counter.poll():9d} {mem['VmRSS'] / 1024:8.1f} {mem['VmHWM'] / 1024:8.1f} {cpu:7.1f} {samples[-1][3]:7d}",
                flush=True,
            )
            if finished:
                break
        res = result["r"]
        accepted = len(res.accepted)
        counter.wait(accepted, 120)
        delivered = counter.poll()
    finally:
        if inst:
            stop_instance(inst)
        sink.stop()
        dns.stop()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)

    wrong = [k for k, o in res.outcomes.items() if o.accepted != expect_ok[k]]
    unfinished = res.unfinished
    lat = res.latencies()
    elapsed = res.finished - res.started
    warm = samples[min(1, len(samples) - 1)]
    last = samples[-1]
    growth = (last[1]["VmRSS"] - warm[1]["VmRSS"]) / 1024
    print()
    print(f"sent {total} in {elapsed:.0f}s ({total / elapsed:.1f} msg/s); accepted {accepted}; refused {len(res.refused)}; "
          f"delivered {delivered}; unfinished {len(unfinished)}")
    print(f"acceptance latency p50 {percentile(lat, 50) * 1000:.0f} ms, p99 {percentile(lat, 99) * 1000:.0f} ms")
    print(f"milter RSS after warm-up {warm[1]['VmRSS'] / 1024:.1f} MiB at {warm[0]:.0f}s, at the end {last[1]['VmRSS'] / 1024:.1f} MiB "
          f"(growth {growth:+.1f} MiB), peak {last[1]['VmHWM'] / 1024:.1f} MiB; CPU {(last[2]) / max(1, total) * 1000:.2f} s per 1000 messages")
    ok = True
    if delivered != accepted:
        print(f"LOST: {accepted - delivered} accepted message(s) not delivered")
        ok = False
    if wrong or unfinished:
        print(f"WRONG: {len(wrong)} message(s) accepted/refused against expectation, {len(unfinished)} unfinished; e.g. "
              f"{[(k, res.outcomes[k].code, res.outcomes[k].text) for k in (wrong or [o.key for o in unfinished])[:3]]}")
        ok = False
    if growth > args.max_growth_mib:
        print(f"MEMORY: RSS grew {growth:.1f} MiB (> {args.max_growth_mib} MiB)")
        ok = False
    print("soak: OK" if ok else "soak: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
