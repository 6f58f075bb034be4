"""A detect-secrets plugin: every line of an Ansible vault password file is a secret.

The built-in plugins look for keywords and high-entropy strings; a vault password file
holds a bare password on one line, which they do not see. A file whose name says it is
one (``vault-pass...``, ``vault_pass...``, ``.vault_pass``) is reported whole, so
committing one fails the secret scan unless the baseline lists it with a reason.
Loaded through .secrets.baseline (``plugins_used``); see docs/secrets-baseline.md.
"""

from __future__ import annotations

import os
import re
from typing import Any

from detect_secrets.core.potential_secret import PotentialSecret
from detect_secrets.plugins.base import BasePlugin

VAULT_PASSWORD_FILE = re.compile(r"vault[-_.]?pass", re.IGNORECASE)


class VaultPasswordFileDetector(BasePlugin):
    """Ansible vault password file (by file name)."""

    secret_type = "Ansible Vault Password File"

    def analyze_string(self, string: str):  # the file name decides, see analyze_line
        yield from ()

    def analyze_line(self, filename: str, line: str, line_number: int = 0, context: Any = None, **kwargs: Any) -> set[PotentialSecret]:
        value = line.strip()
        if not value or not VAULT_PASSWORD_FILE.search(os.path.basename(filename)):
            return set()
        return {PotentialSecret(type=self.secret_type, filename=filename, secret=value, line_number=line_number)}
