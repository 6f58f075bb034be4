"""Has this node's tracker read its logs to the end? (``relayctl drain``)

The tracker commits its read position in each log (inode and offset, tracking/follower.py)
with the events of every batch. It has caught up when, for both logs, the committed
position is the current end of the current file: every line Postfix and the milter wrote
until now is recorded in the store.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from relay_milter.config import Settings
from relay_milter.tracking.tracker import STREAM_MAILLOG, STREAM_MILTER


@dataclass
class StreamLag:
    stream: str
    path: Path
    size: int  # the current file's size now
    offset: int | None  # the committed position in it (None: no checkpoint, or another file)
    note: str = ""

    @property
    def behind(self) -> int:
        """Bytes of the current file not yet recorded (all of it without a position in it)."""
        return self.size - (self.offset or 0) if self.offset is not None else max(self.size, 1)

    def describe(self) -> str:
        if self.offset is None:
            return f"{self.stream} {self.path}: {self.note}"
        return f"{self.stream} {self.path}: {self.behind} bytes behind (at {self.offset} of {self.size})"


def lag(store, settings: Settings) -> list[StreamLag]:
    """One entry per log: how far this node's committed position is from its end."""
    points = store.checkpoints(settings.node)
    out = []
    for stream, path in ((STREAM_MAILLOG, Path(settings.maillog_file)), (STREAM_MILTER, Path(settings.tracking.milter_log_file))):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            out.append(StreamLag(stream, path, 0, 0))  # no log: nothing to read
            continue
        cp = points.get(stream)
        if cp is None:
            out.append(StreamLag(stream, path, st.st_size, None, f"no checkpoint of node {settings.node}: has its tracker run?"))
        elif cp.get("inode") != st.st_ino:
            out.append(StreamLag(stream, path, st.st_size, None, "the tracker is still in a rotated file (or has not opened this one)"))
        else:
            out.append(StreamLag(stream, path, st.st_size, min(int(cp.get("offset") or 0), st.st_size)))
    return out


def caught_up(lags: list[StreamLag]) -> bool:
    return all(x.offset is not None and x.behind == 0 for x in lags)
