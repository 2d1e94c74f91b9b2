"""Pseudonymisation of patient identifiers (the only place a raw patient id is turned into a key).

A raw id becomes ``p-`` + the first 16 hex characters of HMAC-SHA256(secret, raw_id). Without the
secret the mapping cannot be reversed or recomputed; with it, the same patient always gets the
same key, so records of one patient can still be grouped.
"""

from __future__ import annotations

import hashlib
import hmac


def pseudonymise(raw_id: str, secret: bytes) -> str:
    """Stable, keyed pseudonym for a raw patient identifier: ``p-<16 hex chars>``."""
    if not secret:
        raise ValueError("pseudonymise needs a non-empty secret")
    if raw_id is None or str(raw_id) == "":
        raise ValueError("pseudonymise needs a non-empty patient id")
    digest = hmac.new(bytes(secret), str(raw_id).encode("utf-8"), hashlib.sha256).hexdigest()
    return "p-" + digest[:16]


def tombstone_hash(kind: str, value: str, secret: bytes) -> str:
    """Keyed hash (32 hex) under which the tombstone table of `ecgplat forget` remembers a
    forgotten record key (``kind="record"``) or patient key (``"patient"``): it answers "was
    this forgotten?" for whoever holds the store's secret, and reveals nothing without it."""
    message = f"{kind}\0{value}".encode()
    return hmac.new(bytes(secret), message, hashlib.sha256).hexdigest()[:32]
