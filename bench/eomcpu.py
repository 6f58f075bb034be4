#!/usr/bin/env python3
"""Milter CPU per message without Postfix: the adapter's callbacks, timed with process_time.

For the Python side of the relay's CPU per message (issue 16): a fresh child interpreter,
with the ``relay_milter`` package taken from --src (compare two checkouts), runs the real
adapter (``RelayMilter`` under Milter.testctx, callbacks in libmilter order, the body in
64 KiB chunks) on N distinct signed messages per cell and prints the CPU seconds (user +
system of the process, ``time.process_time``) per message for the callbacks from MAIL FROM
to end of message. Not included: libmilter and the socket (no MTA here), connection setup.
Included: what Milter.testctx does to record the edits (the same for both checkouts).
CPU time, not wall time, so other load on the machine moves it much less than throughput.

Run:  .venv/bin/python bench/eomcpu.py [--messages 300] [--src /work/main/milter]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CELLS = (("rsa", 2048), ("ed", 2048), ("rsa", 102400))

CHILD = r"""
import email, json, logging, statistics, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import Milter
from Milter.testctx import TestCtx
from relay_milter import logs
from relay_milter.config import Settings, load_tenants
from relay_milter.core.policy import Policy
from relay_milter.milter.adapter import RelayMilter

work = Path(sys.argv[2])
profile = None
if len(sys.argv) > 3:
    import cProfile
    profile = cProfile.Profile()
logs.setup("info", str(work / "milter.log"))  # the milter's own log line per message, to a file
RelayMilter.source = Policy(load_tenants(work / "tenants"), Settings(myhostname="relay.test"))
Milter.factory = RelayMilter
out = {}
for cell in json.loads((work / "cells.json").read_text()):
    ctx = TestCtx()
    ctx._setsymval("i", "EOMCPU1")
    ctx._connect(host="platform.example", helo="platform.example", ip="127.0.0.1")
    times = []
    for path in sorted((work / cell).iterdir()):
        raw = path.read_bytes()
        head, _, body = raw.partition(b"\r\n\r\n")
        fields = []
        for line in head.decode().split("\r\n"):
            if line[:1] in " \t":
                fields[-1][1] += "\r\n" + line
            else:
                name, _, value = line.partition(":")
                fields.append([name, value.lstrip(" ")])
        rcpt = json.loads((work / (cell + ".rcpt")).read_text())[path.name]
        ctx._msg = email.message_from_bytes(head + b"\r\n\r\n")
        ctx._body = None
        ctx._reply = None
        t0 = time.process_time()
        if profile:
            profile.enable()
        assert ctx._envfrom("<news@" + cell.split("-")[0] + ".example>") == Milter.CONTINUE
        assert ctx._envrcpt("<" + rcpt + ">") == Milter.CONTINUE
        for name, value in fields:
            ctx._priv.header(name, value)
        ctx._eoh()
        for i in range(0, len(body), 65536):
            ctx._priv.body(body[i : i + 65536])
        rc = ctx._eom()
        if profile:
            profile.disable()
        times.append(time.process_time() - t0)
        assert rc == Milter.CONTINUE and ctx._reply is None, ctx._reply
    out[cell] = {"messages": len(times), "cpu_ms_per_msg": 1000 * sum(times) / len(times), "median_ms": 1000 * statistics.median(times)}
if profile:
    import io, pstats
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats(sys.argv[3]).print_stats(30)
    print(text.getvalue(), file=sys.stderr)
print(json.dumps(out))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=300, help="messages per cell (default: %(default)s)")
    ap.add_argument("--src", action="append", help="a directory holding relay_milter (repeatable; default: this checkout's milter/)")
    ap.add_argument("--extra-tenants", type=int, default=0,
                    help="also define this many other tenants (issue 17: the cost per message must not grow with them)")
    ap.add_argument("--profile", choices=("tottime", "cumulative"), help="also print cProfile's top 30 entries (to stderr), sorted so")
    args = ap.parse_args()
    here = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(here / "milter"))
    sys.path.insert(0, str(here / "tests"))
    from relay_milter.core.addresses import encode_recipient
    from relay_milter.lab import ed25519_key, rsa_key, sign
    from support.factories import tenant_doc, write_tenants

    srcs = args.src or [str(here / "milter")]
    with tempfile.TemporaryDirectory(prefix="relay-eomcpu-") as tmp:
        work = Path(tmp)
        keys = {"rsa": rsa_key(2048), "ed": ed25519_key()}
        docs = []
        for tid, key in keys.items():
            docs.append(
                tenant_doc(
                    tid, key, smarthost={"host": "127.0.0.1", "port": 2525},
                    headers={"envelope_sender": f"bounces@{tid}.example", "reply_to": f"support@{tid}.example"},
                )
                | {"relay_domain": f"{tid}.relay.test", "signing_domain": f"hop-{tid}.bench.example",
                   "selector": "bench", "allowed_sender_domains": [f"{tid}.example"], "allow_bcc": True}
            )
        for n in range(args.extra_tenants):
            tid = f"x{n:05d}"
            docs.append(tenant_doc(tid, keys["ed"], smarthost={"host": f"{tid}.sink.test", "port": 2525})
                        | {"relay_domain": f"{tid}.relay.test", "signing_domain": f"hop-{tid}.bench.example",
                           "allowed_sender_domains": [f"{tid}.example"]})
        (work / "tenants").mkdir()
        write_tenants(work / "tenants", docs)
        cells = []
        line = ("The quick brown fox jumps over the lazy dog 0123456789 " * 2)[:76] + "\r\n"
        for tid, size in CELLS:
            cell = f"{tid}-{size}"
            cells.append(cell)
            (work / cell).mkdir()
            rcpts = {}
            for i in range(args.messages):
                head = (
                    f"From: Bench <news@{tid}.example>\r\nTo: user{i}@example.org\r\nSubject: eomcpu #{i}\r\n"
                    f"Date: Tue, 01 Dec 2026 12:00:00 +0000\r\nMessage-ID: <{cell}.{i}@bench.example>\r\n"
                    "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
                )
                body = line * max(1, (size - len(head) - 500) // len(line))
                raw = sign((head + body).encode(), keys[tid], f"hop-{tid}.bench.example", "bench")
                (work / cell / f"{i:05d}.eml").write_bytes(raw)
                rcpts[f"{i:05d}.eml"] = encode_recipient(f"user{i}@example.org", f"{tid}.relay.test")
            (work / (cell + ".rcpt")).write_text(json.dumps(rcpts))
        (work / "cells.json").write_text(json.dumps(cells))
        for src in srcs:
            argv = [sys.executable, "-c", CHILD, src, str(work)] + ([args.profile] if args.profile else [])
            r = subprocess.run(argv, capture_output=True, text=True)
            if args.profile:
                print(r.stderr, file=sys.stderr)
            if r.returncode != 0:
                print(f"{src}: failed\n{r.stderr[-3000:]}", file=sys.stderr)
                return 1
            for cell, res in json.loads(r.stdout).items():
                print(f"{src}\t{cell}\t{res['messages']} msgs\tCPU {res['cpu_ms_per_msg']:.3f} ms/msg (median {res['median_ms']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
