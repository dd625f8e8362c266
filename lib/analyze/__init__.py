"""analyze.py: per-layer signal metrics, the table and chart, and the suggested (unverified) plan."""
