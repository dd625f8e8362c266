"""evaluate.py and chat.py: scoring replies (refusal markers), first-token KL divergence, tokenizer
comparison, the report, and the chat session's commands."""
