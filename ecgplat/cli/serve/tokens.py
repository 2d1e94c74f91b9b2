"""Bearer tokens with scopes, read from a file only its owner can read, and a rate limit per token.

The tokens file is JSON (layout: docs/formats.md, "Service tokens"):
``{"tokens": [{"name": "ward-3", "token": "<secret, >= 16 characters>", "scopes": ["query",
"records"], "rate": 5, "burst": 10}]}``; ``rate`` (requests per second) and ``burst`` are
optional and default to the service's. The file must not be readable or writable by anyone but
its owner (mode 0600 or stricter): it is refused otherwise. Tokens are kept only as SHA-256
digests; a request's token is looked up by its digest, so no comparison leaks a prefix.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SCOPES = ("query", "predict", "records")
MIN_TOKEN_CHARS = 16
ANONYMOUS = "anonymous"  # the caller's name when the service runs without a tokens file


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the token's name (never the token), its scopes and rate limit."""

    name: str
    scopes: frozenset[str]
    rate: float
    burst: int


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def check_private(path: Path) -> None:
    """ValueError unless `path` is a regular file that only its owner may read or write."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path}: tokens file is not a regular file")
    if st.st_mode & 0o077:
        raise ValueError(
            f"{path}: tokens file is mode {stat.S_IMODE(st.st_mode):04o}; it must be readable "
            f"by its owner only (chmod 600 {path})"
        )


def _entry(i: int, e, path: Path, rate: float, burst: int) -> tuple[str, Caller]:
    where = f"{path}: tokens[{i}]"
    if not isinstance(e, dict):
        raise ValueError(f"{where} is not an object")
    name, token, scopes = e.get("name"), e.get("token"), e.get("scopes")
    if not isinstance(name, str) or not name.strip() or len(name) > 64 or not name.isprintable():
        raise ValueError(f"{where}: 'name' must be a printable string of 1-64 characters")
    if not isinstance(token, str) or len(token) < MIN_TOKEN_CHARS:
        raise ValueError(
            f"{where} ({name}): 'token' must be a string of >= {MIN_TOKEN_CHARS} chars"
        )
    if not isinstance(scopes, list) or not all(s in SCOPES for s in scopes):
        raise ValueError(f"{where} ({name}): 'scopes' must be a list of {', '.join(SCOPES)}")
    r, b = e.get("rate", rate), e.get("burst", burst)
    if not isinstance(r, int | float) or not r > 0 or not math.isfinite(r):
        raise ValueError(f"{where} ({name}): 'rate' must be a positive number")
    if not isinstance(b, int) or b < 1:
        raise ValueError(f"{where} ({name}): 'burst' must be a positive integer")
    return _digest(token), Caller(name, frozenset(scopes), float(r), b)


def read_tokens(path: str | os.PathLike, rate: float, burst: int) -> dict[str, Caller]:
    """{token digest: Caller} of the tokens file at `path` (module docstring); ValueError (one
    line naming the file, never a token) when it is not private or not of that layout."""
    path = Path(path)
    check_private(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: tokens file is not JSON ({type(e).__name__})") from None
    entries = data.get("tokens") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f'{path}: expected {{"tokens": [...]}} with at least one token')
    table: dict[str, Caller] = {}
    names: set[str] = set()
    for i, entry in enumerate(entries):
        digest, caller = _entry(i, entry, path, rate, burst)
        if digest in table or caller.name in names:
            raise ValueError(f"{path}: tokens[{i}] ({caller.name}) repeats a name or a token")
        table[digest] = caller
        names.add(caller.name)
    return table


class TokenTable:
    """The callers a service knows: by token, or one anonymous caller with every scope when the
    service runs without a tokens file."""

    def __init__(self, path: str | os.PathLike | None, rate: float, burst: int):
        self.required = path is not None
        self._table = read_tokens(path, rate, burst) if path is not None else {}
        self._anonymous = Caller(ANONYMOUS, frozenset(SCOPES), rate, burst)

    def caller(self, authorization: str | None) -> Caller | None:
        """The caller of an ``Authorization`` header value (None: no valid bearer token)."""
        if not self.required:
            return self._anonymous
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return self._table.get(_digest(token.strip()))


class RateLimiter:
    """A token bucket per caller: `burst` requests at once, refilled at `rate` per second."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (level, time)
        self._lock = threading.Lock()

    def take(self, caller: Caller) -> float:
        """0.0 when the request may go ahead (one unit taken), else the seconds to wait."""
        now = self._clock()
        with self._lock:
            level, then = self._buckets.get(caller.name, (float(caller.burst), now))
            level = min(float(caller.burst), level + (now - then) * caller.rate)
            if level >= 1.0:
                self._buckets[caller.name] = (level - 1.0, now)
                return 0.0
            self._buckets[caller.name] = (level, now)
            return (1.0 - level) / caller.rate
