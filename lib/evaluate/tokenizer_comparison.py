"""Whether two tokenizers turn text into the same ids and ids into the same text.

Equal vocabularies are not enough: a tokenizer.json without its decoder, with another normalizer,
pre-tokenizer or merges, or with other special-token flags shares the vocabulary but encodes or
decodes differently, and replies decoded differently are judged differently by the refusal markers
(a copy without the decoder turned every " " into "Ġ" and hid every refusal). So both tokenizers
encode a fixed sample (several scripts, code, odd whitespace, emoji, the special tokens written out),
decode it back, decode single ids spread over the whole vocabulary, and their special tokens are
compared. For each kind of difference the first one found is named.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase as Tokenizer

SAMPLE_TEXTS = (
    "Hello, world! How do I bake bread at home? I'm sorry, but I can't help with that.",
    "  two leading spaces,\ttab, trailing space \nnew line\r\nWindows line\n\n\nblank lines",
    "Größe, café, naïve, Ærøskøbing; ¿Qué tal? Привет, мир! Γειά σου κόσμε. שלום עולם. مرحبا بالعالم",
    "日本語のテキスト、中文文本，한국어 텍스트. हिन्दी पाठ. 🙂👍🏽🚀 ∑∫√∞ ≠ ≤ ≥ … “quotes” ‘single’",
    "def add(a: int, b: int) -> int:\n    return a + b  # sum\n\nprint(add(2, 40) == 42)",
    '{"key": [1, 2.5e-3, null, true]}; if (x != y) { return 0x1F; } <div class="x">&amp;</div>',
    "1234567890 3.14159 -0.5 100% $9.99 2024-01-31 12:30:45 https://example.com/path?q=1&b=2",
)
DECODED_SINGLE_IDS = 4096  # at most this many ids, spread evenly over the vocabulary, decoded one by one
_SHOWN_CHARACTERS = 40
_CONTEXT_CHARACTERS = 8  # shown before the first character where two decoded texts differ


def tokenizer_differences(
    original: Tokenizer, edited: Tokenizer, compare_chat_template: bool = True
) -> list[str]:
    """What differs between the two tokenizers, one short phrase per kind; empty when they agree."""
    differences = [
        _vocabulary_difference(original, edited),
        _special_tokens_difference(original, edited),
        _encoding_difference(original, edited),
        _decoding_difference(original, edited),
        _chat_template_difference(original, edited) if compare_chat_template else None,
    ]
    return [difference for difference in differences if difference]


def _vocabulary_difference(original: Tokenizer, edited: Tokenizer) -> str | None:
    original_vocabulary, edited_vocabulary = original.get_vocab(), edited.get_vocab()
    if original_vocabulary == edited_vocabulary:
        return None
    differing = len(set(original_vocabulary.items()) ^ set(edited_vocabulary.items()))
    sizes = f"{len(original_vocabulary)} vs {len(edited_vocabulary)} tokens"
    return f"vocabulary ({sizes}, {differing} entries differ)"


def _special_tokens_difference(original: Tokenizer, edited: Tokenizer) -> str | None:
    """The named special tokens (bos, eos, pad, ...) and every added token's text and special flag."""
    original_named, edited_named = original.special_tokens_map, edited.special_tokens_map
    for name in sorted(original_named.keys() | edited_named.keys()):
        if original_named.get(name) != edited_named.get(name):
            return f"special tokens ({name} {original_named.get(name)!r} vs {edited_named.get(name)!r})"
    original_added, edited_added = _added_tokens(original), _added_tokens(edited)
    for token_id in sorted(original_added.keys() | edited_added.keys()):
        if original_added.get(token_id) != edited_added.get(token_id):
            return (
                f"special tokens (added token {token_id}: {_describe_added(original_added.get(token_id))} "
                f"vs {_describe_added(edited_added.get(token_id))})"
            )
    return None


def _added_tokens(tokenizer: Tokenizer) -> dict[int, tuple[str, bool]]:
    added_tokens = tokenizer.added_tokens_decoder
    return {token_id: (added.content, added.special) for token_id, added in added_tokens.items()}


def _describe_added(token: tuple[str, bool] | None) -> str:
    if token is None:
        return "none"
    content, special = token
    return f"{content!r} ({'special' if special else 'not special'})"


def _encoding_difference(original: Tokenizer, edited: Tokenizer) -> str | None:
    for text in _sample_texts(original):
        original_ids, edited_ids = _encode(original, text), _encode(edited, text)
        if original_ids != edited_ids:
            position = _first_mismatch(original_ids, edited_ids)
            return f"encoding ({_shown(text)} becomes other ids from token {position} on)"
    return None


def _decoding_difference(original: Tokenizer, edited: Tokenizer) -> str | None:
    """Each sample's ids decoded back, then single ids, with and without the special tokens."""
    vocabulary_size = min(len(original), len(edited))
    step = max(1, vocabulary_size // DECODED_SINGLE_IDS)
    id_lists = [_encode(original, text) for text in _sample_texts(original)]
    id_lists += [[token_id] for token_id in range(0, vocabulary_size, step)]
    for skip_special_tokens in (True, False):
        original_texts = original.batch_decode(id_lists, skip_special_tokens=skip_special_tokens)
        edited_texts = edited.batch_decode(id_lists, skip_special_tokens=skip_special_tokens)
        for ids, original_text, edited_text in zip(id_lists, original_texts, edited_texts):
            if original_text != edited_text:
                return f"decoding ({_decoded_difference(ids, original_text, edited_text)})"
    return None


def _decoded_difference(ids: Sequence[int], original_text: str, edited_text: str) -> str:
    """`ids [1, 44, ...] give 'a b' vs 'aĠb'`, shown from a little before the first differing character."""
    shown_ids = ", ".join(map(str, ids[:4])) + (", ..." if len(ids) > 4 else "")
    start = max(0, _first_mismatch(original_text, edited_text) - _CONTEXT_CHARACTERS)
    where = f" from character {start} on" if start else ""
    return f"ids [{shown_ids}] give {_shown(original_text[start:])} vs {_shown(edited_text[start:])}{where}"


def _chat_template_difference(original: Tokenizer, edited: Tokenizer) -> str | None:
    if getattr(original, "chat_template", None) != getattr(edited, "chat_template", None):
        return "chat template"
    return None


def _sample_texts(tokenizer: Tokenizer) -> list[str]:
    """The fixed sample, and the tokenizer's special tokens written out as text inside a sentence."""
    return [*SAMPLE_TEXTS, "Special tokens as text: " + " and ".join(tokenizer.all_special_tokens) + "."]


def _encode(tokenizer: Tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def _first_mismatch(first: Sequence, second: Sequence) -> int:
    """The first position where the two differ (the shorter one's length where one extends the other)."""
    differing = (position for position, (one, other) in enumerate(zip(first, second)) if one != other)
    return next(differing, min(len(first), len(second)))


def _shown(text: str) -> str:
    """A string for a one-line message: quoted with escapes, cut short."""
    shown = repr(text)
    return shown if len(shown) <= _SHOWN_CHARACTERS else shown[: _SHOWN_CHARACTERS - 1] + "…"
