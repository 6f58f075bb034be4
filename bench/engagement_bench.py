#!/usr/bin/env python3
"""Milter CPU per message with engagement tracking on and off (issue 15 part B).

One private lab (real Postfix, the real milter, a loopback sink) with two tenants that differ
only in ``engagement_tracking``: ``plain`` (off, the default) and ``engaged`` (opens and
clicks on). Batches of the same signed multipart/alternative message (a text part and an
HTML part with ``--links`` links, about ``--html-kb`` KB) go to each tenant in turn,
interleaved, so the noise of a shared machine hits both alike. For each batch the milter
process's user+system CPU (/proc) is read before the first message and after the sink has
the last one; the result is CPU milliseconds per message, median over the batches.

Needs root, postfix and dnsmasq (the lab's own needs). Loopback only.

Run:  .venv/bin/python bench/engagement_bench.py [--messages 200] [--batches 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from relay_milter.core.addresses import encode_recipient
from relay_milter.lab import Lab, Sink, TenantSpec, rsa_key, sign, wait_for
from relay_milter.lab.loadgen import proc_cpu_seconds


def message(spec: TenantSpec, n: int, links: int, html_kb: int) -> tuple[bytes, str, str]:
    to = encode_recipient("alice@example.org", spec.relay_domain)
    sender = f"news@{spec.sender_domains[0]}"
    filler = "<p>" + "Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 8 + "</p>\r\n"
    anchors = "".join(f'<p><a href="https://shop.example.org/item/{i}?utm_source=mail">Item {i}</a></p>\r\n' for i in range(links))
    body_html = filler * max(1, (html_kb * 1024 - len(anchors)) // len(filler)) + anchors
    html = f"<html><body>\r\n{body_html}</body></html>\r\n".replace("=", "=3D")
    text = "Hello Alice,\r\nour news: https://shop.example.org/\r\n"
    head = (f"From: News <{sender}>\r\nTo: {to}\r\nSubject: bench {n}\r\nMessage-ID: <bench.{n}.{time.time_ns()}@platform.test>\r\n"
            f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\nMIME-Version: 1.0\r\n"
            'Content-Type: multipart/alternative; boundary="b1"\r\n\r\n')
    body = (f"--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{text}\r\n"
            f"--b1\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n{html}\r\n--b1--\r\n")
    return sign((head + body).encode(), spec.key, spec.signing_domain, spec.selector), sender, to


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=200, help="messages per batch (default: %(default)s)")
    ap.add_argument("--batches", type=int, default=5, help="batches per tenant, interleaved (default: %(default)s)")
    ap.add_argument("--links", type=int, default=20, help="links in the HTML part (default: %(default)s)")
    ap.add_argument("--html-kb", type=int, default=20, help="approximate size of the HTML part in KB (default: %(default)s)")
    args = ap.parse_args(argv)

    lab = Lab()
    key = rsa_key(2048)
    lab.overrides["engagement"] = {"key_file": str(lab.base / "engagement.key")}
    for tid, extra in (("plain", {}), ("engaged", {"engagement_tracking": {"base_url": "https://t.example.net"}})):
        lab.add_tenant(TenantSpec(tid, f"{tid}.relay.test", f"hop.{tid}.test", "s1", key, [f"{tid}.example"], extra=extra), Sink(tid))
    results: dict[str, list[float]] = {"plain": [], "engaged": []}
    try:
        lab.write_settings()
        lab.relayctl("web", "--create-key")
        lab.start()
        pid = lab.milter_proc.pid
        n = 0
        for batch in range(args.batches):
            for tid in ("plain", "engaged"):
                spec, sink = lab.tenants[tid], lab.sinks[tid]
                msgs = []
                for _ in range(args.messages):
                    n += 1
                    msgs.append(message(spec, n, args.links, args.html_kb))
                before_count = len(sink.messages)
                cpu0 = proc_cpu_seconds(pid)
                for raw, sender, to in msgs:
                    code, text, _ = lab.send(raw, sender, [to])
                    if code != 250:
                        raise SystemExit(f"{tid}: {code} {text}")
                wait_for(lambda: len(sink.messages) >= before_count + args.messages, 120, what=f"{tid} batch {batch}")
                cpu = proc_cpu_seconds(pid) - cpu0
                results[tid].append(1000 * cpu / args.messages)
                print(f"batch {batch} {tid:8} {1000 * cpu / args.messages:6.2f} ms CPU/message", file=sys.stderr, flush=True)
        rewritten = [m for m in lab.sinks["engaged"].messages if b"t.example.net/c/" in m.content]
        assert len(rewritten) == len(lab.sinks["engaged"].messages), "some engaged messages were not rewritten"
        assert not any(b"t.example.net" in m.content for m in lab.sinks["plain"].messages)
    finally:
        lab.destroy()
    plain, engaged = statistics.median(results["plain"]), statistics.median(results["engaged"])
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")
    print(f"message: multipart/alternative, HTML part ~{args.html_kb} KB quoted-printable with {args.links} links; "
          f"{args.batches} batches x {args.messages} messages per tenant")
    print(f"milter CPU per message, median of batches: off {plain:.2f} ms, on {engaged:.2f} ms "
          f"(+{engaged - plain:.2f} ms, x{engaged / plain:.2f})")
    print(f"  off batches: {', '.join(f'{x:.2f}' for x in results['plain'])}")
    print(f"  on batches:  {', '.join(f'{x:.2f}' for x in results['engaged'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
