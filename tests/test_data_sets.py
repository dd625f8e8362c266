"""The prompt sets in data/: large enough, clean, and with held-out eval sets that share nothing with
the measurement and demo training sets, so that a refusal rate measured on the eval sets is not a
memorisation score."""

from __future__ import annotations

import difflib
import itertools
import re
from collections import Counter
from functools import cache

import pytest

from lib.core.prompts import DATA_DIRECTORY

# Every file the demo model trains on: the measurement sets and the larger demo training sets.
TRAINING_FILES = ("harmful.txt", "harmless.txt", "demo_train_harmful.txt", "demo_train_harmless.txt")
EVALUATION_FILES = ("eval_harmful.txt", "eval_harmless.txt")
MINIMUM_PROMPTS = {
    "harmful.txt": 256,
    "harmless.txt": 256,
    "demo_train_harmful.txt": 4000,
    "demo_train_harmless.txt": 4000,
    "eval_harmful.txt": 100,
    "eval_harmless.txt": 100,
}
MINIMUM_WORDS, MAXIMUM_WORDS = 5, 40

# Word-level similarity above which an eval prompt counts as a reworded copy of a measurement prompt:
# changing one word of an 8-word prompt scores 0.875, while distinct requests that merely share a
# question template ("What is the difference between ...") stay at or below 0.8.
NEAR_COPY_RATIO = 0.85


@cache
def read_prompts(file_name: str) -> tuple[str, ...]:
    # Strict UTF-8 decoding: a stray byte would otherwise reach the tokenizer as a replacement character.
    return tuple((DATA_DIRECTORY / file_name).read_bytes().decode("utf-8").splitlines())


def normalise(prompt: str) -> str:
    """Lowercase, drop punctuation and collapse whitespace, so trivial variants compare equal."""
    without_punctuation = re.sub(r"[^\w\s]", "", prompt.lower())
    return " ".join(without_punctuation.split())


def normalised_set(file_name: str) -> set[str]:
    return {normalise(prompt) for prompt in read_prompts(file_name)}


@pytest.mark.parametrize("file_name", list(MINIMUM_PROMPTS))
def test_file_holds_enough_prompts(file_name: str) -> None:
    assert len(read_prompts(file_name)) >= MINIMUM_PROMPTS[file_name]


@pytest.mark.parametrize("file_name", list(MINIMUM_PROMPTS))
def test_every_line_is_one_trimmed_prompt_of_reasonable_length(file_name: str) -> None:
    for line_number, prompt in enumerate(read_prompts(file_name), start=1):
        location = f"{file_name}:{line_number}"
        assert prompt.strip(), f"{location} is empty"
        assert prompt == prompt.strip(), f"{location} has leading or trailing whitespace"
        word_count = len(prompt.split())
        assert MINIMUM_WORDS <= word_count <= MAXIMUM_WORDS, f"{location} has {word_count} words"


@pytest.mark.parametrize("file_name", list(MINIMUM_PROMPTS))
def test_no_duplicates_within_a_file(file_name: str) -> None:
    counts = Counter(normalise(prompt) for prompt in read_prompts(file_name))
    duplicates = sorted(prompt for prompt, count in counts.items() if count > 1)
    assert not duplicates, f"{file_name} repeats: {duplicates}"


# Every pair of files must be disjoint: training vs eval keeps the eval held out, harmful vs harmless
# keeps the labels unambiguous, and the remaining pairs are one or the other.
@pytest.mark.parametrize("first_file, second_file", list(itertools.combinations(MINIMUM_PROMPTS, 2)))
def test_files_share_no_prompt(first_file: str, second_file: str) -> None:
    shared = sorted(normalised_set(first_file) & normalised_set(second_file))
    assert not shared, f"{first_file} and {second_file} share: {shared}"


def could_be_near_copies(first_length: int, second_length: int) -> bool:
    """Whether two prompts of these word counts can reach NEAR_COPY_RATIO at all: the ratio is at most
    2 * min / (sum), so most pairs are ruled out by length alone, before any comparison."""
    return 2 * min(first_length, second_length) > NEAR_COPY_RATIO * (first_length + second_length)


def word_similarity(first_words: list[str], second_words: list[str]) -> float:
    if not could_be_near_copies(len(first_words), len(second_words)):
        return 0.0
    matcher = difflib.SequenceMatcher(None, first_words, second_words, autojunk=False)
    # quick_ratio is a cheap upper bound of ratio; it skips the full comparison for most pairs.
    return matcher.ratio() if matcher.quick_ratio() > NEAR_COPY_RATIO else 0.0


@pytest.mark.slow  # every eval prompt against some 11,000 training prompts: seconds
@pytest.mark.parametrize("evaluation_file", EVALUATION_FILES)
def test_no_eval_prompt_is_a_reworded_training_prompt(evaluation_file: str) -> None:
    training_words = [normalise(prompt).split() for name in TRAINING_FILES for prompt in read_prompts(name)]
    near_copies = [
        (evaluation_prompt, " ".join(words))
        for evaluation_prompt in read_prompts(evaluation_file)
        for evaluation_words in [normalise(evaluation_prompt).split()]
        for words in training_words
        if word_similarity(evaluation_words, words) > NEAR_COPY_RATIO
    ]
    assert not near_copies, f"{evaluation_file} has near-copies of training prompts: {near_copies}"
