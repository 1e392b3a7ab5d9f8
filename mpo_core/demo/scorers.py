"""The demo's three attributes, each a plain-Python score of a reply's text.

Each scorer is the reward ``r`` its aligned policy was fine-tuned towards (``train.py``)
and the measure ``bench/demo_eval.py`` reports. They count phrases, case-insensitively,
on word boundaries; they know nothing of the prompt. They pull against each other:
polite and upbeat phrases cost words, and apologies are polite but gloomy.
"""

from __future__ import annotations

import re
from collections.abc import Callable

POLITE_MARKERS = (
    "please",
    "thank you",
    "thanks",
    "happy to help",
    "sorry",
    "of course",
    "hope this helps",
    "let me know",
)
RUDE_MARKERS = (
    "obviously",
    "fine.",
    "just",
    "figure out the rest yourself",
    "whatever",
    "you should",
)
UPBEAT_MARKERS = (
    "great",
    "love",
    "fun",
    "wonderful",
    "you've got this",
    "good luck",
    "hope this helps",
    "enjoy",
    "!",
)
GLOOMY_MARKERS = (
    "sorry",
    "tricky",
    "boring",
    "chore",
    "unfortunately",
    "long time",
    "not hard",
)
CONCISE_FULL, CONCISE_ZERO = 6, 30  # word counts that score 1 and 0 on concise


def _count(text: str, phrases: tuple[str, ...]) -> int:
    lowered = text.lower()
    total = 0
    for phrase in phrases:
        # word boundary on the sides that are word characters ("!" and "fine." end in
        # punctuation, so they match without one)
        left = r"\b" if phrase[0].isalnum() else ""
        right = r"\b" if phrase[-1].isalnum() else ""
        total += len(re.findall(left + re.escape(phrase) + right, lowered))
    return total


def _clip(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))


def polite(text: str) -> float:
    """Politeness in [-1, 1]: (polite phrases - rude phrases) / 2, clipped.

    Polite phrases: please, thank you, thanks, happy to help, sorry, of course, hope this
    helps, let me know. Rude phrases: obviously, "fine.", just, figure out the rest
    yourself, whatever, you should. Two more polite than rude phrases score 1; a reply
    with neither scores 0.
    """
    return _clip((_count(text, POLITE_MARKERS) - _count(text, RUDE_MARKERS)) / 2, -1.0, 1.0)


def concise(text: str) -> float:
    """Brevity in [0, 1]: ``(30 - words) / 24``, clipped; whitespace-separated words.

    At most 6 words score 1, 18 words 0.5, 30 words or more 0. An empty reply scores 0:
    it is not a concise answer, it is no answer.
    """
    words = len(text.split())
    if words == 0:
        return 0.0
    return _clip((CONCISE_ZERO - words) / (CONCISE_ZERO - CONCISE_FULL), 0.0, 1.0)


def upbeat(text: str) -> float:
    """Cheerfulness in [-1, 1]: (upbeat markers - gloomy markers) / 3, clipped.

    Upbeat markers: great, love, fun, wonderful, you've got this, good luck, hope this
    helps, enjoy, and each "!". Gloomy markers: sorry, tricky, boring, chore,
    unfortunately, long time, not hard. Three more upbeat than gloomy markers score 1.
    """
    return _clip((_count(text, UPBEAT_MARKERS) - _count(text, GLOOMY_MARKERS)) / 3, -1.0, 1.0)


SCORERS: dict[str, Callable[[str], float]] = {
    "polite": polite,
    "concise": concise,
    "upbeat": upbeat,
}
