"""The per-tenant queue summary file the milter's backpressure reads
(settings ``reputation.queue_summary_file``; format: ``core.quota.summary_document``).

The tracker rewrites it every ``reputation.queue_refresh`` seconds: a temp file in the same
directory, fsync, rename(2), so the milter never reads half a file. Mode 0640: the
directory's group (the Ansible role makes it setgid to the configuration group, which the
milter is in) reads it; it names tenants and queue sizes, nothing more."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_summary(path: Path | str, doc: dict[str, Any]) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(doc, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o640)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
