#!/usr/bin/env python3
"""Milter memory for one large message: peak RSS growth of the process that runs the milter.

The parent builds a tenant, a key and a signed message of --size-mib (written to a
temporary directory). A fresh child interpreter, with the ``relay_milter`` package taken
from --src (compare two checkouts), runs the real adapter (``RelayMilter`` under
Milter.testctx, the callbacks in libmilter order, the body in 64 KiB chunks as Postfix sends
it), and reports VmRSS before the transaction and VmHWM (peak RSS, reset just before it)
once the body has arrived and after end of message, from /proc/self/status. Linux only.

Run:  .venv/bin/python bench/bigmem.py [--size-mib 19] [--src milter]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import io, json, sys, logging
logging.basicConfig(level=logging.ERROR)
sys.path.insert(0, sys.argv[1])
from pathlib import Path
import Milter
from Milter.testctx import TestCtx
from relay_milter.config import Settings, load_tenants
from relay_milter.core.policy import Policy
from relay_milter.milter.adapter import RelayMilter

work = Path(sys.argv[2])

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) // 1024  # MiB

RelayMilter.source = Policy(load_tenants(work / "tenants"), Settings(myhostname="relay.test"))
Milter.factory = RelayMilter
ctx = TestCtx()
ctx._setsymval("i", "BIGMEM1")
assert ctx._connect(host="platform.example", helo="platform.example", ip="127.0.0.1") == Milter.CONTINUE
with open(work / "message.eml", "rb") as f:
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += f.readline()
    fields = []
    for line in head[:-4].decode().split("\r\n"):
        if line[:1] in " \t":
            fields[-1][1] += "\r\n" + line
        else:
            name, _, value = line.partition(":")
            fields.append([name, value.lstrip(" ")])
    import email
    ctx._msg = email.message_from_bytes(head)  # testctx applies header edits to this (headers only)
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as c:
        c.write("5")  # reset VmHWM
    assert ctx._envfrom("<news@acme.example>") == Milter.CONTINUE
    assert ctx._envrcpt("<alice=example.org@acme.relay.test>") == Milter.CONTINUE
    for name, value in fields:
        ctx._header(name, value)
    ctx._eoh()
    ctx._body = io.BytesIO()
    while chunk := f.read(65536):
        assert ctx._priv.body(chunk) == Milter.CONTINUE
    body_peak = status("VmHWM")
    rc = ctx._eom()
peak = status("VmHWM")
print(json.dumps({"accepted": rc == Milter.CONTINUE and ctx._reply is None, "reply": ctx._reply, "rss_before_mib": before, "peak_mib": peak, "growth_mib": peak - before, "growth_while_receiving_mib": body_peak - before}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=float, default=19)
    ap.add_argument("--src", default=str(Path(__file__).resolve().parents[1] / "milter"), help="directory holding the relay_milter package")
    args = ap.parse_args()
    sys.path.insert(0, args.src)
    import yaml

    from relay_milter.lab import make_message, rsa_key, sign

    with tempfile.TemporaryDirectory(prefix="relay-bigmem-") as tmp:
        work = Path(tmp)
        key = rsa_key(2048)
        (work / "tenants").mkdir()
        doc = {
            "id": "acme", "relay_domain": "acme.relay.test", "signing_domain": "hop.acme.test", "selector": "s1",
            "public_key": key.txt, "allowed_sender_domains": ["acme.example"],
            "smarthost": {"host": "127.0.0.1", "port": 2525},
        }
        (work / "tenants" / "acme.yaml").write_text(yaml.safe_dump(doc))
        line = ("The quick brown fox jumps over the lazy dog, again and again.  Twice-spaced. " * 12).rstrip() + "\r\n"
        body = line * int(args.size_mib * 1024 * 1024 // len(line))
        raw = sign(make_message("news@acme.example", "alice@example.org", subject="big", body=body), key, "hop.acme.test", "s1")
        (work / "message.eml").write_bytes(raw)
        del raw, body
        r = subprocess.run([sys.executable, "-c", CHILD, args.src, str(work)], capture_output=True, text=True, env=os.environ | {"PYTHONPATH": ""} | ({"MALLOC_MMAP_THRESHOLD_": os.environ["BIGMEM_MMAP"]} if os.environ.get("BIGMEM_MMAP") else {}))
        if r.returncode != 0 or "Traceback" in r.stderr:
            print(r.stderr, file=sys.stderr)
            return 1
        result = json.loads(r.stdout.strip().splitlines()[-1])
        result["message_mib"] = round((work / "message.eml").stat().st_size / 2**20, 1)
        result["src"] = args.src
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
