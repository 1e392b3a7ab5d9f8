"""Reward functions that judge a reply's text with established, model-free measures.

They score the real demo (docs/demo.md) and any family whose objectives are tone or
length; none was tuned on the demo's replies.

- ``vader.compound``: the compound sentiment score of VADER (Hutto and Gilbert, ICWSM
  2014; the ``vaderSentiment`` package), in [-1, 1]: how upbeat a reply reads.
- ``text.brevity``: minus the number of words (whitespace-separated) in the reply: the
  shorter the reply, the higher.
- ``text.politeness``: the number of politeness markers in the reply, per the positive
  strategies of Danescu-Niculescu-Mizil et al., "A computational approach to
  politeness" (ACL 2013): gratitude (thank, thanks, appreciate, grateful), the word
  please, apologies (sorry, apologise/apologize, pardon, excuse me), indirect requests
  (would you, could you, would you mind), deference and greetings (kindly, glad to,
  happy to, my pleasure, you're welcome, dear, hello, hi). Each occurrence counts once,
  matched case-insensitively on word boundaries.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

__all__ = ["POLITENESS_MARKERS", "TEXT_REWARDS", "brevity", "politeness", "vader_compound"]

POLITENESS_MARKERS = (
    r"thank(s| you)?",
    r"appreciated?",
    r"grateful",
    r"please",
    r"sorry",
    r"apologi[sz]e",
    r"pardon",
    r"excuse me",
    r"would you( mind)?",
    r"could you",
    r"kindly",
    r"glad to",
    r"happy to",
    r"my pleasure",
    r"you'?re welcome",
    r"dear",
    r"hello",
    r"hi",
)
_POLITE = re.compile(r"\b(?:" + "|".join(POLITENESS_MARKERS) + r")\b", re.IGNORECASE)


@cache
def _analyzer() -> Any:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader_compound(text: str) -> float:
    return float(_analyzer().polarity_scores(text)["compound"])


def brevity(text: str) -> float:
    return -float(len(text.split()))


def politeness(text: str) -> float:
    return float(len(_POLITE.findall(text)))


def _per_reply(score: Callable[[str], float]) -> Callable[[], Any]:
    def factory() -> Callable[[Sequence[str], Sequence[str]], list[float]]:
        def reward(prompts: Sequence[str], replies: Sequence[str]) -> list[float]:
            return [score(reply) for reply in replies]

        return reward

    return factory


# builtin name -> a factory of its reward function (rewards.BUILTINS includes these)
TEXT_REWARDS: dict[str, Callable[[], Any]] = {
    "vader.compound": _per_reply(vader_compound),
    "text.brevity": _per_reply(brevity),
    "text.politeness": _per_reply(politeness),
}
