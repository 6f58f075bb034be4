"""What every relayctl command group shares: the global options, the event store, the age format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from relay_milter.cli.errors import ExitCode, fail, invalid_configuration, warn
from relay_milter.cli.lastgood import fallback
from relay_milter.config import ConfigError, Settings, TenantSet, applied_tenants_path, load_settings, load_tenants

DEFAULT_TENANTS = "/etc/tenant-relay/tenants"
DEFAULT_SETTINGS = "/etc/tenant-relay/relay.yaml"


class Context:
    """``relayctl --tenants DIR --settings FILE``; loading either exits 3 when it is invalid."""

    def __init__(self, tenants_dir: Path, settings_file: Path | None):
        self.tenants_dir = tenants_dir
        self.settings_file = settings_file

    def load_settings(self) -> Settings:
        try:
            return load_settings(self.settings_file)
        except ConfigError as exc:
            invalid_configuration(exc)

    def load(self, last_good: bool = False) -> tuple[TenantSet, Settings]:
        """Tenants and settings; exits 3 if either is invalid. ``last_good``: with broken
        tenant files, warn and use the tenant set `relayctl apply` last activated (the
        operator commands; see cli/lastgood.py). Invalid settings always exit 3."""
        settings = self.load_settings()
        try:
            # Files unchanged since the last apply are not parsed again (config.load_tenants).
            tenants = load_tenants(self.tenants_dir, applied=applied_tenants_path(settings))
        except ConfigError as exc:
            if not last_good:
                invalid_configuration(exc)
            try:
                tenants = fallback(settings, exc)
            except ConfigError as error:
                invalid_configuration(error)
        return tenants, settings


def sqlite_path(dsn: str) -> Path | None:
    if dsn.startswith("sqlite:///"):
        return Path(dsn[len("sqlite:///"):])
    return None


def open_store(settings: Settings, required: bool = True, create: bool = False) -> Any:
    """The event store (RELAY_EVENTS_DSN, else settings tracking.events_dsn), or None when it
    is optional and absent. Unavailable and required: exit 4.

    An SQLite store that does not exist yet is created only with ``create`` (the tracker,
    its writer): a read-only command should not leave an empty database behind.
    """
    dsn = settings.tracking.dsn()
    path = sqlite_path(dsn)
    if not create and path is not None and not path.exists():
        if not required:
            return None
        fail(ExitCode.UNAVAILABLE, f"event store {path} does not exist (has `relayctl track` run on this node?)")
    try:
        from relay_milter.tracking import store as eventstore

        return eventstore.open_store(dsn)
    except Exception as exc:  # driver missing, database down, permissions: all "unavailable"
        if not required:
            warn(f"event store unavailable, attributing by sender domain: {exc}")
            return None
        fail(ExitCode.UNAVAILABLE, f"event store unavailable: {exc}")
