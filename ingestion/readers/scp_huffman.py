"""Huffman decoding of SCP-ECG lead data (EN 1064, section 2), with the standard's default table.

A code structure is (bits in the prefix, bits in the whole code, value, prefix). The prefix is
read most significant bit first from each lead's bytes; when the whole code is longer than the
prefix, the bits after the prefix hold the value itself (two's complement), else the structure's
value is the value. The default table (section 2's table count 19999) has 19 structures: 0 in
one bit, +-1..+-8 in 3 to 10 bits, and two 10-bit escapes followed by an 8-bit or a 16-bit value.
Tables carried in the file (other table counts) and table-mode switches are not supported: the
reader refuses them with a reason.
"""

from __future__ import annotations

import numpy as np

from ingestion.readers.scp_sections import ScpError

# (bits in prefix, bits in the entire code, value, prefix) of EN 1064's default Huffman table
DEFAULT_TABLE: tuple[tuple[int, int, int, int], ...] = (
    (1, 1, 0, 0b0),
    (3, 3, 1, 0b100),
    (3, 3, -1, 0b101),
    (4, 4, 2, 0b1100),
    (4, 4, -2, 0b1101),
    (5, 5, 3, 0b11100),
    (5, 5, -3, 0b11101),
    (6, 6, 4, 0b111100),
    (6, 6, -4, 0b111101),
    (7, 7, 5, 0b1111100),
    (7, 7, -5, 0b1111101),
    (8, 8, 6, 0b11111100),
    (8, 8, -6, 0b11111101),
    (9, 9, 7, 0b111111100),
    (9, 9, -7, 0b111111101),
    (10, 10, 8, 0b1111111100),
    (10, 10, -8, 0b1111111101),
    (10, 18, 0, 0b1111111110),  # escape: the next 8 bits are the value
    (10, 26, 0, 0b1111111111),  # escape: the next 16 bits are the value
)


def decode(data: bytes, n: int, table=DEFAULT_TABLE) -> np.ndarray:
    """The first ``n`` values (int64) Huffman-coded in ``data`` with ``table``; ``ScpError`` when
    the bits end first or hold no code of the table. Bits after the ``n``-th value (padding of
    the last byte) are ignored."""
    lookup = {(p, code): (total - p, value) for p, total, value, code in table}
    longest = max(p for p, *_ in table)
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8)).tolist()
    end = len(bits)
    out = np.empty(n, dtype=np.int64)
    pos = 0
    for i in range(n):
        code, hit = 0, None
        for length in range(1, longest + 1):
            if pos >= end:
                raise ScpError(f"lead data end after {i} of {n} samples (truncated or corrupt)")
            code = (code << 1) | bits[pos]
            pos += 1
            hit = lookup.get((length, code))
            if hit is not None:
                break
        if hit is None:
            raise ScpError("lead data hold a code outside the Huffman table (corrupt)")
        extra, value = hit
        if extra:
            if pos + extra > end:
                raise ScpError(f"lead data end after {i} of {n} samples (truncated or corrupt)")
            value = 0
            for bit in bits[pos : pos + extra]:
                value = (value << 1) | bit
            if value >= 1 << (extra - 1):
                value -= 1 << extra
            pos += extra
        out[i] = value
    return out
