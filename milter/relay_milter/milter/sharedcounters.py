"""Rate counters shared by every worker process of the milter (core.quota.Counters).

A tenant's ``messages_per_minute`` / ``messages_per_day`` are limits per node, not per
worker: with N workers each keeping its own count, a tenant could send N times its limit.
The supervisor creates one table before it forks the workers; every worker (and every
replacement) maps the same pages.

The table is a fixed array of slots in a shared file mapping (an unlinked temporary
file): the tenant id (up to 31 octets, zero-padded), the minute and its count, the day and
its count. A tenant's slot is found by open addressing from a stable hash of its id.
Updates take a POSIX record lock on the file (``lockf``) plus a thread lock: the kernel
drops a record lock when its holder dies, so a worker killed mid-update cannot leave the
others waiting. Slots of removed tenants stay (a few bytes each) until a restart.
"""

from __future__ import annotations

import fcntl
import mmap
import struct
import tempfile
import threading
import zlib

_SLOT = struct.Struct("<32sqqqq")  # tenant id, minute, per minute, day, per day
# Tenants with a rate limit each take a slot (64 bytes): 65,536 slots (4 MiB) hold 10,000
# such tenants at a load of 15 %, so probes stay short. 8,192 would have been full before
# 10,000 tenants with limits (issue 17): their mail would have been refused with a 4xx.
DEFAULT_SLOTS = 65536


class TableFull(RuntimeError):
    pass


class SharedCounters:
    """core.quota.Counters in shared memory; create before fork, use in any child."""

    def __init__(self, slots: int = DEFAULT_SLOTS):
        self.slots = slots
        self._file = tempfile.TemporaryFile(prefix="relay-milter-counters-")
        self._file.truncate(slots * _SLOT.size)
        self._map = mmap.mmap(self._file.fileno(), slots * _SLOT.size, flags=mmap.MAP_SHARED)
        self._thread_lock = threading.Lock()

    def _slot(self, key: bytes) -> int:
        """The slot holding ``key``, or the free slot where it goes (lock held)."""
        start = zlib.crc32(key) % self.slots
        for i in range(self.slots):
            n = (start + i) % self.slots
            held = self._map[n * _SLOT.size : n * _SLOT.size + 32]
            if held == key or held == bytes(32):
                return n
        raise TableFull(f"rate counter table full ({self.slots} tenants)")

    def window(self, tenant_id: str, minute: int, day: int, add: int = 0) -> tuple[int, int]:
        key = tenant_id.encode("ascii").ljust(32, b"\0")
        if len(key) > 32:
            raise ValueError(f"tenant id too long for the counter table: {tenant_id!r}")
        with self._thread_lock:
            fcntl.lockf(self._file.fileno(), fcntl.LOCK_EX)
            try:
                offset = self._slot(key) * _SLOT.size
                _, m, per_minute, d, per_day = _SLOT.unpack_from(self._map, offset)
                if m != minute:
                    m, per_minute = minute, 0
                if d != day:
                    d, per_day = day, 0
                per_minute += add
                per_day += add
                _SLOT.pack_into(self._map, offset, key, m, per_minute, d, per_day)
                return per_minute, per_day
            finally:
                fcntl.lockf(self._file.fileno(), fcntl.LOCK_UN)
