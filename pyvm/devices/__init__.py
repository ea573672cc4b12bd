"""Emulated PC devices, one per module; each declares its migratable state beside it."""
