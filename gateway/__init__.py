"""Maestro gateway: an OpenAI-compatible front for pools of inference engines."""

__version__ = "0.1.0"
