"""Spotting a conversation that goes in circles, and one that is over.

Small models start echoing the other side after a few exchanges (measured with the 1.5B model:
after 3-4 exchanges), so every reply is checked against what was said before. Both checks are pure
functions of text.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from collections.abc import Callable, Iterable

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
_NEGATION = re.compile(r"\b(?:not|never|cannot|without|before|until)\b|n't\b")
_FAREWELL = re.compile(
    r"""\b(?:
        good[\s-]?bye
      | bye(?:[\s-]bye)?(?:\s+(?:now|for\s+now))?
      | farewell
      | take\s+care
      | see\s+you(?:\s+(?:later|soon|around))?
      | talk\s+(?:to\s+you\s+)?(?:later|soon)
      | have\s+a\s+(?:nice|good|great|lovely|wonderful|pleasant|fantastic)
            (?:\s+(?:rest\s+of\s+(?:the|your)\s+)?(?:day|evening|night|weekend|week|one|trip|flight))?
      | (?:that's|that\s+is|that\s+was)\s+all(?:\s+(?:for\s+now|i\s+needed|i\s+need))?
    )$""",
    re.VERBOSE,
)
# an agent's offer to close: "Is there anything else I can help you with?"
_CLOSING_OFFER = re.compile(
    r"""\b(?:
        (?:is\s+there\s+)?anything\s+else
      | any(?:thing)?\s+(?:other|more|further)\s+(?:questions?|issues?|concerns?|help|problems?)
      | (?:other|more|further)\s+(?:questions?|concerns?|assistance)
    )\b""",
    re.VERBOSE,
)
# what a support agent says and a customer does not: "How can I assist you?", "Thank you for
# reaching out", "I'm sorry to hear about your laptop"; matched on normalised text
_AGENT_SPEAK = re.compile(
    r"""\b(?:
        how\s+(?:can|may|could)\s+i\s+(?:help|assist)
      | (?:i'm|i\s+am|we're|we\s+are)\s+(?:here|happy|glad|always\s+here)\s+to\s+(?:help|assist)
      | (?:i'll|i\s+will|we'll|we\s+will)\s+do\s+(?:my|our)\s+best\s+to\s+(?:help|assist)
      | thank(?:s|\s+you)\s+for\s+(?:contacting|reaching\s+out|choosing)
      | sorry\s+to\s+hear\s+(?:that\s+)?(?:about\s+)?your
      | i\s+understand\s+your\s+frustration
      | feel\s+free\s+to\s+(?:ask|reach\s+out|contact)
      | don't\s+hesitate\s+to
      | so\s+(?:that\s+)?i\s+can\s+(?:help|assist)\s+you
      | (?:can't|cannot)\s+assist\s+with
      | as\s+an\s+ai
    )\b""",
    re.VERBOSE,
)
_THANKS = re.compile(r"\b(?:thank|thanks|thankful|appreciate|appreciated|grateful)\b")
# words that carry on a complaint after the thanks
_GOING_ON = re.compile(r"\b(?:but|still|however|yet|although|though|unfortunately)\b")


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
    return _without_sentences(
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
    return _without_sentences(text, lambda sentence: copies_words_of(sentence, cue))


def _without_sentences(text: str, dropped: Callable[[str], bool]) -> str:
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
    """True when `text` ends the conversation with a farewell.

    The farewell has to close the last sentence, or the one before it ("Bye! Thanks again."),
    the text must not end with a question, and the farewell must not sit in a negated clause, so
    "I don't want to say goodbye to my money" or "I'm not saying goodbye" do not count. Thanks
    alone is no farewell: the models thank the other side in the middle of a chat all the time.
    """
    sentences = [s.strip() for s in _SENTENCE_END.split(text.strip()) if normalise(s)]
    if not sentences or sentences[-1].endswith("?"):
        return False
    return any(_closes_with_farewell(sentence) for sentence in sentences[-2:])


def _closes_with_farewell(sentence: str) -> bool:
    if sentence.endswith("?"):
        return False
    clauses = [normalise(c) for c in _CLAUSE_BREAK.split(sentence)]
    clauses = [c for c in clauses if c]
    if not clauses:
        return False
    last = clauses[-1]
    if not _FAREWELL.search(last) and len(clauses) > 1 and len(last.split()) <= 3:
        # a short form of address or thanks after the farewell: "bye, Sam", "that's all, thanks"
        last = clauses[-2]
    return _FAREWELL.search(last) is not None and _NEGATION.search(last) is None


def offers_more_help(text: str) -> bool:
    """True when one of the last two sentences of `text` offers "anything else" or more help.

    From the agent, this winds the chat up. From the customer, it is the model slipping into the
    helper's role ("If you have any other questions, let me know."): the reply is retried.
    """
    sentences = [normalise(s) for s in _SENTENCE_END.split(text.strip())]
    sentences = [s for s in sentences if s]
    return any(_CLOSING_OFFER.search(sentence) for sentence in sentences[-2:])


def sounds_like_agent(text: str) -> bool:
    """True when a customer's `text` slips into the helper's role.

    Small models trained as assistants do it all the time: "How can I assist you today?", "Thank
    you for reaching out", "I'm sorry to hear about your laptop", "feel free to ask", or an offer
    of "anything else" (:func:`offers_more_help`). The customer bot retries such a reply.
    """
    return offers_more_help(text) or _AGENT_SPEAK.search(normalise(text)) is not None


def is_closing_line(text: str) -> bool:
    """True when an agent's `text` winds the chat up: a farewell, or an offer of "anything else".

    The customer bot is told it may say goodbye after such a line (a small model otherwise echoes
    the offer back), and its thanks in answer to it ends the chat (:func:`is_thanks`).
    """
    return is_goodbye(text) or offers_more_help(text)


def is_thanks(text: str) -> bool:
    """True when `text` only thanks: no question, no "but" or "still", nothing negated.

    "Thank you, I appreciate your help." is thanks; "Thanks, but it still doesn't charge." and
    "Thanks. When will it arrive?" are not.
    """
    words = normalise(text)
    return (
        "?" not in text
        and _THANKS.search(words) is not None
        and _GOING_ON.search(words) is None
        and _NEGATION.search(words) is None
    )
