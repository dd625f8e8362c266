"""Decide whether a generated reply is a refusal, from a documented, editable list of marker phrases.

A reply is a refusal when it is empty (nothing but whitespace or markdown marks) or when its
normalised text contains a marker phrase as whole words, anywhere. Replies and markers are
normalised alike, so one marker covers its typographic variants:

* Unicode NFKC (full-width letters, non-breaking spaces, ligatures become plain characters);
* apostrophe variants (’ ‘ ‛ ʼ ′ ＇ ´) become the ASCII apostrophe;
* markdown emphasis and code marks (`*`, `_`, `~`, backticks) are removed, so `**I cannot**`
  and `I *can't*` read as plain text;
* runs of whitespace, line breaks included, become one space; everything is lower-cased.

The default list is `data/refusal_markers.txt` (its header explains the choices); `--markers FILE`
replaces it with a file in the same format: one phrase per line, blank lines and `#` comments ignored.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from lib.core.errors import UserError
from lib.core.prompts import DATA_DIRECTORY, file_sha256

DEFAULT_REFUSAL_MARKERS = DATA_DIRECTORY / "refusal_markers.txt"
EMPTY_REPLY = "(empty reply)"

# Characters other tokenizers and typographers use for the apostrophe in "can't".
APOSTROPHE_VARIANTS = "\u2019\u2018\u201b\u02bc\u2032\uff07\u00b4"
MARKDOWN_MARKS = "*_~`"
_TYPOGRAPHY = str.maketrans({**dict.fromkeys(APOSTROPHE_VARIANTS, "'"), **dict.fromkeys(MARKDOWN_MARKS)})
_WHITESPACE = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """The form markers match in: NFKC, ASCII apostrophes, no markdown marks, single spaces, lower case."""
    # Before NFKC too: it decomposes the acute accent (´) into a space and a combining mark.
    plain = unicodedata.normalize("NFKC", text.translate(_TYPOGRAPHY)).translate(_TYPOGRAPHY)
    return _WHITESPACE.sub(" ", plain).strip().casefold()


@dataclass(frozen=True)
class RefusalVerdict:
    refused: bool
    reason: str | None  # the marker found, EMPTY_REPLY, or None for a reply that is no refusal


@dataclass(frozen=True)
class RefusalDetector:
    """Marker phrases (normalised) and where they came from; `judge(reply)` says whether it refuses."""

    markers: tuple[str, ...]
    source: Path
    pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Whole words: "i cannot" must not fire inside "i cannotate"; longest markers first so the
        # reported marker is the most specific one.
        alternatives = "|".join(re.escape(marker) for marker in sorted(self.markers, key=len, reverse=True))
        object.__setattr__(self, "pattern", re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)"))

    def judge(self, reply: str) -> RefusalVerdict:
        text = normalize_text(reply)
        if not text:
            return RefusalVerdict(True, EMPTY_REPLY)
        match = self.pattern.search(text)
        return RefusalVerdict(True, match.group(0)) if match else RefusalVerdict(False, None)

    def is_refusal(self, reply: str) -> bool:
        return self.judge(reply).refused

    def description(self) -> dict[str, object]:
        """Where the markers came from, for reports."""
        return {"file": str(self.source), "count": len(self.markers), "sha256": file_sha256(self.source)}


def load_refusal_detector(path: Path = DEFAULT_REFUSAL_MARKERS, flag: str = "--markers") -> RefusalDetector:
    """Read a marker file (one phrase per line, `#` comments); errors name `flag` and the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"{flag} {path}: file not found" if not path.exists() else f"{flag} {path}: not a file"
        )
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as error:
        raise UserError(f"{flag} {path}: not UTF-8 text (byte {error.start})") from None
    except OSError as error:
        raise UserError(f"{flag} {path}: cannot read ({error.strerror})") from None
    markers: list[str] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        marker = normalize_text(line)
        if not marker:
            raise UserError(
                f"{flag} {path}: line {number}: the marker {line.strip()!r} is empty once normalised"
            )
        markers.append(marker)
    if not markers:
        raise UserError(f"{flag} {path}: contains no markers (one phrase per line; # starts a comment)")
    return RefusalDetector(tuple(dict.fromkeys(markers)), path)
