"""Text made safe to print on one line: control characters escaped (file names may hold any)."""

from __future__ import annotations

import unicodedata


def one_line(text: object) -> str:
    """``str(text)`` with every control, format or line/paragraph separator character written as
    an escape (``\\n``, ``\\x1b``, ``\\u2028``), so that it prints on one line and cannot move the
    cursor or recolour a terminal."""
    return "".join(
        ascii(ch)[1:-1] if unicodedata.category(ch) in _ESCAPED else ch for ch in str(text)
    )


_ESCAPED = ("Cc", "Cf", "Zl", "Zp")
