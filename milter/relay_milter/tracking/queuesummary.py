"""The per-tenant queue summary file the milter's backpressure reads
(settings ``reputation.queue_summary_file``; format: ``core.quota.summary_document``).

The tracker rewrites it every ``reputation.queue_refresh`` seconds: a temp file in the same
directory, fsync, rename(2), so the milter never reads half a file. Mode 0640: the
directory's group (the Ansible role makes it setgid to the configuration group, which the
milter is in) reads it; it names tenants and queue sizes, nothing more."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from relay_milter.files import replace_file


def write_summary(path: Path | str, doc: dict[str, Any]) -> None:
    replace_file(path, json.dumps(doc, sort_keys=True) + "\n", 0o640)
