"""Asyncio control loops that keep engine state current (monitor; later co-location, DiT resizing, aging)."""
