"""An interactive chat's state and commands: the conversation so far, and what a typed line means.

The whole conversation (system message, every user turn and reply) is formatted with the model's
chat template for each new reply, so the model sees the history exactly as its template lays
it out. Commands start with a slash:

  /clear        forget the conversation (the system message stays)
  /system TEXT  set the system message for the whole conversation; `/system` alone removes it
  /exit         quit (so do Ctrl-D and /quit)
  /help         list the commands
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Action(Enum):
    SEND = "send"  # an ordinary message for the model
    CLEAR = "clear"
    SYSTEM = "system"
    EXIT = "exit"
    HELP = "help"
    NOTHING = "nothing"  # an empty line
    UNKNOWN = "unknown"  # a slash command that does not exist


COMMANDS: dict[str, Action] = {
    "/clear": Action.CLEAR,
    "/system": Action.SYSTEM,
    "/exit": Action.EXIT,
    "/quit": Action.EXIT,
    "/help": Action.HELP,
}

HELP_TEXT = (
    "commands: /clear forgets the conversation, /system TEXT sets the system message "
    "(/system alone removes it), /exit quits (or Ctrl-D), /help shows this; Ctrl-C stops a reply"
)


@dataclass(frozen=True)
class Input:
    action: Action
    text: str  # the message for SEND, the argument of /system, the command for UNKNOWN


def parse_line(line: str) -> Input:
    """What a typed line asks for: a message, a command with its argument, or nothing."""
    stripped = line.strip()
    if not stripped:
        return Input(Action.NOTHING, "")
    if not stripped.startswith("/"):
        return Input(Action.SEND, stripped)
    command, _, argument = stripped.partition(" ")
    action = COMMANDS.get(command.lower())
    if action is None:
        return Input(Action.UNKNOWN, command)
    return Input(action, argument.strip())


@dataclass
class Conversation:
    """The system message and the exchanges so far, as chat-template messages."""

    system_prompt: str | None = None
    turns: list[dict[str, str]] = field(default_factory=list)
    use_chat_template: bool = True  # False: the messages are sent as raw text (--no-chat-template)
    # Whether the user was told the conversation outgrows the model's positions: once until /clear.
    length_warned: bool = False

    def messages(self, next_message: str | None = None) -> list[dict[str, str]]:
        """Every message so far, then `next_message` as the user's new turn if given."""
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        upcoming = [{"role": "user", "content": next_message}] if next_message is not None else []
        return [*system, *self.turns, *upcoming]

    def add_exchange(self, message: str, reply: str) -> None:
        self.turns += [{"role": "user", "content": message}, {"role": "assistant", "content": reply}]

    def clear(self) -> None:
        self.turns.clear()
        self.length_warned = False

    @property
    def exchanges(self) -> int:
        return len(self.turns) // 2
