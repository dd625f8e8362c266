"""search.py: plans proposed by Optuna, scored with forward passes on the model in memory, and the
outputs (the chosen plan, every trial as JSON, the refusal-vs-KL chart)."""
