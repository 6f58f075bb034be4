"""The tracker as a service (``relayctl track``): the poll loop with its worker threads and
signal handling around a :class:`~relay_milter.tracking.tracker.Tracker`."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Callable, Iterable

from relay_milter import logs
from relay_milter.config import Settings, TenantSet
from relay_milter.tracking.tracker import Tracker, TrackerStore

log = logging.getLogger("relay.tracker")


def main_loop(
    settings: Settings,
    tenants: TenantSet,
    store: TrackerStore,
    stop: threading.Event,
    *,
    once: bool = False,
    from_start: bool = False,
    workers: Iterable[Callable[[threading.Event], None]] = (),
    on_start: Callable[[], None] | None = None,
    on_tracker: Callable[[Tracker], None] | None = None,
    heartbeat: Callable[[], None] | None = None,
) -> int:
    """Run the tracker until SIGTERM/SIGINT (or ``stop``); return the exit status (0).

    The first pass positions both followers and commits their checkpoints before
    ``on_start`` is called, so a tracker killed right after it announced itself resumes
    without a gap. The signal only sets ``stop``: the batch in progress is finished and
    committed, so a restart continues exactly there. ``workers`` (the webhook sender, the
    metrics writer) run on their own threads with ``stop`` and are joined on the way out.
    ``once`` processes what is in the files now and returns (workers are not started).
    ``on_tracker`` gets the tracker (a tenant reload swaps its ``tenants``); ``heartbeat``
    is called after every completed pass (relay_tracker_last_run_timestamp_seconds).

    Only one tracker may run per node name and store: the node is claimed first
    (``store.claim_node``) and a second tracker fails with a ConfigError naming it.
    """
    claim = store.claim_node(settings.node) if hasattr(store, "claim_node") else None
    try:
        return _run(settings, tenants, store, stop, once, from_start, workers, on_start, on_tracker, heartbeat)
    finally:
        if claim is not None:
            claim.release()


def _run(settings, tenants, store, stop, once, from_start, workers, on_start, on_tracker, heartbeat) -> int:
    tracker = Tracker(settings, tenants, store, from_start=from_start)
    if on_tracker is not None:
        on_tracker(tracker)
    try:
        written = tracker.run_once()
    except BaseException:
        tracker.close()
        raise
    if heartbeat is not None:
        heartbeat()
    if once:
        tracker.close()
        logs.event(log, logging.INFO, None, "tracker_once", events=written)
        return 0
    previous = _install_signals(stop)
    threads = [threading.Thread(target=w, args=(stop,), name=getattr(w, "__name__", "worker"), daemon=True) for w in workers]
    for t in threads:
        t.start()
    if on_start is not None:
        on_start()
    try:
        tracker.run(stop, heartbeat)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        _restore_signals(previous)
    return 0


def _install_signals(stop: threading.Event) -> dict[int, Any]:
    """SIGTERM/SIGINT set ``stop`` (only possible from the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum: int, frame: Any) -> None:
        logs.event(log, logging.INFO, None, "tracker_signal", signal=signal.Signals(signum).name, action="finishing the batch")
        stop.set()

    return {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}


def _restore_signals(previous: dict[int, Any]) -> None:
    for sig, old in previous.items():
        signal.signal(sig, old)


__all__ = ["main_loop"]
