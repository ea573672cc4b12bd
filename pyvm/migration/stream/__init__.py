"""The migration stream format: bytes <-> objects, no I/O."""
