"""Command-line options shared by the entry scripts, defined without torch or transformers.

Building a parser imports only this module, `lib.core.arguments` and other light modules, so that
`--help` and usage errors answer at once; the modules that act on the options (`lib.core.loading`,
`lib.core.chat_format`) import their names from here, so each choice is defined once. Keep this module
free of heavy imports: tests/test_start_up.py checks that building every entry script's parser
loads neither torch nor transformers.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from lib.core.arguments import positive_integer

# `--dtype` names; lib/core/loading.py maps them to torch dtypes ("auto": the checkpoint's own dtype).
DTYPE_NAMES = ("auto", "bfloat16", "float16", "float32")
DEVICE_MAPS = ("auto", "balanced", "sequential", "cpu", "cuda")
QUANTIZATIONS = ("4bit", "8bit")  # bitsandbytes
NO_CHAT_TEMPLATE_FLAG = "--no-chat-template"


def add_model_loading_arguments(
    parser: argparse.ArgumentParser, quantization_flags: Sequence[str] = ("--quant",)
) -> None:
    """Add `--dtype`, `--device-map`, `--flash-attn` and the quantisation flag (named by the caller).

    The parsed values land in `dtype`, `device_map`, `flash_attn` and `quantization`; the first of
    `quantization_flags` is the name messages use (`quantization_flag`). Pass the namespace to
    `lib.core.loading.ModelLoadOptions.from_arguments`.
    """
    group = parser.add_argument_group("model loading")
    group.add_argument(
        "--dtype",
        choices=list(DTYPE_NAMES),
        default="auto",
        help="dtype of the weights and activations (default: auto, the checkpoint's own dtype)",
    )
    group.add_argument(
        "--device-map",
        choices=DEVICE_MAPS,
        default="auto",
        help="where the layers go: auto/balanced/sequential spread them over all GPUs and then CPU RAM "
        "(accelerate), cpu or cuda put everything on one device (default: auto; CPU when no GPU)",
    )
    group.add_argument(
        *quantization_flags,
        dest="quantization",
        choices=QUANTIZATIONS,
        default=None,
        help="load the weights quantised with bitsandbytes (4bit NF4 or 8bit) to fit a big model "
        "in less memory; works on CPU and CUDA; ignored for checkpoints that are already quantised",
    )
    group.add_argument(
        "--flash-attn",
        action="store_true",
        help="use FlashAttention 2 (needs CUDA and the flash-attn package); falls back to the default "
        "attention with a warning where it is unavailable",
    )
    parser.set_defaults(quantization_flag=quantization_flags[0])


def add_no_chat_template_argument(parser: argparse.ArgumentParser) -> None:
    """`--no-chat-template` (dest `no_chat_template`), the same in measure.py, evaluate.py and chat.py."""
    parser.add_argument(
        NO_CHAT_TEMPLATE_FLAG,
        action="store_true",
        help="tokenise the raw text instead of formatting it with the model's chat template (system message "
        "and turns joined by blank lines); needed for a model without a chat template",
    )


def add_prompt_set_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that shape how prompt files become model inputs, shared by measure and evaluate."""
    parser.add_argument(
        "--max-prompts",
        type=positive_integer,
        default=None,
        metavar="N",
        help="use only the first N prompts of each file (default: all)",
    )
    parser.add_argument(
        "--system-prompt", default=None, metavar="TEXT", help="system message placed before every prompt"
    )
    add_no_chat_template_argument(parser)
