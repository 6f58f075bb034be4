#!/usr/bin/env python3
"""Milter-only microbench: the milter's own capacity, with no Postfix in the way.

Starts the real milter (``relayctl milter --workers W``) on a private unix socket with
two tenants (RSA-2048 and ed25519, keys pinned in the tenant files, so no DNS), and
drives the socket directly with a milter-protocol client (bench/milterclient.py) that
speaks as Postfix 3.7 does: protocol 6, Postfix's default macros, one session per
simulated SMTP connection carrying several messages. The messages are real DKIM-signed
messages of about --size bytes; every one must come back accepted with the relay's
route header, or the run counts an error.

For each worker count (default 1, 2 and N = the CPUs) it reports messages/s, the
milter's CPU per message (user+system of the supervisor and every worker, from /proc),
the client's own CPU per message (it shares the machine), and the workers' memory.

--soak MINUTES instead runs N workers at a steady --rate for that long and prints the
workers' memory every --sample seconds, then the growth from the first sample after
warm-up to the last (exit 1 above --max-growth-mib).

As root (the lab's directories); run from the repository:

    .venv/bin/python bench/microbench.py                       # the table (~2-4 min)
    .venv/bin/python bench/microbench.py --markdown FILE       # ... also as Markdown
    .venv/bin/python bench/microbench.py --soak 10 --rate 150  # 10-minute soak, N workers

Exit 0 when every message was accepted as expected, 1 otherwise, 2 on usage errors.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import re
import os
import sys
import threading
import time
from pathlib import Path

from bench import build_messages, loadavg, log, tenants
from milterclient import Envelope, MilterClient, MilterProtocolError
from relay_milter.defaults import ROUTE_HEADER
from relay_milter.lab import Lab, Sink, wait_for
from relay_milter.lab.loadgen import proc_cpu_seconds, proc_memory_kib, proc_tree
from relay_milter.milter.workers import default_workers


def unstuff(data: bytes) -> bytes:
    """An Outgoing's wire data (dot-stuffed) back to the message."""
    if data.startswith(b".."):
        data = data[1:]
    return data.replace(b"\r\n..", b"\r\n.")


@dataclasses.dataclass
class Run:
    workers: int
    messages: int
    seconds: float
    milter_cpu: float
    client_cpu: float
    errors: list[str]
    rss_kib: int
    pss_kib: int | None
    spread: list[int] = dataclasses.field(default_factory=list)  # messages accepted by each worker

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    def cpu_ms(self) -> float:
        return self.milter_cpu / self.messages * 1000

    def client_ms(self) -> float:
        return self.client_cpu / self.messages * 1000


class MicroLab:
    """The lab's directories and tenant files, and only the milter (no Postfix, no DNS)."""

    def __init__(self):
        self.lab = Lab()
        self.tenants = tenants()
        for t in self.tenants.values():
            spec = dataclasses.replace(t.spec, pin_key=True)
            t.spec = spec
            self.lab.add_tenant(spec, Sink(spec.id))  # the sink is never started: no delivery here
        self.lab.write_settings()

    def start(self, workers: int) -> int:
        self.lab.start_milter("--workers", str(workers))
        wait_for(lambda: len(self.lab.milter_workers()) == workers, 30, what=f"{workers} workers")
        return self.lab.milter_proc.pid

    def stop(self) -> None:
        self.lab.stop_milter()

    @property
    def socket(self) -> str:
        return str(self.lab.milter_socket)

    def destroy(self) -> None:
        self.lab.destroy()


def envelopes(ml: MicroLab, size: int, count: int, algs: list[str]) -> list[Envelope]:
    out = []
    for alg in algs:
        for m in build_messages(ml.tenants[alg], size, count // len(algs), f"micro-{alg}"):
            out.append(Envelope(m.mail_from, m.rcpts, unstuff(m.data)))
    # interleave the algorithms
    return [e for pair in zip(*[out[i::len(algs)] for i in range(len(algs))]) for e in pair] if len(algs) > 1 else out


def drive(path: str, envs: list[Envelope], sessions: int, per_session: int, rate: float | None = None,
          deadline: float | None = None) -> tuple[int, list[str]]:
    """Send ``envs`` over ``sessions`` concurrent milter sessions (threads); each session
    carries ``per_session`` messages, then a new one is opened. The count sent and the errors."""
    lock = threading.Lock()
    state = {"next": 0, "sent": 0}
    errors: list[str] = []
    interval = sessions / rate if rate else 0.0

    def take() -> Envelope | None:
        with lock:
            if state["next"] >= len(envs) or (deadline and time.monotonic() > deadline):
                return None
            state["next"] += 1
            return envs[state["next"] - 1]

    def worker() -> None:
        env = take()
        while env is not None:
            try:
                c = MilterClient.connect(path)
                c.open()
            except (OSError, MilterProtocolError) as exc:
                with lock:
                    errors.append(f"session: {exc}")
                return
            try:
                for _ in range(per_session):
                    t0 = time.monotonic()
                    try:
                        r = c.message(env)
                    finally:
                        with lock:
                            state["sent"] += 1
                    if not r.accepted or ROUTE_HEADER not in r.added_headers():
                        with lock:
                            errors.append(f"{r.stage}: {r.reply} {r.text}".strip())
                    if interval:
                        time.sleep(max(0.0, interval - (time.monotonic() - t0)))
                    env = take()
                    if env is None:
                        break
            except (OSError, MilterProtocolError) as exc:  # that message is an error; go on
                with lock:
                    errors.append(f"session: {exc}")
                env = take()
            finally:
                c.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return state["sent"], errors


def measure(ml: MicroLab, workers: int, envs: list[Envelope], warmup: list[Envelope], sessions: int, per_session: int) -> Run:
    pid = ml.start(workers)
    mark = len(ml.lab.milter_log_text())
    try:
        drive(ml.socket, warmup, min(sessions, len(warmup)), per_session)  # keys parsed, caches warm
        cpu0, client0, t0 = proc_cpu_seconds(pid), time.process_time(), time.monotonic()
        sent, errors = drive(ml.socket, envs, sessions, per_session)
        seconds = time.monotonic() - t0
        cpu1, client1 = proc_cpu_seconds(pid), time.process_time()
        mem = proc_memory_kib(pid)
        missing = len(envs) - sent
        if missing:
            errors.append(f"{missing} messages not sent")
        per_pid = collections.Counter(re.findall(r"relay\.milter\[(\d+)\]: INFO \w+: event=accepted ", ml.lab.milter_log_text()[mark:]))
        return Run(workers, sent, seconds, cpu1 - cpu0, client1 - client0, errors, mem.get("VmRSS", 0), mem.get("Pss"),
                   sorted(per_pid.values(), reverse=True))
    finally:
        ml.stop()


def table(runs: list[Run], args, header: str) -> str:
    base = runs[0].rate if runs else 0
    lines = [
        header,
        "",
        "| workers | msg/s | × 1 worker | milter CPU ms/msg | client CPU ms/msg | RSS MiB (sum) | PSS MiB | accepted per worker | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r.workers} | {r.rate:.0f} | {r.rate / base:.2f} | {r.cpu_ms():.2f} | {r.client_ms():.2f} | "
            f"{r.rss_kib / 1024:.0f} | {'-' if r.pss_kib is None else f'{r.pss_kib / 1024:.0f}'} | "
            f"{'/'.join(map(str, r.spread))} | {len(r.errors)} |"
        )
    return "\n".join(lines)


def soak(ml: MicroLab, args, envs: list[Envelope]) -> int:
    workers = args.soak_workers or default_workers()
    pid = ml.start(workers)
    deadline = time.monotonic() + args.soak * 60
    samples: list[tuple[float, int, int | None, list[int]]] = []
    result: dict = {}

    def load() -> None:
        # the messages in rotation, as many as the rate and the time ask for
        n = int(args.rate * args.soak * 60) + 1
        pool = [envs[i % len(envs)] for i in range(n)]
        result["sent"], result["errors"] = drive(ml.socket, pool, args.sessions, args.per_session, rate=args.rate, deadline=deadline)

    t = threading.Thread(target=load, daemon=True)
    start = time.monotonic()
    t.start()
    print(f"soak: {workers} workers, {args.rate:g} msg/s for {args.soak:g} min; load average {loadavg()}")
    print(f"{'t s':>6} {'RSS MiB':>8} {'PSS MiB':>8}  per-worker RSS MiB")
    try:
        while t.is_alive():
            t.join(args.sample)
            mem = proc_memory_kib(pid)
            per = []
            for p in proc_tree(pid)[1:]:
                per.append(proc_memory_kib(p)["VmRSS"])
            samples.append((time.monotonic() - start, mem["VmRSS"], mem.get("Pss"), per))
            s = samples[-1]
            print(f"{s[0]:6.0f} {s[1] / 1024:8.1f} {(s[2] or 0) / 1024:8.1f}  {' '.join(f'{k / 1024:.1f}' for k in s[3])}", flush=True)
    finally:
        ml.stop()
    sent, errors = result.get("sent", 0), result.get("errors", ["the load did not finish"])
    warm = next((s for s in samples if s[0] >= args.sample * 2), samples[0])
    last = samples[-1]
    growth = (last[1] - warm[1]) / 1024
    print(
        f"soak: {sent} messages in {last[0]:.0f} s ({sent / max(last[0], 1):.0f}/s), {len(errors)} errors; "
        f"workers' RSS (sum) after warm-up {warm[1] / 1024:.1f} MiB at {warm[0]:.0f} s, at the end {last[1] / 1024:.1f} MiB "
        f"(growth {growth:+.1f} MiB); load average {loadavg()}"
    )
    for e in errors[:5]:
        print(f"  error: {e}")
    return 0 if not errors and growth <= args.max_growth_mib else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default=None, help="comma-separated worker counts (default: 1,2,N with N = the CPUs)")
    ap.add_argument("--messages", type=int, default=2000, help="messages per worker count (default: %(default)s)")
    ap.add_argument("--distinct", type=int, default=400, help="distinct signed messages, sent in rotation (default: %(default)s)")
    ap.add_argument("--size", type=int, default=2048, help="message size in bytes (default: %(default)s)")
    ap.add_argument("--algs", default="rsa,ed25519", help="hop signature algorithms, alternating (default: %(default)s)")
    ap.add_argument("--sessions", type=int, default=8, help="concurrent milter sessions (default: %(default)s)")
    ap.add_argument("--per-session", type=int, default=10, help="messages per session (default: %(default)s)")
    ap.add_argument("--repeat", type=int, default=1, help="measure each worker count this often, interleaved; the run with the median msg/s is shown (default: %(default)s)")
    ap.add_argument("--markdown", type=Path, help="also write the table to this file")
    ap.add_argument("--soak", type=float, default=0, metavar="MINUTES", help="soak mode: N workers at --rate for this long")
    ap.add_argument("--soak-workers", type=int, default=None, help="workers in soak mode (default: the CPUs)")
    ap.add_argument("--rate", type=float, default=100.0, help="soak: messages per second (default: %(default)s)")
    ap.add_argument("--sample", type=float, default=30.0, help="soak: seconds between memory samples (default: %(default)s)")
    ap.add_argument("--max-growth-mib", type=float, default=20.0, help="soak: fail above this RSS growth (default: %(default)s)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("microbench: run as root (the lab's directories)", file=sys.stderr)
        return 2
    algs = [a.strip() for a in args.algs.split(",") if a.strip()]
    if not algs or any(a not in ("rsa", "ed25519") for a in algs):
        print("microbench: --algs takes rsa and/or ed25519", file=sys.stderr)
        return 2
    counts = [int(x) for x in args.workers.split(",")] if args.workers else sorted({1, 2, default_workers()})

    ml = MicroLab()
    try:
        log(f"signing {args.distinct} messages of {args.size} bytes ({', '.join(algs)})")
        envs = envelopes(ml, args.size, args.distinct, algs)
        if args.soak:
            return soak(ml, args, envs)
        pool = [envs[i % len(envs)] for i in range(args.messages)]
        warmup = envs[: min(len(envs), 4 * args.sessions)]
        all_runs: dict[int, list[Run]] = {w: [] for w in counts}
        load_before = loadavg()
        for rep in range(args.repeat):
            for w in counts:
                log(f"{w} worker(s), round {rep + 1}/{args.repeat}: {args.messages} messages over {args.sessions} sessions")
                r = measure(ml, w, pool, warmup, args.sessions, args.per_session)
                all_runs[w].append(r)
                log(f"  {r.rate:.0f} msg/s, milter {r.cpu_ms():.2f} ms CPU/msg, client {r.client_ms():.2f} ms CPU/msg, "
                    f"accepted per worker {r.spread}, {len(r.errors)} errors")
        runs = [sorted(rs, key=lambda r: r.rate)[len(rs) // 2] for rs in all_runs.values()]
        errors = [e for rs in all_runs.values() for r in rs for e in r.errors]
        header = (
            f"Milter-only microbench: {args.messages} × {args.size} B messages ({'/'.join(algs)} alternating, keys pinned), "
            f"{args.sessions} sessions × {args.per_session} messages; {args.repeat} interleaved round(s), the median shown; {os.cpu_count()} CPUs; "
            f"load average {load_before} before, {loadavg()} after."
        )
        out = table(runs, args, header)
        print(out)
        if args.markdown:
            args.markdown.write_text(out + "\n")
        for e in errors[:10]:
            print(f"  error: {e}", file=sys.stderr)
        return 1 if errors else 0
    finally:
        ml.destroy()


if __name__ == "__main__":
    sys.exit(main())
