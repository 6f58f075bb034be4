"""Atomic file replacement, shared by every writer of a file another process reads
(metrics textfiles, the queue summary, the reputation metrics)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def replace_file(path: Path | str, text: str, mode: int = 0o644, make_parent: bool = False) -> None:
    """Replace ``path`` atomically: a temp file in the same directory (``.NAME.*.tmp``, so a
    reader globbing ``*.prom`` or the name never sees it), fsync, chmod ``mode``, rename.
    The temp file is removed if anything fails."""
    path = Path(path)
    if make_parent:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
