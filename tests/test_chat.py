"""chat.py: one-shot --prompt replies, the conversation's history and commands, a pty-driven session."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chat import main
from lib.core.chat_format import tokenize_conversation
from lib.core.errors import UserError
from lib.evaluate.chat_session import Action, Conversation, parse_line
from tests.cli_helpers import error_line
from tests.fixtures import ALL_FAMILIES, build_tokenizer, copy_without_chat_template
from tests.generation_helpers import reference_greedy_continuation, reference_greedy_reply

REPOSITORY = Path(__file__).resolve().parent.parent
ANSI_ESCAPE = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.mark.parametrize("model_type", ALL_FAMILIES)
def test_prompt_prints_the_greedy_reply_and_exits(tiny_model, capsys, model_type: str) -> None:
    model = tiny_model(model_type)
    assert main(["--model", str(model), "--prompt", "How do rainbows form?", "--max-new-tokens", "6"]) == 0
    expected = reference_greedy_reply(model, [{"role": "user", "content": "How do rainbows form?"}], 6)
    printed = capsys.readouterr().out
    assert (
        printed.endswith("\n") and printed.strip() == expected
    )  # some fixtures' greedy replies are blank lines


def test_greedy_by_default_even_when_the_model_asks_for_sampling(tiny_model, tmp_path: Path, capsys) -> None:
    model = shutil.copytree(tiny_model("llama"), tmp_path / "sampling-model")
    settings = json.loads((model / "generation_config.json").read_text())
    settings.update(do_sample=True, temperature=1.5, top_k=50)
    (model / "generation_config.json").write_text(json.dumps(settings))
    arguments = ["--model", str(model), "--prompt", "hi", "--max-new-tokens", "6"]
    replies = []
    for _ in range(2):
        assert main(arguments) == 0
        replies.append(capsys.readouterr().out.strip())
    assert replies[0] == replies[1] == reference_greedy_reply(model, [{"role": "user", "content": "hi"}], 6)


def test_sampling_with_temperature_and_top_p(tiny_model, capsys) -> None:
    arguments = ["--model", str(tiny_model("llama")), "--prompt", "hi", "--max-new-tokens", "6"]
    assert main([*arguments, "--temperature", "0.8", "--top-p", "0.9"]) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_quantised_loading_and_flash_attention_fallback(tiny_model, capsys) -> None:
    arguments = ["--model", str(tiny_model("llama")), "--prompt", "hi", "--max-new-tokens", "4"]
    assert main([*arguments, "--quant", "8bit", "--flash-attn", "--device-map", "cpu"]) == 0
    captured = capsys.readouterr()
    assert captured.out.endswith("\n")
    assert (
        "warning: --flash-attn: FlashAttention needs a CUDA device; using the default attention"
        in captured.err
    )


def test_system_message_reaches_the_template(tiny_model, capsys) -> None:
    model = tiny_model("llama")
    assert (
        main(["--model", str(model), "--prompt", "hi", "--system", "Be terse.", "--max-new-tokens", "6"]) == 0
    )
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}]
    assert capsys.readouterr().out.strip() == reference_greedy_reply(model, messages, 6)


def test_a_model_without_chat_template_continues_the_raw_text(tiny_model, tmp_path: Path, capsys) -> None:
    model = copy_without_chat_template(tiny_model("llama"), tmp_path / "base-model")
    arguments = [
        "--model",
        str(model),
        "--prompt",
        "Once upon a time",
        "--system",
        "A story.",
        "--max-new-tokens",
        "6",
    ]
    line = error_line(capsys, main, arguments)
    assert line.startswith(f"error: --model {model}: the tokenizer has no chat template")
    assert "--no-chat-template" in line
    assert main([*arguments, "--no-chat-template"]) == 0
    expected = reference_greedy_continuation(model, "A story.\n\nOnce upon a time", 6)
    assert capsys.readouterr().out.strip() == expected


def test_raw_conversation_joins_the_turns_with_blank_lines() -> None:
    tokenizer = build_tokenizer()
    conversation = Conversation(system_prompt="Be kind.", use_chat_template=False)
    conversation.add_exchange("first question", "first answer")
    ids = tokenize_conversation(tokenizer, conversation.messages("second"), use_chat_template=False)
    assert tokenizer.decode(ids) == "<bos>Be kind.\n\nfirst question\n\nfirst answer\n\nsecond"


# 64 positions: the demo model has 512, as many as the longest default reply, so every message warned.
FEW_POSITIONS = 64
LONG_MESSAGE = "Please describe, in careful detail, how the tides of the sea follow the moon."


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning: ")]


def test_default_reply_length_fits_a_model_with_few_positions(tiny_model, capsys) -> None:
    """The default reply is capped at half the model's positions, silently: a short prompt gets no warning."""
    model = tiny_model("llama", max_position_embeddings=FEW_POSITIONS)
    assert main(["--model", str(model), "--prompt", "hi"]) == 0
    captured = capsys.readouterr()
    messages = [{"role": "user", "content": "hi"}]
    assert captured.out.strip() == reference_greedy_reply(model, messages, FEW_POSITIONS // 2)
    assert _warnings(captured.err) == []


def test_one_shot_prompt_past_the_positions_warns_without_chat_commands(tiny_model, capsys) -> None:
    model = tiny_model("llama", max_position_embeddings=FEW_POSITIONS)
    assert main(["--model", str(model), "--prompt", "hi", "--max-new-tokens", str(FEW_POSITIONS)]) == 0
    prompt_tokens = len(tokenize_conversation(build_tokenizer(), Conversation().messages("hi")))
    assert _warnings(capsys.readouterr().err) == [
        f"warning: the prompt is {prompt_tokens} tokens long: with --max-new-tokens {FEW_POSITIONS} a reply "
        f"can run past the model's {FEW_POSITIONS} positions"
    ]


def test_chat_warns_once_per_conversation_that_outgrows_the_positions(
    tiny_model, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A short first message fits; the long one after it crosses the positions and warns; the next
    message, though longer still, does not warn again; after /clear the long message warns anew."""
    model = tiny_model("llama", max_position_embeddings=FEW_POSITIONS)
    typed = ["hi", LONG_MESSAGE, LONG_MESSAGE, "/clear", LONG_MESSAGE, "/exit"]
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(f"{line}\n" for line in typed)))
    assert main(["--model", str(model)]) == 0
    warnings = _warnings(capsys.readouterr().err)
    lengths = [int(line.split(" is ")[1].split(" tokens")[0]) for line in warnings]
    alone = len(tokenize_conversation(build_tokenizer(), Conversation().messages(LONG_MESSAGE)))
    assert len(warnings) == 2 and lengths[0] > alone == lengths[1]  # the first after "hi" and its reply
    assert all(line.endswith("positions; /clear starts over (not repeated until then)") for line in warnings)


def test_conversation_history_and_commands() -> None:
    tokenizer = build_tokenizer()
    conversation = Conversation(system_prompt="Be kind.")
    conversation.add_exchange("first question", "first answer")
    rendered = tokenizer.decode(tokenize_conversation(tokenizer, conversation.messages("second question")))
    assert rendered.count("<bos>") == 1
    assert rendered.index("Be kind.") < rendered.index("first question") < rendered.index("first answer")
    assert rendered.endswith("second question<|end|>\n<|start|>assistant\n")
    conversation.clear()
    assert conversation.messages("again") == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "again"},
    ]
    assert parse_line("  /system  Talk like a pirate ") == parse_line("/system Talk like a pirate")
    assert parse_line("/system Talk like a pirate").text == "Talk like a pirate"
    assert [parse_line(line).action for line in ("/clear", "/EXIT", "/quit", "/nope", "", "hi /exit")] == [
        Action.CLEAR,
        Action.EXIT,
        Action.EXIT,
        Action.UNKNOWN,
        Action.NOTHING,
        Action.SEND,
    ]


def test_template_that_rejects_system_messages_is_reported() -> None:
    tokenizer = build_tokenizer()
    tokenizer.chat_template = (
        "{% for message in messages %}{% if message['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}{{ message['content'] }}{% endfor %}"
    )
    with pytest.raises(UserError, match=r"^--system: the model's chat template rejected"):
        tokenize_conversation(tokenizer, Conversation("Be kind.").messages("hi"))


class PseudoTerminalSession:
    """chat.py running on a pseudo-terminal, as a user would see it (echo, prompts, streamed replies)."""

    def __init__(self, arguments: list[str]) -> None:
        self.terminal, child_side = pty.openpty()
        environment = {**os.environ, "TERM": "dumb", "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(
            [sys.executable, str(REPOSITORY / "chat.py"), *arguments],
            stdin=child_side,
            stdout=child_side,
            stderr=child_side,
            cwd=REPOSITORY,
            env=environment,
            start_new_session=True,
        )
        os.close(child_side)
        self.pending = b""

    def read_until(self, ending: bytes, timeout: float = 120) -> bytes:
        """Everything printed until the output ends with `ending` (escape sequences removed)."""
        deadline = time.monotonic() + timeout
        while not ANSI_ESCAPE.sub(b"", self.pending).endswith(ending):
            ready, _, _ = select.select([self.terminal], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"no {ending!r} within {timeout} s; output so far: {self.pending!r}")
            self.pending += os.read(self.terminal, 4096)
        output, self.pending = ANSI_ESCAPE.sub(b"", self.pending), b""
        return output

    def send(self, line: str) -> bytes:
        """Type a line and return what appears until the next prompt."""
        os.write(self.terminal, line.encode() + b"\n")
        return self.read_until(b"\n> ")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.terminal)


@pytest.mark.slow  # chat.py as its own process; the conversation's logic is tested in-process above
def test_interactive_session_on_a_pseudo_terminal(tiny_model) -> None:
    session = PseudoTerminalSession(["--model", str(tiny_model("llama")), "--max-new-tokens", "5"])
    try:
        assert b"/clear" in session.read_until(b"> ")  # the banner lists the commands
        first = session.send("hello")
        assert first.startswith(b"hello\r\n") and len(first) > len(b"hello\r\n\r\n> ")
        session.send("hello")  # answered with the first exchange in its context
        assert b"(conversation cleared)" in session.send("/clear")
        # Greedy decoding: with the history gone, the same message gets the very first reply again.
        assert session.send("hello") == first
        assert b"unknown command /nope" in session.send("/nope")
        os.write(session.terminal, b"/exit\n")
        assert session.process.wait(timeout=60) == 0
    finally:
        session.close()


def test_missing_model_is_a_one_line_error(capsys, tmp_path: Path) -> None:
    line = error_line(capsys, main, ["--model", str(tmp_path / "nowhere"), "--prompt", "hi"])
    assert line.startswith(f"error: --model {tmp_path / 'nowhere'}: ") and "not found" in line


def test_empty_prompt_is_a_one_line_error(capsys, tiny_model) -> None:
    line = error_line(capsys, main, ["--model", str(tiny_model("llama")), "--prompt", "   "])
    assert line == "error: --prompt: the message is empty"


@pytest.mark.parametrize(
    "flag, value", [("--temperature", "-1"), ("--top-p", "0"), ("--max-new-tokens", "0")]
)
def test_out_of_range_numbers_are_usage_errors(capsys, tiny_model, flag: str, value: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tiny_model("llama")), "--prompt", "hi", flag, value])
    assert exit_info.value.code == 2 and flag in capsys.readouterr().err
