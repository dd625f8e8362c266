"""Shared code of the abliteration toolkit (see docs/SPEC.md)."""

__version__ = "0.1.0"
