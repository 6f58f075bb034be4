"""Every default in one place, so operators and tests read the same numbers."""

from pathlib import Path

# Postfix paths of a standard Debian install.
CONFIG_DIRECTORY = "/etc/postfix"
QUEUE_DIRECTORY = "/var/spool/postfix"
DATA_DIRECTORY = "/var/lib/postfix"
MAIL_OWNER = "postfix"
SETGID_GROUP = "postdrop"
MAILLOG_FILE = "/var/log/postfix.log"

# Milter socket in Postfix syntax (unix:/path or inet:host:port).
MILTER_SOCKET = "unix:/run/relay-milter/milter.sock"
MILTER_SOCKET_GROUP = "postfix"
MILTER_SOCKET_MODE = 0o660
# Postfix waits this long for the milter before applying milter_default_action (tempfail).
MILTER_CONNECT_TIMEOUT = "10s"
MILTER_COMMAND_TIMEOUT = "30s"
MILTER_CONTENT_TIMEOUT = "60s"

# Per-tenant secrets (smarthost passwords), root-only.
SECRETS_FILE = "/etc/tenant-relay/secrets.yaml"

# Temporary failures are retried for 48 h, then the message bounces.
MAXIMAL_QUEUE_LIFETIME = "48h"
MESSAGE_SIZE_LIMIT = 25 * 1024 * 1024
# AUTH commands per client per minute (Postfix anvil); password guessing slows to this.
SMTPD_CLIENT_AUTH_RATE_LIMIT = 30

# DKIM key lookups when a tenant has no pinned key.
DNS_TIMEOUT = 5.0

# Headers the relay always removes on the way through (the route marker is ours).
ROUTE_HEADER = "X-Relay-Route"
# The route marker's seal: routes requeued mail (postsuper -r); an HMAC of the tenant (core/route.py).
ROUTE_SEAL_HEADER = "X-Relay-Route-Seal"
# The route key (32 random bytes, created by `relayctl apply` if missing; never rotated by it).
ROUTE_KEY_FILE = "relay/requeue/route.key"  # relative to the Postfix config directory
# Bounce tracking (issue 15 A): the VERP token keys (one hex key per line, the first signs),
# next to the route key, readable by the milter only.
VERP_KEY_FILE = "relay/requeue/verp.key"
# Headers a tenant's hop signature must cover unless the tenant says otherwise.
REQUIRED_SIGNED_HEADERS = ("from", "to", "subject")
# ... and these too whenever the message has them (every instance): they change what the
# message means or how it is displayed, and are easy to add or change after signing.
SIGNED_HEADERS_IF_PRESENT = ("reply-to", "cc", "content-type", "mime-version", "message-id")
# Hop signatures older than this (by t=) are refused: the replay window of a captured
# message. One day rides out a long relay outage while the platform's queue retries the
# same signed message; docs/security.md has the reasoning. 0 turns the check off.
MAX_SIGNATURE_AGE = 86400
# Signatures with the tenant's d=/s= examined per message; more are refused (5.7.21)
# before any cryptography. A platform signs once (twice during a key change).
MAX_HOP_SIGNATURES = 3
# Author-like headers held to the tenant's sender policy, like From (both ways in).
SENDER_HEADERS = ("sender", "resent-from", "resent-sender")
# RFC 5322 section 3.6: at most one of each. Duplicates are a display-spoofing trick.
SINGLETON_HEADERS = ("from", "sender", "reply-to", "to", "cc", "subject", "date", "message-id")

SMARTHOST_CONCURRENCY = 5

# Templates ship at the top of the source tree; installs copy them here.
TEMPLATE_DIRS = (
    Path(__file__).resolve().parents[2] / "postfix-templates",
    Path("/usr/share/tenant-relay/postfix-templates"),
)

# Delivery tracking (relayctl track).
EVENTS_DSN = "sqlite:////var/lib/tenant-relay/events.db"
# The milter's own log: the tracker reads its record of each accepted message here.
MILTER_LOG_FILE = "/var/log/tenant-relay/milter.log"
TRACK_POLL_INTERVAL = 0.5
# relayctl prune: events and delivered webhook rows older than this are removed.
TRACK_RETENTION = "90d"
# A queued message waits this long for the milter's record before it is recorded without it.
TRACK_RECORD_WAIT = 10.0
# Postfix's minimal_backoff_time: the next-retry estimate when the queue file says nothing.
MINIMAL_BACKOFF = 300
# The platform's own message reference, recorded when the message carries it.
UPSTREAM_ID_HEADER = "X-Upstream-ID"

# Webhooks: retried with exponential backoff (base * 2**(attempts-1), capped), never dropped.
WEBHOOK_TIMEOUT = 10.0
WEBHOOK_BACKOFF_BASE = 30.0
WEBHOOK_BACKOFF_MAX = 3600.0
WEBHOOK_SIGNATURE_HEADER = "X-Relay-Signature"
WEBHOOK_SIGNATURE_TOLERANCE = 300

# Sender reputation (relayctl ip, relayctl reputation).
REPUTATION_STATE_FILE = "/var/lib/tenant-relay/reputation.json"
REPUTATION_INTERVAL = 300.0
# How often the tracker rewrites the per-tenant queue summary and the milter re-reads it
# (backpressure), where it is, and when the milter stops trusting it (fails open).
QUEUE_SUMMARY_INTERVAL = 5.0

# Engagement tracking (opt-in opens and clicks, relayctl web).
ENGAGEMENT_KEY_FILE = "/etc/tenant-relay/engagement.key"
ENGAGEMENT_LISTEN = "127.0.0.1:8480"
# Metrics: up to this many configured tenants every per-tenant series exists from the start
# (0 until used); beyond it only series with something recorded are written (docs/scale.md).
METRICS_ZERO_FILL_TENANTS = 100
QUEUE_SUMMARY_FILE = "/var/lib/tenant-relay/queue/summary.json"
QUEUE_SUMMARY_MAX_AGE = 120.0
