"""The demo corpus: a small grammar of short assistant replies to short user requests.

A request names one everyday task ("How do I keep houseplants healthy?"); a reply is

    [opener] tip [, and tip] [. tip] [remark] [closer]

where the tips carry the content and the opener, remark and closer carry the *tone*.
Each tone slot is drawn independently, so the reference model sees every mix of
polite / rude, upbeat / gloomy, short / long replies, and the three attributes of
``scorers.py`` vary within the replies to any one prompt. That variation is what the
reward-weighted fine-tunes (``train.py``) tilt: they never see text outside this
grammar, they only re-weight it.

The conflict between attributes is built in: every polite or upbeat phrase costs
words (so ``concise`` pulls against both), and the apologetic phrases ("Sorry, this
can be tricky.") are polite but gloomy (so ``polite`` and ``upbeat`` partly disagree).

Prompts are split deterministically: about one (task, request template) pair in six
is *held out*: never used to train the reference nor to sample for the fine-tunes;
``bench/demo_eval.py`` evaluates on those.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

# (verb phrase after "to", noun phrase for "tips for ...", tips as imperative clauses)
# fmt: off
TASKS: list[tuple[str, str, list[str]]] = [
    ("keep houseplants healthy", "houseplants", [
        "water them once a week", "give them plenty of light",
        "check the soil before you water", "wipe the dust off the leaves",
    ]),
    ("bake better bread", "baking bread", [
        "let the dough rise slowly", "use a hot oven", "weigh the flour", "add a pinch of salt",
    ]),
    ("sleep better", "better sleep", [
        "go to bed at the same time every night", "keep the room dark and cool",
        "put the phone away an hour before bed", "skip coffee after lunch",
    ]),
    ("start running", "new runners", [
        "start with short easy runs", "buy a good pair of shoes", "rest one day between runs",
        "walk when you need to",
    ]),
    ("study for an exam", "exam study", [
        "make a plan for each day", "test yourself with old questions", "study in short blocks",
        "sleep well the night before",
    ]),
    ("save money", "saving money", [
        "write down what you spend", "set a small goal each month", "cook at home more often",
        "move some money to savings on payday",
    ]),
    ("learn the guitar", "guitar practice", [
        "practice a little every day", "learn three easy chords first", "play songs you like",
        "keep the guitar in tune",
    ]),
    ("clean the kitchen", "a clean kitchen", [
        "wash the dishes right after dinner", "wipe the counters every night",
        "clean the fridge once a month", "take out the trash often",
    ]),
    ("write a good essay", "essay writing", [
        "start with a clear outline", "write one idea per paragraph", "read the draft out loud",
        "cut the words you do not need",
    ]),
    ("give a talk", "public speaking", [
        "practice in front of a friend", "speak slowly", "know your first line by heart",
        "look at the people in the room",
    ]),
    ("make good coffee", "better coffee", [
        "grind the beans fresh", "use clean water", "weigh the coffee",
        "keep the beans in a dark jar",
    ]),
    ("pack for a trip", "packing", [
        "make a list the day before", "roll your clothes", "pack light",
        "keep your papers in one bag",
    ]),
    ("learn a new language", "language learning", [
        "learn ten new words a day", "talk with a partner", "watch shows in that language",
        "read short stories out loud",
    ]),
    ("stay focused at work", "focus", [
        "turn off the alerts on your phone", "work in short blocks", "do the hard task first",
        "take a short walk at noon",
    ]),
    ("cook rice", "cooking rice", [
        "rinse the rice first", "use two cups of water for one cup of rice", "keep the lid on",
        "let it rest for five minutes",
    ]),
    ("prepare for a job interview", "job interviews", [
        "read about the company", "practice your answers out loud",
        "prepare two questions to ask", "arrive ten minutes early",
    ]),
    ("paint a room", "painting a room", [
        "cover the floor first", "tape the edges", "use two thin coats",
        "open a window while you work",
    ]),
    ("take care of a cat", "cat care", [
        "give it fresh water every day", "clean the litter box often",
        "play with it every evening", "take it to the vet once a year",
    ]),
    ("train a puppy", "puppy training", [
        "reward good behavior right away", "keep lessons short",
        "use the same words every time", "take it outside often",
    ]),
    ("start a vegetable garden", "a first garden", [
        "pick a sunny spot", "start with easy plants", "water in the morning",
        "pull the weeds every week",
    ]),
    ("back up my files", "backups", [
        "copy your files to an external drive", "keep one copy in the cloud",
        "back up once a week", "test that you can restore a file",
    ]),
    ("fix a flat bike tire", "flat tires", [
        "find the hole in the tube", "patch it or use a new tube", "check the tire for glass",
        "pump it to the right pressure",
    ]),
    ("start meditating", "meditation", [
        "sit still for five minutes a day", "focus on your breath", "use a timer",
        "be kind to yourself when your mind wanders",
    ]),
    ("drink more water", "drinking water", [
        "carry a bottle with you", "drink a glass with every meal",
        "set a reminder on your phone", "add a slice of lemon",
    ]),
    ("make new friends", "making friends", [
        "join a club or a class", "say yes to invitations", "ask people questions",
        "keep in touch with a short message",
    ]),
    ("write a clear email", "emails", [
        "put the main point first", "keep it short", "use a clear subject line",
        "read it once before you send it",
    ]),
    ("read more books", "reading more", [
        "read for ten minutes before bed", "carry a book with you", "pick books you enjoy",
        "join a book club",
    ]),
    ("organize my desk", "a tidy desk", [
        "clear everything off first", "keep only what you use daily", "use a tray for papers",
        "tidy up at the end of each day",
    ]),
    ("learn to draw", "drawing", [
        "draw a little every day", "start with simple shapes", "copy drawings you like",
        "carry a small sketchbook",
    ]),
    ("take better photos", "photography", [
        "use natural light", "keep the camera steady", "get closer to your subject",
        "take many shots and keep the best",
    ]),
]
# fmt: on

# Request templates: {vp} is the task's verb phrase, {np} its noun phrase.
REQUESTS: list[str] = [
    "How do I {vp}?",
    "Can you help me {vp}?",
    "Any tips for {np}?",
    "What is the best way to {vp}?",
    "I want to {vp}. Where do I start?",
    "Please tell me how to {vp}.",
]

# Tone slots. Each phrase's attribute markers are what scorers.py counts.
OPENERS: list[str] = [
    "",
    "",
    "Sure.",
    "Okay.",
    "Here is what works.",
    "Of course, I would be happy to help.",  # polite
    "Thank you for asking.",  # polite
    "Sure, happy to help.",  # polite
    "Great question!",  # upbeat
    "Oh, I love this one!",  # upbeat
    "Sorry, this can be tricky.",  # polite, gloomy
    "Well, obviously.",  # rude
    "Fine.",  # rude
]
TIP_LEADS: list[str] = ["", "", "", "try to ", "please ", "you should ", "just "]
REMARKS: list[str] = [
    "",
    "",
    "",
    "It is really fun!",  # upbeat
    "You will do great!",  # upbeat
    "It is a wonderful habit!",  # upbeat
    "It can be boring at first.",  # gloomy
    "Honestly, it is a bit of a chore.",  # gloomy
    "Unfortunately, it takes a long time.",  # gloomy
    "It is not hard.",
]
CLOSERS: list[str] = [
    "",
    "",
    "",
    "Hope this helps!",  # polite, upbeat
    "Please let me know if you need anything else.",  # polite
    "Thanks for asking.",  # polite
    "Good luck, you've got this!",  # upbeat
    "That is all.",
    "Figure out the rest yourself.",  # rude
    "Whatever works for you.",  # rude
]

HELDOUT_EVERY = 6  # one (task, template) pair in HELDOUT_EVERY is held out


@dataclass(frozen=True)
class Prompt:
    """A user request and the task it asks about."""

    text: str
    task: int  # index into TASKS
    heldout: bool  # never used for training; the demo's evaluation prompts


def _is_heldout(task: int, template: int) -> bool:
    key = f"{TASKS[task][0]}|{REQUESTS[template]}".encode()
    return zlib.crc32(key) % HELDOUT_EVERY == 0


def all_prompts() -> list[Prompt]:
    """Every request the grammar can make, in a fixed order, each marked held out or not."""
    prompts = []
    for task, (vp, np_, _tips) in enumerate(TASKS):
        for template, request in enumerate(REQUESTS):
            prompts.append(Prompt(request.format(vp=vp, np=np_), task, _is_heldout(task, template)))
    return prompts


def train_prompts() -> list[Prompt]:
    return [p for p in all_prompts() if not p.heldout]


def heldout_prompts() -> list[Prompt]:
    """The evaluation prompts: (task, template) pairs no model was trained on."""
    return [p for p in all_prompts() if p.heldout]


def _sentence(clause: str) -> str:
    return clause[0].upper() + clause[1:]


def sample_reply(task: int, rng: random.Random) -> str:
    """One reply to a request about ``TASKS[task]``, tone slots drawn independently."""
    tips = rng.sample(TASKS[task][2], k=rng.choice([1, 1, 2, 2, 3]))
    body = rng.choice(TIP_LEADS) + tips[0]
    if len(tips) >= 2:
        body += ", and " + tips[1]
    sentences = [_sentence(body) + rng.choice([".", ".", "!"])]
    if len(tips) == 3:
        sentences.append(_sentence(rng.choice(["", "also "]) + tips[2]) + ".")
    parts = [rng.choice(OPENERS), *sentences, rng.choice(REMARKS), rng.choice(CLOSERS)]
    return " ".join(p for p in parts if p)


def sample_dialogues(n: int, rng: random.Random) -> list[tuple[str, str]]:
    """``n`` (request, reply) pairs over the training prompts only."""
    prompts = train_prompts()
    pairs = []
    for _ in range(n):
        prompt = rng.choice(prompts)
        pairs.append((prompt.text, sample_reply(prompt.task, rng)))
    return pairs
