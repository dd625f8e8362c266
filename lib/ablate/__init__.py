"""sharded_ablate.py: the architecture table, the plan and its resolution into explicit tensor edits, the
projection math, the streaming safetensors I/O and the output's files; and the same edits applied to a
loaded model in memory (previews and search trials)."""
