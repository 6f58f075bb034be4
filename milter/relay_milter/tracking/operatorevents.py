"""Operator events into the event store: the tracker copies the events that `relayctl
reputation check|watch` and `relayctl ip failover|restore` append to the reputation state
file (``reputation.state_file``, key ``events``: IP_LISTED, IP_DELISTED, DOMAIN_LISTED,
DOMAIN_DELISTED, IP_FAILOVER, IP_RESTORED) into the store's ``operator_events`` table.

The tracker is the store's one writer on a node (it owns the SQLite file); the reputation
commands run as root to reload Postfix and must not create store files the tracker cannot
open. The copy is exactly-once: the events and the checkpoint (the time of the newest
event copied, stream ``operator_events``) are written in one transaction."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

STREAM = "operator_events"


def read_events(path: Path | str) -> list[dict[str, Any]]:
    """The events in the state file ([] when there is none yet). Raises OSError/ValueError
    when it cannot be read."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a reputation state (a JSON object)")
    events = data.get("events", [])
    if not isinstance(events, list):
        raise ValueError(f"{path}: events is not a list")
    return [e for e in events if isinstance(e, dict) and {"at", "event", "subject"} <= e.keys()]


def import_events(store: Any, node: str, events: list[dict[str, Any]]) -> int:
    """Record the events newer than the node's checkpoint; returns how many."""
    with store.transaction() as tx:
        cp = tx.get_checkpoint(node, STREAM) or {}
        last = float(cp.get("at", 0.0))
        new = sorted((e for e in events if float(e["at"]) > last), key=lambda e: float(e["at"]))
        for e in new:
            tx.add_operator_event(node, e)
        if new:
            tx.set_checkpoint(node, STREAM, {"at": float(new[-1]["at"])})
    return len(new)
