"""``relayctl web``: the engagement tracking service (opt-in opens and clicks, issue 15).

A plain ASGI application (run on uvicorn by the CLI) with three routes:

- ``GET /o/<token>``: a 1x1 transparent GIF; records ``OPENED``.
- ``GET /c/<token>``: ``302`` to the link's original target; records ``CLICKED``.
- ``GET /healthz``: ``ok`` (for the reverse proxy and the unit's checks).

A token is only believed when its HMAC verifies under the engagement key
(core/engagement.py). Anything else, a forged, altered or truncated token, an open
token on the click route, gets ``404`` and no ``Location``: the service is never an open
redirector. The target of a redirect is only ever the URL inside a verified token.

Events go through the same store and outbox as the tracker's (``webhooks.record_event``,
one transaction each); the running tracker sends the webhooks. The event takes the
message's tenant, Message-ID, sender and recipient from the message's ``RECEIVED`` event
(matched by queue id and the token's keyed recipient id). Repeats are counted and marked
(``reason``: ``first open``, ``repeat open #2``, ``first click <url>``, ...): opens per
message and recipient, clicks per message, recipient and link. No IP address, user agent
or cookie is recorded or logged. If the store is unavailable, the pixel and the redirect
are still served (the recipient is never held up) and the failure is logged.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from relay_milter.config import Settings, TenantSet
from relay_milter.core import engagement
from relay_milter.logs import event as log_event
from relay_milter.tracking import webhooks
from relay_milter.tracking.events import Event, Kind, engagement_detail, engagement_reason

log = logging.getLogger("relay.web")

# The classic 43-byte transparent 1x1 GIF.
PIXEL = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
# A message's RECEIVED event is looked for this long around the token's issue time
# (Postfix reuses short queue ids, eventually).
MATCH_WINDOW = 6 * 3600
_NO_STORE = [(b"cache-control", b"no-store, no-cache, must-revalidate, private"), (b"pragma", b"no-cache"),
             (b"referrer-policy", b"no-referrer"), (b"x-content-type-options", b"nosniff")]


class Recorder:
    """Writes OPENED/CLICKED events (sync; called from one worker thread)."""

    def __init__(self, store: Any, key: bytes, settings: Settings, tenants: Callable[[], TenantSet]):
        self.store = store
        self.key = key
        self.settings = settings
        self.tenants = tenants

    def _received(self, token: engagement.Token) -> Event | None:
        received = self.store.events(
            tenant=token.tenant, queue_id=token.queue_id, kinds=[Kind.RECEIVED],
            since=token.issued - MATCH_WINDOW, until=token.issued + MATCH_WINDOW,
        )
        if not token.rcpt_id:
            return received[0] if received else None
        for ev in received:
            if engagement.recipient_id(self.key, token.tenant, ev.recipient) == token.rcpt_id:
                return ev
        return None

    def record(self, token: engagement.Token, now: float | None = None) -> Event:
        kind = Kind.OPENED if token.kind == engagement.OPEN else Kind.CLICKED
        seed = self._received(token)
        recipient = seed.recipient if seed and token.rcpt_id else None
        earlier = [
            e for e in self.store.events(tenant=token.tenant, queue_id=token.queue_id, kinds=[kind],
                                         since=token.issued - MATCH_WINDOW)
            if e.recipient == recipient and (kind is Kind.OPENED or (engagement_detail(e) or {}).get("url") == token.url)
        ]
        ev = Event(
            kind=kind,
            ts=time.time() if now is None else now,
            node=seed.node if seed else self.settings.node,
            tenant=token.tenant,
            queue_id=token.queue_id,
            message_id=seed.message_id if seed else None,
            upstream_id=seed.upstream_id if seed else None,
            sender=seed.sender if seed else None,
            recipient=recipient,
            original_recipient=seed.original_recipient if seed and token.rcpt_id else None,
            reason=engagement_reason(kind, len(earlier) + 1, token.url),
        )
        tenant = self.tenants().by_id(token.tenant)
        with self.store.transaction() as tx:
            webhooks.record_event(tx, ev, webhook=bool(tenant is not None and tenant.webhook))
        return ev


class EngagementApp:
    """The ASGI application. ``recorder`` runs on one worker thread, so the repeat count
    and the insert of one hit are never interleaved with another hit's."""

    def __init__(self, key: bytes, recorder: Recorder | None):
        self.key = key
        self.recorder = recorder
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-web-store")

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if path == "/healthz" and method in ("GET", "HEAD"):
            await _respond(send, 200, b"ok\n", [(b"content-type", b"text/plain; charset=utf-8")], method)
            return
        route, _, token_text = path.lstrip("/").partition("/")
        if route not in (engagement.OPEN, engagement.CLICK) or "/" in token_text:
            await _not_found(send, method)
            return
        if method not in ("GET", "HEAD"):
            await _respond(send, 405, b"method not allowed\n", [(b"allow", b"GET, HEAD")], method)
            return
        token = engagement.read_token(self.key, token_text, kind=route)
        if token is None:
            log_event(log, logging.WARNING, None, "token_refused", route=route, length=len(token_text))
            await _not_found(send, method)
            return
        if method == "GET":  # a HEAD (link scanners, previews) is answered but not counted
            await self._record(token)
        if token.kind == engagement.OPEN:
            await _respond(send, 200, PIXEL, [(b"content-type", b"image/gif"), *_NO_STORE], method)
        else:
            assert token.url is not None
            await _respond(send, 302, b"", [(b"location", token.url.encode("utf-8")), *_NO_STORE], method)

    async def _record(self, token: engagement.Token) -> None:
        if self.recorder is None:
            return
        try:
            ev = await asyncio.get_running_loop().run_in_executor(self.pool, self.recorder.record, token)
        except Exception as exc:  # noqa: BLE001 - the recipient still gets the pixel or the link
            log_event(log, logging.ERROR, token.queue_id, "record_failed", tenant=token.tenant,
                      kind=token.kind, error=f"{type(exc).__name__}: {exc}")
            return
        log_event(log, logging.INFO, token.queue_id, ev.kind.value.lower(), tenant=ev.tenant, id=ev.id,
                  message_id=ev.message_id, recipient=ev.recipient, reason=ev.reason)

    async def _lifespan(self, receive: Callable, send: Callable) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.pool.shutdown(wait=True)
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _respond(send: Callable, status: int, body: bytes, headers: list[tuple[bytes, bytes]], method: str) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body if method != "HEAD" else b""})


async def _not_found(send: Callable, method: str) -> None:
    await _respond(send, 404, b"not found\n", [(b"content-type", b"text/plain; charset=utf-8"), *_NO_STORE], method)


def serve(app: EngagementApp, listen: str) -> None:
    """Run ``app`` on uvicorn at ``listen`` (host:port) until SIGTERM/SIGINT."""
    import uvicorn

    host, _, port = listen.rpartition(":")
    config = uvicorn.Config(app, host=host.strip("[]"), port=int(port), log_config=None, access_log=False,
                            server_header=False, proxy_headers=False, lifespan="on")
    log_event(log, logging.INFO, None, "web_start", listen=listen)
    uvicorn.Server(config).run()
    log_event(log, logging.INFO, None, "web_stop")
