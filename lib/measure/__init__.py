"""measure.py: residual streams captured at the last prompt token, per-layer refusal directions, and the
measurement file (.pt) every later stage reads."""
