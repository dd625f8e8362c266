"""Chat with a model in the terminal, replies streamed as they are generated; or answer one --prompt.

The conversation's history goes through the model's chat template for every reply (with
--no-chat-template it is sent as raw text, for models without a template). Commands:
/clear, /system TEXT, /exit (see lib/evaluate/chat_session.py). Decoding is greedy unless --temperature
is above 0. See docs/evaluate.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from lib.core.arguments import non_negative_float, positive_integer, probability
from lib.core.cli_options import add_model_loading_arguments, add_no_chat_template_argument
from lib.core.errors import UserError, run_cli, warn
from lib.evaluate.chat_session import HELP_TEXT, Action, Conversation, parse_line

# Only light modules at the top: --help and usage errors answer before torch and transformers load.
# The functions import the rest where they need it.
if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from lib.core.generation import DecodingSettings

PROMPT = "> "
DEFAULT_MAX_NEW_TOKENS = 512


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Chat with a model (e.g. the output of sharded_ablate.py); replies stream as they are "
        "generated. Commands in the chat: /clear forgets the conversation, /system TEXT sets the system "
        "message, /exit quits.",
    )
    parser.add_argument(
        "--model",
        "-m",
        required=True,
        metavar="DIR",
        help="local model directory or a hub id in the local cache",
    )
    parser.add_argument(
        "--prompt",
        default=None,
        metavar="TEXT",
        help="answer this one message, print the reply and exit (for scripts and tests)",
    )
    parser.add_argument(
        "--system", default=None, metavar="TEXT", help="system message at the start of the conversation"
    )
    parser.add_argument(
        "--max-new-tokens",
        type=positive_integer,
        default=None,
        metavar="N",
        help=f"longest reply in tokens (default: {DEFAULT_MAX_NEW_TOKENS}, or half the model's positions "
        "where that is less)",
    )
    parser.add_argument(
        "--temperature",
        type=non_negative_float,
        default=0.0,
        metavar="T",
        help="0 (default) decodes greedily (always the most likely token); above 0 samples with this "
        "temperature",
    )
    parser.add_argument(
        "--top-p",
        type=probability,
        default=1.0,
        metavar="P",
        help="when sampling, draw only from the most likely tokens whose probabilities add up to P "
        "(default: 1.0, all tokens)",
    )
    add_no_chat_template_argument(parser)
    add_model_loading_arguments(parser, quantization_flags=("--quant",))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    if arguments.prompt is not None and not arguments.prompt.strip():
        raise UserError("--prompt: the message is empty")
    if arguments.top_p < 1 and arguments.temperature == 0:
        warn("--top-p only applies when sampling; add --temperature above 0")
    from lib.core.chat_format import require_chat_template
    from lib.core.generation import DecodingSettings
    from lib.core.loading import ModelLoadOptions, load_model, load_tokenizer
    from lib.core.model_files import resolve_model_directory

    # The tokenizer and template are checked before the (slow) weights load.
    model_directory = resolve_model_directory(arguments.model, "--model")
    label = f"--model {arguments.model}"
    tokenizer = load_tokenizer(model_directory, label)
    use_chat_template = not arguments.no_chat_template
    if use_chat_template:
        require_chat_template(tokenizer, label)
    conversation = Conversation(system_prompt=arguments.system, use_chat_template=use_chat_template)
    conversation_token_ids(tokenizer, conversation, "hello")  # a template may reject --system
    model = load_model(model_directory, ModelLoadOptions.from_arguments(arguments), label)
    max_new_tokens = arguments.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = default_max_new_tokens(model_positions(model))
    settings = DecodingSettings(max_new_tokens, arguments.temperature, arguments.top_p)

    if arguments.prompt is not None:
        reply(model, tokenizer, conversation, arguments.prompt, settings, interactive=False)
        return 0
    import readline  # noqa: F401  (imported for its effect: line editing and history in input())

    print(f"chatting with {arguments.model}; {HELP_TEXT}", file=sys.stderr)
    chat_loop(model, tokenizer, conversation, settings)
    return 0


def chat_loop(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversation: Conversation,
    settings: DecodingSettings,
) -> None:
    """Read lines until /exit or end of input; answer messages and carry out commands."""
    while True:
        try:
            line = input(PROMPT)
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print("\n(/exit or Ctrl-D quits)")
            continue
        typed = parse_line(line)
        if typed.action is Action.EXIT:
            return
        if typed.action is Action.SEND:
            try:
                reply(model, tokenizer, conversation, typed.text, settings, interactive=True)
            except KeyboardInterrupt:
                print("\n(reply stopped; it is not kept in the conversation)")
        elif typed.action is Action.CLEAR:
            conversation.clear()
            print("(conversation cleared)")
        elif typed.action is Action.SYSTEM:
            set_system_prompt(tokenizer, conversation, typed.text or None)
        elif typed.action is Action.HELP:
            print(HELP_TEXT)
        elif typed.action is Action.UNKNOWN:
            print(f"unknown command {typed.text}; {HELP_TEXT}")


def model_positions(model: PreTrainedModel) -> int | None:
    """The longest sequence (prompt and reply) the model was built for, where its config says."""
    from lib.core.loading import text_config

    return getattr(text_config(model.config), "max_position_embeddings", None)


def default_max_new_tokens(positions: int | None) -> int:
    """The default reply length, at most half the model's positions so that a conversation fits too
    (the demo model has 512 positions)."""
    if positions is None:
        return DEFAULT_MAX_NEW_TOKENS
    return max(1, min(DEFAULT_MAX_NEW_TOKENS, positions // 2))


def reply(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversation: Conversation,
    message: str,
    settings: DecodingSettings,
    interactive: bool,
) -> None:
    """Stream the model's reply to `message` and add the exchange to the conversation."""
    from lib.core.generation import stream_reply

    token_ids = conversation_token_ids(tokenizer, conversation, message)
    positions = model_positions(model)
    warn_once_past_positions(conversation, len(token_ids), settings.max_new_tokens, positions, interactive)
    conversation.add_exchange(message, stream_reply(model, tokenizer, token_ids, settings))


def warn_once_past_positions(
    conversation: Conversation,
    prompt_tokens: int,
    max_new_tokens: int,
    positions: int | None,
    interactive: bool,
) -> None:
    """Warn when a full-length reply would run past the model's positions, once until /clear: the
    conversation only grows, so every later message would warn again."""
    if positions is None or prompt_tokens + max_new_tokens <= positions or conversation.length_warned:
        return
    conversation.length_warned = True
    subject = "the conversation" if interactive else "the prompt"
    advice = "; /clear starts over (not repeated until then)" if interactive else ""
    warn(
        f"{subject} is {prompt_tokens} tokens long: with --max-new-tokens {max_new_tokens} a reply can run "
        f"past the model's {positions} positions{advice}"
    )


def set_system_prompt(
    tokenizer: PreTrainedTokenizerBase, conversation: Conversation, system_prompt: str | None
) -> None:
    previous = conversation.system_prompt
    conversation.system_prompt = system_prompt
    try:
        conversation_token_ids(tokenizer, conversation, "hello", system_flag="/system")
    except UserError as error:
        conversation.system_prompt = previous
        print(f"(system message not changed: {error})")
        return
    print("(system message removed)" if system_prompt is None else "(system message set)")


def conversation_token_ids(
    tokenizer: PreTrainedTokenizerBase,
    conversation: Conversation,
    message: str,
    system_flag: str = "--system",
) -> list[int]:
    """The conversation so far and `message` as the user's next turn, formatted as the conversation asks."""
    from lib.core.chat_format import tokenize_conversation

    return tokenize_conversation(
        tokenizer, conversation.messages(message), system_flag, conversation.use_chat_template
    )


if __name__ == "__main__":
    run_cli(main)
