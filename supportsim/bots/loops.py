"""Spotting a conversation that goes in circles, and one that is over.

Small models start echoing the other side after a few exchanges, so every reply is checked
against what was said before (word runs, any language). The checks that need words (a farewell,
an agent's phrases in the customer's mouth, thanks) take them from the scenario's ``checks.yaml``
(:class:`Phrases`). All checks are pure functions of text.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from supportsim.bots.scenario_files import read_yaml

DUPLICATE_THRESHOLD = 0.85
# texts are compared word by word (characters would cost seconds on long messages)
# below this many words only an identical text is a repeat ("Thanks!" after "Thank you!")
MIN_FUZZY_WORDS = 5
# copied text: runs of at least this many words shared with an earlier message
MIN_COPIED_RUN = 3
# a reply is an echo when copied text makes up this share of it (and at least MIN_COPIED_WORDS)
COPIED_SHARE_OF_REPLY = 0.6
MIN_COPIED_WORDS = 8
# ... or when it copies this share of an earlier message at least ECHOED_MESSAGE_WORDS long
# (a short line restated in a reply, "your headphones stopped working", is no echo)
COPIED_SHARE_OF_EARLIER = 0.8
ECHOED_MESSAGE_WORDS = 15
# a reply that shares this many words in a row with the bot's own stage directions copied them
MIN_COPIED_CUE_RUN = 4

_WORD = re.compile(r"[\w']+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_CLAUSE_BREAK = re.compile(r"[,;:]|\s[-\u2013\u2014]\s")
CHECKS_FILE = "checks.yaml"
PHRASE_LISTS = ("farewell", "closing_offer", "agent_voice", "thanks", "going_on", "negation")


class PhrasesError(ValueError):
    """A scenario's checks.yaml is missing or malformed."""


@dataclass(frozen=True)
class Phrases:
    """The phrases of a scenario's reply checks (its ``checks.yaml``), compiled.

    Each list holds regular expressions matched on :func:`normalise`d text, so a scenario in
    another language brings its own words and the checks stay the same code.
    """

    farewell: re.Pattern[str]
    closing_offer: re.Pattern[str]
    agent_voice: re.Pattern[str]
    thanks: re.Pattern[str]
    going_on: re.Pattern[str]
    negation: re.Pattern[str]

    @classmethod
    def load(cls, folder: Path) -> Phrases:
        """Read and compile ``checks.yaml`` of a scenario folder."""
        path = folder / CHECKS_FILE
        data = read_yaml(folder, CHECKS_FILE, PhrasesError)
        try:
            patterns = {}
            for name in PHRASE_LISTS:
                entries = [str(e) for e in data[name]]
                if not entries:
                    raise ValueError(f"{name} has no entries")
                # a farewell must close its clause; the other lists match anywhere
                end = "$" if name == "farewell" else r"\b"
                patterns[name] = re.compile(r"\b(?:" + "|".join(entries) + ")" + end)
        except (KeyError, TypeError, ValueError, re.error) as exc:
            raise PhrasesError(f"{path} is malformed: {type(exc).__name__}: {exc}") from None
        return cls(**patterns)

    def is_goodbye(self, text: str) -> bool:
        """True when `text` ends the conversation with a farewell.

        The farewell has to close the last sentence, or the one before it ("Bye! Thanks
        again."), the text must not end with a question, and the farewell must not sit in a
        negated clause, so "I don't want to say goodbye to my money" or "I'm not saying goodbye"
        do not count. Thanks alone is no farewell: the models thank the other side in the middle
        of a chat all the time.
        """
        sentences = [s.strip() for s in _SENTENCE_END.split(text.strip()) if normalise(s)]
        if not sentences or sentences[-1].endswith("?"):
            return False
        return any(self._closes_with_farewell(sentence) for sentence in sentences[-2:])

    def _closes_with_farewell(self, sentence: str) -> bool:
        if sentence.endswith("?"):
            return False
        clauses = [normalise(c) for c in _CLAUSE_BREAK.split(sentence)]
        clauses = [c for c in clauses if c]
        if not clauses:
            return False
        last = clauses[-1]
        if not self.farewell.search(last) and len(clauses) > 1 and len(last.split()) <= 3:
            # a short form of address or thanks after the farewell: "bye, Sam", "that's all"
            last = clauses[-2]
        return self.farewell.search(last) is not None and self.negation.search(last) is None

    def offers_more_help(self, text: str) -> bool:
        """True when one of the last two sentences of `text` winds the chat up: it offers
        "anything else" or more help, or answers thanks ("You're welcome, glad I could help").

        From the agent, this winds the chat up. From the customer, it is the model slipping into
        the helper's role ("If you have any other questions, let me know."): the reply is retried.
        """
        sentences = [normalise(s) for s in _SENTENCE_END.split(text.strip())]
        sentences = [s for s in sentences if s]
        return any(self.closing_offer.search(sentence) for sentence in sentences[-2:])

    def sounds_like_agent(self, text: str) -> bool:
        """True when a customer's `text` slips into the helper's role.

        Small models trained as assistants do it all the time: "How can I assist you today?",
        "Thank you for reaching out", "I'm sorry to hear about your laptop", "feel free to ask",
        or an offer of "anything else" (:meth:`offers_more_help`). The customer bot retries it.
        """
        return self.offers_more_help(text) or self.agent_voice.search(normalise(text)) is not None

    def is_closing_line(self, text: str) -> bool:
        """True when an agent's `text` winds the chat up: a farewell or "anything else?".

        The customer bot is told it may say goodbye after such a line (a small model otherwise
        echoes the offer back), and its thanks in answer to it ends the chat (:meth:`is_thanks`).
        """
        return self.is_goodbye(text) or self.offers_more_help(text)

    def is_thanks(self, text: str) -> bool:
        """True when `text` only thanks: no question, no "but" or "still", nothing negated.

        "Thank you, I appreciate your help." is thanks; "Thanks, but it still doesn't charge."
        and "Thanks. When will it arrive?" are not.
        """
        words = normalise(text)
        return (
            "?" not in text
            and self.thanks.search(words) is not None
            and self.going_on.search(words) is None
            and self.negation.search(words) is None
        )


@cache
def default_phrases() -> Phrases:
    """The phrases of the default scenario, for callers that have no scenario at hand."""
    from supportsim.bots.prompts import DEFAULT_SCENARIO, PROMPTS_ROOT

    return Phrases.load(PROMPTS_ROOT / DEFAULT_SCENARIO)


def normalise(text: str) -> str:
    """Lower-case words only: accents folded, punctuation and spacing ignored."""
    text = text.replace("\u2019", "'")
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return " ".join(_WORD.findall(folded.lower()))


def similarity(first: str, second: str) -> float:
    """How alike two texts are, from 0 (nothing shared) to 1 (same words in the same order)."""
    a, b = normalise(first).split(), normalise(second).split()
    if not a or not b:
        return 1.0 if a == b else 0.0
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def is_near_duplicate(
    reply: str, earlier_texts: Iterable[str], threshold: float = DUPLICATE_THRESHOLD
) -> bool:
    """True when `reply` repeats or echoes one of `earlier_texts`.

    Compared word by word after :func:`normalise`: an identical text; a text at least
    `threshold` similar (texts of some length only); a reply mostly copied from an earlier
    message (one of its sentences, say); or a reply that copies most of an earlier long message,
    framed by a few words of its own. A `threshold` of 0 counts every non-empty reply as a
    repeat (it forces a retry).
    """
    candidate = normalise(reply).split()
    if not candidate:
        return False
    for earlier in earlier_texts:
        previous = normalise(earlier).split()
        if not previous:
            continue
        if candidate == previous:
            return True
        if min(len(candidate), len(previous)) < MIN_FUZZY_WORDS and threshold > 0:
            continue
        matcher = difflib.SequenceMatcher(None, candidate, previous, autojunk=False)
        copied = sum(
            block.size for block in matcher.get_matching_blocks() if block.size >= MIN_COPIED_RUN
        )
        mostly_copied = copied >= max(MIN_COPIED_WORDS, COPIED_SHARE_OF_REPLY * len(candidate))
        echoes_earlier = len(
            previous
        ) >= ECHOED_MESSAGE_WORDS and copied >= COPIED_SHARE_OF_EARLIER * len(previous)
        if mostly_copied or echoes_earlier or matcher.ratio() >= threshold:
            return True
    return False


def without_copied_sentences(text: str, earlier_texts: Iterable[str]) -> str:
    """`text` without the sentences that repeat a sentence of `earlier_texts`.

    A small model often starts its reply by copying the other side's last message and then adds
    a line of its own ("The screen is blurry. You should restart it. ... Thanks for your help!").
    Only sentences of at least five words are dropped: "Thank you!" said twice is no echo. The
    separators between the kept sentences are kept as they were. Returns "" when every sentence
    was copied.
    """
    earlier = [
        sentence
        for line in earlier_texts
        for sentence in _SENTENCE_END.split(line.strip())
        if len(normalise(sentence).split()) >= MIN_FUZZY_WORDS
    ]
    return without_sentences(
        text,
        lambda sentence: (
            len(normalise(sentence).split()) >= MIN_FUZZY_WORDS
            and is_near_duplicate(sentence, earlier)
        ),
    )


def without_cue_sentences(text: str, cue: str) -> str:
    """`text` without the sentences that copy words of the stage direction `cue`.

    The 1.5B model sometimes ends a sensible reply with a line of its prompt ("... Do not repeat
    anything already said in this chat."). A sentence that shares a run of
    :data:`MIN_COPIED_CUE_RUN` words with `cue` is dropped (:func:`copies_words_of`). Returns ""
    when every sentence copies the cue.
    """
    return without_sentences(text, lambda sentence: copies_words_of(sentence, cue))


def without_sentences(text: str, dropped: Callable[[str], bool]) -> str:
    """`text` without its sentences for which `dropped` is true, separators kept as they were."""
    parts = re.split(f"({_SENTENCE_END.pattern})", text.strip())
    kept = [
        sentence + separator
        for sentence, separator in zip(parts[::2], [*parts[1::2], ""], strict=True)
        if not dropped(sentence)
    ]
    return "".join(kept).strip()


def copies_words_of(text: str, source: str, run: int = MIN_COPIED_CUE_RUN) -> bool:
    """True when `text` contains a run of at least `run` consecutive words of `source`.

    The bots use it to spot a reply that parrots the stage direction it was given ("Thank Sam
    and say goodbye.").
    """
    a, b = normalise(text).split(), normalise(source).split()
    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    return any(block.size >= run for block in matcher.get_matching_blocks())


def is_goodbye(text: str) -> bool:
    """:meth:`Phrases.is_goodbye` with the default scenario's phrases."""
    return default_phrases().is_goodbye(text)


def offers_more_help(text: str) -> bool:
    """:meth:`Phrases.offers_more_help` with the default scenario's phrases."""
    return default_phrases().offers_more_help(text)


def sounds_like_agent(text: str) -> bool:
    """:meth:`Phrases.sounds_like_agent` with the default scenario's phrases."""
    return default_phrases().sounds_like_agent(text)


def is_closing_line(text: str) -> bool:
    """:meth:`Phrases.is_closing_line` with the default scenario's phrases."""
    return default_phrases().is_closing_line(text)


def is_thanks(text: str) -> bool:
    """:meth:`Phrases.is_thanks` with the default scenario's phrases."""
    return default_phrases().is_thanks(text)
