"""Delivery tracking: typed events, Postfix and milter log parsers, the tracker service
loop, the event store (SQLite/PostgreSQL), webhooks and metrics."""
