"""HTTP shell only: parse, validate, call the core, relay bytes, shape errors."""
