"""Following one log file across rotations (rename and copytruncate) by inode and offset.

The tracker reads both of its logs through a :class:`Follower` and commits the follower's
:meth:`Follower.checkpoint` in the same store transaction as the events of the lines it
consumed, so a restart resumes exactly after the last committed line.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay_milter import logs

log = logging.getLogger("relay.tracker")

READ_BYTES = 1 << 20
# Bytes at the start of a file remembered (as a hash) to recognise a file that was
# truncated and written again past our offset before we looked (copytruncate).
HEAD_BYTES = 256
ROTATED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".Z")


@dataclass(frozen=True)
class Line:
    text: str
    end: int  # offset just after this line in the file it came from


def _head_digest(fd: int, length: int) -> str:
    return hashlib.sha256(os.pread(fd, length, 0)).hexdigest()


class Follower:
    """Follows one log file across rotations by inode and offset.

    Rename rotation: the old inode is drained to its end, then the new file is read from 0
    (only once the new file has data: until then the writer may still append to the old one).
    Truncation (copytruncate): read again from 0; if the copy is found among the siblings it
    is finished first. On restore, a checkpointed inode that is no longer at the path is looked
    for among ``<path>.*`` and ``<path>-*`` and finished first, followed by any newer rotated
    files, then the path itself.

    Position changes only through :meth:`advance` (the tracker consumed the line) and file
    switches; both show up in :meth:`checkpoint`, which the tracker commits with the events.
    """

    def __init__(self, path: Path, stream: str):
        self.path = Path(path)
        self.stream = stream
        self._fd: int | None = None
        self.current: Path | None = None
        self.inode: int | None = None
        self.offset = 0
        self._head: tuple[int, str] | None = None  # (length, sha256) of the file's first bytes
        self._queue: list[int] = []  # inodes of rotated files to read before the path

    # -- setup --
    def restore(self, checkpoint: dict | None, from_start: bool = False) -> None:
        """Position at the checkpoint; without one at the end of the file (or its start)."""
        self.close()
        if checkpoint is None:
            if self._open(self.path) and not from_start:
                self.offset = os.fstat(self._fd).st_size  # type: ignore[arg-type]
                self._remember_head()
            return
        inode, offset = int(checkpoint.get("inode") or 0), int(checkpoint.get("offset") or 0)
        head = checkpoint.get("head")
        found = self._find_inode(inode)
        if found is None:
            copy = self._find_copy(head, offset) if head else None
            if copy is not None:
                found = copy
            else:
                if inode:
                    self._problem(
                        "tracker_file_gone",
                        file=checkpoint.get("path"),
                        inode=inode,
                        offset=offset,
                        action=f"reading {self.path} from the start; lines written to the old file after the checkpoint are lost",
                    )
                self._open(self.path)
                return
        if not self._open(found):
            return
        self.offset = offset
        self._head = (int(head[0]), str(head[1])) if head else None
        if found != self.path:
            self._queue = self._newer_siblings(found)
            logs.event(log, logging.INFO, None, "tracker_resume_rotated", stream=self.stream, file=found, offset=offset, then=len(self._queue) + 1)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self.current, self.inode, self.offset, self._head, self._queue = None, None, None, 0, None, []

    def checkpoint(self) -> dict:
        return {
            "path": str(self.current or self.path),
            "inode": self.inode,
            "offset": self.offset,
            "head": list(self._head) if self._head else None,
        }

    # -- reading --
    def read(self, max_lines: int) -> list[Line]:
        """Complete lines from the current position (all from one file). A partial last line
        waits for its newline, unless the file was rotated away and will not grow again."""
        for _ in range(len(self._queue) + 3):
            if self._fd is None and not self._open(self.path):
                return []
            self._check_truncation()
            rotated = self._successor_ready()
            lines = self._read_lines(max_lines, final=rotated)
            if lines or not rotated:
                return lines
            self._switch()
        return []

    def advance(self, end: int) -> None:
        self.offset = end
        if self._head is None or self._head[0] < HEAD_BYTES:
            self._remember_head()

    def behind(self) -> int:
        """Bytes not read yet in the current file (a lag measure for the progress log)."""
        if self._fd is None:
            return 0
        return max(0, os.fstat(self._fd).st_size - self.offset)

    # -- internals --
    def _open(self, path: Path) -> bool:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return False
        except OSError as exc:
            self._problem("tracker_file_unreadable", file=path, error=exc.strerror or str(exc))
            return False
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            self._problem("tracker_file_unreadable", file=path, error="not a regular file")
            return False
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self.current, self.inode, self.offset, self._head = fd, Path(path), st.st_ino, 0, None
        return True

    def _remember_head(self) -> None:
        if self._fd is None:
            return
        length = min(self.offset, HEAD_BYTES)
        self._head = (length, _head_digest(self._fd, length)) if length else None

    def _check_truncation(self) -> None:
        assert self._fd is not None
        size = os.fstat(self._fd).st_size
        rewritten = False
        if self._head and size >= self._head[0]:
            rewritten = _head_digest(self._fd, self._head[0]) != self._head[1]
        if size >= self.offset and not rewritten:
            return
        old_head, old_offset = self._head, self.offset
        copy = self._find_copy(list(old_head), old_offset) if old_head else None
        if copy is not None and self._open(copy):
            self.offset, self._head = old_offset, old_head
            logs.event(log, logging.WARNING, None, "tracker_truncated", stream=self.stream, file=self.path, offset=old_offset, action=f"finishing the copy {copy} first")
            return
        self.offset, self._head = 0, None
        self._problem("tracker_truncated", file=self.current, offset=old_offset, action="reading from the start")

    def _successor_ready(self) -> bool:
        """Is there a newer file to go on with once this one is drained?"""
        if self._queue:
            return True
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        return st.st_ino != self.inode and st.st_size > 0

    def _switch(self) -> None:
        while self._queue:
            inode = self._queue.pop(0)
            path = self._find_inode(inode)
            if path is not None and self._open(path):
                logs.event(log, logging.INFO, None, "tracker_rotated", stream=self.stream, file=path)
                return
        done = self.current
        if self._open(self.path):
            logs.event(log, logging.INFO, None, "tracker_rotated", stream=self.stream, file=self.path, finished=done)

    def _read_lines(self, max_lines: int, final: bool) -> list[Line]:
        assert self._fd is not None
        data = os.pread(self._fd, READ_BYTES, self.offset)
        if not data:
            return []
        at_eof = len(data) < READ_BYTES
        cut = data.rfind(b"\n") + 1
        if final and at_eof:
            cut = len(data)  # the writer moved on: a last line without newline is complete
        elif cut == 0 and not at_eof:
            cut = len(data)  # one line longer than READ_BYTES: not a log line, skip it whole
            self._problem("tracker_overlong_line", file=self.current, offset=self.offset)
        lines: list[Line] = []
        pos = 0
        while pos < cut and len(lines) < max_lines:
            nl = data.find(b"\n", pos, cut)
            stop = cut if nl < 0 else nl + 1
            text = data[pos:stop].rstrip(b"\r\n").decode("utf-8", "replace")
            lines.append(Line(text, self.offset + stop))
            pos = stop
        return lines

    def _siblings(self) -> list[Path]:
        name = self.path.name
        try:
            entries = list(self.path.parent.iterdir())
        except OSError:
            return []
        return [
            p
            for p in entries
            if (p.name.startswith(name + ".") or p.name.startswith(name + "-")) and not p.name.endswith(ROTATED_SUFFIXES)
        ]

    def _find_inode(self, inode: int) -> Path | None:
        if not inode:
            return None
        for path in [self.path, *sorted(self._siblings())]:
            try:
                st = os.stat(path)
            except OSError:
                continue
            if st.st_ino == inode and stat.S_ISREG(st.st_mode):
                return path
        return None

    def _find_copy(self, head: list | None, offset: int) -> Path | None:
        """A rotated copy (copytruncate) of the file we were reading: same first bytes, and
        at least as long as our position."""
        if not head or not head[0]:
            return None
        for path in sorted(self._siblings()):
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                if os.fstat(fd).st_size >= offset and _head_digest(fd, int(head[0])) == head[1]:
                    return path
            finally:
                os.close(fd)
        return None

    def _newer_siblings(self, found: Path) -> list[int]:
        """Rotated files written after ``found`` (read before the path itself), oldest first."""
        try:
            base = os.stat(found)
            live = os.stat(self.path).st_ino if self.path.exists() else None
        except OSError:
            return []
        newer = []
        for path in self._siblings():
            try:
                st = os.stat(path)
            except OSError:
                continue
            if st.st_ino not in (base.st_ino, live) and st.st_mtime >= base.st_mtime:
                newer.append((st.st_mtime, st.st_ino))
        return [ino for _, ino in sorted(newer)]

    def _problem(self, name: str, **fields: Any) -> None:
        logs.event(log, logging.WARNING, None, name, stream=self.stream, **fields)


__all__ = ["Follower", "Line", "HEAD_BYTES", "READ_BYTES"]
