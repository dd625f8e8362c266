"""What every stage shares: errors and exit codes, atomic files, command-line options, prompt files,
chat formatting, model loading and model files, batching, and batched greedy generation."""
