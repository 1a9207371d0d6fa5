"""HTTP/1.1 parsing shared by the benchmark's raw asyncio protocols (the fake upstream and the load client).

Both parse headers by hand, not with aiohttp, so that their own cost stays far below the gateway overheads
the benchmark measures."""

from __future__ import annotations


def header_value(head_lower: bytes, name: bytes) -> bytes | None:
    """Value of header ``name`` (lower-case, with trailing colon) in a lower-cased header block, or None."""
    i = head_lower.find(b"\r\n" + name)
    if i < 0:
        return None
    i += 2 + len(name)
    j = head_lower.find(b"\r\n", i)
    return head_lower[i: j if j >= 0 else len(head_lower)].strip()
