"""Hand edits of the live main.cf/master.cf, found before `relayctl apply` overwrites them.

Apply keeps a copy of the main.cf and master.cf it installed in ``relay/installed/``. If the
live files differ from those copies, someone edited them by hand (``postconf -e``, an editor)
since: apply shows the difference and refuses unless ``--force``, so an edit is never undone
silently. The supported way to keep a main.cf parameter is settings ``postfix_extra``.
"""

from __future__ import annotations

import difflib
import os
import shutil

from relay_milter.config import Settings

INSTALLED_DIR = "relay/installed"
WATCHED = ("main.cf", "master.cf")


def _read(path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return None


def hand_edits(settings: Settings) -> dict[str, str]:
    """name -> unified diff (as installed by apply -> live now), for each edited file."""
    live_dir = settings.config_directory
    out: dict[str, str] = {}
    for name in WATCHED:
        installed = _read(live_dir / INSTALLED_DIR / name)
        live = _read(live_dir / name)
        if installed is None or live is None or installed == live:
            continue
        out[name] = "".join(difflib.unified_diff(
            installed.splitlines(keepends=True), live.splitlines(keepends=True),
            fromfile=f"{name} (as relayctl apply installed it)", tofile=f"{live_dir / name} (live)",
        ))
    return out


def record(settings: Settings) -> None:
    """Remember the live main.cf/master.cf as apply installed them."""
    live_dir = settings.config_directory
    keep = live_dir / INSTALLED_DIR
    keep.mkdir(parents=True, exist_ok=True)
    for name in WATCHED:
        if (live_dir / name).exists():
            tmp = keep / f".{name}.tmp"
            shutil.copyfile(live_dir / name, tmp)
            os.replace(tmp, keep / name)
