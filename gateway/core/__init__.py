"""Pure scheduling decisions: no I/O, no asyncio, no clock reads (``now`` is always an argument)."""
