"""An asyncio SMTP load generator and delivery counters, for the benchmark and the fault suite.

``send_all`` pushes pre-built (pre-signed) messages through an SMTP server
with C concurrent clients, each reusing its connection for several messages,
and records for every message what the server finally said and how long the
transaction took (MAIL FROM sent -> reply to the final dot: the *acceptance
latency* a client sees).

With ``retry=True`` it behaves like a well-behaved MTA: a 4xx reply, a refused
or dropped connection, or a timeout puts the message back in the queue and it
is tried again (until ``deadline``); a 5xx reply is final. An attempt whose
connection broke after the final dot was sent but before the reply arrived is
counted as *ambiguous*: the server may or may not have taken the message (the
classic SMTP duplicate window, RFC 1047), so a retry may legitimately produce
a second copy.

Everything talks to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Outgoing:
    """One message to send: envelope plus wire-ready (CRLF, dot-stuffed, no final dot) data."""

    key: str  # caller's identifier, e.g. the message number
    mail_from: str
    rcpts: list[str]
    data: bytes

    @classmethod
    def build(cls, key: str, mail_from: str, rcpts: list[str], message: bytes) -> "Outgoing":
        return cls(key, mail_from, rcpts, dot_stuff(message))


def dot_stuff(message: bytes) -> bytes:
    data = re.sub(rb"(?<!\r)\n", b"\r\n", message)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    if data.startswith(b"."):
        data = b"." + data
    return data.replace(b"\r\n.", b"\r\n..")


@dataclass
class Attempt:
    stage: str  # connect | greeting | ehlo | mail | rcpt | data | dot
    code: int  # SMTP code, or 0 for a connection problem
    text: str
    ambiguous: bool = False  # the connection broke after the final dot was sent


@dataclass
class Outcome:
    key: str
    accepted: bool = False
    refused: bool = False  # 5xx: final
    code: int = 0
    text: str = ""
    latency: float | None = None  # seconds, MAIL FROM -> final reply, of the accepting attempt
    accepted_at: float | None = None  # time.monotonic()
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def ambiguous_attempts(self) -> int:
        return sum(1 for a in self.attempts if a.ambiguous)

    @property
    def temp_failures(self) -> list[Attempt]:
        return [a for a in self.attempts if 400 <= a.code < 500 or a.code == 0]


@dataclass
class RunResult:
    outcomes: dict[str, Outcome]
    started: float  # time.monotonic() when the first client started
    finished: float  # when the last client finished

    @property
    def accepted(self) -> list[Outcome]:
        return [o for o in self.outcomes.values() if o.accepted]

    @property
    def refused(self) -> list[Outcome]:
        return [o for o in self.outcomes.values() if o.refused]

    @property
    def unfinished(self) -> list[Outcome]:
        return [o for o in self.outcomes.values() if not o.accepted and not o.refused]

    def latencies(self) -> list[float]:
        return sorted(o.latency for o in self.outcomes.values() if o.latency is not None)


class _ConnectionLost(Exception):
    def __init__(self, stage: str, why: str, ambiguous: bool = False):
        super().__init__(why)
        self.stage, self.why, self.ambiguous = stage, why, ambiguous


class _Client:
    def __init__(self, host: str, port: int, helo: str, timeout: float):
        self.host, self.port, self.helo, self.timeout = host, port, helo, timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    @property
    def connected(self) -> bool:
        return self.writer is not None

    async def _reply(self, stage: str, ambiguous: bool = False) -> tuple[int, str]:
        assert self.reader is not None
        lines = []
        try:
            while True:
                line = await asyncio.wait_for(self.reader.readline(), self.timeout)
                if not line:
                    raise _ConnectionLost(stage, "connection closed by server", ambiguous)
                lines.append(line.decode("utf-8", "replace").rstrip("\r\n"))
                if len(line) < 4 or line[3:4] != b"-":
                    break
        except asyncio.TimeoutError:
            raise _ConnectionLost(stage, f"no reply within {self.timeout}s", ambiguous) from None
        except OSError as exc:
            raise _ConnectionLost(stage, f"{exc.__class__.__name__}: {exc}", ambiguous) from None
        try:
            code = int(lines[-1][:3])
        except ValueError:
            raise _ConnectionLost(stage, f"unparsable reply {lines[-1]!r}", ambiguous) from None
        return code, " ".join(l[4:] for l in lines)

    async def _cmd(self, stage: str, line: bytes) -> tuple[int, str]:
        assert self.writer is not None
        try:
            self.writer.write(line + b"\r\n")
            await self.writer.drain()
        except OSError as exc:
            raise _ConnectionLost(stage, f"{exc.__class__.__name__}: {exc}") from None
        return await self._reply(stage)

    async def connect(self) -> Attempt | None:
        """Connect and EHLO. Returns None when ready, else the failed attempt."""
        try:
            self.reader, self.writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, limit=1 << 20), self.timeout
            )
        except (OSError, asyncio.TimeoutError) as exc:
            self.reader = self.writer = None
            return Attempt("connect", 0, f"{exc.__class__.__name__}: {exc}")
        try:
            code, text = await self._reply("greeting")
            if code != 220:
                await self.close()
                return Attempt("greeting", code, text)
            code, text = await self._cmd("ehlo", b"EHLO " + self.helo.encode())
            if code != 250:
                await self.close()
                return Attempt("ehlo", code, text)
        except _ConnectionLost as exc:
            await self.close(quit=False)
            return Attempt(exc.stage, 0, exc.why)
        return None

    async def transaction(self, msg: Outgoing) -> tuple[Attempt, float]:
        """One MAIL/RCPT/DATA transaction. Raises _ConnectionLost if the connection breaks."""
        t0 = time.monotonic()
        code, text = await self._cmd("mail", f"MAIL FROM:<{msg.mail_from}>".encode())
        if code != 250:
            await self._rset()
            return Attempt("mail", code, text), time.monotonic() - t0
        rcpt_fail = None
        for r in msg.rcpts:
            code, text = await self._cmd("rcpt", f"RCPT TO:<{r}>".encode())
            if code not in (250, 251):
                rcpt_fail = rcpt_fail or Attempt("rcpt", code, text)
        if rcpt_fail:  # all-or-nothing: one message, one outcome
            await self._rset()
            return rcpt_fail, time.monotonic() - t0
        code, text = await self._cmd("data", b"DATA")
        if code != 354:
            await self._rset()
            return Attempt("data", code, text), time.monotonic() - t0
        assert self.writer is not None
        try:
            self.writer.write(msg.data + b".\r\n")
            await self.writer.drain()
        except OSError as exc:
            raise _ConnectionLost("dot", f"{exc.__class__.__name__}: {exc}", ambiguous=True) from None
        code, text = await self._reply("dot", ambiguous=True)
        return Attempt("dot", code, text), time.monotonic() - t0

    async def _rset(self) -> None:
        code, text = await self._cmd("rset", b"RSET")
        if code != 250:
            raise _ConnectionLost("rset", f"RSET answered {code} {text}")

    async def close(self, quit: bool = True) -> None:
        if self.writer is None:
            return
        w, self.writer, self.reader = self.writer, None, None
        try:
            if quit:
                w.write(b"QUIT\r\n")
                await asyncio.wait_for(w.drain(), 2)
            w.close()
            await asyncio.wait_for(w.wait_closed(), 2)
        except (OSError, asyncio.TimeoutError):
            pass


async def send_all_async(
    messages: list[Outgoing],
    port: int,
    host: str = "127.0.0.1",
    clients: int = 10,
    per_connection: int = 10,
    retry: bool = False,
    retry_delay: float = 0.5,
    deadline: float = 120.0,
    timeout: float = 60.0,
    helo: str = "loadgen.lab.test",
    pace: float = 0.0,
) -> RunResult:
    """Send every message; see the module docstring for the retry semantics.

    ``pace`` makes each client pause that long between transactions (a steady
    rate for soak and fault runs). In retry mode a client that got a temporary
    failure closes its connection and starts a fresh SMTP session for the retry.
    """
    queue: asyncio.Queue[Outgoing] = asyncio.Queue()
    for m in messages:
        queue.put_nowait(m)
    outcomes = {m.key: Outcome(m.key) for m in messages}
    pending = {"n": len(messages)}
    started = time.monotonic()
    stop_at = started + deadline

    def settle(m: Outgoing, attempt: Attempt, latency: float | None) -> None:
        o = outcomes[m.key]
        o.attempts.append(attempt)
        o.code, o.text = attempt.code, attempt.text
        if attempt.stage == "dot" and 200 <= attempt.code < 300:
            o.accepted, o.latency, o.accepted_at = True, latency, time.monotonic()
            pending["n"] -= 1
        elif 500 <= attempt.code < 600 or not retry:
            o.refused = 500 <= attempt.code < 600
            pending["n"] -= 1
        else:
            queue.put_nowait(m)  # 4xx or a broken connection: try again later

    async def worker() -> None:
        c = _Client(host, port, helo, timeout)
        sent_on_conn = 0
        while pending["n"] > 0 and time.monotonic() < stop_at:
            try:
                m = queue.get_nowait()
            except asyncio.QueueEmpty:
                await asyncio.sleep(0.05)  # others hold the rest (maybe for a retry)
                continue
            if not c.connected or sent_on_conn >= per_connection:
                await c.close()
                sent_on_conn = 0
                failed = await c.connect()
                if failed:
                    settle(m, failed, None)
                    if retry:
                        await asyncio.sleep(retry_delay)
                    continue
            try:
                attempt, latency = await c.transaction(m)
                sent_on_conn += 1
                settle(m, attempt, latency)
                if retry and not (200 <= attempt.code < 300):
                    await c.close()
                    await asyncio.sleep(retry_delay)
                elif pace:
                    await asyncio.sleep(pace)
            except _ConnectionLost as exc:
                await c.close(quit=False)
                settle(m, Attempt(exc.stage, 0, exc.why, exc.ambiguous), None)
                if retry:
                    await asyncio.sleep(retry_delay)
        await c.close()

    await asyncio.gather(*(worker() for _ in range(max(1, clients))))
    return RunResult(outcomes, started, time.monotonic())


def send_all(messages: list[Outgoing], port: int, **kw) -> RunResult:
    return asyncio.run(send_all_async(messages, port, **kw))


def percentile(sorted_values: list[float], p: float) -> float | None:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return None
    import math

    k = max(0, min(len(sorted_values) - 1, math.ceil(p / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


# -- counting what Postfix delivered -------------------------------------------


class MaillogCounter:
    """Counts ``status=sent`` lines in a Postfix maillog_file, reading only what is new."""

    SENT = re.compile(rb" status=sent ")

    def __init__(self, path: Path):
        self.path = Path(path)
        self.offset = self.path.stat().st_size if self.path.exists() else 0
        self.sent = 0
        self._partial = b""

    def poll(self) -> int:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return self.sent
        self.offset += len(chunk)
        data = self._partial + chunk
        cut = data.rfind(b"\n") + 1
        self._partial = data[cut:]
        self.sent += len(self.SENT.findall(data[:cut]))
        return self.sent

    def wait(self, count: int, timeout: float, interval: float = 0.01) -> float | None:
        """Wait until ``count`` deliveries were logged; returns the monotonic time seen, or None."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.poll() >= count:
                return time.monotonic()
            time.sleep(interval)
        return None


class SmtpSinkProcess:
    """Postfix's ``smtp-sink`` as a fast smarthost that accepts and discards everything.

    Quacks enough like ``lab.Sink`` (name, port, start/stop, ``_controller``) for
    ``Lab.add_tenant``.
    """

    def __init__(self, name: str, port: int, workdir: Path, backlog: int = 256, delay: float = 0):
        self.name, self.port, self.workdir, self.backlog, self.delay = name, port, Path(workdir), backlog, delay
        self.proc: subprocess.Popen | None = None
        self.messages: list = []  # never filled: smtp-sink discards mail

    @property
    def _controller(self):  # Lab.start() starts sinks whose _controller is None
        return self.proc

    def start(self) -> "SmtpSinkProcess":
        exe = "/usr/sbin/smtp-sink" if os.path.exists("/usr/sbin/smtp-sink") else "smtp-sink"
        args = [exe, "-u", "postfix", "-m", "1000"]
        if self.delay:
            args += ["-w", str(self.delay)]
        args += [f"127.0.0.1:{self.port}", str(self.backlog)]
        self.proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=open(self.workdir / f"smtp-sink-{self.name}.log", "ab")
        )
        from relay_milter.lab.harness import wait_for

        wait_for(self._up, 10, what=f"smtp-sink on port {self.port}")
        return self

    def _up(self) -> bool:
        from relay_milter.lab.harness import port_open

        if self.proc and self.proc.poll() is not None:
            raise RuntimeError(f"smtp-sink exited with {self.proc.returncode}")
        return port_open(self.port)

    def stop(self) -> None:
        from relay_milter.lab.harness import stop_process

        stop_process(self.proc)
        self.proc = None


def proc_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (the milter's supervisor and its workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
        except OSError:
            pass
    return out


def _cpu_ticks(pid: int) -> int:
    """utime + stime + cutime + cstime: the process's threads and its reaped children."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])


def proc_cpu_seconds(pid: int) -> float:
    """User+system CPU seconds of a process (all its threads) and of its descendants, live
    or reaped (a multi-process milter: the supervisor and every worker), from /proc."""
    ticks = 0
    for p in proc_tree(pid):
        try:
            ticks += _cpu_ticks(p)
        except OSError:  # exited meanwhile: its time is in its parent's cutime once reaped
            pass
    return ticks / os.sysconf("SC_CLK_TCK")


def proc_memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB, summed over it and its live
    descendants (pages shared after fork are counted in each: an upper bound), and Pss
    (proportional set size, shared pages split among the processes sharing them) where
    /proc allows it."""
    out = {"VmRSS": 0, "VmHWM": 0}
    pss = 0
    for p in proc_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith(("VmRSS:", "VmHWM:")):
                    name, value = line.split(":", 1)
                    out[name] += int(value.split()[0])
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            pass
    if pss:
        out["Pss"] = pss
    return out
