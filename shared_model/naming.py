"""The one rule for a site's name, and the one way a free text becomes part of a file name.

A site's name appears in every metric, log, run folder, privacy record and certificate: it is 1 to 64
characters from A-Z a-z 0-9 . _ -, and starts with a letter or a digit (so it is never a hidden file or an
option). Anything else that becomes part of a file name (a patient id, a message kind) goes through
`safe_filename`.
"""

from __future__ import annotations

import re

__all__ = ["SITE_NAME_PATTERN", "SITE_NAME_RULE", "check_site_name", "safe_filename"]

SITE_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SITE_NAME_RULE = "1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or a digit"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def check_site_name(name: object) -> str:
    """`name` if it is a valid site name, else ValueError saying the rule."""
    if not isinstance(name, str) or not SITE_NAME_PATTERN.fullmatch(name):
        raise ValueError(f"site name {name!r} must be {SITE_NAME_RULE}")
    return name


def safe_filename(text: str, *, fallback: str = "x") -> str:
    """`text` with every character outside A-Z a-z 0-9 . _ - replaced by "_" (`fallback` if empty)."""
    return _UNSAFE.sub("_", str(text)) or fallback
