"""Checkpoint conversion (installed as ``regla.convert``)."""
