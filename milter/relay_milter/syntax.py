"""Shared syntax: the regular expressions that config validation and the
address codec must agree on. Public on purpose: import these, never a copy."""

from __future__ import annotations

import re

LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
#: A lower-case DNS name of at least two labels (no trailing dot).
DOMAIN_RE = re.compile(rf"^{LABEL}(\.{LABEL})+$")
#: An RFC 5321 dot-atom local part, checked further for dots by callers.
LOCAL_RE = re.compile(r"^[A-Za-z0-9!#$&'*+/=?^_`{|}~.-]{1,64}$")
