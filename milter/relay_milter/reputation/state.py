"""The reputation state file (settings ``reputation.state_file``, JSON): listing and FCrDNS
states, failovers in force, the last events and the event counters. Its shape and meaning
are ``core/reputation.py``'s; this module only reads and replaces the file."""

from __future__ import annotations

import json
from pathlib import Path

from relay_milter.config import ConfigError, Settings
from relay_milter.files import replace_file
from relay_milter.core.reputation import empty_state, normalise_state


def load_state(path: Path) -> dict:
    """The state in ``path``; an empty state if there is no file yet. A file that cannot be
    read or parsed is a ConfigError naming it (never silently an empty state: that would
    forget the failovers in force)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return empty_state()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the reputation state: {exc}") from None
    try:
        return normalise_state(json.loads(text))
    except ValueError as exc:
        raise ConfigError(f"{path}: cannot read the reputation state: {exc}") from None


def state_for(settings: Settings) -> dict:
    """The state the configuration is rendered with: the file's, or an empty one when
    there is no pool (no failovers to read)."""
    if not settings.reputation.pool:
        return empty_state()
    return load_state(settings.reputation.state_file)


def save_state(path: Path, state: dict) -> None:
    """Replace the file atomically (files.replace_file: temp file, fsync, rename). Mode 0644:
    no secrets, operators read it (relayctl ip list)."""
    replace_file(path, json.dumps(state, indent=2, sort_keys=True) + "\n", mode=0o644, make_parent=True)
