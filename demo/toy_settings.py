"""The demo model's training settings (see demo/toy_model.py), importable without torch.

demo/build_toy_model.py's parser takes its defaults from `DemoSettings()` before torch loads;
demo/toy_model.py, which trains the model, re-exports the class.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DemoSettings:
    """Everything that determines the trained model; the same settings give the same weights."""

    seed: int = 0
    steps: int = 2000
    batch_size: int = 32
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.1
    num_hidden_layers: int = 8
    hidden_size: int = 128
    intermediate_size: int = 384
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 4096
